//! Workloads: what the session feeds the model.
//!
//! - [`Workload::eval`]: teacher-forced batches over a text; each pass scores next-token
//!   predictions (cross-entropy), so quality figures are available.
//! - [`Workload::generate`]: autoregressive decoding from prompts with a KV cache (one prompt at
//!   a time, batch 1), so per-token decode latency is realistic. A prompt is run as one prefill
//!   pass, then one decode pass per sampled byte until the sequence reaches its length; then the
//!   next prompt starts.
//!
//! Every input problem (missing or empty file, a prompt longer than the context, a sequence
//! length beyond the model's) is a [`WorkloadError`] with a clear message, found when the
//! workload is built, not in the middle of a run.

pub mod gguf_tokenizer;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::sync::Arc;

use crate::model::config::ModelConfig;
use crate::model::trace::ForwardTrace;
use crate::model::{KvCache, Model, RoutingConfig};
use crate::profiling::snapshot::{TokenOrigin, WorkloadInfo, WorkloadKind};
use tokenizer::{Encoded, TextTokenizer, TokenizerError};

use crate::profiling::stats::{
    BatchQuality, PassKind, ReferenceComparison, cross_entropy_nats, kl_nats,
};

/// Why a workload cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A file could not be read.
    #[error("cannot read {path}: {io}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        io: std::io::Error,
    },
    /// The text has no bytes.
    #[error("the text {name} is empty")]
    EmptyText {
        /// Its name.
        name: String,
    },
    /// The text is shorter than one sequence plus its next-token target.
    #[error(
        "the text {name} has {tokens} tokens, fewer than the {needed} one sequence needs (--seq-len {seq_len} + 1); use a longer text or a shorter --seq-len"
    )]
    TextTooShort {
        /// Its name.
        name: String,
        /// Its length in tokens.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
        /// Sequence length asked for.
        seq_len: usize,
    },
    /// Batch or sequence length is zero or beyond the model.
    #[error("{what} must be in 1..={max}, found {found}")]
    OutOfRange {
        /// The option.
        what: &'static str,
        /// Largest allowed.
        max: usize,
        /// Value given.
        found: usize,
    },
    /// A prompts file has only blank lines.
    #[error("{path} has no prompts: every line is blank (one prompt per line)")]
    NoPromptsInFile {
        /// The file.
        path: PathBuf,
    },
    /// No prompt was given.
    #[error("no prompts: give --prompt TEXT or a --prompts file with one prompt per line")]
    NoPrompts,
    /// A prompt has no bytes.
    #[error("prompt {index} is empty")]
    EmptyPrompt {
        /// 1-based prompt number.
        index: usize,
    },
    /// A prompt leaves no room for generation.
    #[error(
        "prompt {index} has {len} tokens, but sequences are limited to {max} positions (the model's context or --seq-len); it must be shorter to leave room for generated tokens"
    )]
    PromptTooLong {
        /// 1-based prompt number.
        index: usize,
        /// Its length in tokens.
        len: usize,
        /// Positions per sequence.
        max: usize,
    },
    /// Temperature is negative or not finite.
    #[error("temperature must be finite and >= 0, found {0}")]
    BadTemperature(f32),
    /// The tokenizer failed on the text.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A text to evaluate on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextSource {
    /// For display: a path, or e.g. "embedded held-out text".
    pub name: String,
    /// Its bytes (any bytes: a byte model does not need UTF-8).
    pub bytes: Vec<u8>,
}

impl TextSource {
    /// Reads a file (non-UTF-8 content is fine).
    pub fn from_file(path: &Path) -> Result<Self, WorkloadError> {
        let bytes =
            crate::input_file::read(path, crate::input_file::MAX_TEXT_BYTES).map_err(|io| {
                WorkloadError::Read {
                    path: path.to_path_buf(),
                    io,
                }
            })?;
        Ok(Self {
            name: path.display().to_string(),
            bytes,
        })
    }
}

/// Options of the eval workload.
#[derive(Clone, Debug)]
pub struct EvalSpec {
    /// The text.
    pub text: TextSource,
    /// Sequences per pass.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

/// Options of the generate workload.
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    /// Prompts, used in turn.
    pub prompts: Vec<Vec<u8>>,
    /// Where they came from, for display ("--prompt", a path, "built-in prompts").
    pub source: String,
    /// Positions per sequence (prompt + generated); capped at the model's context.
    pub max_len: usize,
    /// Sampling temperature; 0 = greedy.
    pub temperature: f32,
    /// Sampler seed.
    pub seed: u64,
}

