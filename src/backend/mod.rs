//! The hypervisor backend trait: the only door between the core and a VMM.
//!
//! A backend drives one hypervisor process per VM. The core calls it only
//! after [`crate::model::transition`] allowed the operation and commits
//! the new state only after the backend succeeded. Everything a backend needs
//! to find a VM's process again after a metald restart is in [`Runtime`],
//! which the core persists.

pub mod cloudhypervisor;
pub mod exit;
pub mod fake;
pub mod firecracker;
pub mod host;
pub mod kernel;
pub mod process;
pub mod qemu;
pub mod restvmm;
pub mod tap;
pub mod uds_http;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::model::{BackendKind, Runtime, StopMode, Usage};
use crate::model::{ValidSpec, VmId};
use crate::util::logs::LogFile;

/// What a backend gets to know about the VM it acts on.
#[derive(Debug, Clone)]
pub struct VmContext<'a> {
    pub id: &'a VmId,
    pub spec: &'a ValidSpec,
    /// `<data dir>/vms/<id>`, created by the core, owned by this VM
    /// (borrowed on the metering path, which builds thousands per tick).
    pub dir: Cow<'a, Path>,
}

/// One VM of a [`Backend::usage_many`] call.
#[derive(Debug, Clone)]
pub struct UsageTarget<'a> {
    pub vm: VmContext<'a>,
    pub rt: &'a Runtime,
}

/// A usage sample and the time it was taken (see [`Backend::usage_many`]).
pub type Stamped = (i64, Result<Usage>);

/// Health of the backend itself.
#[derive(Debug, Clone, Serialize)]
pub struct BackendHealth {
    pub ok: bool,
    pub version: String,
    pub detail: String,
}

/// What a hypervisor says its guest is doing ([`Backend::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The VMM runs; the guest has not been started.
    Created,
    Running,
    /// The VMM runs; the guest is stopped (paused, or halted in an error).
    Paused,
    /// The VMM process is gone.
    Gone,
}

/// A VMM process ended without the core asking for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitEvent {
    pub vm_id: VmId,
    pub pid: Option<u32>,
    /// Why it ended (see [`exit`]).
    pub reason: crate::model::StopReason,
    pub detail: String,
    /// The guest rebooted, which ends this VMM (Firecracker): the core
    /// starts it again and the VM stays `RUNNING`.
    pub rebooted: bool,
}

/// Where backends report VMM exits; the core turns them into `GuestExited`.
pub type ExitSink = mpsc::UnboundedSender<ExitEvent>;

/// The error that caused a [`BackendError`], kept as its `source()`.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a backend operation failed. Each kind carries a context (what was
/// being done) and, when another error caused it, that error as its
/// `source()`: the chain is rendered once, at the edge
/// ([`crate::error::Error::chain`] prints `context: cause`). An error built
/// from a cause alone ([`BackendError::failed_by`], ...) has no context of
/// its own and shows the cause's message, for causes that already name
/// what failed (an API call, a QMP command).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request cannot be served by this backend (e.g. kernel format).
    #[error("{}", Message(.context, .source))]
    Unsupported {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    /// The hypervisor is not reachable or not installed.
    #[error("{}", Message(.context, .source))]
    Unavailable {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    /// Something the request needs is held by something else (e.g. a TAP
    /// device another process uses): the caller must change the situation.
    #[error("{}", Message(.context, .source))]
    Conflict {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("timed out: {}", Message(.context, .source))]
    Timeout {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("{}", Message(.context, .source))]
    Failed {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The context, or the cause's message when there is no context.
struct Message<'a>(&'a str, &'a Option<Cause>);

impl std::fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(cause) if self.0.is_empty() => cause.fmt(f),
            _ => f.write_str(self.0),
        }
    }
}

impl BackendError {
    pub fn unsupported(context: impl Into<String>) -> Self {
        BackendError::Unsupported { context: context.into(), source: None }
    }

    pub fn unavailable(context: impl Into<String>) -> Self {
        BackendError::Unavailable { context: context.into(), source: None }
    }

    pub fn conflict(context: impl Into<String>) -> Self {
        BackendError::Conflict { context: context.into(), source: None }
    }

    pub fn timeout(context: impl Into<String>) -> Self {
        BackendError::Timeout { context: context.into(), source: None }
    }

    pub fn failed(context: impl Into<String>) -> Self {
        BackendError::Failed { context: context.into(), source: None }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io { context: context.into(), source }
    }

    /// Unavailable because of `cause`, whose message says what failed.
    pub fn unavailable_by(cause: impl Into<Cause>) -> Self {
        BackendError::Unavailable { context: String::new(), source: Some(cause.into()) }
    }

    /// Timed out, as `cause` (whose message says what) reports.
    pub fn timeout_by(cause: impl Into<Cause>) -> Self {
        BackendError::Timeout { context: String::new(), source: Some(cause.into()) }
    }

    /// Failed because of `cause`, whose message says what failed.
    pub fn failed_by(cause: impl Into<Cause>) -> Self {
        BackendError::Failed { context: String::new(), source: Some(cause.into()) }
    }

