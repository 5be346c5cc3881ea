//! Signals from outside: the ones that ask xmoe-top to finish (SIGTERM, SIGINT, SIGHUP, SIGQUIT)
//! and the job-control pair (SIGTSTP, SIGCONT).
//!
//! A terminating signal does not kill the process where it stands: [`TerminationGuard`] records
//! it, and the running command notices ([`received`]), stops the model, restores the terminal,
//! finishes what it was writing (summary, report, trace) and exits with `128 + N`
//! ([`exit_status`]), as a shell reports a process killed by signal N. A second terminating
//! signal means the user insists: the process exits at once with the same status.
//!
//! Only the live UI catches SIGTSTP and SIGCONT (through [`Forwarder`]): it must leave raw mode
//! before the shell gets the terminal back, and re-enter it and redraw when continued.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

pub use signal_hook::consts::signal::{SIGCONT, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTSTP};
use signal_hook::iterator::{Handle, Signals};
use signal_hook::{SigId, low_level};

/// The signals that ask xmoe-top to finish cleanly.
pub const TERMINATING: [i32; 4] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT];

/// The first terminating signal caught, 0 for none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The first terminating signal caught since a [`TerminationGuard`] was installed, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status that reports `signal` (128 + N, the shell's convention; 130 for SIGINT).
pub fn exit_status(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(1, 127)).unwrap_or(u8::MAX)
}

/// The signal's name, `SIGTERM` style.
pub fn name(signal: i32) -> String {
    match signal {
        SIGTERM => "SIGTERM".into(),
        SIGINT => "SIGINT".into(),
        SIGHUP => "SIGHUP".into(),
        SIGQUIT => "SIGQUIT".into(),
        SIGTSTP => "SIGTSTP".into(),
        SIGCONT => "SIGCONT".into(),
        n => format!("signal {n}"),
    }
}

/// Catches the terminating signals for as long as it lives: the first one is recorded for
/// [`received`]; a second one exits the process at once with [`exit_status`].
pub struct TerminationGuard {
    ids: Vec<SigId>,
}

impl TerminationGuard {
    /// Installs the handlers.
    pub fn install() -> io::Result<Self> {
        let armed = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for signal in TERMINATING {
            // Registered first, so it runs before the recorder below arms it: the first signal
            // is only recorded, the second exits.
            ids.push(signal_hook::flag::register_conditional_shutdown(
                signal,
                i32::from(exit_status(signal)),
                armed.clone(),
            )?);
            let armed = armed.clone();
            let record = move || {
                let _ = RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
                armed.store(true, Ordering::SeqCst);
            };
            // SAFETY: the action only touches atomics, which is async-signal-safe.
            ids.push(unsafe { low_level::register(signal, record) }?);
        }
        Ok(Self { ids })
    }
}

impl Drop for TerminationGuard {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            low_level::unregister(id);
        }
    }
}

/// Delivers the terminating signals and SIGTSTP / SIGCONT to a callback on a thread of its own,
/// for the live UI; closed when dropped.
pub struct Forwarder {
    handle: Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Starts the thread; `deliver` gets each signal's number and returns false to stop.
    pub fn start(mut deliver: impl FnMut(i32) -> bool + Send + 'static) -> io::Result<Self> {
        let mut signals = Signals::new(TERMINATING.iter().chain(&[SIGTSTP, SIGCONT]))?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if !deliver(signal) {
                        return;
                    }
                }
            })?;
        Ok(Self {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops the whole process as SIGTSTP's default action would, returning once it is continued.
/// Call with the terminal restored.
pub fn stop_process() {
    // emulate_default_handler raises SIGSTOP for the stop signals.
    let _ = low_level::emulate_default_handler(SIGTSTP);
}
