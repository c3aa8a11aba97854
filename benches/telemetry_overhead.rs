//! GetVmInfo throughput with telemetry disabled vs enabled (sampling rate
//! 1.0, traces and metrics exported over OTLP/HTTP to a sink in this
//! process), measured in the same run, alternating rounds so machine noise
//! hits both alike. Prints the ratio; goal: enabled ≥ 0.9 × disabled.
//!
//! Run: `cargo bench --bench telemetry_overhead` (env `METALD_BENCH_VMS`,
//! `METALD_BENCH_CALLS` per round, `METALD_BENCH_ROUNDS`, `METALD_BENCH_CLIENTS`,
//! `METALD_BENCH_RATE` for the enabled daemon's sampling rate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::client::{WireProtocol, vm_client};
use metald::daemon::Config;
use metald::pb::vmprovisioner::v1 as pb;
use support::{env_or, metald_env};

/// An OTLP/HTTP endpoint that accepts and discards everything. It stands
/// in for a collector on another host, so it reads the body as it arrives
/// and keeps none of it; its cost still lands on this machine's cores.
async fn sink() -> (String, Arc<AtomicUsize>) {
    use http_body_util::BodyExt;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let accept = move |body: axum::body::Body| {
        let h = h.clone();
        async move {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
            h.fetch_add(1, Ordering::Relaxed);
            [("content-type", "application/x-protobuf")]
        }
    };
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(accept.clone()))
        .route("/v1/metrics", axum::routing::post(accept));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

/// CPU time this process has used (user + system).
fn cpu_time() -> Duration {
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_micros(u64::try_from(t.tv_sec() * 1_000_000 + t.tv_usec()).unwrap_or(0))
    };
    tv(ru.user_time()) + tv(ru.system_time())
}

/// Starts a daemon, runs `calls` GetVmInfo over `clients` connections,
/// stops it; returns calls per second and CPU per call.
async fn round(env: &HashMap<String, String>, vms: usize, calls: usize, clients: usize) -> (f64, Duration) {
    let daemon = metald::daemon::start(Config::from_source(env).unwrap()).await.unwrap();
    let endpoint = format!("http://{}", daemon.addr);
    let per_client = calls / clients;
    let mut workers = Vec::new();
    let go = Arc::new(tokio::sync::Barrier::new(clients + 1));
    for c in 0..clients {
        let client =
            vm_client(&endpoint, "dev_customer_bench", WireProtocol::ConnectProto, Duration::from_secs(10)).unwrap();
        let go = go.clone();
        workers.push(tokio::spawn(async move {
            // Warm up the connection.
            for i in 0..20 {
                let id = format!("vm-{:05}", (c * 31 + i) % vms);
                client.get_vm_info(pb::GetVmInfoRequest { vm_id: id, ..Default::default() }).await.unwrap();
            }
            go.wait().await;
            for i in 0..per_client {
                let id = format!("vm-{:05}", (c * 7919 + i * 104_729) % vms);
                client.get_vm_info(pb::GetVmInfoRequest { vm_id: id, ..Default::default() }).await.unwrap();
            }
        }));
    }
    go.wait().await;
    let t = Instant::now();
    let cpu = cpu_time();
    for w in workers {
        w.await.unwrap();
    }
    let cpu = (cpu_time() - cpu).div_f64((per_client * clients) as f64);
    let rate = (per_client * clients) as f64 / t.elapsed().as_secs_f64();
    daemon.shutdown();
    daemon.wait().await.unwrap();
    (rate, cpu)
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50)
}

fn percentile(v: &[f64], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) * p / 100]
}

#[tokio::main]
async fn main() {
    {
        // As `main` does: the OpenTelemetry layer is part of the process'
        // subscriber (logs are left out: they cost the same either way).
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry().with(metald::telemetry::layer()).init();
    }
    // `cargo test --all-targets` runs this too (without `--bench`): a short smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (use `cargo bench` for the real figures)");
    }
    let vms = env_or("METALD_BENCH_VMS", 1000);
    // Many short rounds (~0.3 s), alternating: this shared machine's speed
    // swings by half over a few seconds, so a long round often straddles
    // a swing; a short pair mostly sees one. The median of the pairs'
    // ratios is the figure, the quartiles show the spread.
    let calls = env_or("METALD_BENCH_CALLS", if full { 10_000 } else { 400 });
    let rounds = env_or("METALD_BENCH_ROUNDS", if full { 31 } else { 1 });
    let clients = env_or("METALD_BENCH_CLIENTS", 4);
    let host = support::Host::new();
    host.seed(vms, |_| false);
    let (otlp, hits) = sink().await;
    let rate = std::env::var("METALD_BENCH_RATE").unwrap_or_else(|_| "1.0".into());

    let base = host.env(vms, &[]);
    let mut enabled = base.clone();
    enabled.extend(metald_env([
        ("OTEL_ENABLED", "true"),
        ("OTEL_SAMPLING_RATE", rate.as_str()),
        ("OTEL_ENDPOINT", otlp.as_str()),
        ("OTEL_PROMETHEUS_PORT", "0"),
        ("OTEL_METRICS_INTERVAL_MS", "1000"),
    ]));

    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_off, mut cpu_on) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // METALD_BENCH_PROFILE=enabled|disabled runs only that side (for perf).
        let only = std::env::var("METALD_BENCH_PROFILE").ok();
        let skip = (f64::NAN, Duration::ZERO);
        let (a, ca) = if only.as_deref() == Some("enabled") { skip } else { round(&base, vms, calls, clients).await };
        let (b, cb) =
            if only.as_deref() == Some("disabled") { skip } else { round(&enabled, vms, calls, clients).await };
        println!(
            "round {r}: disabled {a:>8.0} calls/s {:>5.1} µs CPU/call | enabled {b:>8.0} calls/s {:>5.1} µs CPU/call | ratio {:.3}",
            ca.as_secs_f64() * 1e6,
            cb.as_secs_f64() * 1e6,
            b / a
        );
        off.push(a);
        on.push(b);
        ratios.push(b / a);
        cpu_off.push(ca.as_secs_f64() * 1e6);
        cpu_on.push(cb.as_secs_f64() * 1e6);
    }
    let (a, b, ratio) = (median(&off), median(&on), median(&ratios));
    let (cpu_off, cpu_on) = (median(&cpu_off), median(&cpu_on));
    println!(
        "GetVmInfo throughput, {clients} clients, {calls} calls/round, {vms} VMs, medians of {rounds} rounds: \
         disabled {a:.0}/s ({cpu_off:.1} µs CPU/call, client included), \
         enabled (rate {rate}, OTLP export) {b:.0}/s ({cpu_on:.1} µs CPU/call)"
    );
    println!(
        "ratio enabled/disabled (median of the rounds' ratios) = {ratio:.3}, quartiles {:.3}..{:.3} \
         (goal >= 0.9: {}); OTLP requests received by the sink: {}",
        percentile(&ratios, 25),
        percentile(&ratios, 75),
        if ratio >= 0.9 { "met" } else { "MISSED" },
        hits.load(Ordering::Relaxed)
    );
}
