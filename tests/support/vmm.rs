//! The fake VMMs (`metald-fake-firecracker`, `metald-fake-cloud-hypervisor`)
//! for `tests/firecracker.rs` and `tests/cloudhypervisor.rs`: a daemon with
//! their backend, the calls both make through it (create, info, a VM's
//! directory), reading and checking their request logs, steering their
//! error injection through a per-test `fake-control.json`.

use std::path::{Path, PathBuf};

use metald::pb::vmprovisioner::v1 as pb;
use serde_json::Value;

use super::daemon::{TOKEN_A, TestDaemon};
use super::process::KillOnDrop;

/// Starts the daemon (fake API tokens, temp dirs) with `backend` env vars
/// plus `extra`, an `initrd.img` asset, the test's TAP device
/// ([`test_tap`]: metald checks that a NIC's TAP exists), and a guard that
/// kills the test's VMM processes and deletes the TAP when dropped.
pub async fn start_with(backend: &[(&str, &str)], extra: &[(&str, &str)]) -> (super::daemon::TestDaemon, VmmGuard) {
    let mut env = backend.to_vec();
    env.extend_from_slice(extra);
    let t = super::daemon::start(&env).await;
    std::fs::write(t.assets().join("initrd.img"), b"fake initramfs").unwrap();
    let tap = test_tap(&t);
    let made = std::process::Command::new("ip")
        .args(["tuntap", "add", "dev", &tap, "mode", "tap"])
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("note: could not create TAP device {tap} (needs root); tests with a NIC will fail");
    }
    let guard = VmmGuard { _kill: KillOnDrop(t.tmp.path().to_path_buf()), tap };
    (t, guard)
}

/// The name of the TAP device [`start_with`] made for `t` (unique per test).
pub fn test_tap(t: &TestDaemon) -> String {
    let name = t.tmp.path().file_name().unwrap().to_string_lossy().into_owned();
    format!("mt{}", name.trim_start_matches(".tmp"))
}

/// Kills the test's VMM processes, then deletes its TAP device.
pub struct VmmGuard {
    _kill: KillOnDrop,
    tap: String,
}

impl Drop for VmmGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.tap])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `CreateVm` of `id` as customer A.
pub async fn create(
    t: &TestDaemon,
    id: &str,
    config: pb::VmConfig,
) -> Result<pb::CreateVmResponse, connectrpc::ConnectError> {
    let c = t.client(TOKEN_A);
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: config.into(), ..Default::default() })
        .await
        .map(|r| r.into_owned())
}

/// `GetVmInfo` of `id` as customer A (which must succeed).
pub async fn info(t: &TestDaemon, id: &str) -> pb::GetVmInfoResponse {
    let c = t.client(TOKEN_A);
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned()
}

/// The directory metald keeps for VM `id` (socket, logs, request log).
pub fn vm_dir(t: &TestDaemon, id: &str) -> PathBuf {
    t.data_dir().join("vms").join(id)
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

/// Asserts that the recorded requests `got` are the expected `want`
/// (`{method, path, body}` each, in order) and that each one succeeded
/// (status < 300).
pub fn assert_requests(got: &[Value], want: &[Value]) {
    assert_eq!(calls(got), calls(want));
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["body"], w["body"], "body of {} {}", w["method"], w["path"]);
        assert!(g["status"].as_u64().is_some_and(|s| s < 300), "{g}");
    }
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
