//! Metering cost at scale with the fake backend: N "running" VMs sampled
//! every 100 ms for a while. Prints CPU % of one core used by the process
//! (utime+stime from /proc/self/stat), collection-tick lateness p50/p99,
//! samples collected per second and RSS, beside the same run with metering
//! disabled. Goal at 10,000 VMs: < 5 % of a core, p99 lateness < 10 ms.
//!
//! Mock mode acknowledges batches without a network peer, so what is
//! measured is collection, spooling (SQLite group commits) and batching.
//!
//! Run: `cargo bench --bench metering` (env `METALD_BENCH_VMS`, a comma
//! list, default `1000,10000`; `METALD_BENCH_SECS`, default 30;
//! `METALD_BENCH_BATCH`, samples per batch, default 600 as the daemon's
//! default — 100 sends six times as often, a stress figure). Without
//! `--bench` (as `cargo test --all-targets` runs it) it does a 2 s smoke
//! run with 200 VMs.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Bench arithmetic on small counts and durations.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::daemon::Config;
use metald::model::{CustomerId, VmId};
use support::{env_or, percentile, process_cpu_ns, rss_kib};

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    process_cpu_ns(std::process::id()) as f64 / 1e9
}

fn rss_mb() -> f64 {
    rss_kib(std::process::id()) as f64 / 1024.0
}

/// CPU seconds per thread (tid, name): tokio workers, the spool writer, ...
fn cpu_by_thread() -> std::collections::BTreeMap<(u32, String), f64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let mut out = std::collections::BTreeMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        out.insert((tid, name), ticks as f64 / hz);
    }
    out
}

/// CPU % of one core per thread name between two readings (threads that
/// ended in between are missing; those started count from zero).
fn by_name(
    before: &std::collections::BTreeMap<(u32, String), f64>,
    after: &std::collections::BTreeMap<(u32, String), f64>,
    wall: f64,
) -> Vec<(String, f64)> {
    let mut sums = std::collections::BTreeMap::<String, f64>::new();
    for (k, v) in after {
        *sums.entry(k.1.clone()).or_default() += v - before.get(k).copied().unwrap_or(0.0);
    }
    sums.into_iter().map(|(k, v)| (k, v / wall * 100.0)).filter(|(_, pct)| *pct >= 0.05).collect()
}

struct Figures {
    cpu_pct: f64,
    rss_mb: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    samples_per_s: f64,
    /// Samples acknowledged (mock peer) per second: sending is in the window.
    delivered_per_s: f64,
    spool_mb: f64,
    /// CPU % of one core per thread name.
    threads: Vec<(String, f64)>,
}

async fn run(vms: usize, secs: u64, warmup: Duration, metering: bool, batch: usize) -> Figures {
    let host = support::Host::new();
    host.seed(vms, |_| false);
    let env = host.env(
        vms,
        &[
            ("BILLING_ENABLED", metering.to_string()),
            ("BILLING_MOCK_MODE", "true".into()),
            ("BILLING_BATCH_SIZE", batch.to_string()),
        ],
    );
    let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    // Steady state, not a cold start: the VMs boot evenly spread over one
    // batch period (batch / 10 s), as on a host whose VMs started at
    // different times, so batches fall due all through the window
    // (vms / (batch / 10) a second) instead of all at once. With metering
    // off they boot at once (nothing runs per VM then).
    let ramp = if metering { Duration::from_millis(batch as u64 * 100) } else { Duration::ZERO };
    let caller = CustomerId("bench".into());
    let t = Instant::now();
    for i in 0..vms {
        let at = t + ramp.mul_f64(i as f64 / vms as f64);
        tokio::time::sleep_until(at.into()).await;
        daemon.manager.boot(&caller, &VmId::parse(&format!("vm-{i:05}")).unwrap()).await.unwrap();
    }
    // Warm-up: first rounds, page cache, SQLite.
    tokio::time::sleep(warmup).await;
    let status = daemon.billing.clone();
    let totals = |s: &Option<metald::billing::BillingStatus>| {
        s.as_ref()
            .map_or((0, 0), |s| s.counters().values().fold((0, 0), |(c, d), v| (c + v.collected, d + v.delivered)))
    };
    let ((n0, d0), c0, t0, th0) = (totals(&status), cpu_seconds(), Instant::now(), cpu_by_thread());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (c1, (n1, d1), wall, th1) = (cpu_seconds(), totals(&status), t0.elapsed().as_secs_f64(), cpu_by_thread());
    let threads = by_name(&th0, &th1, wall);
    let mut late = status.as_ref().map(|s| s.tick_lateness()).unwrap_or_default();
    let keep = late.len().min((secs * 10) as usize);
    late = late.split_off(late.len() - keep);
    late.sort();
    let spool_mb = status.as_ref().map_or(0.0, |s| s.health().spool_bytes as f64 / (1 << 20) as f64);
    let f = Figures {
        cpu_pct: (c1 - c0) / wall * 100.0,
        rss_mb: rss_mb(),
        p50: percentile(&late, 0.5),
        p99: percentile(&late, 0.99),
        max: late.last().copied().unwrap_or_default(),
        samples_per_s: (n1 - n0) as f64 / wall,
        delivered_per_s: (d1 - d0) as f64 / wall,
        spool_mb,
        threads,
    };
    daemon.shutdown();
    daemon.wait().await.unwrap();
    f
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let counts: Vec<usize> = std::env::var("METALD_BENCH_VMS")
        .unwrap_or_else(|_| if bench { "1000,10000" } else { "200" }.into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let secs: u64 = env_or("METALD_BENCH_SECS", if bench { 30 } else { 1 });
    // Samples per batch: the default (600, one batch a minute per VM);
    // smaller sizes send more often (a stress figure for the send path).
    // The smoke run uses 10 (a 1 s ramp).
    let batch: usize = env_or("METALD_BENCH_BATCH", if bench { 600 } else { 10 });
    let warmup = if bench { Duration::from_secs(2) } else { Duration::from_millis(500) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "metering bench: fake backend, 100 ms interval, {secs} s per run, mock billing peer, batches of {batch} samples (boots spread over one batch period: steady-state sending)"
    );
    println!(
        "{:>7} {:<9} {:>8} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "VMs",
        "metering",
        "CPU %",
        "samples/s",
        "delivered/s",
        "late p50",
        "late p99",
        "late max",
        "RSS MB",
        "spool MB"
    );
    for n in counts {
        for metering in [false, true] {
            let f = rt.block_on(run(n, secs, warmup, metering, batch));
            let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
            let (p50, p99, max) =
                if metering { (ms(f.p50), ms(f.p99), ms(f.max)) } else { ("-".into(), "-".into(), "-".into()) };
            println!(
                "{n:>7} {:<9} {:>7.2}% {:>12.0} {:>12.0} {:>10} {:>10} {:>10} {:>9.0} {:>9.1}",
                if metering { "on" } else { "off" },
                f.cpu_pct,
                f.samples_per_s,
                f.delivered_per_s,
                p50,
                p99,
                max,
                f.rss_mb,
                f.spool_mb
            );
            let by: Vec<String> = f.threads.iter().map(|(k, v)| format!("{k} {v:.2}%")).collect();
            println!("{:>17} by thread: {}", "", if by.is_empty() { "-".into() } else { by.join(", ") });
        }
    }
}
