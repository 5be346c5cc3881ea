//! Writing a recording: [`Recorder`] owns a writer thread fed through a bounded queue.
//!
//! The model thread's part (the observers) only clones a snapshot or a pass trace and offers it
//! to the queue with `try_send`; when the queue is full the item is dropped and counted, never
//! waited for. The writer thread encodes, compresses and appends chunks to `NAME.partial`,
//! flushing after every frame so that a crash loses at most the chunk being written;
//! [`Recorder::finish`] writes the end chunk and renames the file to `NAME`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::DeflateEncoder;

use super::{
    CHUNK_HEADER_LEN, ChunkKind, FORMAT_NAME, FORMAT_VERSION, FrameBody, FrameChunk, FrameData,
    KEYFRAME_EVERY, MAGIC, RecordingEnd, RecordingHeader, delta,
};
use crate::model::trace::ForwardTrace;
use crate::profiling::snapshot::Snapshot;
use crate::report::trace::{TraceHeader, TraceWriter};

/// Items waiting for the writer thread, frames and passes together.
const QUEUE_CAPACITY: usize = 1024;

/// Bytes of pass traces allowed in the queue at once (estimated): a pass's trace can be large
/// (every router probability of every token of a big batch), and small fast passes come by the
/// hundred per second; either way they must not crowd out the snapshots or take the memory.
const MAX_QUEUED_PASS_BYTES: usize = 64 << 20;

/// What a pass's copy holds, roughly: per token and MoE layer, the probabilities and the choices.
fn pass_bytes(trace: &ForwardTrace) -> usize {
    trace
        .moe
        .iter()
        .map(|m| trace.tokens() * (m.routing.n_experts * 4 + 64))
        .sum::<usize>()
        .max(1)
}

/// Trace records are gathered into one chunk until it holds this many bytes (or a frame comes).
const TRACE_CHUNK_BYTES: usize = 1 << 20;

/// The suffix of a recording being written.
pub const PARTIAL_SUFFIX: &str = ".partial";

enum Item {
    Frame(Box<Snapshot>),
    Pass(Vec<u32>, Box<ForwardTrace>),
}

/// Counters shared by the observers, the writer thread and the UI (which shows them).
#[derive(Debug, Default)]
pub struct RecorderStatus {
    /// The file being written (`NAME.partial` until the end).
    pub path: PathBuf,
    /// Frames written.
    pub frames: AtomicU64,
    /// Frames dropped (queue full, or the writer failed).
    pub dropped_frames: AtomicU64,
    /// Pass traces written.
    pub passes: AtomicU64,
    /// Pass traces dropped.
    pub dropped_passes: AtomicU64,
    queued_pass_bytes: AtomicUsize,
    /// The writer's error, once it failed (it writes nothing after).
    pub error: Mutex<Option<String>>,
}

impl RecorderStatus {
    /// One line for a status bar: "REC 123 frames" with drops and failure when there are any.
    pub fn line(&self) -> String {
        let frames = self.frames.load(Ordering::Relaxed);
        let df = self.dropped_frames.load(Ordering::Relaxed);
        let dp = self.dropped_passes.load(Ordering::Relaxed);
        if let Some(e) = self
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return format!("REC FAILED: {e}");
        }
        let mut s = format!("REC {frames} frames");
        if df > 0 || dp > 0 {
            s.push_str(&format!(" ({df} frames, {dp} passes dropped)"));
        }
        s
    }
}

/// What a finished recording holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingSummary {
    /// Where it is.
    pub path: PathBuf,
    /// Frames written.
    pub frames: u64,
    /// Frames dropped.
    pub dropped_frames: u64,
    /// Pass traces written.
    pub passes: u64,
    /// Pass traces dropped.
    pub dropped_passes: u64,
    /// File size, bytes.
    pub bytes: u64,
}

