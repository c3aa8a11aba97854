//! Why a VMM ended, for the exits metald did not ask for: its wait status
//! (when metald is its parent), the fatal lines it wrote to its own logs
//! since it started, and the kernel's OOM-killer messages.
//!
//! A status alone does not tell: Cloud Hypervisor exits 0 after a vCPU
//! fails ("VCPU generated error: VcpuRun(Failed to run vcpu" in its log),
//! Firecracker exits 1 after `KVM_EXIT_INTERNAL_ERROR`, and the kernel's OOM
//! killer and an operator's `kill -9` both leave `SIGKILL`. So:
//!
//! | seen | reason |
//! |---|---|
//! | `SIGKILL`, the kernel log says it killed this pid for memory | `out_of_memory` |
//! | `SIGKILL` otherwise | `killed` |
//! | another signal, a non-zero status, or a fatal line in the VMM's log | `crashed` (detail: the status and the line) |
//! | status 0, no fatal line | `guest_power_off` |
//! | no status (a VMM found again after a metald restart is not its child), nothing in the logs | `unknown` |

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::model::StopReason;

/// Lines in a VMM's log that mean it failed (QEMU, Firecracker, Cloud
/// Hypervisor).
const FATAL: [&str; 9] = [
    "KVM internal error",
    "KVM_EXIT_INTERNAL_ERROR",
    "kvm run failed",
    "VCPU generated error",
    "Failed to run vcpu",
    "MicroVM stopped with an error",
    "Firecracker exiting with error",
    "qemu: fatal",
    "Assertion",
];
/// How much of each log's end is searched.
const TAIL: u64 = 64 << 10;

/// A VMM's log files and their sizes when it started: only what it wrote
/// since counts (the files are shared by a VM's successive processes).
#[derive(Debug, Clone, Default)]
pub struct Logs {
    logs: Vec<(PathBuf, u64)>,
    /// For a VMM that ends when its guest reboots (Firecracker): the
    /// console, where a guest that powers off says so first.
    reboot_console: Option<(PathBuf, u64)>,
}

/// What metald's guests (metald-init, the test guest) print right before
/// they power off; under Firecracker they then reboot, which ends it.
pub const POWEROFF_MARKER: &str = "METALD_GUEST_POWEROFF";

fn at_start(p: PathBuf) -> (PathBuf, u64) {
    let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    (p, len)
}

impl Logs {
    pub fn at_start(paths: impl IntoIterator<Item = PathBuf>) -> Logs {
        Logs { logs: paths.into_iter().map(at_start).collect(), reboot_console: None }
    }

    /// The VMM exits when its guest reboots (Firecracker on x86: a guest
    /// cannot power it off, `reboot=k` ends it): a clean exit is a reboot
    /// unless the guest printed [`POWEROFF_MARKER`] on `console` first.
    pub fn ends_on_reboot(mut self, console: PathBuf) -> Logs {
        self.reboot_console = Some(at_start(console));
        self
    }

    /// The first fatal line written since the start (the cause; later
    /// ones tend to be its consequences), if any.
    pub fn fatal_line(&self) -> Option<String> {
        self.logs.iter().find_map(|(p, from)| fatal_in(&read_since(p, *from)))
    }

    /// Whether a VMM that ended as `reason` did so because its guest
    /// rebooted (see [`Logs::ends_on_reboot`]).
    pub fn rebooted(&self, reason: StopReason) -> bool {
        reason == StopReason::GuestPowerOff
            && self.reboot_console.as_ref().is_some_and(|(p, from)| !read_since(p, *from).contains(POWEROFF_MARKER))
    }
}

/// What a file holds past `from` (all of it, up to [`TAIL`] from its end,
/// when it is now shorter: rotated).
fn read_since(path: &Path, from: u64) -> String {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let start = if len >= from { from } else { 0 }.max(len.saturating_sub(TAIL));
    let limit = usize::try_from(TAIL).unwrap_or(usize::MAX);
    let buf = crate::util::logs::read_range(path, start, len, limit).unwrap_or_default();
    String::from_utf8_lossy(&buf).into_owned()
}

fn fatal_in(text: &str) -> Option<String> {
    text.lines().find(|l| FATAL.iter().any(|f| l.contains(f))).map(|l| l.trim().chars().take(300).collect())
}

