//! Recording round trips and damaged files, on fixture snapshots (no model runs).

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::profiling::fixtures::{example_config, example_snapshot};
use crate::profiling::snapshot::WorkloadKind;
use crate::report::trace::TraceOptions;

/// `n` snapshots that differ the way a session's do: sequence, time, tokens, a history point.
fn snapshots(n: u64) -> Vec<Snapshot> {
    let base = example_snapshot(WorkloadKind::Eval, 8, false);
    (0..n)
        .map(|i| {
            let mut s = base.clone();
            s.sequence = i;
            s.session_elapsed_s = 0.1 * i as f64;
            s.tokens_processed_total = 100 * i;
            s.epoch.tokens_per_second = 1000.0 + i as f64 / 3.0;
            s.paused = i % 7 == 3;
            s.ended = (i + 1 == n).then(|| "token budget reached".to_string());
            s.history.truncate((i as usize).min(s.history.len()));
            s
        })
        .collect()
}

/// Records `snaps` into `path` (waiting for the writer between frames, so none is dropped).
fn record(path: &Path, snaps: &[Snapshot]) -> RecordingSummary {
    let trace = TraceHeader::new(&example_config(8), TraceOptions { probs: false });
    let rec = Recorder::create(path, trace, false).unwrap();
    let mut obs = rec.snapshot_observer();
    let status = rec.status();
    for (i, s) in snaps.iter().enumerate() {
        obs(s);
        while status.frames.load(std::sync::atomic::Ordering::Relaxed) < i as u64 + 1 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    drop(obs);
    rec.finish().unwrap()
}

#[test]
fn frames_round_trip_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.xmoe-rec");
    let snaps = snapshots(2 * KEYFRAME_EVERY + 7);
    let summary = record(&path, &snaps);
    assert_eq!(summary.frames, snaps.len() as u64);
    assert_eq!((summary.dropped_frames, summary.dropped_passes), (0, 0));
    assert!(!writer::partial_path(&path).exists());
    let mut r = Recording::open(&path).unwrap();
    assert_eq!(r.frames().len(), snaps.len());
    assert!(r.damage().is_none() && r.notes().is_empty());
    assert_eq!(r.end().unwrap().frames, snaps.len() as u64);
    let keys: Vec<usize> = (0..snaps.len()).filter(|&i| r.frames()[i].key).collect();
    assert_eq!(keys, vec![0, 50, 100]);
    // Forward, backward and jumping across key frames.
    let order: Vec<usize> = (0..snaps.len())
        .chain((0..snaps.len()).rev())
        .chain([3, 99, 51, 0, 106])
        .collect();
    for i in order {
        assert_eq!(r.frame(i).unwrap(), snaps[i], "frame {i}");
    }
    assert_eq!(r.frame_at(0.25), 2);
    assert_eq!(r.frame_at(-1.0), 0);
    assert_eq!(r.frame_at(1e9), snaps.len() - 1);
    // Deltas keep the file small: the whole recording is far below one key frame per snapshot.
    let key_bytes = serde_json::to_vec(&FrameData::of(&snaps[0])).unwrap().len();
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        size < key_bytes * snaps.len() / 10,
        "{size} bytes for {} frames of {key_bytes} bytes of JSON",
        snaps.len()
    );
}

#[test]
fn existing_files_are_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.xmoe-rec");
    record(&path, &snapshots(2));
    let trace = || TraceHeader::new(&example_config(8), TraceOptions { probs: false });
    assert!(Recorder::create(&path, trace(), false).is_err());
    let other = dir.path().join("t.xmoe-rec");
    std::fs::write(writer::partial_path(&other), b"left by a crash").unwrap();
    let e = Recorder::create(&other, trace(), false).err().unwrap();
    assert!(format!("{e:#}").contains("did not end cleanly"), "{e:#}");
    record_forced(&other);
}

fn record_forced(path: &Path) {
    let trace = TraceHeader::new(&example_config(8), TraceOptions { probs: false });
    let rec = Recorder::create(path, trace, true).unwrap();
    rec.finish().unwrap();
    // No frame: nothing to replay, said in one line.
    let e = Recording::open(path).err().unwrap();
    assert!(
        format!("{e:#}").contains("holds no complete frame"),
        "{e:#}"
    );
}

/// Chunk starts (offsets) of a recording's bytes, header chunk included.
fn chunk_starts(data: &[u8]) -> Vec<usize> {
    let mut at = 12;
    let mut v = Vec::new();
    while at + CHUNK_HEADER_LEN <= data.len() {
        v.push(at);
        let stored = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        at += CHUNK_HEADER_LEN + stored;
    }
    v
}

