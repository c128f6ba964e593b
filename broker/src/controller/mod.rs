//! The metadata controller: brokers form one Raft group (raft-rs) whose replicated
//! state machine holds the cluster metadata. This module holds the consensus core; the
//! broker does not run it yet.

pub mod node;
pub mod store;
