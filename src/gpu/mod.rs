//! Device counters: a sampler thread that reads NVML about once a second when an NVIDIA driver is
//! present, and otherwise this process's CPU use and resident memory from `/proc/self`.
//!
//! Nothing here can fail the program: a missing driver, a GPU that does not report a counter, a
//! missing `/proc` or a thread that cannot be spawned all end up as `None` values and a plain note
//! in the [`DeviceSnapshot`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};

use crate::profiling::snapshot::{
    DeviceBackend, DeviceHistoryPoint, DeviceSnapshot, GpuCounters, ProcessCounters,
};

/// Samples kept for the sparklines.
pub const HISTORY_LEN: usize = 120;

/// The note shown when NVML cannot be used.
pub const NO_DRIVER_NOTE: &str = "no NVIDIA driver found: showing this process's CPU and memory";

/// CPU time of all threads of this process so far, nanoseconds: utime + stime of
/// `/proc/self/stat` at the Linux user tick rate (USER_HZ, 100 on every mainstream architecture).
/// (`/proc/self/schedstat` would be finer but counts only the main thread.)
fn process_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat_cpu_ticks(&s))
        .map(|ticks| ticks * 10_000_000)
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`, in clock ticks. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: field 3 (state) is index 0, so utime (14) is index 11 and stime (15) 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
pub fn parse_vmrss(text: &str) -> Option<u64> {
    parse_status_kb(text, "VmRSS:")
}

/// A `key:  N kB` line of `/proc/<pid>/status`, in bytes.
fn parse_status_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident bytes, and of them the pages of mapped files (`RssFile`).
fn process_rss_bytes() -> (Option<u64>, Option<u64>) {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => (parse_vmrss(&s), parse_status_kb(&s, "RssFile:")),
        Err(_) => (None, None),
    }
}

/// Reads counters on demand; [`DeviceSampler`] calls it on a thread, tests call it directly.
pub struct CounterReader {
    nvml: Option<Nvml>,
    note: Option<String>,
    driver_version: Option<String>,
    last_cpu: Option<(Instant, u64)>,
    cpus: usize,
    started: Instant,
    history: VecDeque<DeviceHistoryPoint>,
    period: Duration,
    latest_gpus: Vec<GpuCounters>,
    latest_process: ProcessCounters,
}

impl CounterReader {
    /// Tries NVML; falls back to process counters with a note when it is missing or sees no GPU.
    pub fn new(period: Duration) -> Self {
        let (nvml, note) = match Nvml::init() {
            Ok(n) => match n.device_count() {
                Ok(c) if c > 0 => (Some(n), None),
                Ok(_) => (
                    None,
                    Some(
                        "the NVIDIA driver reports no GPU: showing this process's CPU and memory"
                            .to_string(),
                    ),
                ),
                Err(e) => (
                    None,
                    Some(format!(
                        "NVML cannot count GPUs ({e}): showing this process's CPU and memory"
                    )),
                ),
            },
            Err(_) => (None, Some(NO_DRIVER_NOTE.to_string())),
        };
        Self::with_nvml(nvml, note, period)
    }

    /// A reader that never tries NVML (process counters only), with `note` shown to the user.
    pub fn process_only(note: impl Into<String>, period: Duration) -> Self {
        Self::with_nvml(None, Some(note.into()), period)
    }

    fn with_nvml(nvml: Option<Nvml>, note: Option<String>, period: Duration) -> Self {
        let driver_version = nvml.as_ref().and_then(|n| n.sys_driver_version().ok());
        Self {
            nvml,
            note,
            driver_version,
            last_cpu: None,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            started: Instant::now(),
            history: VecDeque::with_capacity(HISTORY_LEN),
            period,
            latest_gpus: Vec::new(),
            latest_process: ProcessCounters::default(),
        }
    }

    fn read_gpus(&self) -> Vec<GpuCounters> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                Some(GpuCounters {
                    index: i,
                    name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
                    utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
                    memory_used_bytes: mem.as_ref().map(|m| m.used),
                    memory_total_bytes: mem.as_ref().map(|m| m.total),
                    power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                    temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                    sm_clock_mhz: d.clock_info(Clock::SM).ok(),
                })
            })
            .collect()
    }

    /// Takes one sample (CPU use is measured since the previous sample; the first has none).
    pub fn sample(&mut self) {
        let now = Instant::now();
        let cpu_ns = process_cpu_ns();
        let cpu_pct = match (self.last_cpu, cpu_ns) {
            (Some((t0, c0)), Some(c1)) => {
                let wall = now.duration_since(t0).as_nanos() as f64;
                (wall > 0.0).then(|| 100.0 * c1.saturating_sub(c0) as f64 / wall)
            }
            _ => None,
        };
        self.last_cpu = cpu_ns.map(|c| (now, c));
        let (rss_bytes, rss_file_bytes) = process_rss_bytes();
        self.latest_process = ProcessCounters {
            cpu_pct,
            rss_bytes,
            rss_file_bytes,
            cpus: self.cpus,
        };
        self.latest_gpus = self.read_gpus();
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(DeviceHistoryPoint {
            t_s: now.duration_since(self.started).as_secs_f64(),
            gpu_utilization_pct: self.latest_gpus.iter().map(|g| g.utilization_pct).collect(),
            gpu_memory_used_bytes: self
                .latest_gpus
                .iter()
                .map(|g| g.memory_used_bytes)
                .collect(),
            process_cpu_pct: cpu_pct,
            process_rss_bytes: self.latest_process.rss_bytes,
        });
    }

    /// The latest counters and history.
    pub fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot {
            backend: if self.nvml.is_some() {
                DeviceBackend::Nvml
            } else {
                DeviceBackend::ProcessOnly
            },
            note: self.note.clone(),
            driver_version: self.driver_version.clone(),
            gpus: self.latest_gpus.clone(),
            process: self.latest_process,
            sample_period_s: self.period.as_secs_f64(),
            history: self.history.iter().cloned().collect(),
        }
    }
}

struct Shared {
    latest: Mutex<DeviceSnapshot>,
    stop: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

/// A thread that samples device counters every `period` and keeps the latest [`DeviceSnapshot`].
/// Stops and joins on drop.
pub struct DeviceSampler {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl DeviceSampler {
    /// Starts sampling (NVML if a driver is present). Never fails: if the thread cannot be
    /// spawned, the snapshot says so and stays at its initial state.
    pub fn start(period: Duration) -> Self {
        Self::start_with(period, CounterReader::new)
    }

    /// [`DeviceSampler::start`], also handing every new sample to `observer` on the sampler
    /// thread (it must not block): a reader that wants the counters while the model thread is
    /// busy with a long pass, and so publishes nothing.
    pub fn start_observed(
        period: Duration,
        observer: impl Fn(&DeviceSnapshot) + Send + 'static,
    ) -> Self {
        Self::start_inner(period, CounterReader::new, Some(Box::new(observer)))
    }

    /// Starts sampling with a reader built by `make` on the sampler thread.
    pub fn start_with(
        period: Duration,
        make: impl FnOnce(Duration) -> CounterReader + Send + 'static,
    ) -> Self {
        Self::start_inner(period, make, None)
    }

    #[allow(clippy::type_complexity)]
    fn start_inner(
        period: Duration,
        make: impl FnOnce(Duration) -> CounterReader + Send + 'static,
        observer: Option<Box<dyn Fn(&DeviceSnapshot) + Send>>,
    ) -> Self {
        let shared = Arc::new(Shared {
            latest: Mutex::new(DeviceSnapshot::not_sampled()),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        });
        let s = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("xmoe-device-sampler".into())
            .spawn(move || {
                let mut reader = make(period);
                loop {
                    reader.sample();
                    let snap = reader.snapshot();
                    if let Some(observe) = &observer {
                        observe(&snap);
                    }
                    if let Ok(mut l) = s.latest.lock() {
                        *l = snap;
                    }
                    let guard = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                    if s.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let _ = s.wake.wait_timeout(guard, period);
                    if s.stop.load(Ordering::Acquire) {
                        break;
                    }
                }
            });
        let handle = match handle {
            Ok(h) => Some(h),
            Err(e) => {
                if let Ok(mut l) = shared.latest.lock() {
                    l.note = Some(format!("device sampler could not start: {e}"));
                }
                None
            }
        };
        Self { shared, handle }
    }

    /// The latest counters (a clone; cheap).
    pub fn latest(&self) -> DeviceSnapshot {
        self.shared
            .latest
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let _g = self
                .shared
                .wake_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for DeviceSampler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        // A command name with spaces and a parenthesis.
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 4 0 100 1000 50";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(280));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let status = "Name:\txmoe-top\nVmPeak:\t  9999 kB\nVmRSS:\t    2012 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(status), Some(2012 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        let status = "VmRSS:\t 2012 kB\nRssAnon:\t 12 kB\nRssFile:\t 2000 kB\n";
        assert_eq!(parse_status_kb(status, "RssFile:"), Some(2000 * 1024));
    }

    #[test]
    fn process_counters_without_a_driver() {
        let mut r = CounterReader::process_only(NO_DRIVER_NOTE, Duration::from_millis(10));
        r.sample();
        // Burn some CPU so that the second sample measures a positive share.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(7));
        }
        std::hint::black_box(x);
        r.sample();
        let s = r.snapshot();
        assert_eq!(s.backend, DeviceBackend::ProcessOnly);
        assert!(s.gpus.is_empty());
        assert_eq!(s.note.as_deref(), Some(NO_DRIVER_NOTE));
        assert_eq!(s.history.len(), 2);
        assert!(
            s.history[0].process_cpu_pct.is_none(),
            "first sample has no interval"
        );
        let cpu = s.process.cpu_pct.expect("Linux exposes /proc/self");
        assert!(
            cpu > 10.0 && cpu < 100.0 * s.process.cpus as f64 + 50.0,
            "{cpu}"
        );
        assert!(s.process.rss_bytes.unwrap() > 1 << 20);
    }

    #[test]
    fn history_is_bounded() {
        let mut r = CounterReader::process_only("test", Duration::from_millis(1));
        for _ in 0..HISTORY_LEN + 5 {
            r.sample();
        }
        let s = r.snapshot();
        assert_eq!(s.history.len(), HISTORY_LEN);
        assert!(s.history.windows(2).all(|w| w[0].t_s <= w[1].t_s));
    }

    #[test]
    fn nvml_absence_or_presence_never_fails() {
        // On a machine without a driver this takes the fallback with the plain note; with one,
        // GPU counters are present. Either way it returns.
        let mut r = CounterReader::new(Duration::from_secs(1));
        r.sample();
        let s = r.snapshot();
        match s.backend {
            DeviceBackend::Nvml => assert!(!s.gpus.is_empty() && s.note.is_none()),
            DeviceBackend::ProcessOnly => {
                assert!(s.gpus.is_empty());
                assert!(s.note.unwrap().contains("CPU and memory"));
            }
        }
    }

    #[test]
    fn sampler_thread_publishes_and_stops_promptly() {
        let sampler = DeviceSampler::start_with(Duration::from_secs(30), |p| {
            CounterReader::process_only(NO_DRIVER_NOTE, p)
        });
        let t = Instant::now();
        while sampler.latest().history.is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "no sample");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sampler.latest().note.as_deref(), Some(NO_DRIVER_NOTE));
        // Stopping does not wait out the 30 s period.
        let t = Instant::now();
        sampler.stop();
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
