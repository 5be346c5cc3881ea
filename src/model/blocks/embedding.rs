//! Token embeddings, plus a learned position table for models that have one.

use candle_core::Tensor;

use super::PassContext;

/// A token table: a tensor in its stored dtype, or kept quantised (GGUF).
enum Table {
    Tensor(Tensor),
    Quant(std::sync::Arc<crate::model::quant::QuantMatrix>),
}

/// The input embeddings.
pub struct Embedding {
    /// [vocab, d].
    tokens: Table,
    /// [max_seq_len, d], added to the token embeddings (learned positions only).
    positions: Option<Tensor>,
}

impl Embedding {
    /// A token table `[vocab, d]` and an optional position table `[max_seq_len, d]`.
    pub fn new(tokens: Tensor, positions: Option<Tensor>) -> Self {
        Self {
            tokens: Table::Tensor(tokens),
            positions,
        }
    }

    /// A quantised token table `[vocab, d]`: only the rows a pass looks up are dequantised.
    pub fn quantized(table: std::sync::Arc<crate::model::quant::QuantMatrix>) -> Self {
        Self {
            tokens: Table::Quant(table),
            positions: None,
        }
    }

    /// The token table, for models whose LM head is tied to it (`None` when it is quantised).
    pub fn token_table(&self) -> Option<&Tensor> {
        match &self.tokens {
            Table::Tensor(t) => Some(t),
            Table::Quant(_) => None,
        }
    }

    /// The learned position table `[max_seq_len, d]`, if the model has one.
    pub fn position_table(&self) -> Option<&Tensor> {
        self.positions.as_ref()
    }

    /// `ids` = the pass's `batch * seq` token ids -> [batch * seq, d].
    pub fn forward(&self, ids: &Tensor, pass: &PassContext) -> candle_core::Result<Tensor> {
        // Half-precision tables stay half in memory; the rows a pass uses are widened to f32.
        let x = match &self.tokens {
            Table::Tensor(t) => t.index_select(ids, 0)?.to_dtype(candle_core::DType::F32)?,
            Table::Quant(q) => q.lookup(ids)?,
        };
        match &self.positions {
            Some(table) => {
                let (n, d) = x.dims2()?;
                let pos = table.narrow(0, pass.start_pos, pass.seq)?; // [seq, d]
                x.reshape((pass.batch, pass.seq, d))?
                    .broadcast_add(&pos)?
                    .reshape((n, d))
            }
            None => Ok(x),
        }
    }
}
