//! Profiling: FLOP accounting, statistics and the snapshots views read.

// The library's unit tests share the integration tests' fixtures (see that file's header).
pub mod compare;
#[cfg(test)]
#[path = "../../tests/common/fixtures.rs"]
pub mod fixtures;
pub mod flops;
pub mod snapshot;
pub mod stats;
pub mod sweep;
