//! Recordings of a session (`--record FILE`) and their playback (`xmoe-top replay FILE`).
//!
//! A recording holds what the UI showed over time: every snapshot the session published (with
//! the history the history panel draws) and the routing trace of every measured pass, as
//! `docs/trace-format.md` records. The layout is in `docs/recording-format.md`: a magic and a
//! format version, then chunks, each with its own header, CRC-32 and deflate stream, so that a
//! file cut anywhere (a crash leaves `NAME.partial`) is readable up to its last complete chunk.
//! Snapshots are stored as a full key frame every [`KEYFRAME_EVERY`] frames and as a [`delta`]
//! against the previous one in between.
//!
//! [`Recorder`] writes (on its own thread: the model thread only clones and hands over, and
//! drops what does not fit in a bounded queue, counting it); [`Recording`] reads.

pub mod delta;
pub mod reader;
pub mod writer;

use serde::{Deserialize, Serialize};

use crate::profiling::snapshot::{HistoryPoint, Snapshot};
use crate::report::trace::TraceHeader;

pub use reader::{Damage, Recording};
pub use writer::{Recorder, RecorderStatus, RecordingSummary};

/// The first eight bytes of every recording.
pub const MAGIC: [u8; 8] = *b"XMOE-REC";

/// `format` of the header chunk.
pub const FORMAT_NAME: &str = "xmoe-top-recording";

/// Version of the layout (after the magic, little-endian u32); bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;

/// A key frame (a whole snapshot) every this many frames; deltas in between. Seeking decodes at
/// most this many frames.
pub const KEYFRAME_EVERY: u64 = 50;

/// Largest chunk a reader accepts, stored or inflated (a snapshot of a 60-layer, 256-expert
/// model is a few MB of JSON; a pass of trace records is flushed at 1 MiB).
pub const MAX_CHUNK_BYTES: u32 = 256 << 20;

/// What a chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// The [`RecordingHeader`], always first.
    Header,
    /// One snapshot ([`FrameChunk`]).
    Frame,
    /// Routing trace records of whole passes (JSON Lines of `TraceRecord`).
    Trace,
    /// The [`RecordingEnd`], last in a recording that ended cleanly.
    End,
}

impl ChunkKind {
    /// The kind's byte in the chunk header.
    pub fn byte(self) -> u8 {
        match self {
            ChunkKind::Header => 1,
            ChunkKind::Frame => 2,
            ChunkKind::Trace => 3,
            ChunkKind::End => 4,
        }
    }

    /// The kind a chunk header's byte names.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => ChunkKind::Header,
            2 => ChunkKind::Frame,
            3 => ChunkKind::Trace,
            4 => ChunkKind::End,
            _ => return None,
        })
    }
}

/// The first chunk: what was recorded, when, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordingHeader {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Version of xmoe-top that recorded.
    pub xmoe_top_version: String,
    /// When recording started, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The same instant, ISO 8601 UTC.
    pub created_utc: String,
    /// The command line that recorded (program name first).
    pub command_line: Vec<String>,
    /// Model name.
    pub model: String,
    /// Key frame interval, frames.
    pub keyframe_every: u64,
    /// Header of the routing trace carried in the trace chunks.
    pub trace: TraceHeader,
}

/// What is stored for one published snapshot: the snapshot as reports serialise it plus the
/// history the live UI's history panel draws (a report leaves it out).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameData {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Its history points.
    pub history: Vec<HistoryPoint>,
}

impl FrameData {
    /// The stored form of `snapshot`.
    pub fn of(snapshot: &Snapshot) -> Self {
        Self {
            snapshot: snapshot.clone(),
            history: snapshot.history.clone(),
        }
    }

    /// The snapshot with its history put back.
    pub fn into_snapshot(self) -> Snapshot {
        let mut s = self.snapshot;
        s.history = self.history;
        s
    }
}

/// A frame chunk's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameChunk {
    /// Frame number in the recording, from 0.
    pub index: u64,
    /// Frames the recorder had dropped before this one (its queue was full).
    pub dropped_frames: u64,
    /// Passes whose trace the recorder had dropped before this frame.
    pub dropped_passes: u64,
    /// The snapshot: whole, or as a delta against the previous frame.
    pub body: FrameBody,
}

/// A frame's snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameBody {
    /// The whole [`FrameData`] as JSON.
    Key(serde_json::Value),
    /// A [`delta`] against the previous frame's JSON.
    Delta(serde_json::Value),
}

/// The last chunk of a recording that ended cleanly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordingEnd {
    /// Frames written.
    pub frames: u64,
    /// Frames dropped because the writer fell behind.
    pub dropped_frames: u64,
    /// Passes whose trace was written.
    pub passes: u64,
    /// Passes whose trace was dropped because the writer fell behind.
    pub dropped_passes: u64,
    /// When recording ended, milliseconds since the Unix epoch.
    pub ended_unix_ms: u64,
}

#[cfg(test)]
mod tests;
