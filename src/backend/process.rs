//! VMM process helpers shared by the hypervisor backends (QEMU now,
//! Firecracker and Cloud Hypervisor later).
//!
//! - [`ProcessId`]: a pid together with its start time from
//!   `/proc/<pid>/stat`, so a recycled pid is never mistaken for our VMM;
//!   liveness, signals and bounded waits go through it.
//! - [`spawn_detached`]: starts a VMM in its own process group with stdin
//!   closed and stdout/stderr appended to a log file. A new process group is
//!   enough for VMs to outlive metald: a terminal's Ctrl-C (SIGINT to the
//!   foreground group) and metald's own exit do not reach them. (Under
//!   systemd the unit needs `KillMode=process`, otherwise stopping metald
//!   kills its whole cgroup, VMs included.)
//! - [`watch_exit`]: a task that reports a VMM's end on the [`ExitSink`]
//!   within ~250 ms — by `wait()`ing on a child we spawned, or by polling
//!   `/proc` for a process found again after a metald restart (not our
//!   child, so it cannot be waited on; pidfds would need `unsafe` here).
//! - `/proc` itself is read by [`crate::procfs`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::exit::{Logs, classify, oom_killed};
use super::{BackendError, ExitEvent, ExitSink, Runtime};
use crate::model::{StopReason, Usage, VmId};
use crate::procfs::{self, Stat};

/// How often a non-child process is checked for having ended.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// CPU time and resident memory of the VMM recorded in `rt` (`vmm` names
/// the hypervisor in messages): the part of a VM's usage every backend
/// reads from `/proc`, before adding its device counters.
pub fn vmm_usage(vm_id: &VmId, rt: &Runtime, vmm: &str) -> Result<(ProcessId, Usage), BackendError> {
    let pid = ProcessId::from_runtime(rt)
        .ok_or_else(|| BackendError::failed(format!("no {vmm} process recorded for VM {vm_id}")))?;
    let stat = pid.stat().ok_or_else(|| BackendError::failed(format!("{vmm} process {} has exited", pid.pid)))?;
    let memory_bytes =
        procfs::rss_bytes(pid.pid).map_err(|e| BackendError::io(format!("reading /proc/{}/statm", pid.pid), e))?;
    Ok((pid, Usage { cpu_time_ns: stat.cpu_time_ns(), memory_bytes, ..Usage::default() }))
}

/// A process identified by pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcessId {
    /// Identifies the live process `pid`.
    pub fn of(pid: u32) -> std::io::Result<ProcessId> {
        let stat = procfs::read_stat(pid)?;
        Ok(ProcessId { pid, start_ticks: stat.start_ticks })
    }

    /// The VMM recorded in a runtime, when both pid and start time are known.
    pub fn from_runtime(rt: &Runtime) -> Option<ProcessId> {
        Some(ProcessId { pid: rt.pid?, start_ticks: rt.pid_start_ticks? })
    }

    /// Current stat of this very process; `None` once it ended or the pid
    /// belongs to another process.
    pub fn stat(&self) -> Option<Stat> {
        procfs::read_stat(self.pid).ok().filter(|s| s.start_ticks == self.start_ticks && !s.is_dead())
    }

    pub fn is_alive(&self) -> bool {
        self.stat().is_some()
    }

    /// Sends `sig` if the process is still ours and alive; returns whether
    /// it was sent.
    pub fn signal(&self, sig: Signal) -> bool {
        if !self.is_alive() {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else { return false };
        nix::sys::signal::kill(Pid::from_raw(pid), sig).is_ok()
    }

    /// Waits up to `timeout` for the process to end; returns whether it did.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the process and waits for it to be gone.
    pub async fn kill(&self) -> Result<(), BackendError> {
        self.signal(Signal::SIGKILL);
        if self.wait_gone(Duration::from_secs(10)).await {
            Ok(())
        } else {
            Err(BackendError::failed(format!("process {} survived SIGKILL for 10 s", self.pid)))
        }
    }
}

/// Every live process (other than metald itself) whose command line names a
/// path under `vms_dir`, with the name of the directory it names there
/// (the VM id): how start-up reconciliation finds VMMs whose VM has no
/// record, e.g. one a crash left between spawning it and storing its pid.
/// Every backend passes the VM directory's paths (sockets, logs, disks) on
/// its VMM's command line.
pub fn processes_under(vms_dir: &Path) -> Vec<(String, ProcessId)> {
    let own = std::process::id();
    let mut prefix = vms_dir.as_os_str().as_encoded_bytes().to_vec();
    prefix.push(b'/');
    let mut found = Vec::new();
    for pid in procfs::pids() {
        if pid == own {
            continue;
        }
        let cmdline = procfs::cmdline(pid);
        let Some(name) = cmdline.split(|&b| b == 0).find_map(|arg| dir_named(arg, &prefix)) else { continue };
        if let Ok(id) = ProcessId::of(pid)
            && id.is_alive()
        {
            found.push((name, id));
        }
    }
    found
}

