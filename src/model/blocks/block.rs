//! One decoder block: attention, then a dense or MoE feed-forward sublayer.

use anyhow::Result;
use candle_core::Tensor;

use super::{Attention, AttentionOutput, Ffn, KvSlot, MoeBlock, PassContext};
use crate::model::forward::RoutingConfig;
use crate::model::trace::ForwardTrace;

/// The feed-forward half of a block.
pub enum BlockFfn {
    /// A dense FFN.
    Dense(Ffn),
    /// Router and experts.
    Moe(Box<MoeBlock>),
}

/// A pre-norm decoder block.
pub struct Block {
    attention: Attention,
    ffn: BlockFfn,
}

impl Block {
    /// Attention followed by `ffn`.
    pub fn new(attention: Attention, ffn: BlockFfn) -> Self {
        Self { attention, ffn }
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
        let AttentionOutput { hidden, working } =
            self.attention
                .forward(x, pass, cache, &mut trace.blocks[layer])?;
        let out = match &self.ffn {
            BlockFfn::Dense(ffn) => ffn.forward(hidden, &mut trace.blocks[layer])?,
            BlockFfn::Moe(moe) => moe.forward(hidden, layer, routing, trace)?,
        };
        // Only now: see `AttentionOutput::working`.
        drop(working);
        Ok(out)
    }
}
