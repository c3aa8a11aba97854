//! Billing end to end with the fake backend and the development billing
//! service (`metald::billing::devserver`, in-process, SQLite):
//! - samples ~100 ms apart, start/stop notices in order, heartbeats;
//! - OUTAGE: the billing service goes away while 3 VMs run, comes back →
//!   every sample collected arrives once, in order (collected == delivered);
//! - CRASH: `metald` (the real binary, a child process) is SIGKILLed with
//!   batches pending and restarted → pending samples delivered and one
//!   `NotifyPossibleGap` per metered VM;
//! - DAMAGE: a byte of the spool flipped in the middle while metald is down
//!   → the frames after it are still delivered, gap notices cover the
//!   damage, `metald_billing_spool_corrupt_frames_total` counts it;
//! - WIRE: a Connect-node BillingService (tests/js/billing/server.ts, run
//!   with tsx) receives and decodes the batches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::pb::vmprovisioner::v1 as pb;
use rusqlite::Connection;
use support::{
    TOKEN_A, free_port, http_get, http_get_raw, js_bin, js_dir, metald_env, spawn_metald, start, vm_config, wait_for,
    wait_serving,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct DevServer {
    addr: SocketAddr,
    db: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn dev_server(addr: SocketAddr, db: &Path) -> DevServer {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let (db2, stop2) = (db.to_path_buf(), stop.clone());
    let task = tokio::spawn(async move { metald::billing::devserver::serve(listener, &db2, stop2).await });
    DevServer { addr, db: db.to_path_buf(), stop, task }
}

impl DevServer {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn db(path: &Path) -> Connection {
    metald::billing::devserver::open_db(path).unwrap()
}

fn count(path: &Path, sql: &str, vm: &str) -> i64 {
    db(path).query_row(sql, [vm], |r| r.get(0)).unwrap()
}

/// `(kind, ts, last_sent, received id)` of a VM's notices in arrival order.
fn events(path: &Path, vm: &str) -> Vec<(String, i64, Option<i64>, i64)> {
    let c = db(path);
    let mut st = c.prepare("SELECT kind, ts, last_sent, received_ns FROM events WHERE vm_id = ?1 ORDER BY id").unwrap();
    st.query_map([vm], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().map(Result::unwrap).collect()
}

/// Sample timestamps of a VM in arrival order.
fn sample_ts(path: &Path, vm: &str) -> Vec<i64> {
    let c = db(path);
    let mut st = c.prepare("SELECT ts FROM samples WHERE vm_id = ?1 ORDER BY id").unwrap();
    st.query_map([vm], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

async fn create_and_boot(c: &VmClient, kernel: &str, id: &str) {
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: vm_config(kernel).into(), ..Default::default() })
        .await
        .unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
}

async fn stop_vm(c: &VmClient, id: &str) {
    c.shutdown_vm(pb::ShutdownVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
}

fn assert_increasing(ts: &[i64], vm: &str) {
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "{vm}: samples out of order");
}

const FAST: &[(&str, &str)] = &[
    ("BILLING_INTERVAL_MS", "100"),
    ("BILLING_BATCH_SIZE", "10"),
    ("BILLING_FLUSH_MS", "500"),
    ("BILLING_COMMIT_MS", "100"),
    ("BILLING_HEARTBEAT_MS", "500"),
    ("BILLING_RETRY_MIN_MS", "100"),
    ("BILLING_RETRY_MAX_MS", "400"),
    ("INSTANCE_ID", "test-host"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_100ms_apart_with_start_and_stop_notices_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let server = dev_server("127.0.0.1:0".parse().unwrap(), &tmp.path().join("billing.db")).await;
    let endpoint = format!("http://{}", server.addr);
    let mut env = FAST.to_vec();
    env.push(("BILLING_ENDPOINT", &endpoint));
    let t = start(&env).await;
    let c = t.client(TOKEN_A);
    create_and_boot(&c, &t.kernel(), "meter-1").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop_vm(&c, "meter-1").await;
    wait_for("the stop notice", Duration::from_secs(10), || {
        events(&server.db, "meter-1").iter().any(|e| e.0 == "stopped")
    })
    .await;

    let ev = events(&server.db, "meter-1");
    assert_eq!(ev.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), vec!["started", "stopped"]);
    let ts = sample_ts(&server.db, "meter-1");
    assert!(ts.len() >= 15, "{} samples in 2.5 s", ts.len());
    assert_increasing(&ts, "meter-1");
    assert!(ev[0].1 <= ts[0] && *ts.last().unwrap() <= ev[1].1, "samples lie between start and stop");
    // The stop notice arrived after the final batch.
    let last_batch: i64 = count(&server.db, "SELECT max(received_ns) FROM batches WHERE vm_id = ?1", "meter-1");
    assert!(last_batch <= ev[1].3);
    let mut gaps: Vec<i64> = ts.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    assert!((90..=110).contains(&median), "median interval {median} ms: {gaps:?}");
    assert!(*gaps.last().unwrap() < 1000, "{gaps:?}");
    // Every collected sample was delivered.
    let counters = t.d().billing.as_ref().unwrap().counters();
    assert_eq!(counters["meter-1"].collected, ts.len() as u64);
    assert_eq!(counters["meter-1"].delivered, ts.len() as u64);
    let hb: i64 = count(&server.db, "SELECT count(*) FROM heartbeats WHERE instance_id = ?1", "test-host");
    assert!(hb >= 2, "{hb} heartbeats");
    let health = t.d().billing.as_ref().unwrap().health();
    assert!(health.endpoint_ok && health.metered_vms == 0, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_loses_nothing_and_keeps_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dbp = tmp.path().join("billing.db");
    let server = dev_server("127.0.0.1:0".parse().unwrap(), &dbp).await;
    let addr = server.addr;
    let endpoint = format!("http://{addr}");
    let mut env = FAST.to_vec();
    env.push(("BILLING_ENDPOINT", &endpoint));
    let t = start(&env).await;
    let c = t.client(TOKEN_A);
    let vms = ["out-1", "out-2", "out-3"];
    for vm in vms {
        create_and_boot(&c, &t.kernel(), vm).await;
    }
    wait_for("start notices", Duration::from_secs(10), || vms.iter().all(|vm| !events(&dbp, vm).is_empty())).await;

    // The billing service goes away for 4 s while the VMs run.
    server.stop().await;
    let down_at = metald::util::unix_nanos();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = t.d().billing.clone().unwrap();
    let h = status.health();
    assert!(!h.endpoint_ok && h.spool_bytes > 0, "spooling during the outage: {h:?}");
    let server = dev_server(addr, &dbp).await;
    for vm in vms {
        stop_vm(&c, vm).await;
    }
    wait_for("stop notices", Duration::from_secs(20), || {
        vms.iter().all(|vm| events(&dbp, vm).iter().any(|e| e.0 == "stopped"))
    })
    .await;

    let counters = status.counters();
    for vm in vms {
        let ts = sample_ts(&dbp, vm);
        assert_increasing(&ts, vm);
        let during = ts.iter().filter(|t| **t > down_at).count();
        assert!(during >= 30, "{vm}: {during} samples from the outage");
        assert_eq!(counters[vm].collected, ts.len() as u64, "{vm}: collected == delivered (server)");
        assert_eq!(counters[vm].delivered, ts.len() as u64, "{vm}: delivered counter");
        let wire: i64 = count(&dbp, "SELECT sum(samples) FROM batches WHERE vm_id = ?1", vm);
        assert_eq!(wire, i64::try_from(ts.len()).unwrap(), "{vm}: no sample sent twice");
        let kinds: Vec<String> = events(&dbp, vm).into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, vec!["started", "stopped"], "{vm}");
    }
    assert_eq!(status.health().spool_bytes, 0, "spool drained");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_batches_pending_then_restart_delivers_and_reports_gaps() {
    let tmp = tempfile::tempdir().unwrap();
    let dbp = tmp.path().join("billing.db");
    let server = dev_server("127.0.0.1:0".parse().unwrap(), &dbp).await;
    let assets = tmp.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"\x7fELF fake kernel").unwrap();
    let port = free_port();
    let mut env = metald_env([
        ("ADDRESS", "127.0.0.1".to_string()),
        ("PORT", port.to_string()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", assets.display().to_string()),
        ("BACKEND", "fake".into()),
        ("AUTH_DEV_TOKENS", "true".into()),
        ("BILLING_ENDPOINT", format!("http://{}", server.addr)),
        // Large batches and a long flush: samples stay pending in the spool.
        ("BILLING_BATCH_SIZE", "100000".into()),
        ("BILLING_FLUSH_MS", "600000".into()),
        ("BILLING_COMMIT_MS", "100".into()),
        ("BILLING_RETRY_MIN_MS", "100".into()),
        ("LOG", "info".into()),
    ]);
    let log = tmp.path().join("metald.log");
    let first = spawn_metald(&env, &log);
    let c = vm_client(
        &format!("http://127.0.0.1:{port}"),
        "dev_customer_crash",
        WireProtocol::ConnectProto,
        Duration::from_secs(10),
    )
    .unwrap();
    wait_serving(&c, Duration::from_secs(30), &log).await;
    let kernel = assets.join("vmlinux").display().to_string();
    let vms = ["crash-1", "crash-2"];
    for vm in vms {
        create_and_boot(&c, &kernel, vm).await;
    }
    wait_for("start notices", Duration::from_secs(10), || vms.iter().all(|vm| !events(&dbp, vm).is_empty())).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for vm in vms {
        assert!(sample_ts(&dbp, vm).is_empty(), "{vm}: samples are still pending");
    }
    drop(first); // SIGKILL
    let killed_at = metald::util::unix_nanos();

    // Restart with a short flush so the pending samples go out at once.
    env.insert("UNKEY_METALD_BILLING_FLUSH_MS".into(), "200".into());
    let _second = spawn_metald(&env, &log);
    wait_serving(&c, Duration::from_secs(30), &log).await;
    wait_for("gap notices and pre-crash samples", Duration::from_secs(20), || {
        vms.iter().all(|vm| {
            events(&dbp, vm).iter().any(|e| e.0 == "gap") && sample_ts(&dbp, vm).iter().any(|t| *t > killed_at)
        })
    })
    .await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    for vm in vms {
        let ev = events(&dbp, vm);
        let kinds: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(kinds, vec!["started", "gap"], "{vm}\n{logs}");
        let (started, gap) = (&ev[0], &ev[1]);
        let last_sent = gap.2.unwrap();
        assert!(started.1 < last_sent && last_sent <= killed_at && killed_at < gap.1, "{vm}: gap {gap:?}");
        let ts = sample_ts(&dbp, vm);
        assert_increasing(&ts, vm);
        let before: Vec<i64> = ts.iter().copied().filter(|t| *t <= last_sent).collect();
        // ~2 s at 100 ms, less at most one commit period lost to the kill.
        assert!(before.len() >= 15, "{vm}: {} pre-crash samples delivered", before.len());
        assert_eq!(*before.last().unwrap(), last_sent, "{vm}: the gap starts at the last spooled sample");
        assert!(ts.iter().all(|t| *t <= last_sent || *t >= gap.1), "{vm}: no sample inside the gap");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_frame_is_skipped_later_ones_delivered_and_gaps_notified() {
    let tmp = tempfile::tempdir().unwrap();
    let dbp = tmp.path().join("billing.db");
    let server = dev_server("127.0.0.1:0".parse().unwrap(), &dbp).await;
    let assets = tmp.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"\x7fELF fake kernel").unwrap();
    let (port, prom) = (free_port(), free_port());
    let mut env = metald_env([
        ("ADDRESS", "127.0.0.1".to_string()),
        ("PORT", port.to_string()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", assets.display().to_string()),
        ("BACKEND", "fake".into()),
        ("AUTH_DEV_TOKENS", "true".into()),
        ("BILLING_ENDPOINT", format!("http://{}", server.addr)),
        // Samples stay pending in the spool until the restart.
        ("BILLING_BATCH_SIZE", "100000".into()),
        ("BILLING_FLUSH_MS", "600000".into()),
        ("BILLING_COMMIT_MS", "100".into()),
        ("BILLING_RETRY_MIN_MS", "100".into()),
        ("OTEL_ENABLED", "true".into()),
        ("OTEL_ENDPOINT", "http://127.0.0.1:9".into()),
        ("OTEL_PROMETHEUS_PORT", prom.to_string()),
    ]);
    let log = tmp.path().join("metald.log");
    let first = spawn_metald(&env, &log);
    let c = vm_client(
        &format!("http://127.0.0.1:{port}"),
        "dev_customer_damage",
        WireProtocol::ConnectProto,
        Duration::from_secs(10),
    )
    .unwrap();
    wait_serving(&c, Duration::from_secs(30), &log).await;
    let kernel = assets.join("vmlinux").display().to_string();
    let vms = ["dmg-1", "dmg-2"];
    for vm in vms {
        create_and_boot(&c, &kernel, vm).await;
    }
    tokio::time::sleep(Duration::from_millis(3000)).await;
    drop(first); // SIGKILL: ~30 group commits of both VMs are in the spool.
    let killed_at = metald::util::unix_nanos();
    let spool = tmp.path().join("data").join("billing-spool");
    let seg = std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4] {
        *b ^= 0xa5;
    }
    std::fs::write(&seg, &bytes).unwrap();

    env.insert("UNKEY_METALD_BILLING_FLUSH_MS".into(), "200".into());
    let _second = spawn_metald(&env, &log);
    wait_serving(&c, Duration::from_secs(30), &log).await;
    // The frames after the damage are delivered: samples from the last
    // second before the kill arrive.
    wait_for("samples from after the damage", Duration::from_secs(20), || {
        vms.iter().all(|vm| sample_ts(&dbp, vm).iter().any(|t| *t > killed_at - 1_000_000_000 && *t <= killed_at))
    })
    .await;
    wait_for("gap notices for the damage", Duration::from_secs(20), || {
        vms.iter().all(|vm| events(&dbp, vm).iter().filter(|e| e.0 == "gap").count() >= 2)
    })
    .await;
    for vm in vms {
        let ts = sample_ts(&dbp, vm);
        let gaps: Vec<(i64, i64)> =
            events(&dbp, vm).iter().filter(|e| e.0 == "gap").map(|e| (e.2.unwrap(), e.1)).collect();
        eprintln!("{vm}: {} samples, gap notices {gaps:?}", ts.len());
        // Every missing stretch of more than a few periods before the kill
        // lies inside a gap notice.
        for w in ts.windows(2).filter(|w| w[1] <= killed_at && w[1] - w[0] > 500_000_000) {
            assert!(
                gaps.iter().any(|(from, to)| *from <= w[0] && w[1] <= *to.max(&w[1])),
                "{vm}: samples missing between {} and {} without a gap notice: {gaps:?}",
                w[0],
                w[1]
            );
        }
    }
    let (status, _) = http_get(&format!("127.0.0.1:{prom}").parse().unwrap(), "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    let metrics = http_get_raw(&format!("127.0.0.1:{prom}").parse().unwrap(), "/metrics").await;
    let line = metrics.lines().find(|l| l.starts_with("metald_billing_spool_corrupt_frames_total")).unwrap_or("");
    let n: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(n >= 1.0, "the damage is counted: {line:?}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("damaged frames skipped"), "{logs}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_node_billing_service_decodes_our_batches() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let js = js_dir();
    // node itself (tsx as its loader), so killing it leaves no orphan; it
    // also exits when its stdin closes.
    js_bin("tsx");
    let mut node = tokio::process::Command::new("node")
        .args(["--import", "tsx", "billing/server.ts", "0"])
        .current_dir(&js)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    let port = serde_json::from_str::<serde_json::Value>(&first).unwrap()["listening"].as_u64().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut env = FAST.to_vec();
    env.push(("BILLING_ENDPOINT", &endpoint));
    env.push(("BILLING_BATCH_SIZE", "5"));
    let t = start(&env).await;
    let c = t.client(TOKEN_A);
    create_and_boot(&c, &t.kernel(), "wire-1").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop_vm(&c, "wire-1").await;

    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !seen.iter().any(|l| l["method"] == "NotifyVmStopped") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, lines.next_line()).await.expect("stop notice").unwrap().unwrap();
        seen.push(serde_json::from_str(&line).unwrap());
    }
    let ours: Vec<&serde_json::Value> = seen.iter().filter(|l| l["request"]["vmId"] == "wire-1").collect();
    let methods: Vec<&str> = ours.iter().map(|l| l["method"].as_str().unwrap()).collect();
    assert_eq!(methods.first(), Some(&"NotifyVmStarted"), "{methods:?}");
    assert_eq!(methods.last(), Some(&"NotifyVmStopped"), "{methods:?}");
    let batches: Vec<&serde_json::Value> =
        ours.iter().filter(|l| l["method"] == "SendMetricsBatch").map(|l| &l["request"]).collect();
    assert!(batches.len() >= 2, "{methods:?}");
    let b = batches[0];
    assert_eq!(b["customerId"], "cust-a");
    let m = &b["metrics"][0];
    // proto3 JSON: RFC 3339 timestamp, int64 as strings.
    assert!(m["timestamp"].as_str().unwrap().ends_with('Z'), "{m}");
    assert!(m["memoryUsageBytes"].as_str().unwrap().parse::<i64>().unwrap() > 0, "{m}");
    let n: usize = batches.iter().map(|b| b["metrics"].as_array().unwrap().len()).sum();
    assert_eq!(t.d().billing.as_ref().unwrap().counters()["wire-1"].delivered, n as u64);
    assert!(seen.iter().any(|l| l["method"] == "SendHeartbeat"));
    let started = ours[0]["request"]["startTime"].as_str().unwrap().parse::<i64>().unwrap();
    assert!(started > 1_600_000_000_000_000_000, "unix ns: {started}");
}
