//! Resource counters of a process, from /proc, for the soak tests.

/// Resident set (KiB), threads and open file descriptors of process `pid` ("self" for this one).
pub fn proc_sample(pid: &str) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (field("VmRSS:"), field("Threads:") as usize, fds)
}

/// How resource counters moved over a soak: first-quarter against last-quarter figures, after
/// the first tenth of the samples (allocator and caches warming up).
pub struct Drift {
    /// Median resident set (KiB), early and late.
    pub rss: (u64, u64),
    /// Fewest threads, early and late.
    pub threads: (usize, usize),
    /// Fewest open files, early and late.
    pub fds: (usize, usize),
}

/// The [`Drift`] of `samples` (as [`proc_sample`] returns them). Threads and files are compared
/// by their floor: a leak raises it, a file opened for a moment by a sampler does not.
pub fn drift(samples: &[(u64, usize, usize)]) -> Drift {
    let warm = &samples[samples.len() / 10..];
    let (head, tail) = (&warm[..warm.len() / 4], &warm[warm.len() * 3 / 4..]);
    let median = |part: &[(u64, usize, usize)]| {
        let mut v: Vec<u64> = part.iter().map(|s| s.0).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let floor = |part: &[(u64, usize, usize)], f: fn(&(u64, usize, usize)) -> usize| {
        part.iter().map(f).min().unwrap()
    };
    Drift {
        rss: (median(head), median(tail)),
        threads: (floor(head, |s| s.1), floor(tail, |s| s.1)),
        fds: (floor(head, |s| s.2), floor(tail, |s| s.2)),
    }
}