impl std::fmt::Display for RecordingSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recording written to {} ({} frames, {} passes, {})",
            self.path.display(),
            self.frames,
            self.passes,
            crate::units::bytes_one_decimal(self.bytes)
        )?;
        if self.dropped_frames > 0 || self.dropped_passes > 0 {
            write!(
                f,
                "; the writer fell behind and dropped {} frames and {} passes",
                self.dropped_frames, self.dropped_passes
            )?;
        }
        Ok(())
    }
}

/// A recording being written.
pub struct Recorder {
    tx: Option<SyncSender<Item>>,
    status: Arc<RecorderStatus>,
    handle: Option<JoinHandle<Result<File>>>,
    target: PathBuf,
    partial: PathBuf,
}

/// `NAME.partial` beside `path`.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

/// Appends one chunk (header, then the deflated payload) to `out`; returns the bytes written.
pub fn write_chunk(
    out: &mut impl Write,
    kind: ChunkKind,
    key: bool,
    seq: u64,
    time_us: u64,
    raw: &[u8],
) -> std::io::Result<u64> {
    let mut enc = DeflateEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::fast());
    enc.write_all(raw)?;
    let stored = enc.finish()?;
    let too_big = |n: usize| {
        u32::try_from(n)
            .ok()
            .filter(|&n| n <= super::MAX_CHUNK_BYTES)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a recording chunk of {n} bytes is over the format's limit"),
                )
            })
    };
    let (raw_len, stored_len) = (too_big(raw.len())?, too_big(stored.len())?);
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0] = kind.byte();
    h[1] = u8::from(key);
    h[4..8].copy_from_slice(&raw_len.to_le_bytes());
    h[8..12].copy_from_slice(&stored_len.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&time_us.to_le_bytes());
    let crc = chunk_crc(&h, &stored);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&h)?;
    out.write_all(&stored)?;
    Ok((CHUNK_HEADER_LEN + stored.len()) as u64)
}

/// CRC-32 of a chunk: its header without the CRC field, then its stored payload.
pub fn chunk_crc(header: &[u8; CHUNK_HEADER_LEN], stored: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..12]);
    h.update(&header[16..]);
    h.update(stored);
    h.finalize()
}

/// The file prefix: magic and version.
pub fn file_prefix() -> [u8; 12] {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    p
}

impl Recorder {
    /// Starts recording a session into `path` (written as `path.partial` until
    /// [`Recorder::finish`]); `trace` describes the model's MoE layers for the routing trace
    /// ([`TraceHeader::new`]). An existing `path` or `path.partial` is refused unless `force`.
    pub fn create(path: &Path, trace: TraceHeader, force: bool) -> Result<Self> {
        crate::atomic_file::check_target(path, force)?;
        let partial = partial_path(path);
        if partial.exists() && !force {
            bail!(
                "{} exists (a recording that did not end cleanly?): replay it, move it away, or pass --force",
                partial.display()
            );
        }
        let now = crate::report::unix_ms_now();
        let header = RecordingHeader {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            xmoe_top_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ms: now,
            created_utc: crate::report::iso8601_utc(now),
            command_line: std::env::args().collect(),
            model: trace.model.clone(),
            keyframe_every: KEYFRAME_EVERY,
            trace,
        };
        let file = File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut out = BufWriter::new(file);
        let raw = serde_json::to_vec(&header)?;
        out.write_all(&file_prefix())
            .and_then(|()| write_chunk(&mut out, ChunkKind::Header, true, 0, 0, &raw))
            .and_then(|_| out.flush())
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let status = Arc::new(RecorderStatus {
            path: partial.clone(),
            ..Default::default()
        });
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let st = status.clone();
        let trace_header = header.trace.clone();
        let handle = std::thread::Builder::new()
            .name("xmoe-record".into())
            .spawn(move || write_loop(rx, out, trace_header, &st))
            .context("cannot start the recording thread")?;
        Ok(Self {
            tx: Some(tx),
            status,
            handle: Some(handle),
            target: path.to_path_buf(),
            partial,
        })
    }