    /// The same error, caused by `cause` (its `source()` from now on). An
    /// `Io` error keeps its `std::io::Error` and ignores `cause`.
    pub fn caused_by(mut self, cause: impl Into<Cause>) -> Self {
        match &mut self {
            BackendError::Unsupported { source, .. }
            | BackendError::Unavailable { source, .. }
            | BackendError::Conflict { source, .. }
            | BackendError::Timeout { source, .. }
            | BackendError::Failed { source, .. } => *source = Some(cause.into()),
            BackendError::Io { .. } => {}
        }
        self
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// The facts every backend's [`Backend::compat`] records: the hypervisor
/// and its version, the guest's CPUs and memory, its kernel (path and
/// size) and the device layout a saved device state refers to (disk ids
/// and modes, NIC count). Backends add their own (QEMU: machine, accel).
pub fn base_compat(kind: BackendKind, version: &str, spec: &ValidSpec) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("hypervisor".into(), kind.as_str().into());
    m.insert("hypervisor_version".into(), version.into());
    m.insert("vcpus".into(), spec.vcpus().to_string());
    m.insert("memory_bytes".into(), spec.memory_bytes().to_string());
    let size = std::fs::metadata(&spec.boot.kernel).map(|m| m.len()).unwrap_or(0);
    m.insert("kernel".into(), format!("{} ({size} bytes)", spec.boot.kernel.display()));
    let disks: Vec<String> =
        spec.storage.iter().map(|d| format!("{}{}", d.id, if d.read_only { ":ro" } else { "" })).collect();
    m.insert("disks".into(), disks.join(","));
    m.insert("nics".into(), spec.network.len().to_string());
    m
}

/// How long saving or loading a guest of `memory_bytes` may take: one
/// minute, plus a minute per GiB of guest memory (every backend writes or
/// reads the whole memory to or from a local file).
pub fn save_timeout(memory_bytes: u64) -> std::time::Duration {
    let gib = u32::try_from(memory_bytes.div_ceil(1 << 30)).unwrap_or(u32::MAX);
    let minute = std::time::Duration::from_secs(60);
    minute + minute.saturating_mul(gib)
}

/// One hypervisor implementation.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// Backend-specific checks of a validated spec (kernel format, ...),
    /// run before anything is created.
    fn check(&self, _spec: &ValidSpec) -> Result<()> {
        Ok(())
    }

