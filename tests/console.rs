//! API tests of `StreamConsole` and of the per-VM log cap: the daemon on
//! 127.0.0.1:0 with the fake backend (which writes `console.log` to
//! append, as QEMU does; the tests append to it as a guest would).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use connectrpc::ErrorCode;
use metald::client::{VmClient, WireProtocol};
use metald::pb::vmprovisioner::v1 as pb;
use support::{TOKEN_A, TOKEN_B, TestDaemon, start, wait_for};

/// Generous bound for a step that takes milliseconds (a guard against a
/// hang, not a timing assertion).
const STEP: Duration = Duration::from_secs(30);

fn req(id: &str, follow: bool, tail_bytes: i64) -> pb::StreamConsoleRequest {
    pb::StreamConsoleRequest { vm_id: id.into(), follow, tail_bytes, ..Default::default() }
}

/// The whole of a (non-following) stream, or its error.
async fn read_all(c: &VmClient, r: pb::StreamConsoleRequest) -> Result<Vec<u8>, connectrpc::ConnectError> {
    let mut s = c.stream_console(r).await?;
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(m.data());
    }
    Ok(out)
}

async fn running_vm(t: &TestDaemon, id: &str) -> PathBuf {
    let c = t.client(TOKEN_A);
    let config = t.config(&t.kernel()).into();
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config, ..Default::default() }).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let info = c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    PathBuf::from(&info.into_owned().backend_info["console_log"])
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

#[tokio::test]
async fn the_owner_reads_the_history_and_follows_until_the_vm_is_deleted() {
    let t = start(&[]).await;
    let log = running_vm(&t, "vm-1").await;
    let on_disk = std::fs::read(&log).unwrap();
    assert!(String::from_utf8_lossy(&on_disk).contains("METALD_GUEST_READY"), "the fake guest booted");

    for proto in WireProtocol::ALL {
        let c = t.client_with(TOKEN_A, proto);
        assert_eq!(read_all(&c, req("vm-1", false, 0)).await.unwrap(), on_disk, "{proto:?}");
        let tail = read_all(&c, req("vm-1", false, 6)).await.unwrap();
        assert_eq!(tail, on_disk[on_disk.len() - 6..], "{proto:?}");
    }

    // Follow: the history, then what the guest writes next.
    let c = t.client(TOKEN_A);
    let mut s = c.stream_console(req("vm-1", true, 0)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < on_disk.len() {
        let m = tokio::time::timeout(STEP, s.message()).await.unwrap().unwrap().expect("history");
        seen.extend_from_slice(m.data());
    }
    assert_eq!(seen, on_disk);
    append(&log, b"new output from the guest\n");
    let mut new = Vec::new();
    while !String::from_utf8_lossy(&new).contains("new output from the guest\n") {
        let m = tokio::time::timeout(STEP, s.message()).await.unwrap().unwrap().expect("new output");
        new.extend_from_slice(m.data());
    }
    assert_eq!(new, b"new output from the guest\n");

    c.delete_vm(pb::DeleteVmRequest { vm_id: "vm-1".into(), force: true, ..Default::default() }).await.unwrap();
    loop {
        match tokio::time::timeout(STEP, s.message()).await.expect("the stream ends with the VM") {
            Ok(None) => break,
            // Output written while it was being deleted.
            Ok(Some(_)) => {}
            Err(e) => panic!("the stream ends cleanly, not with {e:?}"),
        }
    }
}

#[tokio::test]
async fn another_customer_and_an_unknown_vm_are_not_found() {
    let t = start(&[]).await;
    running_vm(&t, "vm-1").await;
    let b = t.client(TOKEN_B);
    let e = read_all(&b, req("vm-1", true, 0)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{e:?}");
    let info = b.get_vm_info(pb::GetVmInfoRequest { vm_id: "vm-1".into(), ..Default::default() }).await;
    let info_error = info.expect_err("not found");
    assert_eq!(e.message, info_error.message, "the same answer as GetVmInfo");

    let a = t.client(TOKEN_A);
    assert_eq!(read_all(&a, req("vm-2", false, 0)).await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(read_all(&a, req("", false, 0)).await.unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(read_all(&a, req("vm-1", false, -1)).await.unwrap_err().code, ErrorCode::InvalidArgument);
    let anonymous = t.client("");
    assert_eq!(read_all(&anonymous, req("vm-1", false, 0)).await.unwrap_err().code, ErrorCode::Unauthenticated);
}

#[tokio::test]
async fn a_log_over_the_cap_is_rotated_and_the_history_starts_with_the_rotated_part() {
    let cap: u64 = 64 << 10;
    let t = start(&[("VM_LOG_MAX_BYTES", &cap.to_string())]).await;
    let log = running_vm(&t, "vm-1").await;
    let rotated = PathBuf::from(format!("{}.1", log.display()));
    let boot = std::fs::read(&log).unwrap();
    let c = t.client(TOKEN_A);
    // A follower from before the rotation.
    let mut s = c.stream_console(req("vm-1", true, 0)).await.unwrap();

    let burst: Vec<u8> = (0..cap + 1000).map(|i| b'a' + (i % 26) as u8).collect();
    append(&log, &burst);
    wait_for("the console log rotated", STEP, || {
        std::fs::metadata(&log).is_ok_and(|m| m.len() <= cap) && rotated.exists()
    })
    .await;
    append(&log, b"after the rotation\n");
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size <= cap, "the log is bounded: {size} bytes");

    let mut want = boot.clone();
    want.extend(&burst);
    assert_eq!(std::fs::read(&rotated).unwrap(), want, "the rotated part is the log as it was");
    want.extend(b"after the rotation\n");
    assert_eq!(read_all(&c, req("vm-1", false, 0)).await.unwrap(), want, "the history spans the rotation");

    // The follower saw everything once, in order, across the rotation.
    let mut seen = Vec::new();
    while seen.len() < want.len() {
        let m = tokio::time::timeout(STEP, s.message()).await.unwrap().unwrap().expect("output");
        seen.extend_from_slice(m.data());
    }
    assert_eq!(seen, want);
}

#[tokio::test]
async fn console_calls_are_counted_per_operation() {
    let t = start(&[("OTEL_ENABLED", "true"), ("OTEL_PROMETHEUS_PORT", "0")]).await;
    running_vm(&t, "vm-1").await;
    let c = t.client(TOKEN_A);
    read_all(&c, req("vm-1", false, 0)).await.unwrap();
    read_all(&c, req("vm-2", false, 0)).await.unwrap_err();
    let addr = t.d().metrics_addr.expect("a metrics port");
    let text = support::http_get_raw(&addr, "/metrics").await;
    for (prefix, value) in [
        (r#"metald_vm_operations_total{code="ok",operation="console",status="success""#, " 1"),
        (r#"metald_vm_operations_total{code="not_found",operation="console",status="error""#, " 1"),
        (r#"metald_vm_operation_duration_seconds_count{operation="console""#, " 2"),
    ] {
        assert!(text.lines().any(|l| l.starts_with(prefix) && l.ends_with(value)), "no {prefix}..{value} in\n{text}");
    }
}
