//! One decoder block: attention, then a dense or MoE feed-forward sublayer.

use anyhow::Result;
use candle_core::Tensor;

use super::{Attention, AttentionOutput, Ffn, KvSlot, LatentAttention, MoeBlock, PassContext};
use crate::model::forward::RoutingConfig;
use crate::model::trace::ForwardTrace;

/// The feed-forward half of a block.
pub enum BlockFfn {
    /// A dense FFN.
    Dense(Ffn),
    /// Router and experts.
    Moe(Box<MoeBlock>),
}

/// The attention half of a block.
pub enum BlockAttention {
    /// Multi-head (grouped-query) attention.
    Multi(Attention),
    /// Multi-head latent attention (DeepSeek).
    Latent(LatentAttention),
}

impl From<Attention> for BlockAttention {
    fn from(a: Attention) -> Self {
        BlockAttention::Multi(a)
    }
}

impl From<LatentAttention> for BlockAttention {
    fn from(a: LatentAttention) -> Self {
        BlockAttention::Latent(a)
    }
}

/// A pre-norm decoder block.
pub struct Block {
    attention: BlockAttention,
    ffn: BlockFfn,
}

impl Block {
    /// Attention (either kind) followed by `ffn`.
    pub fn new(attention: impl Into<BlockAttention>, ffn: BlockFfn) -> Self {
        Self {
            attention: attention.into(),
            ffn,
        }
    }

    /// The attention half.
    pub fn attention(&self) -> &BlockAttention {
        &self.attention
    }

    /// The feed-forward half.
    pub fn ffn(&self) -> &BlockFfn {
        &self.ffn
    }

    /// The MoE sublayer, if this block has one.
    pub fn moe(&self) -> Option<&MoeBlock> {
        match &self.ffn {
            BlockFfn::Moe(moe) => Some(moe),
            BlockFfn::Dense(_) => None,
        }
    }

    /// Runs block `layer` on `x` = [batch * seq, d], filling `trace.blocks[layer]` (and, for a MoE
    /// block, its routing slot).
    pub fn forward(
        &self,
        x: Tensor,
        layer: usize,
        pass: &PassContext,
        cache: Option<&mut KvSlot>,
        routing: &RoutingConfig,
        trace: &mut ForwardTrace,
    ) -> Result<Tensor> {
        let timing = &mut trace.blocks[layer];
        let AttentionOutput { hidden, working } = match &self.attention {
            BlockAttention::Multi(a) => a.forward(x, pass, cache, timing)?,
            BlockAttention::Latent(a) => a.forward(x, pass, cache, timing)?,
        };
        let out = match &self.ffn {
            BlockFfn::Dense(ffn) => ffn.forward(hidden, &mut trace.blocks[layer])?,
            BlockFfn::Moe(moe) => moe.forward(hidden, layer, routing, trace)?,
        };
        // Only now: see `AttentionOutput::working`.
        drop(working);
        Ok(out)
    }
}
