//! What one forward pass reports besides logits: plain data, reused across passes.

use crate::routing::{ExpertGroups, Routing};

/// Wall time of one block, split by part, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockTiming {
    /// Norm + attention (projections, scores, output projection).
    pub attention_ns: u64,
    /// Router logits and routing policy (MoE blocks only).
    pub router_ns: u64,
    /// Expert compute (MoE blocks) or the dense FFN (dense blocks), norm included.
    pub ffn_ns: u64,
}

/// Routing of one MoE block for every token of the pass.
#[derive(Clone, Debug, Default)]
pub struct MoeLayerTrace {
    /// Block index in the model.
    pub layer: usize,
    /// Selections, weights, probabilities, top-1 and dropped pairs for each token.
    pub routing: Routing,
    /// The kept pairs grouped by expert: exactly the rows each expert computed.
    pub groups: ExpertGroups,
}

/// The trace of one forward pass.
#[derive(Clone, Debug, Default)]
pub struct ForwardTrace {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence in this pass.
    pub seq_len: usize,
    /// Position of the first token of each sequence (non-zero when decoding with a KV cache).
    pub start_pos: usize,
    /// One entry per block.
    pub blocks: Vec<BlockTiming>,
    /// One entry per MoE block, in block order.
    pub moe: Vec<MoeLayerTrace>,
    /// Embeddings, final norm and LM head.
    pub head_ns: u64,
    /// Whole forward pass.
    pub total_ns: u64,
    /// True when the lean decode path ran this pass (`model::decode`), false for candle.
    pub lean_decode: bool,
}

impl ForwardTrace {
    /// Tokens (rows) in the pass: batch x seq_len. Token `i` is sequence `i / seq_len`,
    /// position `start_pos + i % seq_len`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// Number of keys token `i` attends over (its position + 1).
    pub fn context_of(&self, i: usize) -> usize {
        self.start_pos + i % self.seq_len.max(1) + 1
    }

    /// Resets the trace for a new pass, keeping every buffer.
    pub fn begin(&mut self, batch: usize, seq_len: usize, start_pos: usize, n_blocks: usize) {
        self.batch = batch;
        self.seq_len = seq_len;
        self.start_pos = start_pos;
        self.blocks.clear();
        self.blocks.resize(n_blocks, BlockTiming::default());
        self.head_ns = 0;
        self.total_ns = 0;
        self.lean_decode = false;
    }

    /// The trace slot of the `slot`-th MoE block (grown on first use; buffers kept).
    pub fn moe_slot(&mut self, slot: usize, layer: usize) -> &mut MoeLayerTrace {
        if self.moe.len() <= slot {
            self.moe.resize_with(slot + 1, MoeLayerTrace::default);
        }
        let t = &mut self.moe[slot];
        t.layer = layer;
        t
    }
}
