//! Topics: their configuration, their persisted metadata, and the task that owns both.

pub mod config;
pub mod manager;
pub mod registry;
