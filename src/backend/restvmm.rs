//! What the VMMs driven over a JSON REST API on a Unix socket (Firecracker,
//! Cloud Hypervisor) share, written once:
//!
//! - the process lifecycle: [`prepare_socket`] (refuse an unbindable path,
//!   remove a stale socket), [`launch`] (spawn in its own process group,
//!   wait for the API socket to serve, configure; on any failure nothing is
//!   left running), [`Running::watch`] (hand the child to the exit watcher),
//!   [`runtime`] (the persisted handle) and [`stop`] (ask the guest to stop,
//!   wait up to a grace period, then force; see [`grace`]);
//! - the rate-limiter wire type both APIs use ([`RateLimiter`], Firecracker's
//!   `RateLimiter` and Cloud Hypervisor's `RateLimiterConfig`) and its
//!   conversion from the spec's [`RateLimit`].
//!
//! Each backend keeps what really differs: its command line (and
//! Firecracker's jailer), what "configure" sends (Firecracker's `PUT`
//! sequence, Cloud Hypervisor's `vm.create`), how a guest is asked to stop
//! and how a stop is forced. The HTTP client itself is [`super::uds_http`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::exit::Logs;
use super::process::{self, ProcessId, Watched, remove_quiet, watch_exit};
use super::uds_http::UdsClient;
use super::{BackendError, ExitSink, Result, Runtime, StopMode};
use crate::model::{RateLimit, VmId};

/// How long a new VMM may take to serve its API.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `RateLimiter` (Firecracker) / `RateLimiterConfig` (Cloud Hypervisor):
/// independent bytes/s and ops/s token buckets, the same JSON in both APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ops: Option<TokenBucket>,
}

/// `TokenBucket`: `size` tokens refilled every `refill_time` ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl RateLimiter {
    /// A bandwidth limiter from metald's `RateLimit` (bytes per second,
    /// refill period in ms, initial burst in bytes); `None` when unlimited.
    pub fn from_spec(rl: Option<&RateLimit>) -> Option<RateLimiter> {
        let rl = rl?;
        let bandwidth = u64::try_from(rl.bandwidth).ok().filter(|b| *b > 0)?;
        let refill_time = u64::try_from(rl.refill_time_ms).ok().filter(|r| *r > 0).unwrap_or(1000);
        let size = u64::try_from(u128::from(bandwidth) * u128::from(refill_time) / 1000).unwrap_or(u64::MAX).max(1);
        let one_time_burst = u64::try_from(rl.burst).ok().filter(|b| *b > 0);
        Some(RateLimiter { bandwidth: Some(TokenBucket { size, one_time_burst, refill_time }), ops: None })
    }
}

/// Refuses an API socket path the kernel cannot bind (`hint` names the
/// setting to shorten) and removes a stale socket of an earlier process.
pub fn prepare_socket(socket: &Path, hint: &str) -> Result<()> {
    process::check_socket_path("API socket", socket, hint)?;
    remove_quiet(socket);
    Ok(())
}

/// Where a VMM's stdout and stderr go.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// Both appended to one log (Cloud Hypervisor).
    Combined(&'a Path),
    /// Separate files (Firecracker writes the guest's serial console to its
    /// stdout).
    Split { stdout: &'a Path, stderr: &'a Path },
}

/// A VMM process to start.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The VMM's name in error messages ("Firecracker", ...).
    pub vmm: &'a str,
    pub program: &'a Path,
    pub args: &'a [OsString],
    pub cwd: &'a Path,
    pub output: Output<'a>,
    /// The API socket (host path).
    pub socket: &'a Path,
    /// The request that proves the API serves (`GET` of this path).
    pub probe_path: &'a str,
    /// The VMM's own log, whose tail ends the error messages.
    pub log: &'a Path,
}

/// A started and configured VMM, not yet watched.
#[derive(Debug)]
pub struct Running<T> {
    pub child: Child,
    pub pid: ProcessId,
    /// What the configure step returned.
    pub configured: T,
}

impl<T> Running<T> {
    /// Hands the child to an exit watcher reporting on `exits` (see
    /// [`watch_exit`]); returns what the configure step returned.
    /// `logs`: the VMM's own log files (see [`watch_exit`]).
    pub fn watch(self, vm_id: &VmId, logs: Logs, exits: &ExitSink, stop: &CancellationToken) -> T {
        watch_exit(vm_id.clone(), self.pid.pid, Watched::Child(self.child), logs, exits.clone(), stop.clone());
        self.configured
    }
}

