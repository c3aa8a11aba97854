//! A billing service for development and tests (`metaldctl billing-server`).
//!
//! Implements `billing.v1.BillingService` over ConnectRPC (Connect, gRPC,
//! gRPC-Web), stores everything it receives in SQLite and reports per-VM
//! totals: samples, CPU seconds (max − min of the cumulative counter per
//! run), starts, stops and gap notices. Samples are keyed by `(vm_id, ts)`,
//! so a batch delivered twice (sent, acknowledged, acknowledgement lost)
//! does not change totals; `batches.samples` keeps what arrived on the wire.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use rusqlite::{Connection, params};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pb::billing::v1 as pb;
use crate::pb::billing::v1::BillingServiceExt;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// SQLite database to store received data in.
    #[arg(long, default_value = "billing-dev.db")]
    pub db: PathBuf,
    /// Print per-VM totals this often (seconds; 0 = only at exit).
    #[arg(long, default_value_t = 10)]
    pub report_every: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Database written by `metaldctl billing-server`.
    #[arg(long, default_value = "billing-dev.db")]
    pub db: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY, vm_id TEXT NOT NULL, customer_id TEXT NOT NULL, ts INTEGER NOT NULL,
    cpu_ns INTEGER NOT NULL, mem INTEGER NOT NULL, disk_r INTEGER NOT NULL, disk_w INTEGER NOT NULL,
    net_rx INTEGER NOT NULL, net_tx INTEGER NOT NULL, UNIQUE (vm_id, ts));
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, vm_id TEXT NOT NULL, samples INTEGER NOT NULL, received_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, vm_id TEXT NOT NULL, kind TEXT NOT NULL, ts INTEGER NOT NULL,
    last_sent INTEGER, customer_id TEXT, received_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeats (
    id INTEGER PRIMARY KEY, instance_id TEXT NOT NULL, vms TEXT NOT NULL, received_ns INTEGER NOT NULL);
";

/// Opens (creating) the dev server's database.
pub fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// The service; cheap to share.
pub struct DevBillingService {
    db: Mutex<Connection>,
}

fn internal(e: rusqlite::Error) -> ConnectError {
    ConnectError::internal(format!("dev billing database: {e}"))
}

impl DevBillingService {
    pub fn open(path: &Path) -> rusqlite::Result<DevBillingService> {
        Ok(DevBillingService { db: Mutex::new(open_db(path)?) })
    }

    fn with_db<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, ConnectError> {
        let mut c = self.db.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c).map_err(internal)
    }

    fn event(
        &self,
        vm: &str,
        kind: &str,
        ts: i64,
        last_sent: Option<i64>,
        customer: Option<&str>,
    ) -> Result<(), ConnectError> {
        self.with_db(|c| {
            c.execute(
                "INSERT INTO events (vm_id, kind, ts, last_sent, customer_id, received_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![vm, kind, ts, last_sent, customer, crate::util::unix_nanos()],
            )
            .map(|_| ())
        })
    }
}

fn ts_ns(t: Option<&buffa_types::google::protobuf::Timestamp>) -> i64 {
    t.map(|t| t.seconds.saturating_mul(1_000_000_000).saturating_add(i64::from(t.nanos))).unwrap_or(0)
}

#[allow(refining_impl_trait)]
impl pb::BillingService for DevBillingService {
    async fn send_metrics_batch(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SendMetricsBatchRequest>,
    ) -> ServiceResult<pb::SendMetricsBatchResponse> {
        let req = request.to_owned_message();
        self.with_db(|c| {
            let tx = c.transaction()?;
            {
                let mut ins = tx.prepare_cached(
                    "INSERT OR IGNORE INTO samples (vm_id, customer_id, ts, cpu_ns, mem, disk_r, disk_w, net_rx, net_tx)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for m in &req.metrics {
                    ins.execute(params![
                        req.vm_id,
                        req.customer_id,
                        ts_ns(m.timestamp.as_option()),
                        m.cpu_time_nanos,
                        m.memory_usage_bytes,
                        m.disk_read_bytes,
                        m.disk_write_bytes,
                        m.network_rx_bytes,
                        m.network_tx_bytes
                    ])?;
                }
                tx.execute(
                    "INSERT INTO batches (vm_id, samples, received_ns) VALUES (?1, ?2, ?3)",
                    params![req.vm_id, i64::try_from(req.metrics.len()).unwrap_or(i64::MAX), crate::util::unix_nanos()],
                )?;
            }
            tx.commit()
        })?;
        Response::ok(pb::SendMetricsBatchResponse { success: true, ..Default::default() })
    }

    async fn send_heartbeat(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SendHeartbeatRequest>,
    ) -> ServiceResult<pb::SendHeartbeatResponse> {
        let req = request.to_owned_message();
        self.with_db(|c| {
            c.execute(
                "INSERT INTO heartbeats (instance_id, vms, received_ns) VALUES (?1, ?2, ?3)",
                params![req.instance_id, req.active_vms.join(","), crate::util::unix_nanos()],
            )
            .map(|_| ())
        })?;
        Response::ok(pb::SendHeartbeatResponse { success: true, ..Default::default() })
    }

    async fn notify_vm_started(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::NotifyVmStartedRequest>,
    ) -> ServiceResult<pb::NotifyVmStartedResponse> {
        let req = request.to_owned_message();
        self.event(&req.vm_id, "started", req.start_time, None, Some(&req.customer_id))?;
        Response::ok(pb::NotifyVmStartedResponse { success: true, ..Default::default() })
    }

