//! The model: embeddings, then its blocks in order, then the final norm and LM head. Which blocks
//! and from which tensors is an architecture file's business ([`super::arch`]).

use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};

use super::arch;
use super::blocks::{Block, Embedding, KvSlot, Linear, MoeBlock, Norm, PassContext, elapsed_ns};
use super::config::{ModelConfig, NormKind, PositionKind, QkNormKind};
use super::decode::{DecodePath, LeanDecoder, LeanState};
use super::format::{LoadError, ModelFile};
use super::moe::LoadOptions;
use super::source::ModelSource;
use super::trace::ForwardTrace;
use crate::routing::{CapacityFactor, CheckedPolicy, RoutingError, RoutingPolicy};

/// The routing in force: one checked policy per MoE layer and an optional checked capacity
/// factor. Built only through [`RoutingConfig::new`] (or [`RoutingConfig::uniform`]), which check
/// every value, so [`Model::forward`] and the router take it as it is.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    policies: Vec<CheckedPolicy>,
    capacity_factor: Option<CapacityFactor>,
}

impl RoutingConfig {
    /// `policies` (one per MoE layer, in block order) and an optional capacity factor, each
    /// checked against layers of `n_experts` experts.
    pub fn new(
        policies: &[RoutingPolicy],
        capacity_factor: Option<f32>,
        n_experts: usize,
    ) -> Result<Self, RoutingError> {
        Ok(Self {
            policies: policies
                .iter()
                .map(|p| p.check(n_experts))
                .collect::<Result<_, _>>()?,
            capacity_factor: CapacityFactor::optional(capacity_factor)?,
        })
    }

    /// The same policy on every one of `n_moe` layers of `n_experts` experts, no capacity limit.
    pub fn uniform(
        policy: RoutingPolicy,
        n_moe: usize,
        n_experts: usize,
    ) -> Result<Self, RoutingError> {
        Self::new(&vec![policy; n_moe], None, n_experts)
    }

    /// MoE layers covered.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True when there are no MoE layers.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Every slot's policy, in slot order.
    pub fn policies(&self) -> impl ExactSizeIterator<Item = RoutingPolicy> + '_ {
        self.policies.iter().map(|p| p.policy())
    }

    /// The checked policy of MoE slot `slot`.
    pub fn checked(&self, slot: usize) -> CheckedPolicy {
        self.policies[slot]
    }

    /// The capacity factor, if any.
    pub fn capacity_factor(&self) -> Option<f32> {
        self.capacity_factor.map(CapacityFactor::get)
    }

    /// The checked capacity factor, if any.
    pub fn checked_capacity(&self) -> Option<CapacityFactor> {
        self.capacity_factor
    }

    /// Sets MoE slot `slot`'s policy, or every slot's with `None`.
    pub fn set_policy(&mut self, slot: Option<usize>, policy: CheckedPolicy) {
        match slot {
            Some(s) => self.policies[s] = policy,
            None => self.policies.iter_mut().for_each(|p| *p = policy),
        }
    }

    /// Sets or clears the capacity factor.
    pub fn set_capacity_factor(&mut self, factor: Option<CapacityFactor>) {
        self.capacity_factor = factor;
    }
}

/// Keys and values of past positions, for autoregressive decoding.
///
/// Two paths can fill it: full passes (candle tensors, one slot per block) and the lean decode
/// path ([`super::decode`], plain vectors). Each half knows how many positions it holds; a pass
/// first brings its half up to date from the other (once after a prefill, or when a full pass
/// follows lean steps), so the two can alternate freely.
pub struct KvCache {
    /// One slot per block.
    slots: Vec<KvSlot>,
    len: usize,
    batch: usize,
    /// Positions held in `slots`.
    candle_len: usize,
    /// The lean path's keys, values and step buffers (created on its first step).
    lean: Option<Box<LeanState>>,
}

impl KvCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(KvSlot::clear);
        self.len = 0;
        self.candle_len = 0;
        if let Some(l) = &mut self.lean {
            l.clear();
        }
    }
}

