//! The fake VMMs (`metald-fake-firecracker`, `metald-fake-cloud-hypervisor`)
//! for `tests/firecracker.rs` and `tests/cloudhypervisor.rs`: a daemon with
//! their backend, reading their request logs, steering their error
//! injection through a per-test `fake-control.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::process::KillOnDrop;

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