/// Prompts used when none are given.
pub fn builtin_prompts() -> Vec<Vec<u8>> {
    [
        "The history of the city begins",
        "In mathematics, a prime number is",
        "def fibonacci(n):\n    ",
        "Once upon a time, in a small village,",
        "The results of the experiment show that",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Reads prompts from a file, one per line; blank lines are skipped.
pub fn prompts_from_file(path: &Path) -> Result<Vec<Vec<u8>>, WorkloadError> {
    let bytes = crate::input_file::read(path, crate::input_file::MAX_TEXT_BYTES).map_err(|io| {
        WorkloadError::Read {
            path: path.to_path_buf(),
            io,
        }
    })?;
    let prompts: Vec<Vec<u8>> = bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect();
    if prompts.is_empty() {
        return Err(WorkloadError::NoPromptsInFile {
            path: path.to_path_buf(),
        });
    }
    Ok(prompts)
}

/// One input token of a pass, for the generate stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamToken {
    /// Token id.
    pub token: u32,
    /// What the token decodes to.
    pub bytes: Vec<u8>,
    /// Prompt or generated.
    pub origin: TokenOrigin,
    /// Row of the token in the pass (for its routing in the trace).
    pub row: usize,
    /// Prompt run it belongs to.
    pub sequence: u64,
}

/// One input token of the last eval pass, for the UI's token view.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalToken {
    /// Row of the token in the pass (for its routing in the trace).
    pub row: usize,
    /// Position in its sequence.
    pub position: usize,
    /// Token id.
    pub token: u32,
    /// The text it covers.
    pub bytes: Vec<u8>,
    /// The next token (the target predicted at this position).
    pub target: u32,
    /// The text the target covers.
    pub target_bytes: Vec<u8>,
    /// Cross-entropy of predicting the target, nats.
    pub loss_nats: f32,
}

/// What one pass did.
#[derive(Clone, Debug)]
pub struct PassOutcome {
    /// Which statistics it enters.
    pub kind: PassKind,
    /// Tokens run.
    pub tokens: usize,
    /// Eval: the cross-entropy of the batch.
    pub quality: Option<BatchQuality>,
    /// Generate: the input tokens with their origin.
    pub stream: Vec<StreamToken>,
}

struct EvalState {
    spec: EvalSpec,
    /// The text as tokens, with the bytes each covers.
    encoded: Encoded,
    cursor: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    last_logits: Vec<f32>,
    last_quality: Option<BatchQuality>,
    /// Where each window of the last batch starts in `encoded`.
    window_starts: Vec<usize>,
    /// Byte offset of each token in the text (one more entry than tokens).
    byte_offsets: Vec<usize>,
}

struct GenerateState {
    spec: GenerateSpec,
    /// The prompts as tokens.
    prompt_ids: Vec<Vec<u32>>,
    tokenizer: Arc<TextTokenizer>,
    max_len: usize,
    prompt_index: usize,
    sequence: u64,
    cache: Option<KvCache>,
    pending: Option<u32>,
    rng: StdRng,
    probs: Vec<f64>,
    last_tokens: Vec<u32>,
}

enum State {
    Eval(Box<EvalState>),
    Generate(Box<GenerateState>),
}

/// A workload, ready to run passes.
pub struct Workload {
    state: State,
    info: WorkloadInfo,
    vocab: usize,
}

impl Workload {
    /// Teacher-forced batches over `spec.text` for a byte-level model of configuration `cfg`.
    pub fn eval(spec: EvalSpec, cfg: &ModelConfig) -> Result<Self, WorkloadError> {
        Self::eval_tokenized(spec, cfg, &TextTokenizer::Byte)
    }

