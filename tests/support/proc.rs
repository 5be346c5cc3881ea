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
