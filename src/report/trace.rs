//! Routing traces as JSON Lines (format: `docs/trace-format.md`).
//!
//! The first line is a [`TraceHeader`]; every further line is one [`TraceRecord`]: one token of
//! one forward pass with, per MoE layer, the selected experts and their gate weights (and
//! optionally every router probability). [`TraceWriter`] streams each pass straight to a buffered
//! temporary file, so a trace of any length never sits in memory; [`TraceWriter::finish`] moves the
//! file into place atomically. [`TraceReader`] reads a trace back line by line.

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::atomic_file::AtomicFile;
use crate::model::config::{ModelConfig, TokenizerKind};
use crate::model::trace::ForwardTrace;

/// The `format` field of every trace header.
pub const TRACE_FORMAT: &str = "xmoe-top-trace";

/// Version of the trace layout; bumped on any incompatible change.
pub const TRACE_FORMAT_VERSION: u32 = 1;

/// What a trace records besides the selections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// Also write every router probability of every token (E floats per token and layer).
    pub probs: bool,
}

/// The first line of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// Always [`TRACE_FORMAT`].
    pub format: String,
    /// [`TRACE_FORMAT_VERSION`].
    pub version: u32,
    /// Version of xmoe-top that wrote it.
    pub xmoe_top_version: String,
    /// Model name.
    pub model: String,
    /// Block indices of the MoE layers (the order of `layers` in every record).
    pub moe_layers: Vec<usize>,
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// Tokenizer of the model ("byte": token ids are byte values).
    pub tokenizer: TokenizerKind,
    /// Records carry `probs`.
    pub probs: bool,
    /// When the trace was started, ISO 8601 UTC.
    pub created_utc: String,
}

impl TraceHeader {
    /// The header for a model of configuration `cfg`.
    pub fn new(cfg: &ModelConfig, options: TraceOptions) -> Self {
        Self {
            format: TRACE_FORMAT.to_string(),
            version: TRACE_FORMAT_VERSION,
            xmoe_top_version: env!("CARGO_PKG_VERSION").to_string(),
            model: cfg.name.clone(),
            moe_layers: cfg.moe_layer_indices(),
            n_experts: cfg.n_experts,
            tokenizer: cfg.tokenizer,
            probs: options.probs,
            created_utc: super::iso8601_utc(super::unix_ms_now()),
        }
    }
}

/// The routing of one token in one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceLayer {
    /// Block index of the layer.
    pub layer: usize,
    /// Selected experts, in descending probability (choice rank) order.
    pub experts: Vec<u16>,
    /// Gate weight of each selected expert (same order).
    pub weights: Vec<f32>,
    /// Selected experts a capacity limit dropped (they contributed nothing); omitted when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<u16>,
    /// Every router probability, by expert id (only when the header says `probs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<f32>>,
}

/// One token of one forward pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Forward pass number in this trace, from 0.
    pub pass: u64,
    /// Sequence (row of the batch) within the pass.
    pub seq: usize,
    /// Position of the token in its sequence (counts cached positions when decoding).
    pub pos: usize,
    /// Token id.
    pub token: u32,
    /// The byte the token stands for (byte tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte: Option<u8>,
    /// One entry per MoE layer, in block order.
    pub layers: Vec<TraceLayer>,
}

/// Streams routing traces, one JSON line per token per pass.
pub struct TraceWriter<W: Write> {
    out: W,
    header: TraceHeader,
    pass: u64,
    records: u64,
    record: TraceRecord,
}

impl TraceWriter<AtomicFile> {
    /// A trace written atomically to `path` (appears there on [`TraceWriter::finish`]); an
    /// existing file is an error unless `force`.
    pub fn create(
        path: &Path,
        cfg: &ModelConfig,
        options: TraceOptions,
        force: bool,
    ) -> Result<Self> {
        let f = AtomicFile::create(path, force)?;
        TraceWriter::new(f, TraceHeader::new(cfg, options))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Finishes the trace and moves it into place; returns its path.
    pub fn finish(self) -> Result<PathBuf> {
        self.out.commit()
    }
}

impl<W: Write> TraceWriter<W> {
    /// Writes `header` as the first line of `out`.
    pub fn new(mut out: W, header: TraceHeader) -> io::Result<Self> {
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        Ok(Self {
            out,
            header,
            pass: 0,
            records: 0,
            record: TraceRecord {
                pass: 0,
                seq: 0,
                pos: 0,
                token: 0,
                byte: None,
                layers: Vec::new(),
            },
        })
    }

