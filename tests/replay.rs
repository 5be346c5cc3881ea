//! `--record` and `xmoe-top replay`, end to end through the binary: a recorded headless run
//! replays to the report the run wrote, a cut `.partial` replays, bad files are one clear line,
//! and the replay UI in a pseudo-terminal pauses, steps and counts frames.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{CommandBuilder, PtySize, native_pty_system};

#[path = "support/cli.rs"]
mod cli;
use cli::{text, xmoe};

/// Records a short headless run of the embedded model (small passes, so there are many
/// snapshots) with its live report; returns the run's output.
fn record(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--headless",
        "--threads",
        "1",
        "--batch",
        "1",
        "--seq-len",
        "32",
        "--record",
        "s.xmoe-rec",
        "--report",
        "live.json",
    ];
    args.extend_from_slice(extra);
    let o = xmoe(&args, dir);
    assert!(o.status.success(), "{:?}", text(&o));
    o
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_recorded_run_replays_to_its_own_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = record(d, &["--tokens", "1500"]);
    let (_, err) = text(&o);
    assert!(err.contains("recording written to s.xmoe-rec"), "{err}");
    assert!(!d.join("s.xmoe-rec.partial").exists());

    let o = xmoe(
        &[
            "replay",
            "s.xmoe-rec",
            "--report",
            "replayed.json",
            "--trace",
            "t.jsonl",
        ],
        d,
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let live = json(&d.join("live.json"));
    let replayed = json(&d.join("replayed.json"));
    // The figures are the run's last snapshot, float for float; the report says where they
    // come from.
    assert_eq!(live["snapshot"], replayed["snapshot"]);
    let rec = &replayed["recording"];
    assert_eq!(rec["file"], "s.xmoe-rec");
    assert_eq!(
        rec["frame"].as_u64().unwrap() + 1,
        rec["frames"].as_u64().unwrap()
    );
    assert!(
        rec["recorded_command_line"]
            .to_string()
            .contains("--record")
    );
    assert!(live.get("recording").is_none());

    // The routing trace: one record per token of every pass (1500 tokens -> 47 passes of 32).
    let trace = std::fs::read_to_string(d.join("t.jsonl")).unwrap();
    let mut lines = trace.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["format"], "xmoe-top-trace");
    let records = lines.count() as u64;
    let tokens = live["snapshot"]["tokens_processed_total"].as_u64().unwrap();
    assert_eq!(records, tokens, "{err}");

    // --at picks an earlier snapshot; the Markdown report names the recording.
    let o = xmoe(
        &["replay", "s.xmoe-rec", "--at", "0", "--report", "first.md"],
        d,
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let md = std::fs::read_to_string(d.join("first.md")).unwrap();
    assert!(
        md.contains("played back from the recording s.xmoe-rec"),
        "{md}"
    );
    assert!(md.contains("snapshot 1 of"), "{md}");
}

/// `--record-no-trace`: the same snapshots, no trace chunks (a smaller file for long sessions).
#[test]
fn a_recording_without_its_trace_still_replays_every_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    record(d, &["--tokens", "1500", "--record-no-trace"]);
    let o = xmoe(
        &[
            "replay",
            "s.xmoe-rec",
            "--report",
            "replayed.json",
            "--trace",
            "t.jsonl",
        ],
        d,
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        json(&d.join("live.json"))["snapshot"],
        json(&d.join("replayed.json"))["snapshot"]
    );
    // Only the trace header: no pass was recorded.
    let trace = std::fs::read_to_string(d.join("t.jsonl")).unwrap_or_default();
    assert!(trace.lines().count() <= 1, "{trace}");
    let o = xmoe(&["run", "--headless", "--record-no-trace"], d);
    assert_eq!(o.status.code(), Some(2), "--record-no-trace needs --record");
}