    /// Starts the VMM for `vm` with the guest not yet running.
    async fn create(&self, vm: &VmContext<'_>) -> Result<Runtime>;

    /// Starts the guest of a created VM.
    async fn boot(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()>;

    async fn pause(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()>;

    async fn resume(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()>;

    /// Restarts the guest; `force` is a hard reset. The runtime may change
    /// (a backend that must restart its VMM records the new process).
    async fn reboot(&self, vm: &VmContext<'_>, rt: &mut Runtime, force: bool) -> Result<()>;

    /// Stops the guest and releases the VMM process and its resources.
    async fn shutdown(&self, vm: &VmContext<'_>, rt: &Runtime, mode: StopMode) -> Result<()>;

    /// Releases everything a VM holds: kills its VMM if `rt` is given and
    /// removes backend resources. Must succeed for a VM whose process is gone.
    async fn delete(&self, vm: &VmContext<'_>, rt: Option<&Runtime>) -> Result<()>;

    /// Cleans up after a VMM that exited on its own (sockets, taps, ...).
    async fn reap(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<()>;

    /// What a guest this backend saves depends on, for `spec` on this host:
    /// hypervisor, version, machine and CPU model, kernel, memory and
    /// device layout, as names and values. The core records it with every
    /// save and refuses a restore (`FailedPrecondition`, naming what
    /// differs) when the values now differ.
    fn compat(&self, spec: &ValidSpec) -> BTreeMap<String, String>;

    /// The log files the VM's hypervisor writes (in its directory or jail),
    /// each with how it is opened: metald keeps them bounded
    /// ([`crate::util::logs`]). Every file that grows with the VM's life,
    /// except metrics files (Firecracker's).
    fn log_files(&self, vm: &VmContext<'_>) -> Vec<LogFile>;

    /// Saves the paused guest's memory and device state into `dir` (an
    /// empty directory the core made and syncs); the VMM goes on with the
    /// guest paused. Disks are the core's (it copies them for snapshots).
    async fn save(&self, vm: &VmContext<'_>, rt: &Runtime, dir: &Path) -> Result<()>;

    /// Starts a VMM for `vm` from the state [`Backend::save`] wrote into
    /// `dir`, the guest paused where it was saved; `vm.spec`'s disks and
    /// NICs are the ones it runs with (a clone's own copies and TAPs).
    async fn restore(&self, vm: &VmContext<'_>, dir: &Path) -> Result<Runtime>;

    /// Gives a guest restored as a clone a new generation while it is still
    /// paused: `seed` (32 bytes from the host's CSPRNG) for its random
    /// number generator (docs/SNAPSHOTS.md, "Fresh randomness"). `Ok` names
    /// the way (`"vmgenid"`: the hypervisor's VM generation ID device, which
    /// it changes by itself on every load; `"virtio-console"`: metald's
    /// generation port); `Unsupported` where the backend has neither.
    async fn new_generation(&self, _vm: &VmContext<'_>, _rt: &Runtime, _seed: &[u8; 32]) -> Result<&'static str> {
        Err(BackendError::unsupported("a new VM generation (fresh randomness for a clone)"))
    }

    /// Backend facts for `GetVmInfo.backend_info`.
    fn info(&self, rt: &Runtime) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("backend".into(), self.kind().as_str().into());
        if let Some(pid) = rt.pid {
            m.insert("pid".into(), pid.to_string());
        }
        if let Some(s) = &rt.api_socket {
            m.insert("api_socket".into(), s.display().to_string());
        }
        if let Some(c) = &rt.console_log {
            m.insert("console_log".into(), c.display().to_string());
        }
        for (k, v) in &rt.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    /// Current usage of a VM whose VMM is running.
    async fn usage(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Usage>;

    /// Usage of many running VMs: the billing collector's call every
    /// interval. `out[k]` gets `vms[k]`'s usage and the value `stamp()` gave
    /// right before that VM was measured (so a slow VM's sample carries its
    /// own time). The default asks [`Backend::usage`] for each: every call is
    /// polled once inline (most answer from `/proc` or memory at once) and
    /// only calls that wait are parked, at most `concurrency` at a time.
    /// Backends that answer from memory override it with a plain loop.
    async fn usage_many(
        &self,
        vms: &[UsageTarget<'_>],
        concurrency: usize,
        stamp: &(dyn Fn() -> i64 + Send + Sync),
        out: &mut Vec<Stamped>,
    ) {
        use futures::FutureExt;
        use futures::stream::{FuturesUnordered, StreamExt};
        out.clear();
        let mut waiting = FuturesUnordered::new();
        for (k, t) in vms.iter().enumerate() {
            let ts = stamp();
            let mut call = self.usage(&t.vm, t.rt);
            match (&mut call).now_or_never() {
                Some(r) => out.push((ts, r)),
                None => {
                    // A placeholder, replaced when the parked call ends.
                    out.push((ts, Err(BackendError::timeout("usage"))));
                    waiting.push(call.map(move |r| (k, r)));
                    if waiting.len() >= concurrency.max(1)
                        && let Some((k, r)) = waiting.next().await
                    {
                        out[k].1 = r;
                    }
                }
            }
        }
        while let Some((k, r)) = waiting.next().await {
            out[k].1 = r;
        }
    }

    /// Asks the hypervisor what the guest is doing: after an operation
    /// failed or timed out (it may still have taken effect) and after a
    /// crash interrupted one, the core commits what this says.
    async fn observe(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Observed>;

    /// After a metald restart: is this VM's VMM still alive and ours?
    /// When it is, the backend resumes watching it for exits.
    async fn reattach(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<bool>;

    /// Waits until the backend has decided what it decides in the
    /// background after start (QEMU: the accelerator); the core calls it
    /// before [`Backend::compat`].
    async fn ready(&self) {}

    /// Start-up reconciliation, once every stored VM was recovered: removes
    /// what this backend keeps per VM outside the VM directory (the
    /// jailer's jails and cgroups) for every VM not in `live` (host VM
    /// ids), processes included. Returns how many VMs' leftovers went.
    async fn sweep(&self, _live: &HashSet<String>) -> usize {
        0
    }

    async fn health(&self) -> BackendHealth;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::model::Code;

    fn gone() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "gone")
    }

    #[test]
    fn a_cause_is_kept_as_source_and_printed_once_at_the_edge() {
        let e = BackendError::unsupported("cannot read /k").caused_by(gone());
        assert_eq!(e.to_string(), "cannot read /k");
        let source = std::error::Error::source(&e).unwrap();
        assert_eq!(source.downcast_ref::<std::io::Error>().unwrap().kind(), std::io::ErrorKind::NotFound);
        let e = Error::Backend(e);
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.chain(), "hypervisor backend failed: cannot read /k: gone");

        let e = BackendError::timeout("vm.counters").caused_by(gone());
        assert_eq!(Error::Backend(e).chain(), "hypervisor backend failed: timed out: vm.counters: gone");
    }

    #[test]
    fn a_cause_without_context_speaks_for_itself() {
        let cases = [
            (BackendError::failed_by(gone()), "gone", Code::Internal),
            (BackendError::unavailable_by(gone()), "gone", Code::Unavailable),
            (BackendError::timeout_by(gone()), "timed out: gone", Code::DeadlineExceeded),
        ];
        for (e, text, code) in cases {
            assert_eq!(e.to_string(), text);
            assert!(std::error::Error::source(&e).is_some());
            let e = Error::Backend(e);
            assert_eq!(e.code(), code);
            assert_eq!(e.chain(), format!("hypervisor backend failed: {text}"));
        }
        let plain = BackendError::failed("no process");
        assert!(std::error::Error::source(&plain).is_none());
        assert_eq!(Error::Backend(plain).chain(), "hypervisor backend failed: no process");
    }
}
