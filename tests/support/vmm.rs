//! The fake VMMs (`metald-fake-firecracker`, `metald-fake-cloud-hypervisor`)
//! for `tests/firecracker.rs` and `tests/cloudhypervisor.rs`: a daemon with
//! their backend, reading their request logs, steering their error
//! injection through a per-test `fake-control.json`, finding (and killing)
//! the processes a test started, and a plain HTTP GET for `/_/health`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Starts the daemon (fake API tokens, temp dirs) with `backend` env vars
/// plus `extra`, an `initrd.img` asset, and a guard that kills the test's
/// VMM processes when dropped.
pub async fn start_with(backend: &[(&str, &str)], extra: &[(&str, &str)]) -> (super::daemon::TestDaemon, KillOnDrop) {
    let mut env = backend.to_vec();
    env.extend_from_slice(extra);
    let t = super::daemon::start(&env).await;
    std::fs::write(t.assets().join("initrd.img"), b"fake initramfs").unwrap();
    let guard = KillOnDrop(t.tmp.path().to_path_buf());
    (t, guard)
}

/// The canonical form of an asset path, as metald stores it.
pub fn canon(p: PathBuf) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

/// The requests a fake VMM recorded next to its socket.
pub fn requests(socket_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(socket_dir.join("fake-requests.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The requests without those `usage()` makes (metering samples every VM
/// every 100 ms): Firecracker's `FlushMetrics`, Cloud Hypervisor's
/// `vm.counters`.
pub fn without_usage(reqs: Vec<Value>) -> Vec<Value> {
    reqs.into_iter()
        .filter(|r| r["body"]["action_type"] != "FlushMetrics" && r["path"] != "/api/v1/vm.counters")
        .collect()
}

/// `"<METHOD> <path>"` of each request.
pub fn calls(reqs: &[Value]) -> Vec<String> {
    reqs.iter().map(|r| format!("{} {}", r["method"].as_str().unwrap(), r["path"].as_str().unwrap())).collect()
}

/// Error injection for every fake VMM started under `dir` (the test's
/// temp dir): `{"fail"|"hang"|"exit": "<endpoint>"}`; `None` clears it.
pub fn set_control(dir: &Path, control: Option<Value>) {
    let p = dir.join("fake-control.json");
    match control {
        Some(c) => std::fs::write(p, c.to_string()).unwrap(),
        None => {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Pids of live processes whose command line or working directory
/// mentions `dir`.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle.as_slice()) || cwd.starts_with(dir) {
            out.push(pid);
        }
    }
    out
}

/// Kills every process under `dir` when dropped (pass or fail).
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in processes_under(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn process_exists(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'))
}

pub async fn http_get(addr: &std::net::SocketAddr, path: &str) -> (String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The console text of a VM.
pub fn console(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

pub fn count_lines(path: &Path, marker: &str) -> usize {
    console(path).lines().filter(|l| l.trim() == marker).count()
}