#[test]
fn a_cut_partial_replays_and_bad_files_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    record(d, &["--tokens", "600"]);
    let data = std::fs::read(d.join("s.xmoe-rec")).unwrap();

    // A crash leaves NAME.partial cut anywhere: what is complete replays, the loss is said.
    std::fs::write(d.join("cut.xmoe-rec.partial"), &data[..data.len() - 20]).unwrap();
    let o = xmoe(&["replay", "cut.xmoe-rec.partial", "--headless"], d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("did not end cleanly"), "{err}");
    assert!(out.contains("tokens"), "{out}");

    let bad = |name: &str, bytes: &[u8], says: &str| {
        std::fs::write(d.join(name), bytes).unwrap();
        let o = xmoe(&["replay", name, "--headless"], d);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(3), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    bad(
        "live.json.rec",
        &std::fs::read(d.join("live.json")).unwrap(),
        "not an xmoe-top recording",
    );
    let mut newer = data.clone();
    newer[8] = 9;
    bad(
        "newer.xmoe-rec",
        &newer,
        "version 9 is newer than this xmoe-top reads",
    );
    bad(
        "head.xmoe-rec",
        &data[..30],
        "the header chunk is unreadable",
    );
    let mut corrupt = data.clone();
    corrupt[20] ^= 1;
    bad("corrupt.xmoe-rec", &corrupt, "CRC mismatch");
    // --at that is not a time is the command line's fault.
    let o = xmoe(&["replay", "s.xmoe-rec", "--at", "soon", "--headless"], d);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
}

const ROWS: u16 = 40;
const COLS: u16 = 120;

/// The replay UI in a pseudo-terminal: starts paused on frame 1, `.` `,` step, End jumps,
/// Space plays, a model key is refused, `q` quits.
#[test]
fn the_replay_ui_pauses_steps_and_counts_frames() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    record(d, &["--seconds", "1.5"]);
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: ROWS,
            cols: COLS,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut c = CommandBuilder::new(env!("CARGO_BIN_EXE_xmoe-top"));
    c.args(["replay", "s.xmoe-rec"]);
    c.cwd(d);
    c.env("TERM", "xterm-256color");
    let mut child = pair.slave.spawn_command(c).unwrap();
    drop(pair.slave);
    let parser = Arc::new(Mutex::new(vt100::Parser::new(
        ROWS.try_into().unwrap(),
        COLS.try_into().unwrap(),
        0,
    )));
    let mut reader = pair.master.try_clone_reader().unwrap();
    let p = parser.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            p.lock().unwrap().process(&buf[..n]);
        }
    });
    let mut keys = pair.master.take_writer().unwrap();
    let screen = || parser.lock().unwrap().screen().contents();
    let wait = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        let start = Instant::now();
        loop {
            let t = screen();
            if pred(&t) {
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "waiting for {what}:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut press = |b: &[u8]| {
        keys.write_all(b).unwrap();
        keys.flush().unwrap();
    };
    // "frame 1/N": the counter, and how many frames there are.
    let first = wait("frame 1", &|t| {
        t.contains("frame 1/") && t.contains("REPLAY")
    });
    assert!(first.contains("REPLAY s.xmoe-rec (recorded"), "{first}");
    assert!(first.contains("xmoe-kjv"), "{first}");
    assert!(first.contains("paused"), "{first}");
    let n: usize = first
        .split("frame 1/")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("frame count");
    assert!(n >= 3, "only {n} frames recorded:\n{first}");
    press(b".");
    wait("frame 2", &|t| t.contains("frame 2/"));
    press(b".");
    wait("frame 3", &|t| t.contains("frame 3/"));
    press(b",");
    wait("frame 2 again", &|t| t.contains("frame 2/"));
    // A key that would change the model (P pauses it) says read-only.
    press(b"P");
    wait("read-only", &|t| t.contains("replay: read-only"));
    press(b"\x1b[F"); // End
    let end = format!("frame {n}/{n}");
    wait("the last frame", &|t| t.contains(&end));
    press(b"\x1b[H"); // Home
    wait("frame 1 again", &|t| t.contains("frame 1/"));
    press(b"+");
    press(b" ");
    wait("playing", &|t| t.contains("playing") && t.contains("2x"));
    press(b" ");
    wait("paused", &|t| t.contains("paused"));
    press(b"q");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "replay did not quit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.exit_code(), 0);
}