/// Whether the kernel's log says its OOM killer ended `pid`
/// (`Killed process <pid> (...)`). `/dev/kmsg` is read from the start of
/// the kernel's ring buffer; unreadable (no privilege) means no.
pub fn oom_killed(pid: u32) -> bool {
    let Ok(mut f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg") else {
        return false;
    };
    let needle = format!("Killed process {pid} ");
    let mut rec = vec![0u8; 8192];
    // Each read is one record; EAGAIN at the end, EPIPE for records
    // overwritten while reading (skipped).
    for _ in 0..100_000 {
        match f.read(&mut rec) {
            Ok(0) => return false,
            Ok(n) => {
                if String::from_utf8_lossy(&rec[..n]).contains(&needle) {
                    return true;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// The reason and a one-line detail for a VMM `pid` that ended with
/// `status` (`None`: not known), given its fatal log line and whether the
/// OOM killer named it.
pub fn classify(pid: u32, status: Option<ExitStatus>, fatal: Option<String>, oom: bool) -> (StopReason, String) {
    let seen = match status {
        Some(s) => format!("VMM process {pid} ended ({s})"),
        None => format!("VMM process {pid} ended"),
    };
    let with = |what: String| match &fatal {
        Some(line) => format!("{what}: {line}"),
        None => what,
    };
    match status.and_then(|s| s.signal()) {
        Some(9) if oom => (StopReason::OutOfMemory, format!("{seen}: killed by the kernel's OOM killer")),
        Some(9) => (StopReason::Killed, with(format!("{seen}: SIGKILL, not sent by metald"))),
        Some(_) => (StopReason::Crashed, with(seen)),
        None => match (status.and_then(|s| s.code()), fatal) {
            (Some(0), None) => (StopReason::GuestPowerOff, format!("{seen}: the guest powered off")),
            (_, Some(line)) => (StopReason::Crashed, format!("{seen}: {line}")),
            (Some(_), None) => (StopReason::Crashed, seen),
            (None, None) if oom => (StopReason::OutOfMemory, format!("{seen}: killed by the kernel's OOM killer")),
            (None, None) => (
                StopReason::Unknown,
                format!("{seen} while metald was not its parent (after a restart): its exit status is unknown"),
            ),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_told_apart_by_status_log_and_oom() {
        let code = |c: i32| Some(ExitStatus::from_raw(c << 8));
        let sig = |s: i32| Some(ExitStatus::from_raw(s));
        let ch = "cloud-hypervisor: 36.7s: <vcpu0> ERROR:vmm/src/cpu.rs:1460 -- VCPU generated error: VcpuRun(Failed"
            .to_string();
        assert_eq!(classify(5, code(0), None, false).0, StopReason::GuestPowerOff);
        let (r, d) = classify(5, code(0), Some(ch.clone()), false);
        assert_eq!(r, StopReason::Crashed, "Cloud Hypervisor exits 0 after a vCPU error");
        assert!(d.contains("VCPU generated error") && d.contains("exit status: 0"), "{d}");
        assert_eq!(classify(5, code(1), None, false).0, StopReason::Crashed);
        assert_eq!(classify(5, sig(11), None, false).0, StopReason::Crashed);
        assert_eq!(classify(5, sig(9), None, false).0, StopReason::Killed);
        assert_eq!(classify(5, sig(9), None, true).0, StopReason::OutOfMemory);
        assert_eq!(classify(5, None, None, false).0, StopReason::Unknown);
        assert_eq!(classify(5, None, Some(ch), false).0, StopReason::Crashed);
        assert_eq!(classify(5, None, None, true).0, StopReason::OutOfMemory);
    }

    #[test]
    fn only_lines_written_since_the_start_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(&log, "[vm:fc_vcpu 0:ERROR] Received KVM_EXIT_INTERNAL_ERROR signal\n").unwrap();
        let logs = Logs::at_start([log.clone(), dir.path().join("missing.log")]);
        assert_eq!(logs.fatal_line(), None, "a previous process's crash");
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(
            &mut f,
            b"ok\n[vm:fc_vcpu 0:ERROR] Received KVM_EXIT_INTERNAL_ERROR signal\n\
              [vm:main:ERROR] Firecracker exiting with error. exit_code=1\n",
        )
        .unwrap();
        assert_eq!(
            logs.fatal_line().unwrap(),
            "[vm:fc_vcpu 0:ERROR] Received KVM_EXIT_INTERNAL_ERROR signal",
            "the cause"
        );
        // A VMM that ends on a guest reboot: a clean exit without the guest's power-off marker.
        let console = dir.path().join("console.log");
        std::fs::write(&console, "METALD_GUEST_POWEROFF\n").unwrap();
        let fc = Logs::at_start([]).ends_on_reboot(console.clone());
        assert!(fc.rebooted(StopReason::GuestPowerOff), "an earlier boot's marker does not count");
        assert!(!fc.rebooted(StopReason::Crashed));
        std::fs::write(&console, "METALD_GUEST_POWEROFF\nboot\nMETALD_GUEST_POWEROFF\n").unwrap();
        assert!(!fc.rebooted(StopReason::GuestPowerOff), "the guest powered off");
        assert!(!logs.rebooted(StopReason::GuestPowerOff), "other VMMs do not end on a reboot");
        // Rotated (shorter now): the whole file is searched.
        std::fs::write(&log, "qemu-system-x86_64: KVM internal error. Suberror: 1\n").unwrap();
        assert!(logs.fatal_line().unwrap().contains("KVM internal error"));
    }
}