/// Spawns the VMM, waits for its API to answer `GET probe_path` (the
/// answer, a `P`, goes to `configure`) and runs `configure`. On failure the
/// process is killed and reaped and its socket removed.
pub async fn launch<P, T, F, Fut>(l: &Launch<'_>, client: &UdsClient, configure: F) -> Result<Running<T>>
where
    P: DeserializeOwned,
    F: FnOnce(ProcessId, P) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut child = match l.output {
        Output::Combined(log) => process::spawn_detached(l.program, l.args, l.cwd, log)?,
        Output::Split { stdout, stderr } => process::spawn_detached_split(l.program, l.args, l.cwd, stdout, stderr)?,
    };
    let result = async {
        let pid = child.id().ok_or_else(|| BackendError::failed(format!("{} exited at once", l.vmm)))?;
        let pid = ProcessId::of(pid).map_err(|e| BackendError::io(format!("reading /proc/{pid}/stat"), e))?;
        let probed: P = wait_for_api(&mut child, client, l).await?;
        Ok((pid, configure(pid, probed).await?))
    }
    .await;
    match result {
        Ok((pid, configured)) => Ok(Running { child, pid, configured }),
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            remove_quiet(l.socket);
            Err(e)
        }
    }
}

/// Polls `GET probe_path` on a freshly started VMM's socket until it
/// answers; fails early when the process exits, and after [`START_TIMEOUT`].
async fn wait_for_api<T: DeserializeOwned>(child: &mut Child, client: &UdsClient, l: &Launch<'_>) -> Result<T> {
    let tail = || {
        let t = process::log_tail(l.log, 5);
        if t.is_empty() { String::new() } else { format!(" ({t})") }
    };
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let probe = client.with_timeout(Duration::from_secs(1));
    let mut last = String::from("socket not created");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BackendError::failed(format!("{} exited during start ({status}){}", l.vmm, tail())));
        }
        if l.socket.exists() {
            match probe.get::<T>(l.probe_path).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e.to_string(),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BackendError::timeout(format!(
                "{} did not serve its API within {} s ({last}){}",
                l.vmm,
                START_TIMEOUT.as_secs(),
                tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The persisted handle of a freshly launched VMM (not booted yet).
pub fn runtime(pid: ProcessId, socket: &Path, console_log: &Path, extra: BTreeMap<String, String>) -> Runtime {
    Runtime {
        pid: Some(pid.pid),
        pid_start_ticks: Some(pid.start_ticks),
        api_socket: Some(socket.to_path_buf()),
        console_log: Some(console_log.to_path_buf()),
        booted_at: None,
        extra,
    }
}

/// The grace period of a stop: `None` for a forced one.
pub fn grace(mode: StopMode) -> Option<Duration> {
    match mode {
        StopMode::Graceful { timeout } => Some(timeout),
        StopMode::Force => None,
    }
}

/// Stops a VMM: with a `grace` period, `ask` the guest to stop (`request`
/// names that in the log) and wait up to `grace` for the process to end;
/// then (or at once without a grace period) `force`.
pub async fn stop(
    vm_id: &VmId,
    pid: ProcessId,
    grace: Option<Duration>,
    request: &str,
    ask: impl Future<Output = Result<()>>,
    force: impl Future<Output = Result<()>>,
) -> Result<()> {
    if let Some(grace) = grace {
        match ask.await {
            Ok(()) if pid.wait_gone(grace).await => return Ok(()),
            Ok(()) => info!(vm_id = %vm_id, grace_secs = grace.as_secs(), "guest did not stop in time; forcing"),
            Err(e) => warn!(vm_id = %vm_id, error = %crate::util::chain(&e), "could not {request}; forcing"),
        }
    }
    force.await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rate_limits_become_one_bandwidth_bucket() {
        let rl = |bandwidth, refill_time_ms, burst| RateLimit { bandwidth, refill_time_ms, burst };
        let json = |r: &RateLimit| serde_json::to_value(RateLimiter::from_spec(Some(r))).unwrap();
        assert_eq!(
            json(&rl(1_000_000, 100, 4096)),
            json!({"bandwidth": {"size": 100_000, "one_time_burst": 4096, "refill_time": 100}})
        );
        assert_eq!(json(&rl(2_000_000, 0, 0)), json!({"bandwidth": {"size": 2_000_000, "refill_time": 1000}}));
        assert_eq!(json(&rl(1, 10, 0)), json!({"bandwidth": {"size": 1, "refill_time": 10}}), "at least one token");
        assert_eq!(RateLimiter::from_spec(Some(&rl(0, 100, 5))), None);
        assert_eq!(RateLimiter::from_spec(None), None);
    }
}