    /// The counters, for the UI.
    pub fn status(&self) -> Arc<RecorderStatus> {
        self.status.clone()
    }

    /// What the session calls with every snapshot: hands a copy to the writer or drops it.
    pub fn snapshot_observer(&self) -> impl FnMut(&Snapshot) + Send + 'static {
        let tx = self.tx.clone();
        let status = self.status.clone();
        move |s: &Snapshot| {
            let Some(tx) = &tx else { return };
            if tx.try_send(Item::Frame(Box::new(s.clone()))).is_err() {
                status.dropped_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// What the session calls after every measured pass: hands a copy of its routing to the
    /// writer or drops it. Never fails: a recording problem does not stop the session.
    pub fn pass_observer(
        &self,
    ) -> impl FnMut(&[u32], &ForwardTrace) -> Result<()> + Send + 'static {
        let tx = self.tx.clone();
        let status = self.status.clone();
        move |tokens: &[u32], trace: &ForwardTrace| {
            let Some(tx) = &tx else { return Ok(()) };
            let bytes = pass_bytes(trace);
            if status.queued_pass_bytes.load(Ordering::Relaxed) + bytes > MAX_QUEUED_PASS_BYTES {
                status.dropped_passes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            status.queued_pass_bytes.fetch_add(bytes, Ordering::Relaxed);
            match tx.try_send(Item::Pass(tokens.to_vec(), Box::new(trace.clone()))) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    status.queued_pass_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    status.dropped_passes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }
    }

    /// Writes what is queued and the end chunk, and renames `NAME.partial` to `NAME`. Call after
    /// the session has stopped (its observers hold senders; items they send later are dropped).
    pub fn finish(mut self) -> Result<RecordingSummary> {
        // The observers' senders go with the session; this one goes now, so the writer sees the
        // queue close once the session is gone.
        self.tx = None;
        let handle = self.handle.take().expect("finish runs once");
        let file = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the recording thread panicked"))??;
        file.sync_all()
            .with_context(|| format!("cannot write {}", self.partial.display()))?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(file);
        std::fs::rename(&self.partial, &self.target).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.partial.display(),
                self.target.display()
            )
        })?;
        let st = &self.status;
        Ok(RecordingSummary {
            path: self.target.clone(),
            frames: st.frames.load(Ordering::Relaxed),
            dropped_frames: st.dropped_frames.load(Ordering::Relaxed),
            passes: st.passes.load(Ordering::Relaxed),
            dropped_passes: st.dropped_passes.load(Ordering::Relaxed),
            bytes,
        })
    }
}

