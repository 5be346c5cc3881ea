//! The model: configuration, file format and loading, forward pass.

pub mod config;
