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

/// Runs `f` on a thread of the rayon pool, the calling thread waiting, and returns its result.
///
/// For a thread that runs the model (the session thread, `bench`, `sweep`, `tune`): the kernels'
/// rayon splits and candle's `gemm` then run on the pool's own threads, with the model's thread
/// one of them. Called from outside the pool, a split keeps the caller busy beside the pool's
/// threads, three threads on two cores: on the pool, olmoe-d1024's eval ran 1.02-1.19x faster
/// (medians) and the monitor's passes of the embedded model 1.2-1.3x (docs/benchmarks.md, "The
/// model's thread on the pool"). From a pool thread a split also costs about 1 us instead of
/// about 6, so the lean decoder splits a step's smaller products too (`kernel::split`).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