/// Parameter counts of a model.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    /// Every parameter.
    pub total: usize,
    /// Embeddings (token and position) and, when untied, the LM head.
    pub embeddings: usize,
    /// One expert.
    pub per_expert: usize,
    /// Parameters of each block.
    pub per_layer: Vec<usize>,
    /// Parameters in MoE experts across the model.
    pub experts_total: usize,
}

/// What an architecture file builds from a model file's tensors: the pieces, in run order.
pub struct ModelParts {
    /// Token (and position) embeddings.
    pub embedding: Embedding,
    /// The decoder blocks.
    pub blocks: Vec<Block>,
    /// The norm before the LM head.
    pub final_norm: Norm,
    /// `[d] -> [vocab]`.
    pub lm_head: Linear,
}

/// A loaded model, ready to run: embeddings, blocks run in order, final norm and LM head.
pub struct Model {
    config: ModelConfig,
    device: Device,
    embedding: Embedding,
    blocks: Vec<Block>,
    final_norm: Norm,
    lm_head: Linear,
    moe_layers: Vec<usize>,
    warnings: Vec<String>,
    source: String,
    file_bytes: usize,
    tokenizer_path: Option<std::path::PathBuf>,
    /// The lean decode path, when every part of the model is covered (decided at load).
    lean: Option<LeanDecoder>,
    /// What load decided, and why.
    decode_path: DecodePath,
    /// False after [`Model::set_lean_decode`]`(false)`: one-token passes use candle.
    lean_enabled: bool,
}

