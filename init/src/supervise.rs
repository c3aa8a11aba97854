//! PID 1's duties once the root is in place: start the workload (its own session, the image's
//! user and groups, stdin `/dev/null`, stdout/stderr the console as they are), reap every
//! zombie, turn a stop request (ACPI power button read from evdev, Ctrl-Alt-Del, SIGTERM or
//! SIGPWR to PID 1) into SIGTERM to the workload and SIGKILL after the grace period, and power
//! the machine off when the workload is gone — printing the console markers metald reads.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use crate::console::marker;
use crate::user::Identity;

/// Signals PID 1 takes through its signalfd (blocked, so none is lost before the loop runs).
const SIGNALS: [Signal; 4] = [Signal::SIGCHLD, Signal::SIGINT, Signal::SIGTERM, Signal::SIGPWR];
/// `struct input_event` on x86_64: `struct timeval` (16 bytes), `u16 type`, `u16 code`, `i32 value`.
const INPUT_EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// How long power-off waits for the killed processes to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// Blocks `SIGNALS` (SIGCHLD, SIGINT, SIGTERM, SIGPWR) and returns the signalfd that receives
/// them. Call first: the kernel queues a blocked signal even for PID 1 (it drops unblocked ones
/// PID 1 has no handler for);
/// [`spawn`] gives the workload an empty mask again.
pub fn signal_fd() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in SIGNALS {
        mask.add(s);
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// The evdev nodes of every "Power Button" input device (button.ko for the ACPI power button,
/// evdev.ko for its `/dev/input/eventN`), opened non-blocking. devtmpfs may create a node a
/// moment after the module load returned, so this waits up to a second for it.
pub fn power_buttons() -> Vec<File> {
    let mut nodes = Vec::new();
    for input in fs::read_dir("/sys/class/input").into_iter().flatten().flatten() {
        let name = fs::read_to_string(input.path().join("name")).unwrap_or_default();
        if name.trim() != "Power Button" {
            continue;
        }
        for ev in fs::read_dir(input.path()).into_iter().flatten().flatten() {
            let ev = ev.file_name().to_string_lossy().into_owned();
            if ev.starts_with("event") {
                nodes.push(PathBuf::from("/dev/input").join(ev));
            }
        }
    }
    let start = Instant::now();
    let mut files = Vec::new();
    for node in nodes {
        loop {
            match fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(&node) {
                Ok(f) => {
                    files.push(f);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && start.elapsed() < Duration::from_secs(1) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    marker(&format!("METALD_GUEST_ERROR power button {}: {e}", node.display()));
                    break;
                }
            }
        }
    }
    files
}

/// Whether the bytes read from an evdev node hold a KEY_POWER press.
pub fn has_power_press(events: &[u8]) -> bool {
    events.chunks_exact(INPUT_EVENT_SIZE).any(|e| {
        let kind = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// What the workload is started with.
pub struct Start<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub working_dir: &'a Path,
    pub id: &'a Identity,
}

/// Starts the workload; `Err` is the exec's error (std reports it from the child).
#[allow(unsafe_code)] // `pre_exec`: the one place the OS demands it (see SAFETY below)
pub fn spawn(s: &Start<'_>) -> io::Result<Pid> {
    let (program, args) = s.argv.split_first().ok_or_else(|| io::Error::other("empty argv"))?;
    if !s.working_dir.exists() {
        // Docker creates a missing WorkingDir; give it to the user so it can write there.
        fs::create_dir_all(s.working_dir)?;
        chown(s.working_dir, Some(s.id.uid), Some(s.id.gid))?;
    }
    let groups: Vec<Gid> = s.id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(s.id.uid), Gid::from_raw(s.id.gid));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .current_dir(s.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec. It only makes raw syscalls
    // (sigprocmask, setsid, setgroups, setgid, setuid — async-signal-safe) on values computed before the
    // fork and allocates nothing; this process has a single thread anyway.
    unsafe {
        cmd.pre_exec(move || {
            // PID 1 blocks the signals its signalfd takes; the workload starts with none
            // blocked (std's Command does not reset the mask on this path).
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::unistd::setsid()?;
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    Ok(Pid::from_raw(pid))
}

/// Docker's exit code for a workload that could not be executed.
pub fn exec_error_code(e: &io::Error) -> i32 {
    if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 }
}

/// What power-off tidies up: the writable disk, remounted read-only.
pub struct Shutdown {
    pub rw_disk: Option<OwnedFd>,
}

/// Runs until the workload is gone, then powers off. Never returns.
pub fn supervise(workload: Pid, grace: Duration, signals: &SignalFd, buttons: &mut [File], off: Shutdown) -> ! {
    let mut stop: Option<Instant> = None;
    let mut killed = false;
    loop {
        let timeout = match stop {
            Some(deadline) if !killed => {
                let left = deadline.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_millis().saturating_add(1)).unwrap_or(PollTimeout::MAX)
            }
            _ => PollTimeout::NONE,
        };
        let ready: Vec<bool> = {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            fds.extend(buttons.iter().map(|b| PollFd::new(b.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => marker(&format!("METALD_GUEST_ERROR poll: {e}")),
            }
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        let mut request = None;
        if ready.first() == Some(&true) {
            while let Ok(Some(info)) = signals.read_signal() {
                match Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) {
                    Ok(Signal::SIGINT) => request = Some("ctrl-alt-del"),
                    Ok(Signal::SIGTERM) => request = Some("sigterm"),
                    Ok(Signal::SIGPWR) => request = Some("sigpwr"),
                    _ => {}
                }
            }
        }
        for (button, _) in buttons.iter_mut().zip(ready.iter().skip(1)).filter(|(_, r)| **r) {
            let mut buf = [0u8; INPUT_EVENT_SIZE * 32];
            while let Ok(n) = button.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if has_power_press(&buf[..n]) {
                    request = Some("power-button");
                }
            }
        }
        if let (Some(reason), None) = (request, stop) {
            marker(&format!("METALD_GUEST_SHUTDOWN_REASON={reason}"));
            let _ = kill(workload, Signal::SIGTERM);
            stop = Some(Instant::now() + grace);
        }
        if stop.is_some_and(|deadline| !killed && Instant::now() >= deadline) {
            marker(&format!("METALD_WORKLOAD_KILL grace_seconds={}", grace.as_secs()));
            let _ = kill(workload, Signal::SIGKILL);
            killed = true;
        }
        if let Some(status) = reap(workload) {
            marker(&format!("METALD_WORKLOAD_EXIT {status}"));
            if stop.is_none() {
                marker("METALD_GUEST_SHUTDOWN_REASON=workload-exit");
            }
            power_off(off);
        }
    }
}

/// Reaps every exited child; `Some("code=N" | "signal=N")` once `workload` is among them.
fn reap(workload: Pid) -> Option<String> {
    let mut done = None;
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == workload => done = Some(format!("code={code}")),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == workload => done = Some(format!("signal={}", sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return done,
            Ok(_) => {}
        }
    }
}

/// Kills what is left, syncs, remounts the writable disk read-only, prints
/// `METALD_GUEST_POWEROFF` and powers off — or reboots, when the kernel
/// command line says `metald.stop=reboot` (Firecracker: it has no power-off
/// device, and a reboot ends it; the marker tells metald it was a
/// power-off). Never returns.
pub fn power_off(off: Shutdown) -> ! {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let start = Instant::now();
    while start.elapsed() < REAP_TIMEOUT {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            _ => {}
        }
    }
    nix::unistd::sync();
    if let Some(fd) = off.rw_disk {
        // The disk is mounted in the initramfs, out of sight since the switch; its descriptor
        // still names the mount (best effort: the data is synced already).
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        let _ = mount(None::<&str>, path.as_str(), None::<&str>, flags, None::<&str>);
    }
    marker("METALD_GUEST_POWEROFF");
    let _ = reboot(stop_mode(&fs::read_to_string("/proc/cmdline").unwrap_or_default()));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// How this guest stops: `RB_AUTOBOOT` when the command line has
/// `metald.stop=reboot`, else `RB_POWER_OFF`.
fn stop_mode(cmdline: &str) -> RebootMode {
    if crate::cmdline::Cmdline::parse(cmdline).get("metald.stop") == Some("reboot") {
        RebootMode::RB_AUTOBOOT
    } else {
        RebootMode::RB_POWER_OFF
    }
}

/// A fatal error before the workload ran: reported, then power-off.
pub fn fatal(message: &str) -> ! {
    marker(&format!("METALD_INIT_ERROR {}", message.replace('\n', " ")));
    marker("METALD_GUEST_SHUTDOWN_REASON=init-error");
    power_off(Shutdown { rw_disk: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend(kind.to_ne_bytes());
        e.extend(code.to_ne_bytes());
        e.extend(value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        let press = event(EV_KEY, KEY_POWER, 1);
        let release = event(EV_KEY, KEY_POWER, 0);
        let syn = event(0, 0, 0);
        let other = event(EV_KEY, 30, 1);
        assert!(has_power_press(&[syn.clone(), press.clone(), release.clone()].concat()));
        assert!(!has_power_press(&[release, syn, other].concat()));
        assert!(!has_power_press(&press[..INPUT_EVENT_SIZE - 1]), "a partial event is not one");
    }

    #[test]
    fn under_firecracker_the_guest_reboots_to_stop() {
        assert_eq!(stop_mode("console=ttyS0 reboot=k panic=1 metald.stop=reboot\n"), RebootMode::RB_AUTOBOOT);
        assert_eq!(stop_mode("console=ttyS0 quiet\n"), RebootMode::RB_POWER_OFF);
        assert_eq!(stop_mode("metald.stop=other"), RebootMode::RB_POWER_OFF);
    }
}