    async fn notify_vm_stopped(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::NotifyVmStoppedRequest>,
    ) -> ServiceResult<pb::NotifyVmStoppedResponse> {
        let req = request.to_owned_message();
        self.event(&req.vm_id, "stopped", req.stop_time, None, None)?;
        Response::ok(pb::NotifyVmStoppedResponse { success: true, ..Default::default() })
    }

    async fn notify_possible_gap(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::NotifyPossibleGapRequest>,
    ) -> ServiceResult<pb::NotifyPossibleGapResponse> {
        let req = request.to_owned_message();
        self.event(&req.vm_id, "gap", req.resume_time, Some(req.last_sent), None)?;
        Response::ok(pb::NotifyPossibleGapResponse { success: true, ..Default::default() })
    }
}

/// Serves the dev billing service on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, db: &Path, stop: CancellationToken) -> std::io::Result<()> {
    let svc = DevBillingService::open(db).map_err(std::io::Error::other)?;
    let connect = Arc::new(svc).register(connectrpc::Router::new());
    let app = axum::Router::new().fallback_service(connect.into_axum_service());
    axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await
}

/// Usage totals of one VM as received.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmTotals {
    pub vm_id: String,
    pub customer_id: String,
    pub samples: u64,
    pub cpu_seconds: f64,
    pub max_memory_bytes: i64,
    pub starts: u64,
    pub stops: u64,
    pub gaps: u64,
    pub first_ts: i64,
    pub last_ts: i64,
}

/// Per-VM totals. CPU is summed per run (a start notice begins a new run,
/// whose cumulative counters start again), each run contributing max − min.
pub fn totals(conn: &Connection) -> rusqlite::Result<Vec<VmTotals>> {
    let mut out: Vec<VmTotals> = Vec::new();
    let mut st = conn.prepare(
        "SELECT vm_id, max(customer_id), count(*), max(mem), min(ts), max(ts) FROM samples GROUP BY vm_id ORDER BY vm_id",
    )?;
    let rows = st.query_map([], |r| {
        Ok(VmTotals {
            vm_id: r.get(0)?,
            customer_id: r.get(1)?,
            samples: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            max_memory_bytes: r.get(3)?,
            first_ts: r.get(4)?,
            last_ts: r.get(5)?,
            ..Default::default()
        })
    })?;
    for t in rows {
        out.push(t?);
    }
    let mut starts = conn.prepare("SELECT ts FROM events WHERE vm_id = ?1 AND kind = 'started' ORDER BY ts")?;
    let mut runs =
        conn.prepare("SELECT max(cpu_ns) - min(cpu_ns) FROM samples WHERE vm_id = ?1 AND ts >= ?2 AND ts < ?3")?;
    let mut count = conn.prepare("SELECT count(*) FROM events WHERE vm_id = ?1 AND kind = ?2")?;
    for t in &mut out {
        let mut bounds: Vec<i64> = starts.query_map([&t.vm_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        bounds.insert(0, i64::MIN);
        bounds.push(i64::MAX);
        let mut cpu = 0i64;
        for w in bounds.windows(2) {
            let d: Option<i64> = runs.query_row(params![t.vm_id, w[0], w[1]], |r| r.get(0))?;
            cpu += d.unwrap_or(0);
        }
        t.cpu_seconds = cpu as f64 / 1e9;
        let mut n = |kind: &str| {
            count.query_row(params![t.vm_id, kind], |r| r.get::<_, i64>(0)).map(|n| u64::try_from(n).unwrap_or(0))
        };
        t.starts = n("started")?;
        t.stops = n("stopped")?;
        t.gaps = n("gap")?;
    }
    Ok(out)
}

fn print_totals(t: &[VmTotals], json: bool) {
    if json {
        println!("{}", serde_json::to_string(t).unwrap_or_default());
        return;
    }
    println!(
        "{:<40} {:<16} {:>8} {:>10} {:>6} {:>6} {:>5}",
        "VM", "CUSTOMER", "SAMPLES", "CPU_S", "STARTS", "STOPS", "GAPS"
    );
    for v in t {
        println!(
            "{:<40} {:<16} {:>8} {:>10.3} {:>6} {:>6} {:>5}",
            v.vm_id, v.customer_id, v.samples, v.cpu_seconds, v.starts, v.stops, v.gaps
        );
    }
}

/// `metaldctl billing-report`.
pub fn run_report(a: &ReportArgs, json: bool) -> Result<(), String> {
    let conn = open_db(&a.db).map_err(|e| format!("{}: {e}", a.db.display()))?;
    let t = totals(&conn).map_err(|e| e.to_string())?;
    print_totals(&t, json);
    Ok(())
}

/// `metaldctl billing-server`: serves until SIGINT/SIGTERM, printing totals.
pub async fn run_server(a: &ServerArgs, json: bool) -> Result<(), String> {
    let listener = TcpListener::bind(a.listen).await.map_err(|e| format!("binding {}: {e}", a.listen))?;
    let stop = CancellationToken::new();
    eprintln!("dev billing service on http://{} storing into {}", a.listen, a.db.display());
    let server = tokio::spawn({
        let (db, stop) = (a.db.clone(), stop.clone());
        async move { serve(listener, &db, stop).await }
    });
    let report = |db: &Path| {
        if let Ok(t) = open_db(db).and_then(|c| totals(&c)) {
            print_totals(&t, json);
        }
    };
    let mut last = Vec::new();
    let every = Duration::from_secs(a.report_every.max(1));
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(every), if a.report_every > 0 => {
                let t = open_db(&a.db).and_then(|c| totals(&c)).unwrap_or_default();
                if t != last && !t.is_empty() {
                    print_totals(&t, json);
                    last = t;
                }
            }
        }
    }
    stop.cancel();
    let _ = server.await;
    report(&a.db);
    Ok(())
}
