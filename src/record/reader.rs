//! Reading a recording: the chunk index at open, frames decoded on demand.
//!
//! [`Recording::open`] reads the file, checks the magic, the version and the header chunk,
//! then walks the chunks checking each one's CRC. It stops at the first chunk that is cut short
//! or corrupt and keeps everything before it ([`Damage`] says what was lost), so the `.partial`
//! file of a crashed session replays up to its last complete frame. Frames are inflated and
//! their deltas applied when asked for ([`Recording::frame`]); the last decoded one is kept, so
//! playing forward applies one delta per frame.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use flate2::read::DeflateDecoder;
use serde_json::Value;

use super::writer::chunk_crc;
use super::{
    CHUNK_HEADER_LEN, ChunkKind, FORMAT_NAME, FORMAT_VERSION, FrameBody, FrameChunk, FrameData,
    MAGIC, MAX_CHUNK_BYTES, RecordingEnd, RecordingHeader, delta,
};
use crate::profiling::snapshot::Snapshot;

/// Largest recording file read (it is read whole; a session of hours is well under this).
pub const MAX_FILE_BYTES: u64 = 16 << 30;

#[derive(Clone, Copy, Debug)]
struct ChunkRef {
    /// Offset of the chunk header in the file.
    at: usize,
    /// The stored (deflated) payload.
    start: usize,
    stored: usize,
    raw: usize,
}

/// One recorded frame, as the index knows it without decoding it.
#[derive(Clone, Copy, Debug)]
pub struct FrameRef {
    chunk: ChunkRef,
    /// The snapshot's sequence number in the session.
    pub sequence: u64,
    /// Session time of the snapshot, seconds.
    pub t_s: f64,
    /// A key frame (decodable without the frames before it).
    pub key: bool,
}

/// What a recording lost at its end.
#[derive(Clone, Debug, PartialEq)]
pub enum Damage {
    /// The file ends inside a chunk (a crash or a cut copy): that chunk is skipped.
    Truncated {
        /// File offset of the incomplete chunk.
        at: u64,
        /// What the incomplete chunk held, when its header was complete.
        kind: Option<ChunkKind>,
        /// Bytes of it present, and bytes it needed.
        have: u64,
        /// Bytes it needed (header plus payload), when known.
        need: Option<u64>,
    },
    /// A chunk fails its check (CRC, kind, length): it and everything after it are skipped.
    Corrupt {
        /// File offset of the chunk.
        at: u64,
        /// Why.
        why: String,
        /// Bytes skipped from there to the end of the file.
        skipped: u64,
    },
    /// Every chunk is complete but the end marker is missing: the session did not end cleanly.
    NoEnd,
}

/// A recording opened for playback.
pub struct Recording {
    label: String,
    data: Vec<u8>,
    header: RecordingHeader,
    frames: Vec<FrameRef>,
    traces: Vec<ChunkRef>,
    end: Option<RecordingEnd>,
    damage: Option<Damage>,
    last_drops: (u64, u64),
    cache: Option<(usize, Value)>,
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A chunk read from the file, or why it could not be.
enum Next {
    Chunk(ChunkKind, bool, u64, u64, ChunkRef),
    Eof,
    Damaged(Damage),
}

fn next_chunk(data: &[u8], at: usize) -> Next {
    let rest = data.len() - at;
    if rest == 0 {
        return Next::Eof;
    }
    if rest < CHUNK_HEADER_LEN {
        return Next::Damaged(Damage::Truncated {
            at: at as u64,
            kind: None,
            have: rest as u64,
            need: None,
        });
    }
    let h: &[u8; CHUNK_HEADER_LEN] = data[at..at + CHUNK_HEADER_LEN]
        .try_into()
        .expect("slice of the header's length");
    let corrupt = |why: String| {
        Next::Damaged(Damage::Corrupt {
            at: at as u64,
            why,
            skipped: rest as u64,
        })
    };
    let Some(kind) = ChunkKind::from_byte(h[0]) else {
        return corrupt(format!("unknown chunk kind {}", h[0]));
    };
    if h[1] > 1 || h[2] != 0 || h[3] != 0 {
        return corrupt("reserved header bytes are set".into());
    }
    let raw = le_u32(&h[4..8]);
    let stored = le_u32(&h[8..12]);
    if raw > MAX_CHUNK_BYTES || stored > MAX_CHUNK_BYTES {
        return corrupt(format!(
            "a chunk of {stored} bytes ({raw} inflated) is over the limit of {MAX_CHUNK_BYTES}"
        ));
    }
    let need = CHUNK_HEADER_LEN + stored as usize;
    if rest < need {
        return Next::Damaged(Damage::Truncated {
            at: at as u64,
            kind: Some(kind),
            have: rest as u64,
            need: Some(need as u64),
        });
    }
    let start = at + CHUNK_HEADER_LEN;
    let payload = &data[start..start + stored as usize];
    // Fuzzing builds skip the check, so that mutated payloads reach the decoders behind it.
    if !cfg!(fuzzing) && chunk_crc(h, payload) != le_u32(&h[12..16]) {
        return corrupt("CRC mismatch".into());
    }
    Next::Chunk(
        kind,
        h[1] == 1,
        le_u64(&h[16..24]),
        le_u64(&h[24..32]),
        ChunkRef {
            at,
            start,
            stored: stored as usize,
            raw: raw as usize,
        },
    )
}

impl Recording {
    /// Opens `path`. Errors (one line each): not a recording, a newer format version, a header
    /// that cannot be read, no complete frame. Damage after the first frame is not an error:
    /// see [`Recording::damage`].
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let data = crate::input_file::read(path, MAX_FILE_BYTES)
            .with_context(|| format!("cannot read {label}"))?;
        Self::from_bytes(data, &label)
    }

