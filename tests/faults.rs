//! Faults injected into a running daemon (fake backend): a call whose
//! deadline passes mid-operation, and a data directory on a tiny file
//! system that fills up while VMs change state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::pb::vmprovisioner::v1 as pb;
use serde_json::json;
use support::*;

#[tokio::test]
async fn a_call_past_its_deadline_says_the_operation_continues_and_get_vm_info_shows_it() {
    let t = start(&[]).await;
    let c = t.client(TOKEN_A);
    c.create_vm(pb::CreateVmRequest {
        vm_id: "slow".into(),
        config: t.config(&t.kernel()).into(),
        ..Default::default()
    })
    .await
    .unwrap();
    t.d().fake.as_ref().unwrap().set_delay(Duration::from_millis(1500));
    let addr = t.d().addr;
    let (status, body) = connect_json(
        &addr,
        "DeleteVm",
        TOKEN_A,
        &[("Connect-Timeout-Ms", "300")],
        &json!({"vmId": "slow", "force": true}),
    )
    .await;
    assert!(!status.contains(" 200 "), "{status}");
    assert_eq!(body["code"], "deadline_exceeded", "{status} {body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("continues to completion") && message.contains("operation_in_progress"), "{message}");
    // The delete runs on, and GetVmInfo says so until it ends.
    let info =
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: "slow".into(), ..Default::default() }).await.unwrap().into_owned();
    assert_eq!(info.operation_in_progress, "delete");
    assert!(info.operation_started_timestamp > 0);
    wait_until("the delete to finish", Duration::from_secs(20), || async {
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: "slow".into(), ..Default::default() }).await.is_err()
    })
    .await;
    let list = c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    assert_eq!(list.total_count, 0);
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(dir: &Path, size: &str) -> TinyFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (needs root, as CI has): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyFs(dir.to_path_buf())
    }

    /// Fills the file system with `filler`; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn health(addr: &std::net::SocketAddr) -> (String, serde_json::Value) {
    http_get(addr, "/_/health").await
}

#[tokio::test]
async fn a_full_disk_gives_clear_errors_and_an_unhealthy_health_and_loses_nothing() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let fs = TinyFs::mount(&data, "3m");
    let mut t = start(&[("DATA_DIR", data.to_str().unwrap())]).await;
    let c = t.client(TOKEN_A);
    let create =
        |id: String| pb::CreateVmRequest { vm_id: id, config: t.config(&t.kernel()).into(), ..Default::default() };
    for id in ["keep-1", "keep-2"] {
        c.create_vm(create(id.into())).await.unwrap();
    }
    c.boot_vm(pb::BootVmRequest { vm_id: "keep-1".into(), ..Default::default() }).await.unwrap();
    assert!(health(&t.d().addr).await.0.contains(" 200 "));

    let filler = fs.fill();
    // The store's write-ahead log reuses its space for a while; keep
    // changing state until a write needs a new block.
    let mut refused = None;
    for k in 0..400 {
        let r = c.create_vm(create(format!("more-{k}"))).await;
        if let Err(e) = r {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a create was refused on a full disk");
    assert_eq!(e.code, connectrpc::ErrorCode::Unavailable, "{e:?}");
    let msg = e.message.clone().unwrap_or_default();
    assert!(msg.contains("UNKEY_METALD_DATA_DIR") && msg.contains("full"), "{msg}");
    let (status, body) = health(&t.d().addr).await;
    assert!(status.contains(" 503 "), "{status} {body}");
    assert_eq!(body["store_ok"], false, "{body}");
    assert!(body["store_write_errors"].as_u64().unwrap() >= 1, "{body}");
    // A state change is refused as clearly, and changes nothing.
    let e = c.pause_vm(pb::PauseVmRequest { vm_id: "keep-1".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, connectrpc::ErrorCode::Unavailable, "{e:?}");

    // Space comes back: everything works again, and nothing was lost.
    std::fs::remove_file(filler).unwrap();
    c.pause_vm(pb::PauseVmRequest { vm_id: "keep-1".into(), ..Default::default() }).await.unwrap();
    let (status, body) = health(&t.d().addr).await;
    assert!(status.contains(" 200 "), "{status} {body}");
    assert_eq!(body["store_ok"], true);
    let before = c.list_vms(pb::ListVmsRequest { page_size: 1000, ..Default::default() }).await.unwrap().into_owned();
    let states = |l: &pb::ListVmsResponse| {
        let mut v: Vec<(String, Option<pb::VmState>)> =
            l.vms.iter().map(|v| (v.vm_id.clone(), v.state.as_known())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    t.restart().await;
    let c = t.client(TOKEN_A);
    let after = c.list_vms(pb::ListVmsRequest { page_size: 1000, ..Default::default() }).await.unwrap().into_owned();
    assert_eq!(states(&before), states(&after), "the store agrees with what was reported");
    assert!(states(&after).contains(&("keep-1".into(), Some(pb::VmState::VM_STATE_PAUSED))));
    // No directory of a refused create was left behind.
    let dirs = std::fs::read_dir(data.join("vms")).unwrap().count();
    assert_eq!(dirs, after.vms.len());
    drop(t);
}

#[tokio::test]
async fn a_full_disk_under_the_billing_spool_turns_health_unhealthy_until_space_returns() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let fs = TinyFs::mount(&data, "3m");
    let t = start(&[
        ("DATA_DIR", data.to_str().unwrap()),
        ("BILLING_ENABLED", "true"),
        ("BILLING_MOCK_MODE", "true"),
        ("BILLING_COMMIT_MS", "50"),
        ("OTEL_ENABLED", "true"),
        ("OTEL_ENDPOINT", "http://127.0.0.1:9"),
        ("OTEL_PROMETHEUS_PORT", "0"),
    ])
    .await;
    let c = t.client(TOKEN_A);
    c.create_vm(pb::CreateVmRequest {
        vm_id: "metered".into(),
        config: t.config(&t.kernel()).into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "metered".into(), ..Default::default() }).await.unwrap();
    let addr = t.d().addr;
    assert!(health(&addr).await.0.contains(" 200 "));
    let filler = fs.fill();
    // Samples keep coming every 100 ms; their commits now fail.
    let mut last = (String::new(), serde_json::Value::Null);
    for _ in 0..200 {
        last = health(&addr).await;
        if last.0.contains(" 503 ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = last;
    assert!(status.contains(" 503 "), "{status} {body}");
    assert_eq!(body["billing"]["spool_ok"], false, "{body}");
    assert!(body["billing"]["spool_write_errors"].as_u64().unwrap() >= 1, "{body}");
    assert!(body["billing"]["spool_failing_since"].as_i64().unwrap() > 0, "{body}");
    std::fs::remove_file(filler).unwrap();
    let mut healed = false;
    for _ in 0..200 {
        let (status, body) = health(&addr).await;
        if status.contains(" 200 ") {
            assert_eq!(body["billing"]["spool_ok"], true, "{body}");
            healed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healed, "health is 200 again once the spool can be written");
    let scrape = http_get_raw(&t.d().metrics_addr.unwrap(), "/metrics").await;
    let line = scrape.lines().find(|l| l.starts_with("metald_billing_spool_write_errors_total")).unwrap_or("");
    let n: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(n >= 1.0, "the failed commits are counted: {line:?}");
    drop(t);
}
