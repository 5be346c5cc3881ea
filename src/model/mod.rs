//! The model: configuration, file format and loading, forward pass.

pub mod config;
pub mod device;
pub mod format;
pub mod forward;
pub mod moe;
pub mod synth;

pub use device::DeviceChoice;
pub use format::{LoadError, ModelFile};
pub use forward::{KvCache, Model, ParamCounts, RoutingConfig};
pub use moe::{LoadOptions, MoeDispatch};
