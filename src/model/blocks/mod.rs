//! The building blocks a model is assembled from. Each owns its weights and has a `forward` that
//! fills its part of the [`ForwardTrace`](super::trace::ForwardTrace); none knows a tensor name,
//! so an architecture file under [`super::arch`] can build them from any naming scheme.

pub mod attention;
pub mod block;
pub mod embedding;
pub mod ffn;
pub mod linear;
pub mod mla;
pub mod moe_block;
pub mod norm;

use std::time::Instant;

use candle_core::Device;

pub use attention::{
    Attention, AttentionOutput, AttentionParts, KvSlot, PassContext, QkNorm, Rotary, Yarn,
};
pub use block::{Block, BlockAttention, BlockFfn};
pub use embedding::Embedding;
pub use ffn::Ffn;
pub use linear::{Linear, LinearWeight};
pub use mla::{LatentAttention, LatentKv, LatentParts, LatentQuery, LatentView};
pub use moe_block::{MoeBlock, MoeParts, SharedExpert};
pub use norm::Norm;

/// The values of a contiguous CPU tensor's storage as `T` (`None` for another device, dtype or
/// a strided layout).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<&'a [T]> {
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (storage, layout.contiguous_offsets())
    else {
        return None;
    };
    cpu.as_slice::<T>().ok().map(|s| &s[start..end])
}

/// Nanoseconds since `since`, counting the device work queued meanwhile.
pub(crate) fn elapsed_ns(since: Instant, device: &Device) -> candle_core::Result<u64> {
    // GPU work is asynchronous: wait for it so that the time belongs to this part.
    if !device.is_cpu() {
        device.synchronize()?;
    }
    Ok(since.elapsed().as_nanos() as u64)
}

/// The largest `|a - b|` over two tensors of one shape (for tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("two f32 tensors of one shape")
}
