//! The model: configuration, file format and loading, the building blocks and the architectures
//! that assemble them, the forward pass and the trace it fills.

pub mod arch;
pub mod blocks;
pub mod config;
pub mod decode;
pub mod device;
pub mod format;
pub mod forward;
pub mod gguf;
pub mod hf;
pub mod moe;
pub mod quant;
pub mod source;
pub mod synth;
pub mod trace;

pub use decode::DecodePath;
pub use device::DeviceChoice;
pub use format::{LoadError, ModelFile};
pub use forward::{KvCache, Model, ModelParts, ParamCounts, RoutingConfig};
pub use moe::{ExpertStorage, ExpertWeights, LoadOptions, MoeDispatch};
pub use source::ModelSource;
