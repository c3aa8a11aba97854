//! The one reader of `/proc`: a process's `stat` (state, CPU ticks, threads,
//! start time, memory), `statm` and `cmdline`, the system's clock tick, page
//! size, boot time and host name, and metald's own open and maximum file
//! descriptors. The backends use it to identify and meter VMM processes, the
//! telemetry for the `process_*` metrics and the resource's host name,
//! billing for its default instance id. (`/proc/cpuinfo` is not here: the
//! QEMU backend alone reads it, once at start, as its fallback for the host
//! TSC frequency after sysfs; see `backend::qemu::accel`.)
//!
//! A leaf: it imports nothing of the crate. Hand-written: the fields needed
//! are a handful of values in a few text files, and the `procfs` crate would
//! bring a large dependency tree for them.

use std::io;
use std::sync::OnceLock;

use nix::unistd::{SysconfVar, sysconf};

/// The fields of `/proc/<pid>/stat` metald uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: R, S, D, Z (zombie), X (dead), ...
    pub state: char,
    /// Field 14, clock ticks in user mode.
    pub utime: u64,
    /// Field 15, clock ticks in kernel mode.
    pub stime: u64,
    /// Field 20, number of threads.
    pub threads: u64,
    /// Field 22, start time in clock ticks since boot.
    pub start_ticks: u64,
    /// Field 23, virtual memory size in bytes.
    pub vsize_bytes: u64,
    /// Field 24, resident set size in pages.
    pub rss_pages: u64,
}

impl Stat {
    /// Whether the process has ended: a zombie counts (it runs no more),
    /// but only once its other threads are gone too. A killed
    /// multi-threaded VMM's leader turns `Z` while its other threads still
    /// exit, holding its files (a TAP device, a disk) and its place in a
    /// cgroup; `threads` counts those until they are released.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x') && self.threads <= 1
    }

    /// User plus system CPU time, in nanoseconds.
    pub fn cpu_time_ns(&self) -> u64 {
        let ticks = u128::from(self.utime) + u128::from(self.stime);
        u64::try_from(ticks * 1_000_000_000 / u128::from(clk_tck())).unwrap_or(u64::MAX)
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let num = |n: usize| field(n).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        state: field(3)?.chars().next()?,
        utime: num(14)?,
        stime: num(15)?,
        threads: num(20)?,
        start_ticks: num(22)?,
        vsize_bytes: num(23)?,
        rss_pages: num(24)?,
    })
}

/// `/proc/<pid>/stat` of a process.
pub fn read_stat(pid: u32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat")))
}

/// `/proc/self/stat`: metald's own process.
pub fn read_self_stat() -> io::Result<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat")?;
    parse_stat(&text).ok_or_else(|| io::Error::other("unparsable /proc/self/stat"))
}

/// Resident set size of a process, from `/proc/<pid>/statm`.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = text
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/statm")))?;
    Ok(pages.saturating_mul(page_size()))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| sysconf_u64(SysconfVar::CLK_TCK).unwrap_or(100))
}

/// Bytes per memory page (`sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf_u64(SysconfVar::PAGE_SIZE).unwrap_or(4096))
}

fn sysconf_u64(var: SysconfVar) -> Option<u64> {
    sysconf(var).ok().flatten().and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0)
}

/// When the system booted, in seconds since the Unix epoch (`btime` of
/// `/proc/stat`).
pub fn boot_time_secs() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))
}

/// The arguments of a process (`/proc/<pid>/cmdline`, NUL-separated);
/// empty when the process is gone or the file unreadable.
pub fn cmdline(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// Every process id in `/proc` (each may end while the caller looks).
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// This host's name (`/proc/sys/kernel/hostname`), if set.
pub fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|s| !s.is_empty())
}

/// File descriptors metald has open (entries of `/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    u64::try_from(std::fs::read_dir("/proc/self/fd").ok()?.count()).ok()
}

/// metald's soft limit on open files ("Max open files" of `/proc/self/limits`).
pub fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 987654 1000 100 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                utime: 250,
                stime: 50,
                threads: 3,
                start_ticks: 987_654,
                vsize_bytes: 1000,
                rss_pages: 100
            }
        );
        assert!(!s.is_dead());
        assert!(Stat { state: 'Z', threads: 1, ..s }.is_dead());
        assert!(!Stat { state: 'Z', threads: 3, ..s }.is_dead(), "a leader whose threads still exit");
        assert!(parse_stat("1 (x) Z 1 2").is_none());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(line).unwrap();
        assert_eq!((st.utime, st.stime), (250, 50));
        assert_eq!(st.threads, 7);
        assert_eq!(st.start_ticks, 1000);
        assert_eq!(st.vsize_bytes, 123_456_789);
        assert_eq!(st.rss_pages, 300);
    }

    #[test]
    fn reads_this_process_and_the_system() {
        let me = read_stat(std::process::id()).unwrap();
        assert_eq!(me.start_ticks, read_self_stat().unwrap().start_ticks, "/proc/self is this process");
        assert!(me.threads >= 1 && me.rss_pages > 0);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(clk_tck() > 0 && page_size() > 0);
        assert!(boot_time_secs().unwrap() > 1_000_000_000);
        assert!(open_fds().unwrap() > 0);
        assert!(max_fds().unwrap() > 0);
        assert!(cmdline(std::process::id()).contains(&0));
        assert!(cmdline(u32::MAX).is_empty());
        assert!(hostname().is_some());
    }
}