/// The writer thread: encodes and appends every item until the queue closes, then the end chunk.
fn write_loop(
    rx: Receiver<Item>,
    out: BufWriter<File>,
    trace_header: TraceHeader,
    status: &RecorderStatus,
) -> Result<File> {
    let mut w = ChunkWriter {
        out,
        trace: TraceWriter::new(Vec::new(), trace_header)?,
        prev: None,
        frames: 0,
        trace_start: 0,
        last_seq: 0,
        last_time_us: 0,
    };
    // The trace writer's header line is not part of a chunk: readers rebuild it from the
    // recording header.
    w.trace_start = w.trace.get_ref().len();
    let mut failed: Option<anyhow::Error> = None;
    for item in rx {
        let is_pass = matches!(item, Item::Pass(..));
        if let Item::Pass(_, t) = &item {
            status
                .queued_pass_bytes
                .fetch_sub(pass_bytes(t), Ordering::Relaxed);
        }
        if failed.is_some() {
            // Nothing more is written after an error; what arrives is counted as dropped.
            let c = if is_pass {
                &status.dropped_passes
            } else {
                &status.dropped_frames
            };
            c.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let r = match item {
            Item::Frame(s) => w.frame(&s, status),
            Item::Pass(tokens, trace) => w.pass(&tokens, &trace, status),
        };
        if let Err(e) = r {
            *status.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        return Err(e.context(format!("cannot write {}", status.path.display())));
    }
    w.flush_trace()?;
    let end = RecordingEnd {
        frames: status.frames.load(Ordering::Relaxed),
        dropped_frames: status.dropped_frames.load(Ordering::Relaxed),
        passes: status.passes.load(Ordering::Relaxed),
        dropped_passes: status.dropped_passes.load(Ordering::Relaxed),
        ended_unix_ms: crate::report::unix_ms_now(),
    };
    let raw = serde_json::to_vec(&end)?;
    write_chunk(
        &mut w.out,
        ChunkKind::End,
        false,
        w.last_seq,
        w.last_time_us,
        &raw,
    )
    .and_then(|_| w.out.flush())
    .with_context(|| format!("cannot write {}", status.path.display()))?;
    w.out
        .into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {}", status.path.display(), e.error()))
}

struct ChunkWriter {
    out: BufWriter<File>,
    trace: TraceWriter<Vec<u8>>,
    prev: Option<serde_json::Value>,
    frames: u64,
    trace_start: usize,
    last_seq: u64,
    last_time_us: u64,
}

impl ChunkWriter {
    fn frame(&mut self, s: &Snapshot, status: &RecorderStatus) -> Result<()> {
        // Trace records of the passes before this snapshot come before it in the file.
        self.flush_trace()?;
        let value = serde_json::to_value(FrameData::of(s))?;
        let due = self.frames.is_multiple_of(KEYFRAME_EVERY) || self.prev.is_none();
        let chunk = |body| FrameChunk {
            index: self.frames,
            dropped_frames: status.dropped_frames.load(Ordering::Relaxed),
            dropped_passes: status.dropped_passes.load(Ordering::Relaxed),
            body,
        };
        let delta = match (&self.prev, due) {
            (Some(prev), false) => Some(serde_json::to_vec(&chunk(FrameBody::Delta(
                delta::diff(prev, &value).unwrap_or_else(|| serde_json::json!({"+": {}})),
            )))?),
            _ => None,
        };
        // Early in a session nearly every figure changes between frames, and a delta listing
        // them all is longer than the frame itself: then a key frame is written instead.
        let full = serde_json::to_vec(&chunk(FrameBody::Key(value.clone())))?;
        let (key, raw) = match delta {
            Some(d) if d.len() < full.len() => (false, d),
            _ => (true, full),
        };
        let time_us = (s.session_elapsed_s.max(0.0) * 1e6) as u64;
        write_chunk(
            &mut self.out,
            ChunkKind::Frame,
            key,
            s.sequence,
            time_us,
            &raw,
        )?;
        // A crash loses at most the chunk being written.
        self.out.flush()?;
        self.prev = Some(value);
        self.frames += 1;
        self.last_seq = s.sequence;
        self.last_time_us = time_us;
        status.frames.store(self.frames, Ordering::Relaxed);
        Ok(())
    }

    fn pass(
        &mut self,
        tokens: &[u32],
        trace: &ForwardTrace,
        status: &RecorderStatus,
    ) -> Result<()> {
        self.trace.write_pass(tokens, trace)?;
        status.passes.fetch_add(1, Ordering::Relaxed);
        if self.trace.get_ref().len() - self.trace_start >= TRACE_CHUNK_BYTES {
            self.flush_trace()?;
        }
        Ok(())
    }

    fn flush_trace(&mut self) -> Result<()> {
        let buf = self.trace.get_mut();
        if buf.len() > self.trace_start {
            write_chunk(
                &mut self.out,
                ChunkKind::Trace,
                false,
                self.last_seq,
                self.last_time_us,
                &buf[self.trace_start..],
            )?;
        }
        buf.clear();
        self.trace_start = 0;
        Ok(())
    }
}
