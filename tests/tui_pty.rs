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

#[path = "support/proc.rs"]
mod proc;
use proc::{drift, proc_sample};

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

/// The program running in a pseudo-terminal, its screen read back through vt100.
struct PtyUi {
    child: Box<dyn portable_pty::Child + Send + Sync>,
    master: Box<dyn portable_pty::MasterPty + Send>,
    keys: Box<dyn Write + Send>,
    screen: Screen,
}

impl PtyUi {
    fn spawn(command: CommandBuilder) -> Self {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let child = pair.slave.spawn_command(command).unwrap();
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
        let keys = pair.master.take_writer().unwrap();
        Self {
            child,
            master: pair.master,
            keys,
            screen: Screen(parser),
        }
    }

    fn press(&mut self, bytes: &[u8]) {
        self.keys.write_all(bytes).unwrap();
        self.keys.flush().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }

    /// Resizes the terminal. The emulator takes the new size first, so the UI's full redraw
    /// after SIGWINCH is read at the size it was drawn for (bytes the other way round would
    /// leave cells the UI believes drawn).
    fn resize(&mut self, rows: u16, cols: u16) {
        let mut parser = self.screen.0.lock().unwrap();
        parser
            .screen_mut()
            .set_size(rows.try_into().unwrap(), cols.try_into().unwrap());
        self.master
            .resize(PtySize {
                rows,
                cols,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
    }

    fn pid(&self) -> i32 {
        self.child.process_id().unwrap() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory effects; the pid is our own child's.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits for the program to exit and returns its exit code.
    fn wait_exit(&mut self, secs: u64) -> u32 {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "the UI did not exit; screen:\n{}",
                self.screen.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // Let the reader thread take the last bytes.
        std::thread::sleep(Duration::from_millis(300));
        status.exit_code()
    }

    /// The terminal's line discipline reads lines and echoes (not raw mode).
    fn cooked(&self) -> bool {
        let flags = self.master.get_termios().unwrap().local_flags.bits();
        let want = libc::ICANON | libc::ECHO;
        flags & want == want
    }

    /// Main screen, cursor shown, mouse reporting off, line discipline cooked.
    fn assert_restored(&self, when: &str) {
        let p = self.screen.0.lock().unwrap();
        let s = p.screen();
        assert!(
            !s.alternate_screen(),
            "{when}: left on the alternate screen"
        );
        assert_eq!(
            s.mouse_protocol_mode(),
            vt100::MouseProtocolMode::None,
            "{when}: mouse reporting left on"
        );
        assert!(!s.hide_cursor(), "{when}: cursor left hidden");
        drop(p);
        assert!(self.cooked(), "{when}: terminal left in raw mode");
    }

    /// Waits for a live frame of the UI.
    fn wait_live(&self, secs: u64, what: &str) -> String {
        self.screen.wait(secs, what, |s| {
            s.contains("Thresholds") && slider(s, 0).is_some()
        })
    }
}

#[test]
fn live_ui_in_a_pseudo_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let mut ui = PtyUi::spawn(ui_command(&model));
    assert!(ui.cooked(), "a fresh pty starts cooked");

    // First frame with live figures.
    let first = ui
        .screen
        .wait(90, "the first frame with a full window", |s| {
            s.contains("Thresholds")
                && slider(s, 0).is_some()
                && window_tokens(s).is_some_and(|n| n >= STABLE_TOKENS)
        });
    assert!(ui.screen.0.lock().unwrap().screen().alternate_screen());
    let (t0, e0) = slider(&first, 0).unwrap();
    assert_eq!(t0, "0.90", "{first}");

    // Focus layer 0 and lower its threshold by 0.2 (Shift+Left x2, PgDn x2).
    ui.press(b"\x1b[B");
    ui.press(b"\x1b[1;2D");
    ui.press(b"\x1b[1;2D");
    ui.press(b"\x1b[6~");
    ui.press(b"\x1b[6~");
    let after = ui.screen.wait(
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
    ui.press(b"?");
    ui.screen.wait(10, "the help overlay", |s| {
        s.contains("Help: ? or Esc to close")
    });
    ui.press(b"\x1b");
    ui.screen.wait(10, "the help overlay to close", |s| {
        !s.contains("Help: ? or Esc to close")
    });

    // Quit: the process ends and the terminal is back to normal.
    ui.press(b"q");
    assert_eq!(ui.wait_exit(30), 0);
    ui.assert_restored("after q");
}

/// The embedded model's UI, one thread.
fn embedded_ui() -> PtyUi {
    let mut c = CommandBuilder::new(env!("CARGO_BIN_EXE_xmoe-top"));
    c.args(["--device", "cpu", "--threads", "1"]);
    c.env("TERM", "xterm-256color");
    PtyUi::spawn(c)
}

/// Whether process `pid` is stopped (state T in /proc).
fn stopped(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name's closing parenthesis.
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('T'))
}

fn wait_until(secs: u64, what: &str, pred: impl Fn() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Closing the terminal (the window, or an ssh connection) hangs it up: the UI must end, not keep
/// the model running on a dead terminal. (crossterm's poll can spin on a hung-up descriptor; the
/// UI once waited for its input thread forever there, at 100% CPU.)
#[test]
fn closing_the_terminal_ends_the_ui() {
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: ROWS,
            cols: COLS,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut c = CommandBuilder::new(env!("CARGO_BIN_EXE_xmoe-top"));
    c.args(["--device", "cpu", "--threads", "1"]);
    c.env("TERM", "xterm-256color");
    let mut child = pair.slave.spawn_command(c).unwrap();
    drop(pair.slave);
    // Read on this thread, not a reader thread, so that every descriptor of the master can be
    // closed below (a blocked reader would keep the terminal open).
    let mut reader = pair.master.try_clone_reader().unwrap();
    let fd = pair.master.as_raw_fd().unwrap();
    // SAFETY: fcntl on a descriptor this test owns; the clone shares its open file description.
    unsafe {
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        )
    };
    let (mut drawn, mut buf, start) = (Vec::new(), [0u8; 8192], Instant::now());
    while start.elapsed() < Duration::from_secs(60) {
        match reader.read(&mut buf) {
            Ok(n) if n > 0 => drawn.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => panic!("pty read: {e}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
        if String::from_utf8_lossy(&drawn).contains("tok/s") {
            break;
        }
    }
    assert!(
        String::from_utf8_lossy(&drawn).contains("tok/s"),
        "the UI never drew its header"
    );
    drop(reader);
    drop(pair.master);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the UI kept running after its terminal was closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !status.success(),
        "a hangup is not a clean exit: {status:?}"
    );
}

#[test]
fn terminating_signals_restore_the_terminal_and_exit_128_plus_n() {
    for (signal, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGQUIT, "SIGQUIT"),
    ] {
        let mut ui = embedded_ui();
        ui.wait_live(60, name);
        assert!(!ui.cooked(), "{name}: the UI runs in raw mode");
        ui.signal(signal);
        let code = ui.wait_exit(30);
        assert_eq!(code, 128 + signal as u32, "{name}: exit status");
        ui.assert_restored(name);
        let text = ui.screen.text();
        assert!(
            text.contains(&format!("stopped by {name} in the live UI")),
            "{name}: {text}"
        );
    }
}

#[test]
fn suspend_and_continue_hand_the_terminal_back_and_redraw() {
    let mut ui = embedded_ui();
    ui.wait_live(60, "the first frame");
    let pid = ui.pid();
    for (how, suspend) in [("SIGTSTP", None), ("Ctrl-Z", Some(b"\x1a"))] {
        match suspend {
            None => ui.signal(libc::SIGTSTP),
            Some(key) => ui.press(key),
        }
        wait_until(20, &format!("{how}: the process stops"), || stopped(pid));
        ui.assert_restored(how);
        ui.signal(libc::SIGCONT);
        wait_until(20, &format!("{how}: the process runs again"), || {
            !stopped(pid)
        });
        ui.screen
            .wait(20, "the UI back on the alternate screen", |_| {
                ui.screen.0.lock().unwrap().screen().alternate_screen()
            });
        wait_until(20, &format!("{how}: raw mode again"), || !ui.cooked());
        ui.wait_live(20, "a redrawn frame");
    }
    // SIGSTOP cannot be caught: after SIGCONT the UI takes the terminal again and redraws.
    ui.signal(libc::SIGSTOP);
    wait_until(20, "SIGSTOP stops the process", || stopped(pid));
    ui.signal(libc::SIGCONT);
    wait_until(20, "SIGCONT continues it", || !stopped(pid));
    ui.wait_live(20, "a frame after SIGSTOP and SIGCONT");
    ui.press(b"q");
    assert_eq!(ui.wait_exit(30), 0);
    ui.assert_restored("after q");
}

/// A burst of input: hundreds of keys and mouse events a second and resizes down to 1x1 and
/// back, for `XMOE_BURST_SECONDS` (default 30; the recorded long run used 600, with
/// `XMOE_BURST_CSV=burst.csv` for the curve, one sample about every second). The UI must keep
/// up, stay alive, keep its memory, threads and files flat, and quit cleanly afterwards.
#[test]
fn a_burst_of_keys_mouse_and_resizes_leaves_the_ui_healthy() {
    let secs: u64 = std::env::var("XMOE_BURST_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut ui = embedded_ui();
    ui.wait_live(60, "the first frame");
    let pid = ui.pid();
    // Every key of the table but quit, suspend and export (which writes files).
    let keys: &[&[u8]] = &[
        b"\x1b[A",
        b"\x1b[B",
        b"\x1b[C",
        b"\x1b[D",
        b"\x1b[1;2C",
        b"\x1b[1;2D",
        b"\x1b[5~",
        b"\x1b[6~",
        b"\t",
        b"g",
        b"p",
        b"+",
        b"-",
        b"n",
        b"z",
        b"c",
        b" ",
        b"f",
        b"P",
        b"r",
        b"?",
        b"\x1b",
        b"h",
        b"j",
        b"k",
        b"l",
        b"H",
        b"L",
        b"x",
        b"\x1b[<0;10;5M",
        b"\x1b[<0;10;5m",
        b"\x1b[<32;30;8M",
        b"\x1b[<64;20;20M",
        b"\x1b[<65;20;20M",
        b"\x1b[<66;40;12M",
        b"\x1b[<67;40;12M",
        b"\x1b[<0;200;200M",
    ];
    let sizes = [
        (1u16, 1u16),
        (24, 80),
        (2, 3),
        (60, 200),
        (10, 40),
        (ROWS, COLS),
    ];
    let start = Instant::now();
    let mut samples = Vec::new();
    let (mut sent, mut resizes, mut i) = (0u64, 0u64, 0usize);
    while start.elapsed() < Duration::from_secs(secs) {
        // About 400 events a second.
        for _ in 0..20 {
            ui.keys.write_all(keys[i % keys.len()]).unwrap();
            i = i.wrapping_mul(31).wrapping_add(7) % 1_000_003;
            sent += 1;
        }
        ui.keys.flush().unwrap();
        if sent.is_multiple_of(200) {
            let (rows, cols) = sizes[(sent / 200) as usize % sizes.len()];
            ui.resize(rows, cols);
            resizes += 1;
        }
        if sent.is_multiple_of(400) {
            samples.push(proc_sample(&pid.to_string()));
        }
        assert!(ui.child.try_wait().unwrap().is_none(), "the UI died");
        std::thread::sleep(Duration::from_millis(50));
    }
    ui.resize(ROWS, COLS);
    // Close the help overlay if the burst left it open, then a full frame must come back.
    ui.press(b"?");
    let text = ui.screen.text();
    if text.contains("Help: ? or Esc") {
        ui.press(b"\x1b");
    }
    ui.screen.wait(30, "a full frame after the burst", |s| {
        s.contains("Thresholds")
    });
    let n = samples.len();
    assert!(n >= 4, "{n} samples");
    if let Ok(path) = std::env::var("XMOE_BURST_CSV") {
        let mut csv = String::from("sample,rss_kib,threads,fds\n");
        for (i, (rss, th, fd)) in samples.iter().enumerate() {
            csv.push_str(&format!("{i},{rss},{th},{fd}\n"));
        }
        std::fs::write(path, csv).unwrap();
    }
    let d = drift(&samples);
    eprintln!(
        "burst: {:.0} s, {sent} events, {resizes} resizes; RSS {} -> {} KiB; threads {} -> {}; files {} -> {}",
        start.elapsed().as_secs_f64(),
        d.rss.0,
        d.rss.1,
        d.threads.0,
        d.threads.1,
        d.fds.0,
        d.fds.1
    );
    assert!(d.rss.1 <= d.rss.0 + 16 * 1024, "memory grew");
    assert_eq!(d.threads.0, d.threads.1, "threads");
    assert_eq!(d.fds.0, d.fds.1, "files");
    ui.press(b"q");
    assert_eq!(ui.wait_exit(30), 0);
    ui.assert_restored("after the burst");
}

/// The epoch number in the header ("epoch 3 (…)").
fn epoch_of(screen: &str) -> Option<u64> {
    let rest = screen.split("epoch ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn quick_slider_presses_make_one_epoch_and_the_expert_table_sorts() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let mut ui = PtyUi::spawn(ui_command(&model));
    let first = ui.wait_live(90, "a live frame");
    let e0 = epoch_of(&first).unwrap_or_else(|| panic!("no epoch in the header:\n{first}"));

    // Ten quick presses on the global slider (focused at start): 0.90 -> 0.80.
    for _ in 0..10 {
        ui.keys.write_all(b"\x1b[D").unwrap();
        ui.keys.flush().unwrap();
        std::thread::sleep(Duration::from_millis(40));
    }
    let after = ui.screen.wait(30, "the new threshold in force", |s| {
        s.contains("threshold of all MoE layers set to 0.80")
    });
    // One new epoch for the ten presses, and no more once the keys have settled.
    assert_eq!(epoch_of(&after), Some(e0 + 1), "{after}");
    std::thread::sleep(Duration::from_secs(2));
    let later = ui.screen.text();
    assert_eq!(epoch_of(&later), Some(e0 + 1), "{later}");
    eprintln!("ten presses: epoch {e0} -> {}", e0 + 1);

    // The per-expert table of the selected layer: opens, sorts, closes.
    ui.press(b"x");
    let table = ui.screen.wait(10, "the expert table", |s| {
        s.contains(" experts ") && s.contains("sort: share of tokens")
    });
    assert!(table.contains("load/mean"), "{table}");
    ui.press(b"s");
    ui.screen.wait(10, "the table sorted by gate mass", |s| {
        s.contains("sort: gate mass")
    });
    ui.press(b"\x1b");
    ui.screen.wait(10, "the table to close", |s| {
        !s.contains("sort: gate mass") && s.contains("Thresholds")
    });

    ui.press(b"q");
    assert_eq!(ui.wait_exit(30), 0);
    ui.assert_restored("after q");
}