    /// [`Recording::open`] on bytes already read; `label` names them in messages.
    pub fn from_bytes(data: Vec<u8>, label: &str) -> Result<Self> {
        if data.len() < MAGIC.len() || data[..MAGIC.len()] != MAGIC {
            bail!("{label}: not an xmoe-top recording (it does not start with `XMOE-REC`)");
        }
        if data.len() < 12 {
            bail!(
                "{label}: truncated after {} bytes, inside the format version: nothing to replay",
                data.len()
            );
        }
        let version = le_u32(&data[8..12]);
        if version > FORMAT_VERSION {
            bail!(
                "{label}: recording format version {version} is newer than this xmoe-top reads ({FORMAT_VERSION}): replay it with a newer xmoe-top"
            );
        }
        if version != FORMAT_VERSION {
            bail!("{label}: recording format version {version} is not one xmoe-top ever wrote");
        }
        let header = match next_chunk(&data, 12) {
            Next::Chunk(ChunkKind::Header, _, _, _, c) => {
                let raw = inflate(&data, c).with_context(|| format!("{label}: header chunk"))?;
                let h: RecordingHeader = serde_json::from_slice(&raw).with_context(|| {
                    format!("{label}: the header chunk is not a recording header")
                })?;
                if h.format != FORMAT_NAME {
                    bail!("{label}: not an xmoe-top recording (format `{}`)", h.format);
                }
                if h.version != version {
                    bail!(
                        "{label}: the header says format version {} but the file starts with version {version}",
                        h.version
                    );
                }
                if h.keyframe_every == 0 {
                    bail!("{label}: the header's key frame interval is 0");
                }
                h
            }
            Next::Chunk(kind, ..) => {
                bail!(
                    "{label}: the first chunk is a {kind:?} chunk, not the header: not a readable recording"
                )
            }
            Next::Eof => {
                bail!("{label}: ends after the format version: no header, nothing to replay")
            }
            Next::Damaged(d) => bail!("{label}: the header chunk is unreadable: {}", describe(&d)),
        };
        let mut r = Self {
            label: label.to_string(),
            header,
            frames: Vec::new(),
            traces: Vec::new(),
            end: None,
            damage: None,
            last_drops: (0, 0),
            cache: None,
            data: Vec::new(),
        };
        let Next::Chunk(.., first) = next_chunk(&data, 12) else {
            unreachable!("the header chunk was read above")
        };
        let mut at = first.start + first.stored;
        loop {
            match next_chunk(&data, at) {
                Next::Eof => {
                    if r.end.is_none() {
                        r.damage = Some(Damage::NoEnd);
                    }
                    break;
                }
                Next::Damaged(d) => {
                    r.damage = Some(d);
                    break;
                }
                Next::Chunk(kind, key, seq, time_us, c) => {
                    if r.end.is_some() {
                        r.damage = Some(Damage::Corrupt {
                            at: c.at as u64,
                            why: format!("a {kind:?} chunk after the end marker"),
                            skipped: (data.len() - c.at) as u64,
                        });
                        break;
                    }
                    match kind {
                        ChunkKind::Frame => {
                            if r.frames.is_empty() && !key {
                                r.damage = Some(Damage::Corrupt {
                                    at: c.at as u64,
                                    why: "the first frame is not a key frame".into(),
                                    skipped: (data.len() - c.at) as u64,
                                });
                                break;
                            }
                            r.frames.push(FrameRef {
                                chunk: c,
                                sequence: seq,
                                t_s: time_us as f64 / 1e6,
                                key,
                            })
                        }
                        ChunkKind::Trace => r.traces.push(c),
                        ChunkKind::End => {
                            let raw = inflate(&data, c);
                            match raw.and_then(|raw| Ok(serde_json::from_slice(&raw)?)) {
                                Ok(end) => r.end = Some(end),
                                Err(e) => {
                                    r.damage = Some(Damage::Corrupt {
                                        at: c.at as u64,
                                        why: format!("the end marker cannot be read: {e:#}"),
                                        skipped: (data.len() - c.at) as u64,
                                    });
                                    break;
                                }
                            }
                        }
                        ChunkKind::Header => {
                            r.damage = Some(Damage::Corrupt {
                                at: c.at as u64,
                                why: "a second header chunk".into(),
                                skipped: (data.len() - c.at) as u64,
                            });
                            break;
                        }
                    }
                    at = c.start + c.stored;
                }
            }
        }
        r.data = data;
        if r.frames.is_empty() {
            let why = r
                .damage
                .as_ref()
                .map(|d| format!(" ({})", describe(d)))
                .unwrap_or_default();
            bail!("{label}: holds no complete frame{why}: nothing to replay");
        }
        // The drop counters as of the last frame (the end marker has them for a clean file).
        let last = r.frames.len() - 1;
        let chunk = r.frame_chunk(last).map_err(|e| r.frame_error(last, e))?;
        r.last_drops = (chunk.dropped_frames, chunk.dropped_passes);
        Ok(r)
    }