    /// Teacher-forced batches over `spec.text`, tokenized by `tokenizer`.
    pub fn eval_tokenized(
        spec: EvalSpec,
        cfg: &ModelConfig,
        tokenizer: &TextTokenizer,
    ) -> Result<Self, WorkloadError> {
        if spec.batch == 0 || spec.batch > 4096 {
            return Err(WorkloadError::OutOfRange {
                what: "--batch",
                max: 4096,
                found: spec.batch,
            });
        }
        if spec.seq_len == 0 || spec.seq_len > cfg.max_seq_len {
            return Err(WorkloadError::OutOfRange {
                what: "--seq-len",
                max: cfg.max_seq_len,
                found: spec.seq_len,
            });
        }
        if spec.text.bytes.is_empty() {
            return Err(WorkloadError::EmptyText {
                name: spec.text.name.clone(),
            });
        }
        let encoded = tokenizer.encode(&spec.text.bytes)?;
        if encoded.ids.len() < spec.seq_len + 1 {
            return Err(WorkloadError::TextTooShort {
                name: spec.text.name.clone(),
                tokens: encoded.ids.len(),
                needed: spec.seq_len + 1,
                seq_len: spec.seq_len,
            });
        }
        let byte_offsets = std::iter::once(0)
            .chain(encoded.bytes.iter().scan(0usize, |at, &n| {
                *at += n as usize;
                Some(*at)
            }))
            .collect();
        let info = WorkloadInfo {
            kind: WorkloadKind::Eval,
            source: spec.text.name.clone(),
            source_size: spec.text.bytes.len(),
            batch: spec.batch,
            seq_len: spec.seq_len,
            temperature: None,
            seed: 0,
            description: format!(
                "eval: {} x {} tokens over {} ({})",
                spec.batch,
                spec.seq_len,
                spec.text.name,
                human_bytes(spec.text.bytes.len())
            ),
        };
        Ok(Self {
            state: State::Eval(Box::new(EvalState {
                spec,
                encoded,
                cursor: 0,
                inputs: Vec::new(),
                targets: Vec::new(),
                last_logits: Vec::new(),
                last_quality: None,
                window_starts: Vec::new(),
                byte_offsets,
            })),
            info,
            vocab: cfg.vocab_size,
        })
    }

    /// Autoregressive decoding from `spec.prompts` for a byte-level model of configuration `cfg`.
    pub fn generate(spec: GenerateSpec, cfg: &ModelConfig) -> Result<Self, WorkloadError> {
        Self::generate_tokenized(spec, cfg, Arc::new(TextTokenizer::Byte))
    }

