//! xmoe-top: run an XMoE (threshold-routed Mixture-of-Experts) model and see its router at work.
//!
//! Data flows one way: [`model`] (format, loading, forward) produces a
//! [`model::trace::ForwardTrace`] per pass; [`routing`] is the pure policy code the model calls;
//! [`profiling`] turns traces into statistics, FLOP figures and immutable snapshots; [`session`]
//! runs the model on its own thread over a [`workload`] and publishes those snapshots; [`gpu`]
//! samples device counters; [`kernel`] is the CPU expert layer; [`report`] renders reports, the
//! headless summary and routing traces (the sweep driver lives in [`session::sweep`]); [`units`]
//! formats numbers for every output and [`atomic_file`] writes every file.

// Every `unsafe` block says why it is sound (`// SAFETY:`); CI runs clippy with -D warnings.
#![warn(clippy::undocumented_unsafe_blocks)]

// Lets the test fixtures shared with tests/ name this crate `xmoe_top` from inside it too.
#[cfg(test)]
extern crate self as xmoe_top;

pub mod atomic_file;
pub mod bench;
pub mod cli;
pub mod embedded;
pub mod gpu;
pub mod import;
pub mod input_file;
pub mod inspect;
pub mod kernel;
pub mod model;
pub mod moefy;
pub mod profiling;
pub mod record;
pub mod report;
pub mod routing;
pub mod session;
pub mod signals;
pub mod train;
pub mod tui;
pub mod units;
pub mod workload;