    /// The header chunk.
    pub fn header(&self) -> &RecordingHeader {
        &self.header
    }

    /// The file as given.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The frames, in order.
    pub fn frames(&self) -> &[FrameRef] {
        &self.frames
    }

    /// The end marker, for a recording that ended cleanly.
    pub fn end(&self) -> Option<&RecordingEnd> {
        self.end.as_ref()
    }

    /// What was lost at the end of the file, if anything.
    pub fn damage(&self) -> Option<&Damage> {
        self.damage.as_ref()
    }

    /// Frames and passes the recorder dropped because it fell behind.
    pub fn dropped(&self) -> (u64, u64) {
        match &self.end {
            Some(e) => (e.dropped_frames, e.dropped_passes),
            None => self.last_drops,
        }
    }

    /// The frame showing session time `t_s`: the last one at or before it (the first one for
    /// a time before it).
    pub fn frame_at(&self, t_s: f64) -> usize {
        self.frames
            .partition_point(|f| f.t_s <= t_s)
            .saturating_sub(1)
    }

    /// Lines that say what a reader should know: damage and drops (empty for a clean recording).
    pub fn notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        let last = self.frames.last().expect("a recording has a frame");
        if let Some(d) = &self.damage {
            v.push(format!(
                "{}: {}; read up to frame {} at {:.1} s",
                self.label,
                describe(d),
                self.frames.len(),
                last.t_s
            ));
        }
        let (df, dp) = self.dropped();
        if df > 0 || dp > 0 {
            v.push(format!(
                "{}: the recorder fell behind and dropped {df} frames and the trace of {dp} passes",
                self.label
            ));
        }
        v
    }

    fn frame_chunk(&self, i: usize) -> Result<FrameChunk> {
        let f = self.frames[i];
        let raw = inflate(&self.data, f.chunk)?;
        let chunk: FrameChunk = serde_json::from_slice(&raw).context("not a frame")?;
        if chunk.index != i as u64 {
            bail!("it says it is frame {}", chunk.index);
        }
        if matches!(chunk.body, FrameBody::Key(_)) != f.key {
            bail!("its body does not match the key-frame flag of its header");
        }
        Ok(chunk)
    }

    /// The snapshot of frame `i` (0-based), with its history.
    pub fn frame(&mut self, i: usize) -> Result<Snapshot> {
        let n = self.frames.len();
        if i >= n {
            bail!(
                "{}: frame {i} is past the last one ({n} frames)",
                self.label
            );
        }
        let key = (0..=i).rev().find(|&j| self.frames[j].key).unwrap_or(0);
        let (mut at, mut value) = match self.cache.take() {
            Some((c, v)) if c <= i && c >= key => (c, v),
            _ => (key, self.key_value(key)?),
        };
        while at < i {
            at += 1;
            let chunk = self.frame_chunk(at).map_err(|e| self.frame_error(at, e))?;
            match chunk.body {
                FrameBody::Delta(d) => {
                    delta::apply(&mut value, &d).map_err(|e| self.frame_error(at, e))?
                }
                FrameBody::Key(v) => value = v,
            }
        }
        let data: FrameData = serde_json::from_value(value.clone())
            .map_err(|e| self.frame_error(i, anyhow!("not a snapshot: {e}")))?;
        self.cache = Some((i, value));
        Ok(data.into_snapshot())
    }

    fn key_value(&self, i: usize) -> Result<Value> {
        match self
            .frame_chunk(i)
            .map_err(|e| self.frame_error(i, e))?
            .body
        {
            FrameBody::Key(v) => Ok(v),
            FrameBody::Delta(_) => Err(self.frame_error(i, anyhow!("not a key frame"))),
        }
    }

    fn frame_error(&self, i: usize, e: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{}: frame {} (chunk at byte {}) is corrupt: {e:#}",
            self.label,
            i + 1,
            self.frames[i].chunk.at
        )
    }

    /// Writes the recorded routing trace as a trace file (`docs/trace-format.md`: the header line,
    /// then one record per token); returns the number of records.
    pub fn write_trace(&self, out: &mut impl Write) -> Result<u64> {
        serde_json::to_writer(&mut *out, &self.header.trace)?;
        out.write_all(b"\n")?;
        let mut records = 0u64;
        for c in &self.traces {
            let raw = inflate(&self.data, *c).with_context(|| {
                format!("{}: trace chunk at byte {} is corrupt", self.label, c.at)
            })?;
            records += raw.iter().filter(|&&b| b == b'\n').count() as u64;
            out.write_all(&raw)?;
        }
        Ok(records)
    }
}