    /// The header written.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Token records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Writes one forward pass: `tokens` are its input ids (`trace.tokens()` of them, row-major).
    pub fn write_pass(&mut self, tokens: &[u32], trace: &ForwardTrace) -> Result<()> {
        if tokens.len() != trace.tokens() {
            bail!(
                "trace of {} tokens given {} token ids",
                trace.tokens(),
                tokens.len()
            );
        }
        let seq_len = trace.seq_len.max(1);
        let byte = self.header.tokenizer == TokenizerKind::Byte;
        let rec = &mut self.record;
        rec.pass = self.pass;
        rec.layers.resize_with(trace.moe.len(), || TraceLayer {
            layer: 0,
            experts: Vec::new(),
            weights: Vec::new(),
            dropped: Vec::new(),
            probs: None,
        });
        for (i, &token) in tokens.iter().enumerate() {
            rec.seq = i / seq_len;
            rec.pos = trace.start_pos + i % seq_len;
            rec.token = token;
            rec.byte = (byte && token < 256).then_some(token as u8);
            for (l, m) in rec.layers.iter_mut().zip(&trace.moe) {
                let r = &m.routing;
                l.layer = m.layer;
                l.experts.clear();
                l.weights.clear();
                l.dropped.clear();
                if i < r.tokens() {
                    for (e, w, kept) in r.choices(i) {
                        l.experts.push(e as u16);
                        l.weights.push(w);
                        if !kept {
                            l.dropped.push(e as u16);
                        }
                    }
                }
                l.probs = if self.header.probs && r.n_experts > 0 {
                    let e = r.n_experts;
                    r.probs.get(i * e..(i + 1) * e).map(<[f32]>::to_vec)
                } else {
                    None
                };
            }
            serde_json::to_writer(&mut self.out, rec)?;
            self.out.write_all(b"\n")?;
            self.records += 1;
        }
        self.pass += 1;
        Ok(())
    }

    /// The underlying writer (e.g. the buffer of a writer into memory).
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// The underlying writer, mutably: a recording takes the records out of its buffer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Flushes and returns the underlying writer (for writers other than files).
    pub fn into_inner(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a trace back: the header first, then one record per line.
pub struct TraceReader<R: BufRead> {
    header: TraceHeader,
    lines: io::Lines<R>,
    line_no: usize,
}

impl<R: BufRead> TraceReader<R> {
    /// Reads and checks the header line.
    pub fn new(input: R) -> Result<Self> {
        let mut lines = input.lines();
        let first = lines.next().context("empty trace: no header line")??;
        let header: TraceHeader =
            serde_json::from_str(&first).context("trace line 1 is not a trace header")?;
        if header.format != TRACE_FORMAT {
            bail!("not an xmoe-top trace (format `{}`)", header.format);
        }
        if header.version != TRACE_FORMAT_VERSION {
            bail!(
                "trace format version {} is not supported (this build reads {TRACE_FORMAT_VERSION})",
                header.version
            );
        }
        Ok(Self {
            header,
            lines,
            line_no: 1,
        })
    }

    /// The header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }
}

impl TraceReader<io::BufReader<File>> {
    /// Opens a trace file.
    pub fn open(path: &Path) -> Result<Self> {
        crate::input_file::regular_file(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Self::new(io::BufReader::new(f))
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<TraceRecord>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.line_no += 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(e.into())),
            };
            if line.trim().is_empty() {
                continue;
            }
            let n = self.line_no;
            return Some(
                serde_json::from_str(&line)
                    .with_context(|| format!("trace line {n} is not a record")),
            );
        }
    }
}