impl Model {
    /// Opens, checks and loads a model file onto `device` with default options.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, LoadError> {
        let file = ModelFile::open(path)?;
        Self::from_file(&file, device, LoadOptions::default())
    }

    /// Loads an opened model (either format) onto `device`.
    pub fn from_source(
        source: &ModelSource,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        match source {
            ModelSource::Xmoe(file) => Self::from_file(file, device, options),
            ModelSource::HuggingFace(ckpt) => {
                let (parts, unused) = arch::hf::build(ckpt, device, options)?;
                let mut model = Self::assemble(
                    ckpt.config().clone(),
                    parts,
                    device,
                    unused,
                    ckpt.dir().display().to_string(),
                    ckpt.tensor_bytes(),
                );
                model.tokenizer_path = source.tokenizer_path();
                Ok(model)
            }
            ModelSource::Gguf(g) => {
                let (parts, unused) = crate::model::gguf::build(g, device, options)?;
                let mut model = Self::assemble(
                    g.config().clone(),
                    parts,
                    device,
                    unused,
                    g.file().path().display().to_string(),
                    g.file().tensor_bytes(),
                );
                model.tokenizer_path = source.tokenizer_path();
                Ok(model)
            }
        }
    }

    /// Loads an already checked file onto `device`.
    pub fn from_file(
        file: &ModelFile,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        let parts = arch::xmoe::build(file, device, options)?;
        let mut model = Self::assemble(
            file.config().clone(),
            parts,
            device,
            file.warnings().to_vec(),
            file.path().display().to_string(),
            file.file_bytes(),
        );
        // A stored tokenizer is read back from the model file itself.
        if file.stored_tokenizer().is_some() {
            model.tokenizer_path = Some(file.path().to_path_buf());
        }
        Ok(model)
    }

    fn assemble(
        config: ModelConfig,
        parts: ModelParts,
        device: &Device,
        warnings: Vec<String>,
        source: String,
        file_bytes: usize,
    ) -> Self {
        let moe_layers = (parts.blocks.iter().enumerate())
            .filter(|(_, b)| b.moe().is_some())
            .map(|(i, _)| i)
            .collect();
        let (lean, decode_path) = match LeanDecoder::build(
            device,
            &parts.embedding,
            &parts.blocks,
            &parts.final_norm,
            &parts.lm_head,
            config.max_seq_len,
        ) {
            Ok(l) => (Some(l), DecodePath::Lean),
            Err(reason) => (None, DecodePath::Candle { reason }),
        };
        Model {
            lean,
            decode_path,
            lean_enabled: true,
            config,
            device: device.clone(),
            embedding: parts.embedding,
            blocks: parts.blocks,
            final_norm: parts.final_norm,
            lm_head: parts.lm_head,
            moe_layers,
            warnings,
            source,
            file_bytes,
            tokenizer_path: None,
        }
    }

    /// Where the tokenizer is read from: a checkpoint's `tokenizer.json`, a GGUF file or a model
    /// file with a stored tokenizer (none for byte-level models).
    pub fn tokenizer_path(&self) -> Option<&std::path::Path> {
        self.tokenizer_path.as_deref()
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Block indices of the MoE layers.
    pub fn moe_layers(&self) -> &[usize] {
        &self.moe_layers
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Findings at load that did not stop it (extra tensors).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Size of the model file in bytes.
    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    /// Routing the configuration asks for by default (checked when the configuration was).
    pub fn default_routing(&self) -> RoutingConfig {
        RoutingConfig::new(
            &vec![self.config.default_policy; self.moe_layers.len()],
            self.config.capacity_factor,
            self.config.n_experts,
        )
        .expect("the configuration's policy and capacity factor were validated at load")
    }

    /// Parameter counts.
    pub fn param_counts(&self) -> ParamCounts {
        param_counts(&self.config)
    }

    /// A KV cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache {
            slots: vec![KvSlot::default(); self.blocks.len()],
            len: 0,
            batch,
            candle_len: 0,
            lean: None,
        }
    }

    /// How one token with a KV cache is decoded, as load decided (see [`super::decode`]).
    pub fn decode_path(&self) -> &DecodePath {
        &self.decode_path
    }

    /// Turns the lean decode path off (one-token passes then run on candle, as full passes do)
    /// or back on where load found it applicable; for comparisons and benchmarks.
    pub fn set_lean_decode(&mut self, enabled: bool) {
        self.lean_enabled = enabled;
    }

    /// Bytes the lean decode path reads per token whatever the routing, and per routed expert
    /// (`None` on the candle path).
    pub fn decode_weight_bytes(&self) -> Option<(usize, usize)> {
        self.lean.as_ref().map(|l| l.weight_bytes(&self.blocks))
    }

    /// The lean decoder, when it is in force.
    fn lean(&self) -> Option<&LeanDecoder> {
        self.lean.as_ref().filter(|_| self.lean_enabled)
    }

    /// Decodes one `token` of a single sequence after the positions in `cache` and returns its
    /// logits (`[vocab]`, borrowed from the cache's buffers). On the lean path (see
    /// [`Model::decode_path`]) nothing is allocated once the cache's buffers exist; otherwise
    /// this is [`Model::forward`] of one token.
    pub fn decode<'c>(
        &self,
        token: u32,
        routing: &RoutingConfig,
        cache: &'c mut KvCache,
        trace: &mut ForwardTrace,
    ) -> Result<&'c [f32]> {
        let vocab = self.config.vocab_size;
        if self.lean().is_some() && cache.batch == 1 {
            self.lean_step(token, routing, cache, trace)?;
        } else {
            let logits = self.forward(&[token], 1, routing, Some(&mut *cache), trace)?;
            let state = cache.lean.get_or_insert_with(Box::default);
            state.logits.clear();
            state.logits.extend_from_slice(&logits);
        }
        let state = cache.lean.as_deref().expect("filled above");
        Ok(&state.logits[..vocab])
    }

    /// One lean step: checks as [`Model::forward`] does, brings the lean half of the cache up to
    /// date, then decodes.
    fn lean_step(
        &self,
        token: u32,
        routing: &RoutingConfig,
        cache: &mut KvCache,
        trace: &mut ForwardTrace,
    ) -> Result<()> {
        let lean = self.lean().expect("checked by the caller");
        self.check_pass(&[token], routing, cache.len, 1)?;
        let state = cache.lean.get_or_insert_with(Box::default);
        if state.len != cache.len {
            // Positions a full pass (a prefill) added: copy them over once.
            debug_assert_eq!(cache.candle_len, cache.len);
            lean.load_from_slots(state, &cache.slots, cache.len)?;
        }
        lean.step(&self.blocks, token, routing, state, trace)?;
        cache.len += 1;
        Ok(())
    }

    /// The checks every pass makes before it runs.
    fn check_pass(
        &self,
        tokens: &[u32],
        routing: &RoutingConfig,
        start_pos: usize,
        seq: usize,
    ) -> Result<()> {
        let cfg = &self.config;
        if routing.len() != self.moe_layers.len() {
            bail!(
                "routing has {} policies but the model has {} MoE layers",
                routing.len(),
                self.moe_layers.len()
            );
        }
        if let Some(p) = routing
            .policies
            .iter()
            .find(|p| p.n_experts() != cfg.n_experts)
        {
            bail!(
                "routing was checked for {} experts but the model has {}",
                p.n_experts(),
                cfg.n_experts
            );
        }
        if start_pos + seq > cfg.max_seq_len {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                start_pos + seq,
                cfg.max_seq_len
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary (0..{})",
                cfg.vocab_size
            );
        }
        Ok(())
    }

    /// True when some MoE layer's experts are bf16 on the CPU kernel: what `--moe-dispatch
    /// amx` and `avx512bf16` speed up.
    pub fn has_bf16_kernel_experts(&self) -> bool {
        self.blocks.iter().filter_map(|b| b.moe()).any(|m| {
            m.parts()
                .experts
                .packed()
                .is_some_and(|p| p.dtype() == crate::kernel::WeightDtype::Bf16)
        })
    }

    /// True when the CPU kernel reads every MoE layer's experts in place from the mapped model
    /// files (see [`super::ExpertStorage`]), false when any layer holds its own copy.
    pub fn experts_in_place(&self) -> bool {
        let mut layers = self.blocks.iter().filter_map(|b| b.moe()).peekable();
        layers.peek().is_some()
            && layers.all(|m| m.parts().experts.packed().is_some_and(|p| p.in_place()))
    }

    /// How the MoE layers compute (the kernel variant resolved for this CPU).
    pub fn moe_dispatch(&self) -> Option<super::moe::MoeDispatch> {
        self.blocks
            .iter()
            .find_map(|b| b.moe().map(MoeBlock::dispatch))
    }

    /// Runs `batch` sequences of `tokens.len() / batch` tokens (row-major) and returns the logits,
    /// `[batch * seq, vocab]` row-major on the host. With a cache, the tokens continue the cached
    /// positions and are appended to it. Fills `trace` (its buffers are reused).
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        routing: &RoutingConfig,
        mut cache: Option<&mut KvCache>,
        trace: &mut ForwardTrace,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let cfg = &self.config;
        if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
            bail!(
                "{} tokens cannot be split into {batch} sequences of equal length",
                tokens.len()
            );
        }
        let seq = tokens.len() / batch;
        let start_pos = match &cache {
            Some(c) => {
                if c.batch != batch {
                    bail!("the KV cache holds {} sequences, not {batch}", c.batch);
                }
                c.len
            }
            None => 0,
        };
        if let (Some(c), Some(_), 1, 1) = (&mut cache, self.lean(), batch, seq) {
            // One token after cached positions: the lean path (the logits are copied out of
            // its buffer; `decode` borrows them instead).
            self.lean_step(tokens[0], routing, c, trace)?;
            let state = c.lean.as_deref().expect("filled by the step");
            return Ok(state.logits[..cfg.vocab_size].to_vec());
        }
        self.check_pass(tokens, routing, start_pos, seq)?;
        if let Some(c) = cache.as_deref_mut()
            && c.candle_len != c.len
        {
            // Positions the lean path decoded: hand them to the candle slots once.
            let (lean, state) = (self.lean.as_ref(), c.lean.as_deref());
            let (Some(lean), Some(state)) = (lean, state) else {
                bail!("the KV cache holds positions that neither path can read");
            };
            lean.store_to_slots(state, &mut c.slots, &self.device)?;
            c.candle_len = c.len;
        }
        trace.begin(batch, seq, start_pos, self.blocks.len());
        let pass = PassContext::new(batch, seq, start_pos, &self.device)?;

        let head_start = Instant::now();
        let ids = Tensor::from_slice(tokens, pass.tokens(), &self.device)?;
        let mut x = self.embedding.forward(&ids, &pass)?; // [n, d]
        let mut head_ns = elapsed_ns(head_start, &self.device)?;

        for (layer, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.slots[layer]);
            x = block.forward(x, layer, &pass, slot, routing, trace)?;
        }
        if let Some(c) = cache {
            c.len += seq;
            c.candle_len = c.len;
        }
        let t3 = Instant::now();
        let logits = self.lm_head.forward(&self.final_norm.forward(&x)?)?;
        let out = logits.flatten_all()?.to_vec1::<f32>()?;
        // NaN or infinite logits make every quality figure meaningless ("NaN bits/byte"): stop
        // with the place instead of reporting them.
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            let vocab = cfg.vocab_size;
            bail!(
                "the model produced a non-finite logit ({}) for token {} of this pass (vocabulary entry {}): its weights or activations overflow or hold NaN",
                out[i],
                i / vocab,
                i % vocab
            );
        }
        head_ns += elapsed_ns(t3, &self.device)?;
        trace.head_ns = head_ns;
        trace.total_ns = start.elapsed().as_nanos() as u64;
        Ok(out)
    }
}