/// The first path component after `prefix` in `arg`, if `arg` names one.
fn dir_named(arg: &[u8], prefix: &[u8]) -> Option<String> {
    let at = arg.windows(prefix.len()).position(|w| w == prefix)?;
    let rest = &arg[at + prefix.len()..];
    let end = rest.iter().position(|&b| matches!(b, b'/' | b',' | b':' | b'=' | b' ')).unwrap_or(rest.len());
    let name = std::str::from_utf8(&rest[..end]).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// Kills a stray VMM's whole process group (a VMM is its group's leader,
/// see [`spawn_detached`]) and waits for it to end.
pub async fn kill_stray(pid: ProcessId) -> Result<(), BackendError> {
    if let Ok(raw) = i32::try_from(pid.pid)
        && procfs::read_stat(pid.pid).is_ok_and(|s| s.start_ticks == pid.start_ticks)
    {
        let _ = nix::sys::signal::killpg(Pid::from_raw(raw), Signal::SIGKILL);
    }
    pid.kill().await
}

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a Unix socket path the kernel cannot bind; `hint` names the
/// setting to shorten.
pub fn check_socket_path(what: &str, path: &Path, hint: &str) -> Result<(), BackendError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(BackendError::unavailable(format!(
            "{what} path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter {hint}",
            path.display()
        )));
    }
    Ok(())
}

/// Finds an executable: `name` itself when it contains a `/`, otherwise
/// the first match in `PATH`.
pub fn resolve_binary(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| executable(p))
}

/// Starts `program` in `cwd` in a new process group, stdin from /dev/null,
/// stdout and stderr appended to `log`.
pub fn spawn_detached(program: &Path, args: &[OsString], cwd: &Path, log: &Path) -> Result<Child, BackendError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| BackendError::io(format!("opening {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| BackendError::io(format!("opening {}", log.display()), e))?;
    Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| BackendError::io(format!("starting {}", program.display()), e))
}

/// Like [`spawn_detached`], but stdout and stderr are appended to separate
/// files (Firecracker writes the guest's serial console to its stdout).
pub fn spawn_detached_split(
    program: &Path,
    args: &[OsString],
    cwd: &Path,
    stdout: &Path,
    stderr: &Path,
) -> Result<Child, BackendError> {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| BackendError::io(format!("opening {}", p.display()), e))
    };
    Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(open(stdout)?))
        .stderr(Stdio::from(open(stderr)?))
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| BackendError::io(format!("starting {}", program.display()), e))
}

/// The last `max_lines` non-empty lines of a log file, joined with "; ",
/// for error messages. Empty when the file is missing.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(max_lines)..].join("; ")
}

/// Removes a file, ignoring "not found"; other errors are logged.
pub fn remove_quiet(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        debug!(path = %path.display(), error = %e, "could not remove file");
    }
}

/// How a watcher learns that a VMM ended.
pub enum Watched {
    /// A process we spawned: `wait()` on it (this also reaps it).
    Child(Child),
    /// A process found again after a restart: poll `/proc`.
    Pid(ProcessId),
}

