//! Test harness for Sluice: helpers that start real brokers (in-process and as child
//! processes), bound every wait, and kill what they started.

pub mod binaries;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod history;
pub mod process;
