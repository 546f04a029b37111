//! Figures of a process read from `/proc`, to hold the agent's process
//! metrics against.

/// Fields of `/proc/<pid>/stat` after the command name (which may contain
/// spaces): index 0 is field 3 (`state`), so field N is at N - 3.
pub fn proc_stat_fields(pid: u32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/pid/stat");
    stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let fields = proc_stat_fields(pid);
    fields[14 - 3] + fields[15 - 3]
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK)");
    hz as f64
}

/// Resident set size of a process, in bytes (`VmRSS`).
pub fn vm_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/pid/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kb * 1024
}
