//! xmoe-top: run an XMoE (threshold-routed Mixture-of-Experts) model and see its router at work.
//!
//! Data flows one way: [`model`] (format, loading, forward) produces a
//! [`profiling::trace::ForwardTrace`] per pass; [`routing`] is the pure policy code the model calls;
//! [`profiling`] turns traces into statistics and FLOP figures; [`report`] writes them out
//! (reports, threshold sweeps, routing traces).

pub mod cli;
pub mod inspect;
pub mod model;
pub mod profiling;
pub mod report;
pub mod routing;
