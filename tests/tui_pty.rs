//! End to end: the live UI in a pseudo-terminal, driven by keys, read back through a terminal
//! emulator (vt100), on a small random model.
//!
//! Runs the real program: `xmoe-top MODEL --workload generate` opens the UI when stdin and
//! stdout are terminals.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{CommandBuilder, PtySize, native_pty_system};

const ROWS: u16 = 40;
const COLS: u16 = 120;

fn ui_command(model: &Path) -> CommandBuilder {
    let mut c = CommandBuilder::new(env!("CARGO_BIN_EXE_xmoe-top"));
    c.arg(model);
    c.args([
        "--workload",
        "generate",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]);
    c.env("TERM", "xterm-256color");
    c.env_remove("NO_COLOR");
    c
}

fn synth_model(dir: &Path) -> PathBuf {
    let out = dir.join("m.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args([
            "synth",
            "--layers",
            "4",
            "--d-model",
            "128",
            "--heads",
            "4",
            "--experts",
            "32",
            "--expert-hidden",
            "32",
            "--dense-hidden",
            "256",
            "--seq",
            "256",
            "--threads",
            "1",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    out
}

struct Screen(Arc<Mutex<vt100::Parser>>);

impl Screen {
    fn text(&self) -> String {
        self.0.lock().unwrap().screen().contents()
    }

    /// Waits until `pred` holds for the screen text; panics with the screen after `secs`.
    fn wait(&self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let t = self.text();
            if pred(&t) {
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; screen:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The slider line of block `layer`: (t text, experts per token text).
fn slider(screen: &str, layer: usize) -> Option<(String, String)> {
    let label = format!("L{layer} ");
    let line = screen.lines().find(|l| {
        let l = l.trim_start_matches(['▶', ' ']);
        l.starts_with(&label) && l.contains("exp/tok")
    })?;
    let t = line
        .split("t ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .to_string();
    let before = line.split(" exp/tok").next()?;
    let e = before.split_whitespace().last()?.to_string();
    Some((t, e))
}

/// Tokens in the heatmap's window (its title: "... 4096 tok").
fn window_tokens(screen: &str) -> Option<u64> {
    let line = screen
        .lines()
        .find(|l| l.contains("Experts: share of window tokens"))?;
    line.split(" tok ")
        .next()?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Figures are compared once the window holds this many tokens of the epoch.
const STABLE_TOKENS: u64 = 1000;

#[test]
fn live_ui_in_a_pseudo_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: ROWS,
            cols: COLS,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut child = pair.slave.spawn_command(ui_command(&model)).unwrap();
    drop(pair.slave);
    let parser = Arc::new(Mutex::new(vt100::Parser::new(
        ROWS.try_into().unwrap(),
        COLS.try_into().unwrap(),
        0,
    )));
    let mut reader = pair.master.try_clone_reader().unwrap();
    let p = Arc::clone(&parser);
    // Drain the terminal continuously so the UI never blocks on a full pty.
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
    let mut press = |bytes: &[u8]| {
        keys.write_all(bytes).unwrap();
        keys.flush().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    };
    let screen = Screen(parser);

    // First frame with live figures.
    let first = screen.wait(90, "the first frame with a full window", |s| {
        s.contains("Thresholds")
            && slider(s, 0).is_some()
            && window_tokens(s).is_some_and(|n| n >= STABLE_TOKENS)
    });
    assert!(screen.0.lock().unwrap().screen().alternate_screen());
    let (t0, e0) = slider(&first, 0).unwrap();
    assert_eq!(t0, "0.90", "{first}");

    // Focus layer 0 and lower its threshold by 0.2 (Shift+Left x2, PgDn x2).
    press(b"\x1b[B");
    press(b"\x1b[1;2D");
    press(b"\x1b[1;2D");
    press(b"\x1b[6~");
    press(b"\x1b[6~");
    let after = screen.wait(
        60,
        "the new t and a changed experts-per-token figure",
        |s| {
            // A measured figure of the new epoch (its window starts empty), below the old one.
            window_tokens(s).is_some_and(|n| n >= STABLE_TOKENS)
                && slider(s, 0).is_some_and(|(t, e)| {
                    t == "0.70"
                        && e.parse::<f64>()
                            .is_ok_and(|x| x > 0.0 && x < e0.parse::<f64>().unwrap())
                })
        },
    );
    let (_, e1) = slider(&after, 0).unwrap();
    assert!(after.contains("threshold of layer 0"), "{after}");
    // Other layers keep theirs.
    assert_eq!(slider(&after, 1).unwrap().0, "0.90");
    eprintln!("layer 0: t 0.90 -> 0.70, experts per token {e0} -> {e1}");

    // Help opens and closes.
    press(b"?");
    screen.wait(10, "the help overlay", |s| {
        s.contains("Help: ? or Esc to close")
    });
    press(b"\x1b");
    screen.wait(10, "the help overlay to close", |s| {
        !s.contains("Help: ? or Esc to close")
    });

    // Quit: the process ends and the terminal is back to normal.
    press(b"q");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the UI did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(300));
    let p = screen.0.lock().unwrap();
    let s = p.screen();
    assert!(!s.alternate_screen(), "left on the alternate screen");
    assert_eq!(s.mouse_protocol_mode(), vt100::MouseProtocolMode::None);
    assert!(!s.hide_cursor(), "cursor left hidden");
}
