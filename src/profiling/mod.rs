//! Profiling: forward traces, FLOP accounting, statistics and the snapshots views read.

pub mod fixtures;
pub mod flops;
pub mod snapshot;
pub mod stats;
pub mod summary;
pub mod trace;
