//! Billing with a real guest: metald in-process with the QEMU backend (TCG),
//! the guest burning one CPU (`metald.burn=1`), metering streamed to the
//! in-process development billing service. The CPU total the service
//! receives must match the CPU time the VMM process used over the metered
//! window within 5 %, samples come ~100 ms apart and the start and stop
//! notices bracket them. Guest image: `scripts/guest-image.sh` (built on
//! first use into `target/guest-image`, or `METALD_GUEST_IMAGE_DIR`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use metald::client::{WireProtocol, vm_client};
use metald::daemon::Config;
use metald::pb::vmprovisioner::v1 as pb;
use support::{KillOnDrop, guest_image, metald_env, process_cpu_ns};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_burning_guest_is_billed_its_vmm_cpu_time() {
    let image = guest_image();
    let tmp = tempfile::Builder::new().prefix("metald-billing-qemu-").tempdir().unwrap();
    let _cleanup = KillOnDrop(tmp.path().to_path_buf());
    let db = tmp.path().join("billing.db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let billing_addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let (db, stop) = (db.clone(), stop.clone());
        async move { metald::billing::devserver::serve(listener, &db, stop).await }
    });
    let env = metald_env([
        ("BACKEND", "qemu".to_owned()),
        ("QEMU_ACCEL", "tcg".to_owned()),
        ("AUTH_DEV_TOKENS", "true".to_owned()),
        ("ADDRESS", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", image.display().to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ("BILLING_ENDPOINT", format!("http://{billing_addr}")),
        ("BILLING_BATCH_SIZE", "20".to_owned()),
        ("BILLING_FLUSH_MS", "1000".to_owned()),
        ("BILLING_COMMIT_MS", "100".to_owned()),
    ]);
    let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    let c = vm_client(
        &format!("http://{}", daemon.addr),
        "dev_customer_burn",
        WireProtocol::ConnectProto,
        Duration::from_secs(120),
    )
    .unwrap();
    let config = pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: image.join("vmlinux").display().to_string(),
            initrd_path: image.join("initramfs.cpio.gz").display().to_string(),
            kernel_args: "quiet metald.burn=1".into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    };
    let id = "burn";
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: config.into(), ..Default::default() }).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let info =
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned();
    let pid: u32 = info.backend_info["pid"].parse().unwrap();
    let cpu_at_boot = process_cpu_ns(pid);
    // Wait for the guest, then let it burn ~5 s.
    let console = PathBuf::from(&info.backend_info["console_log"]);
    let t0 = Instant::now();
    while !std::fs::read_to_string(&console).unwrap_or_default().contains("METALD_GUEST_READY") {
        assert!(t0.elapsed() < Duration::from_secs(90), "guest did not boot");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_at_stop = process_cpu_ns(pid);
    c.shutdown_vm(pb::ShutdownVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();

    let conn = metald::billing::devserver::open_db(&db).unwrap();
    let t0 = Instant::now();
    while conn
        .query_row("SELECT count(*) FROM events WHERE vm_id = ?1 AND kind = 'stopped'", [id], |r| r.get::<_, i64>(0))
        .unwrap()
        == 0
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "no stop notice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let totals = metald::billing::devserver::totals(&conn).unwrap();
    let t = totals.iter().find(|t| t.vm_id == id).unwrap();
    let vmm_cpu = (cpu_at_stop - cpu_at_boot) as f64 / 1e9;
    let wall = (t.last_ts - t.first_ts) as f64 / 1e9;
    eprintln!("billed {:.3} s CPU over {wall:.2} s in {} samples; VMM used {vmm_cpu:.3} s", t.cpu_seconds, t.samples);
    // The guest burned CPU for the 5 s after READY (at least half of it even on a loaded host):
    // the comparison below is between real figures.
    assert!(vmm_cpu > 2.5, "the guest burned CPU: {vmm_cpu} s over {wall} s");
    let err = (t.cpu_seconds - vmm_cpu).abs() / vmm_cpu;
    assert!(err < 0.05, "billed {} s vs VMM {vmm_cpu} s ({:.1} %)", t.cpu_seconds, err * 100.0);
    assert_eq!((t.starts, t.stops, t.gaps), (1, 1, 0));
    // Samples ~100 ms apart, between the start and stop notices.
    let mut st = conn.prepare("SELECT ts FROM samples WHERE vm_id = ?1 ORDER BY id").unwrap();
    let ts: Vec<i64> = st.query_map([id], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    let mut gaps: Vec<i64> = ts.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    gaps.sort_unstable();
    assert!((85..=115).contains(&gaps[gaps.len() / 2]), "median sample interval: {gaps:?}");
    let ev: Vec<(String, i64)> = conn
        .prepare("SELECT kind, ts FROM events WHERE vm_id = ?1 ORDER BY id")
        .unwrap()
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ev.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), vec!["started", "stopped"]);
    assert!(ev[0].1 <= ts[0] && *ts.last().unwrap() <= ev[1].1);
    daemon.shutdown();
    daemon.wait().await.unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();
}