/// Reports the end of a VMM on `sink` as an [`ExitEvent`] with the reason
/// ([`super::exit::classify`]: its status, the fatal lines it wrote to
/// `logs` since now, the OOM killer). Stops silently when `stop` is
/// cancelled (daemon shutdown); the child, if any, is left running.
pub fn watch_exit(
    vm_id: VmId,
    pid: u32,
    watched: Watched,
    logs: Logs,
    sink: ExitSink,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let status = match watched {
            Watched::Child(mut child) => tokio::select! {
                _ = stop.cancelled() => return,
                status = child.wait() => status.ok(),
            },
            Watched::Pid(id) => loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                if !id.is_alive() {
                    break None;
                }
            },
        };
        let (reason, detail, rebooted) = tokio::task::spawn_blocking(move || {
            let killed = status.is_none_or(|s| std::os::unix::process::ExitStatusExt::signal(&s) == Some(9));
            let (reason, detail) = classify(pid, status, logs.fatal_line(), killed && oom_killed(pid));
            let rebooted = logs.rebooted(reason);
            (reason, detail, rebooted)
        })
        .await
        .unwrap_or((StopReason::Unknown, format!("VMM process {pid} ended"), false));
        debug!(vm_id = %vm_id, pid, reason = %reason, rebooted, detail = %detail, "VMM exit noticed");
        // The receiver is gone only when the daemon is shutting down.
        let _ = sink.send(ExitEvent { vm_id, pid: Some(pid), reason, detail, rebooted });
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_named_by_the_first_component_after_the_prefix() {
        let p = b"/d/vms/";
        assert_eq!(dir_named(b"/d/vms/a1/qmp.sock", p).as_deref(), Some("a1"));
        assert_eq!(dir_named(b"unix:/d/vms/b,server=on", p).as_deref(), Some("b"));
        assert_eq!(dir_named(b"file=/d/vms/c/disk.img,format=raw", p).as_deref(), Some("c"));
        assert_eq!(dir_named(b"/d/vms", p), None);
        assert_eq!(dir_named(b"/d/vms/", p), None);
        assert_eq!(dir_named(b"/e/vms/x/y", p), None);
    }

    #[tokio::test]
    async fn stray_processes_are_found_by_their_vm_directory_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        std::fs::create_dir_all(vms.join("stray")).unwrap();
        let log = dir.path().join("log");
        // One process whose command line names a file in the VM directory.
        let file = vms.join("stray").join("vmm.log");
        std::fs::write(&file, b"").unwrap();
        let args: Vec<OsString> = vec!["-f".into(), file.into()];
        let mut child = spawn_detached(Path::new("tail"), &args, dir.path(), &log).unwrap();
        let pid = child.id().unwrap();
        // Until the child has exec'd, its command line is still ours.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = processes_under(&vms);
        while found.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            found = processes_under(&vms);
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "stray");
        assert_eq!(found[0].1.pid, pid);
        kill_stray(found[0].1).await.unwrap();
        let _ = child.wait().await;
        assert!(processes_under(&vms).is_empty());
    }

    #[test]
    fn own_process_is_identified_and_alive() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let recycled = ProcessId { start_ticks: me.start_ticks + 1, ..me };
        assert!(!recycled.is_alive(), "a different start time is another process");
        assert!(procfs::rss_bytes(me.pid).unwrap() > 0);
        assert!(procfs::clk_tck() > 0);
    }

    #[test]
    fn binaries_are_resolved_in_path_or_as_given() {
        assert!(resolve_binary("sh").is_some());
        assert_eq!(resolve_binary("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert!(resolve_binary("metald-no-such-binary").is_none());
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(resolve_binary(plain.to_str().unwrap()).is_none(), "not executable");
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 2), "c; d");
        assert_eq!(log_tail(&dir.path().join("none"), 2), "");
    }

    #[tokio::test]
    async fn watcher_reports_child_exit_and_pid_exit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let id = VmId::parse("w").unwrap();
        let watch = |child: Child, log: &Path, tx: &ExitSink| {
            let pid = child.id().unwrap();
            watch_exit(
                id.clone(),
                pid,
                Watched::Child(child),
                Logs::at_start([log.to_path_buf()]),
                tx.clone(),
                CancellationToken::new(),
            );
        };

        let child = spawn_detached(Path::new("sleep"), &["0.2".into()], dir.path(), &log).unwrap();
        let pid = child.id().unwrap();
        watch(child, &log, &tx);
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!((ev.vm_id, ev.pid, ev.reason), (id.clone(), Some(pid), StopReason::GuestPowerOff));

        // Status 0, but a fatal line in its log since it started.
        let child = spawn_detached(
            Path::new("sh"),
            &["-c".into(), "echo 'VCPU generated error: x' >&2".into()],
            dir.path(),
            &log,
        )
        .unwrap();
        watch(child, &log, &tx);
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(ev.reason, StopReason::Crashed, "{}", ev.detail);
        assert!(ev.detail.contains("VCPU generated error"), "{}", ev.detail);

        // Killed by someone else.
        let child = spawn_detached(Path::new("sleep"), &["30".into()], dir.path(), &log).unwrap();
        let pid = child.id().unwrap();
        watch(child, &log, &tx);
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL).unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(ev.reason, StopReason::Killed, "{}", ev.detail);

        // A process we do not wait on: killed, then noticed by polling.
        let mut child = spawn_detached(Path::new("sleep"), &["30".into()], dir.path(), &log).unwrap();
        let pid = child.id().unwrap();
        let pid_id = ProcessId::of(pid).unwrap();
        watch_exit(id.clone(), pid, Watched::Pid(pid_id), Logs::default(), tx, CancellationToken::new());
        pid_id.kill().await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!((ev.pid, ev.reason), (Some(pid), StopReason::Unknown));
        let _ = child.wait().await;
    }
}