#[test]
fn a_cut_file_reads_to_its_last_complete_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.xmoe-rec");
    let snaps = snapshots(12);
    record(&path, &snaps);
    let data = std::fs::read(&path).unwrap();
    let starts = chunk_starts(&data);
    // Chunks: header, 12 frames, end.
    assert_eq!(starts.len(), 14);
    // Cut inside the last frame: 11 frames remain, 1 incomplete frame lost.
    let cut = starts[12] + 40;
    let mut r = Recording::from_bytes(data[..cut].to_vec(), "s.xmoe-rec.partial").unwrap();
    assert_eq!(r.frames().len(), 11);
    assert_eq!(r.frame(10).unwrap(), snaps[10]);
    let notes = r.notes().join("\n");
    assert!(notes.contains("1 incomplete frame lost"), "{notes}");
    assert!(notes.contains("read up to frame 11"), "{notes}");
    // Cut at a chunk boundary before the end marker: every frame, no end.
    let r = Recording::from_bytes(data[..starts[13]].to_vec(), "x").unwrap();
    assert_eq!(r.frames().len(), 12);
    assert_eq!(r.damage(), Some(&Damage::NoEnd));
    // Inside a chunk header.
    let r = Recording::from_bytes(data[..starts[5] + 7].to_vec(), "x").unwrap();
    assert_eq!(r.frames().len(), 4);
    assert!(matches!(
        r.damage(),
        Some(Damage::Truncated { kind: None, .. })
    ));
    // Cut points around every chunk boundary and through the payloads: never a panic; an error
    // only when no frame is complete.
    let cuts = starts
        .iter()
        .flat_map(|&s| [s - 1, s, s + 1, s + CHUNK_HEADER_LEN])
        .chain((0..data.len()).step_by(61));
    for n in cuts.filter(|&n| n <= data.len()) {
        match Recording::from_bytes(data[..n].to_vec(), "x") {
            Ok(mut r) => {
                let last = r.frames().len() - 1;
                assert_eq!(r.frame(last).unwrap(), snaps[last]);
            }
            Err(_) => assert!(n < starts[2], "cut at {n} lost every frame"),
        }
    }
}

fn error_of(data: Vec<u8>) -> String {
    format!(
        "{:#}",
        Recording::from_bytes(data, "f.xmoe-rec").err().unwrap()
    )
}

#[test]
fn bad_files_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.xmoe-rec");
    let snaps = snapshots(5);
    record(&path, &snaps);
    let data = std::fs::read(&path).unwrap();
    let starts = chunk_starts(&data);

    let e = error_of(b"PK\x03\x04 a zip file, not a recording".to_vec());
    assert!(e.contains("not an xmoe-top recording"), "{e}");
    assert!(error_of(Vec::new()).contains("not an xmoe-top recording"));

    let mut newer = data.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = error_of(newer);
    assert!(
        e.contains("version 2 is newer than this xmoe-top reads (1)"),
        "{e}"
    );

    // A flipped byte in frame 3's payload: its CRC fails, frames 0-2 remain.
    let mut corrupt = data.clone();
    corrupt[starts[4] + CHUNK_HEADER_LEN + 5] ^= 0x40;
    let r = Recording::from_bytes(corrupt, "f").unwrap();
    assert_eq!(r.frames().len(), 3);
    let notes = r.notes().join("\n");
    assert!(notes.contains("CRC mismatch"), "{notes}");

    // The header chunk itself corrupt.
    let mut corrupt = data.clone();
    corrupt[starts[0] + CHUNK_HEADER_LEN + 2] ^= 0x01;
    let e = error_of(corrupt);
    assert!(
        e.contains("header chunk is unreadable") && e.contains("CRC"),
        "{e}"
    );

    for e in [e, error_of(b"XMOE-REC\x01\0\0\0".to_vec())] {
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn a_frame_whose_delta_does_not_fit_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.xmoe-rec");
    record(&path, &snapshots(3));
    let data = std::fs::read(&path).unwrap();
    let starts = chunk_starts(&data);
    // Rewrite frame 1 as a valid chunk whose delta names an index past the end of an array.
    let bad = FrameChunk {
        index: 1,
        dropped_frames: 0,
        dropped_passes: 0,
        body: FrameBody::Delta(serde_json::json!({"+": {"history": {"[": [[99, {"=": 1}]]}}})),
    };
    let mut out = data[..starts[2]].to_vec();
    writer::write_chunk(
        &mut out,
        ChunkKind::Frame,
        false,
        1,
        100_000,
        &serde_json::to_vec(&bad).unwrap(),
    )
    .unwrap();
    out.extend_from_slice(&data[starts[3]..]);
    let mut r = Recording::from_bytes(out, "f").unwrap();
    assert!(r.frame(0).is_ok());
    let e = format!("{:#}", r.frame(1).unwrap_err());
    assert!(
        e.contains("frame 2") && e.contains("is corrupt") && e.contains("past the end"),
        "{e}"
    );
}
