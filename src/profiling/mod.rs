//! Profiling: forward traces, FLOP accounting, statistics.

pub mod flops;
pub mod trace;
