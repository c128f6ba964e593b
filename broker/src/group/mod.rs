//! Consumer groups: the assignors, the coordinator, and committed offsets.

pub mod assignor;
pub mod coordinator;
pub mod offsets;

pub use coordinator::{CoordinatorConfig, GroupCoordinator};