    /// Autoregressive decoding from `spec.prompts`, tokenized by `tokenizer`.
    pub fn generate_tokenized(
        spec: GenerateSpec,
        cfg: &ModelConfig,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<Self, WorkloadError> {
        if !(spec.temperature.is_finite() && spec.temperature >= 0.0) {
            return Err(WorkloadError::BadTemperature(spec.temperature));
        }
        if spec.prompts.is_empty() {
            return Err(WorkloadError::NoPrompts);
        }
        if spec.max_len < 2 {
            return Err(WorkloadError::OutOfRange {
                what: "--seq-len",
                max: cfg.max_seq_len,
                found: spec.max_len,
            });
        }
        let max_len = spec.max_len.min(cfg.max_seq_len);
        let mut prompt_ids = Vec::with_capacity(spec.prompts.len());
        for (i, p) in spec.prompts.iter().enumerate() {
            let ids = tokenizer.encode(p)?.ids;
            if ids.is_empty() {
                return Err(WorkloadError::EmptyPrompt { index: i + 1 });
            }
            if ids.len() >= max_len {
                return Err(WorkloadError::PromptTooLong {
                    index: i + 1,
                    len: ids.len(),
                    max: max_len,
                });
            }
            prompt_ids.push(ids);
        }
        let info = WorkloadInfo {
            kind: WorkloadKind::Generate,
            source: spec.source.clone(),
            source_size: spec.prompts.len(),
            batch: 1,
            seq_len: max_len,
            temperature: Some(spec.temperature),
            seed: spec.seed,
            description: format!(
                "generate: {} prompt{} ({}), up to {} positions, temperature {:.2}, seed {}",
                spec.prompts.len(),
                if spec.prompts.len() == 1 { "" } else { "s" },
                spec.source,
                max_len,
                spec.temperature,
                spec.seed
            ),
        };
        Ok(Self {
            state: State::Generate(Box::new(GenerateState {
                rng: StdRng::seed_from_u64(spec.seed),
                spec,
                prompt_ids,
                tokenizer,
                max_len,
                prompt_index: 0,
                sequence: 0,
                cache: None,
                pending: None,
                probs: Vec::new(),
                last_tokens: Vec::new(),
            })),
            info,
            vocab: cfg.vocab_size,
        })
    }

    /// The description shown in snapshots.
    pub fn info(&self) -> &WorkloadInfo {
        &self.info
    }

    /// The tokenized text of an eval workload (`None` when generating): what a quick tune in the
    /// UI measures quality on.
    pub fn eval_text(&self) -> Option<&Encoded> {
        match &self.state {
            State::Eval(e) => Some(&e.encoded),
            State::Generate(_) => None,
        }
    }

    /// True for the eval workload (quality figures and reference passes available).
    pub fn is_eval(&self) -> bool {
        matches!(self.state, State::Eval(_))
    }

    /// Runs the next pass under `routing`, filling `trace`.
    /// The input token ids of the last pass (row-major, as the trace numbers them).
    pub fn last_inputs(&self) -> &[u32] {
        match &self.state {
            State::Eval(s) => &s.inputs,
            State::Generate(g) => &g.last_tokens,
        }
    }

    /// Runs the next pass of the workload.
    pub fn run_pass(
        &mut self,
        model: &Model,
        routing: &RoutingConfig,
        trace: &mut ForwardTrace,
    ) -> anyhow::Result<PassOutcome> {
        let vocab = self.vocab;
        match &mut self.state {
            State::Eval(s) => {
                let target_bytes = s.next_batch();
                let logits = model.forward(&s.inputs, s.spec.batch, routing, None, trace)?;
                let q = BatchQuality {
                    scored_tokens: s.targets.len() as u64,
                    bytes: target_bytes,
                    nats: cross_entropy_nats(&logits, vocab, &s.targets),
                };
                s.last_logits = logits;
                s.last_quality = Some(q);
                Ok(PassOutcome {
                    kind: PassKind::Eval,
                    tokens: s.inputs.len(),
                    quality: Some(q),
                    stream: Vec::new(),
                })
            }
            State::Generate(g) => g.step(model, routing, trace, vocab),
        }
    }

    /// Eval only: runs the batch of the last pass again under `reference` and compares it with
    /// the last pass. `None` for generate or before the first pass. The reference's trace goes
    /// to `trace`, which the caller keeps out of the statistics.
    pub fn run_reference(
        &mut self,
        model: &Model,
        reference: &RoutingConfig,
        trace: &mut ForwardTrace,
    ) -> anyhow::Result<Option<ReferenceComparison>> {
        let vocab = self.vocab;
        let State::Eval(s) = &mut self.state else {
            return Ok(None);
        };
        let Some(current) = s.last_quality else {
            return Ok(None);
        };
        let t = Instant::now();
        let ref_logits = model.forward(&s.inputs, s.spec.batch, reference, None, trace)?;
        let reference_ns = t.elapsed().as_nanos() as u64;
        let rq = BatchQuality {
            nats: cross_entropy_nats(&ref_logits, vocab, &s.targets),
            ..current
        };
        Ok(Some(ReferenceComparison {
            current,
            reference: rq,
            kl_nats: kl_nats(&ref_logits, &s.last_logits, vocab),
            kl_tokens: current.scored_tokens,
            reference_ns,
        }))
    }

    /// Eval only: sequence `seq` of the last pass, token by token, with the text each covers
    /// and the loss of predicting the next; `None` for generate, before the first pass, or for a
    /// sequence the batch does not have.
    pub fn last_eval_sequence(&self, seq: usize) -> Option<Vec<EvalToken>> {
        let State::Eval(s) = &self.state else {
            return None;
        };
        let &start = s.window_starts.get(seq)?;
        let n = s.spec.seq_len;
        let text = &s.spec.text.bytes;
        let span = |i: usize| -> Vec<u8> {
            let (a, b) = (s.byte_offsets[i], s.byte_offsets[i + 1]);
            text.get(a..b).map_or_else(Vec::new, <[u8]>::to_vec)
        };
        let vocab = self.vocab;
        Some(
            (0..n)
                .map(|p| {
                    let row = seq * n + p;
                    let logits = &s.last_logits[row * vocab..(row + 1) * vocab];
                    let target = s.targets[row];
                    EvalToken {
                        row,
                        position: p,
                        token: s.inputs[row],
                        bytes: span(start + p),
                        target,
                        target_bytes: span(start + p + 1),
                        loss_nats: cross_entropy_nats(logits, vocab, &[target]) as f32,
                    }
                })
                .collect(),
        )
    }

    /// The last eval batch compared with itself, without running anything: for when the current
    /// routing is the reference routing (identical logits, so zero difference and zero KL).
    pub fn self_reference(&self) -> Option<ReferenceComparison> {
        let State::Eval(s) = &self.state else {
            return None;
        };
        s.last_quality.map(ReferenceComparison::with_itself)
    }
}

impl EvalState {
    /// Fills `inputs` and `targets` with the next `batch` windows of `seq_len + 1` tokens, read
    /// consecutively through the text and wrapping to its start. Returns the bytes of the text
    /// the targets cover (the denominator of bits per byte).
    fn next_batch(&mut self) -> u64 {
        let (b, s) = (self.spec.batch, self.spec.seq_len);
        self.inputs.clear();
        self.targets.clear();
        let (inputs, targets) = (&mut self.inputs, &mut self.targets);
        let encoded = &self.encoded;
        let starts = &mut self.window_starts;
        starts.clear();
        let mut covered = 0u64;
        for_each_eval_window(&encoded.ids, b, s, &mut self.cursor, |start, w| {
            starts.push(start);
            inputs.extend_from_slice(&w[..s]);
            targets.extend_from_slice(&w[1..]);
            covered += encoded.target_bytes(start, s);
        });
        covered
    }
}

/// Calls `f(start, window)` with the next `batch` windows of `seq_len + 1` tokens of `text` from
/// `*cursor`, read consecutively (stride `seq_len`, so a window's last token is the next one's
/// first) and wrapping to the start of the text when it runs out; advances `cursor`. `start` is
/// the window's first index in `text`. The eval workload's batching, shared with the sweep.
/// `text` must hold at least `seq_len + 1` tokens.
pub fn for_each_eval_window<T>(
    text: &[T],
    batch: usize,
    seq_len: usize,
    cursor: &mut usize,
    mut f: impl FnMut(usize, &[T]),
) {
    for _ in 0..batch {
        if *cursor + seq_len + 1 > text.len() {
            *cursor = 0;
        }
        f(*cursor, &text[*cursor..*cursor + seq_len + 1]);
        *cursor += seq_len;
    }
}

impl GenerateState {
    fn step(
        &mut self,
        model: &Model,
        routing: &RoutingConfig,
        trace: &mut ForwardTrace,
        vocab: usize,
    ) -> anyhow::Result<PassOutcome> {
        let (tokens, kind, origin): (Vec<u32>, PassKind, TokenOrigin) = match self.pending {
            None => {
                let cache = self.cache.get_or_insert_with(|| model.new_cache(1));
                cache.clear();
                self.sequence += 1;
                (
                    self.prompt_ids[self.prompt_index].clone(),
                    PassKind::Prefill,
                    TokenOrigin::Prompt,
                )
            }
            Some(t) => (vec![t], PassKind::Decode, TokenOrigin::Generated),
        };
        let cache = self.cache.as_mut().expect("created above");
        let prefill;
        let last = match kind {
            // One token: the model's decode step (the lean path where it applies, allocation
            // free), its logits borrowed from the cache.
            PassKind::Decode => model.decode(tokens[0], routing, cache, trace)?,
            _ => {
                prefill = model.forward(&tokens, 1, routing, Some(cache), trace)?;
                &prefill[prefill.len() - vocab..]
            }
        };
        self.last_tokens.clone_from(&tokens);
        let next = sample(last, self.spec.temperature, &mut self.rng, &mut self.probs);
        if cache.len() >= self.max_len {
            self.pending = None;
            self.prompt_index = (self.prompt_index + 1) % self.spec.prompts.len();
        } else {
            self.pending = Some(next);
        }
        let sequence = self.sequence;
        Ok(PassOutcome {
            kind,
            tokens: tokens.len(),
            quality: None,
            stream: tokens
                .iter()
                .enumerate()
                .map(|(row, &token)| StreamToken {
                    token,
                    bytes: self.tokenizer.token_bytes(token),
                    origin,
                    row,
                    sequence,
                })
                .collect(),
        })
    }
}

/// Samples a token from one row of logits: argmax at temperature 0 (lowest id on ties), else
/// from `softmax(logits / temperature)`.
pub fn sample(logits: &[f32], temperature: f32, rng: &mut StdRng, scratch: &mut Vec<f64>) -> u32 {
    if temperature == 0.0 {
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
    scratch.clear();
    scratch.extend(
        logits
            .iter()
            .map(|&z| ((z as f64 - max) / temperature as f64).exp()),
    );
    let total: f64 = scratch.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &p) in scratch.iter().enumerate() {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    (scratch.len() - 1) as u32
}

fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / (1 << 10) as f64)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tests::small;