/// The damage in words, without the file name.
pub fn describe(d: &Damage) -> String {
    match d {
        Damage::Truncated {
            at,
            kind,
            have,
            need,
        } => {
            let what = match kind {
                Some(ChunkKind::Frame) => "1 incomplete frame lost".to_string(),
                Some(k) => format!("an incomplete {k:?} chunk lost"),
                None => "an incomplete chunk header lost".to_string(),
            };
            let of = need.map(|n| format!(" of {n}")).unwrap_or_default();
            format!("truncated at byte {}: {what} ({have}{of} bytes present); the recording did not end cleanly", at + have)
        }
        Damage::Corrupt { at, why, skipped } => {
            format!("corrupt chunk at byte {at} ({why}): the last {skipped} bytes are skipped")
        }
        Damage::NoEnd => "no end marker: the recording did not end cleanly (the session crashed or was killed, or the copy is cut short at a chunk boundary)".to_string(),
    }
}

/// The inflated payload of `c`, checked against its declared size.
fn inflate(data: &[u8], c: ChunkRef) -> Result<Vec<u8>> {
    let stored = &data[c.start..c.start + c.stored];
    let mut out = Vec::with_capacity(c.raw.min(64 << 20));
    DeflateDecoder::new(stored)
        .take(c.raw as u64 + 1)
        .read_to_end(&mut out)
        .context("cannot inflate")?;
    if out.len() != c.raw {
        bail!(
            "inflates to {}{} bytes, not the {} its header says",
            if out.len() > c.raw { "more than " } else { "" },
            out.len().min(c.raw),
            c.raw
        );
    }
    Ok(out)
}
