//! Processes seen through `/proc`: whether a pid is alive or merely not yet
//! reaped, the processes a test started under its temp dir, and killing
//! them (a guard does it when a test ends, pass or fail); a process' CPU
//! time, RSS and open file descriptors.

use std::path::{Path, PathBuf};

/// True while `pid` is a live process: it has a `/proc` entry and is not a
/// zombie (a VMM that exited but whose parent has not reaped it yet counts
/// as gone).
pub fn process_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !is_zombie(&stat)
}

/// True while `pid` has a `/proc` entry: running, or a zombie its parent has
/// not reaped yet. False once it is reaped.
pub fn proc_entry_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The state field of `/proc/<pid>/stat` (after the parenthesised name) is `Z`.
fn is_zombie(stat: &str) -> bool {
    stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'))
}

/// `(pid, is a zombie)` of every process whose command line or working
/// directory mentions `dir`.
fn under(dir: &Path) -> Vec<(i32, bool)> {
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle.as_slice()) || cwd.starts_with(dir) {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            out.push((pid, is_zombie(&stat)));
        }
    }
    out
}

/// Pids of live (not zombie) processes whose command line or working
/// directory mentions `dir`.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    under(dir).into_iter().filter(|(_, zombie)| !zombie).map(|(pid, _)| pid).collect()
}

/// SIGKILLs every process whose command line or working directory mentions
/// `dir` and returns how many there were, zombies included (a zombie under
/// `dir` is a VMM nobody reaped, so it counts as left behind).
pub fn kill_processes_under(dir: &Path) -> usize {
    let found = under(dir);
    for (pid, _) in &found {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    found.len()
}

/// Kills every process under `dir` when dropped (pass or fail).
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_processes_under(&self.0);
    }
}

/// CPU time (user + system) of a process in nanoseconds, from
/// `/proc/<pid>/stat` (clock-tick resolution).
pub fn process_cpu_ns(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: i64 = f[11].parse::<i64>().unwrap() + f[12].parse::<i64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    ticks * (1_000_000_000 / hz)
}

/// Resident set size of a process in KiB (`VmRSS`; 0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, `RssFile`, ...); 0 if unknown.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Number of open file descriptors of `pid` (0 when it is gone).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