    fn text(s: &str) -> TextSource {
        TextSource {
            name: "t".into(),
            bytes: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn eval_batches_are_consecutive_windows_with_shifted_targets() {
        let mut w = Workload::eval(
            EvalSpec {
                text: text("abcdefghij"),
                batch: 2,
                seq_len: 3,
            },
            &small(),
        )
        .unwrap();
        let State::Eval(s) = &mut w.state else {
            unreachable!()
        };
        s.next_batch();
        let as_str = |v: &[u32]| v.iter().map(|&b| b as u8 as char).collect::<String>();
        assert_eq!(as_str(&s.inputs), "abcdef");
        assert_eq!(as_str(&s.targets), "bcdefg");
        s.next_batch();
        // Row 3 starts at "g" (needs "ghij"); row 4 wraps to the start.
        assert_eq!(as_str(&s.inputs), "ghiabc");
        assert_eq!(as_str(&s.targets), "hijbcd");
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let cfg = small();
        let e = |spec| Workload::eval(spec, &cfg).err().unwrap().to_string();
        let spec = |t: &str, b, s| EvalSpec {
            text: text(t),
            batch: b,
            seq_len: s,
        };
        assert!(e(spec("", 1, 4)).contains("is empty"));
        assert!(e(spec("abc", 1, 4)).contains("3 tokens, fewer than the 5"));
        assert!(e(spec("abcdefgh", 1, 0)).contains("--seq-len must be in 1..=32"));
        assert!(e(spec("abcdefgh", 1, 33)).contains("found 33"));
        assert!(e(spec("abcdefgh", 0, 4)).contains("--batch"));
        let missing = TextSource::from_file(Path::new("/nonexistent/x.txt")).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("cannot read /nonexistent/x.txt")
        );
        let g = |prompts: Vec<Vec<u8>>, t: f32| {
            Workload::generate(
                GenerateSpec {
                    prompts,
                    source: "test".into(),
                    max_len: 1000,
                    temperature: t,
                    seed: 0,
                },
                &cfg,
            )
            .err()
            .unwrap()
            .to_string()
        };
        assert!(g(vec![], 1.0).contains("no prompts"));
        assert!(g(vec![b"ok".to_vec(), vec![]], 1.0).contains("prompt 2 is empty"));
        // The context of `small()` is 32 positions; a 32-byte prompt leaves no room.
        assert!(g(vec![vec![b'a'; 32]], 1.0).contains("prompt 1 has 32 tokens"));
        assert!(g(vec![b"ok".to_vec()], -1.0).contains("temperature"));
        // Non-UTF-8 text is fine for a byte model.
        assert!(
            Workload::eval(
                EvalSpec {
                    text: TextSource {
                        name: "bin".into(),
                        bytes: vec![0xff, 0xfe, 0x00, 0x80, 0x81]
                    },
                    batch: 1,
                    seq_len: 4
                },
                &cfg
            )
            .is_ok()
        );
    }

    #[test]
    fn prompts_file_skips_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.txt");
        std::fs::write(&p, "first\r\n\n  \nsecond\n").unwrap();
        assert_eq!(
            prompts_from_file(&p).unwrap(),
            vec![b"first".to_vec(), b"second".to_vec()]
        );
        std::fs::write(&p, "\n\n").unwrap();
        assert!(matches!(
            prompts_from_file(&p),
            Err(WorkloadError::NoPromptsInFile { .. })
        ));
    }

    #[test]
    fn sampling() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut scratch = Vec::new();
        assert_eq!(
            sample(&[0.0, 3.0, 3.0, 1.0], 0.0, &mut rng, &mut scratch),
            1
        );
        // A very peaked distribution samples its mode; a flat one covers every id.
        for _ in 0..20 {
            assert_eq!(sample(&[0.0, 50.0, 0.0], 1.0, &mut rng, &mut scratch), 1);
        }
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[sample(&[0.0; 4], 1.0, &mut rng, &mut scratch) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        // Same seed, same sequence.
        let draw = |seed| {
            let mut r = StdRng::seed_from_u64(seed);
            let mut s = Vec::new();
            (0..10)
                .map(|_| sample(&[0.1, 0.2, 0.3, 0.4], 0.8, &mut r, &mut s))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
    }
}
