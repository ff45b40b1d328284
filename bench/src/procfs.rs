//! What the harness reads about the server process from `/proc`: CPU time and resident memory.

use std::path::Path;

/// Clock ticks per second of `/proc/PID/stat` (`USER_HZ`, 100 on every Linux architecture
/// the harness runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))?;
    parse_cpu(&stat).ok_or_else(|| anyhow::anyhow!("cannot parse /proc/{pid}/stat"))
}

/// utime + stime from the text of `/proc/PID/stat`, in seconds.
pub fn parse_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3; utime and stime are fields 14 and 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    parse_rss(&status).ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// VmRSS from the text of `/proc/PID/status`, in bytes.
pub fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU seconds and RSS of an optional pid; zeros without one.
pub fn sample(pid: Option<u32>) -> (f64, u64) {
    match pid {
        Some(pid) => (cpu_seconds(pid).unwrap_or(0.0), rss_bytes(pid).unwrap_or(0)),
        None => (0.0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let stat = "1234 (node (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu(stat), Some(3.0));
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tnode\nVmPeak:\t 100 kB\nVmRSS:\t   2048 kB\nThreads: 3\n";
        assert_eq!(parse_rss(status), Some(2048 * 1024));
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