/// Parameter counts from a configuration alone.
pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    let (d, v) = (cfg.d_model, cfg.vocab_size);
    let norm = if cfg.norm == NormKind::LayerNorm {
        2 * d
    } else {
        d
    };
    let mats = if cfg.gated { 3 } else { 2 };
    let per_expert = mats * d * cfg.expert_hidden
        + match (cfg.expert_bias, cfg.expert_gate_bias) {
            (true, true) => 2 * cfg.expert_hidden + d,
            (true, false) => cfg.expert_hidden + d,
            (false, _) => 0,
        };
    let (q, kv) = (
        cfg.n_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
    );
    let attn = 2 * d * q
        + 2 * d * kv
        + if cfg.attn_bias {
            q + 2 * kv + d
        } else if cfg.qkv_bias {
            q + 2 * kv
        } else {
            0
        }
        + match cfg.qk_norm {
            Some(QkNormKind::PerHead) => 2 * cfg.head_dim(),
            Some(QkNormKind::Full) => q + kv,
            None => 0,
        }
        + if cfg.attn_sinks { cfg.n_heads } else { 0 };
    let attn = match cfg.mla {
        Some(mla) => mla.params(d, cfg.n_heads, cfg.attn_bias),
        None => attn,
    };
    let h = cfg.dense_ffn_hidden;
    let dense = mats * d * h + if cfg.ffn_bias { (mats - 1) * h + d } else { 0 };
    let shared = cfg.shared_expert_hidden.map_or(0, |s| {
        mats * d * s + if cfg.shared_expert_gate { d } else { 0 }
    });
    let mut experts_total = 0;
    let per_layer: Vec<usize> = (0..cfg.n_layers)
        .map(|i| {
            let ffn = if cfg.is_moe_layer(i) {
                experts_total += cfg.n_experts * per_expert;
                let router = cfg.n_experts * d + if cfg.router_bias { cfg.n_experts } else { 0 };
                router + cfg.n_experts * per_expert + shared
            } else {
                dense
            };
            2 * norm + attn + ffn
        })
        .collect();
    let embeddings = v * d
        + if cfg.positions == PositionKind::Learned {
            cfg.max_seq_len * d
        } else {
            0
        }
        + if cfg.tie_embeddings { 0 } else { v * d };
    ParamCounts {
        total: embeddings + per_layer.iter().sum::<usize>() + norm,
        embeddings,
        per_expert,
        per_layer,
        experts_total,
    }
}
