//! Soak: the `metald` binary (fake backend, billing on against the mock
//! peer) under 200 concurrent clients doing random mixed operations (create,
//! boot, pause, resume, reboot, shutdown, delete, GetVmInfo, ListVms) for
//! 60 s, over all four wire protocols (client `i` speaks
//! `WireProtocol::ALL[i % 4]`, each with its own connection pool and
//! customer). The baseline, measured in the same run first, is the same mix
//! from 1 client.
//!
//! Prints calls/s, p50/p99/max latency (all calls and per operation), the
//! metald process' RSS and open fds at start, before the soak (after the
//! baseline and a warm-up at the soak's concurrency: the allocator then
//! holds what a busy metald holds), at peak and after (clients gone, VMs
//! deleted), and errors by code. Goals, each printed PASS/FAIL beside its figure: no 5xx (no call
//! answered with a code whose HTTP status is 5xx: internal, unknown,
//! unavailable, data_loss, unimplemented, deadline_exceeded), RSS after
//! within 20 % of before, fds back to before.
//!
//! Run: `cargo bench --bench soak` (env `METALD_BENCH_CLIENTS` = 200,
//! `METALD_BENCH_SECONDS` = 60, `METALD_BENCH_BASELINE_SECONDS` = 10,
//! `METALD_BENCH_WARMUP_SECONDS` = 10,
//! `METALD_BENCH_ROUNDS` = 1 soaks in a row;
//! `METALD_BENCH_BILLING=unreachable` meters against a closed port instead of
//! the mock peer, `=off` runs without billing). Under `cargo test --all-targets` (no `--bench`) it is a
//! short smoke run.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use connectrpc::ConnectError;
use metald::client::{VmClient, WireProtocol, vm_client};
use metald::pb::vmprovisioner::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{env_or, percentile};

/// VMs one client keeps at most (it creates until it has them).
const VMS_PER_CLIENT: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Create,
    Boot,
    Pause,
    Resume,
    Reboot,
    Shutdown,
    Delete,
    Info,
    List,
}

impl Op {
    const ALL: [Op; 9] =
        [Op::Create, Op::Boot, Op::Pause, Op::Resume, Op::Reboot, Op::Shutdown, Op::Delete, Op::Info, Op::List];

    fn name(self) -> &'static str {
        match self {
            Op::Create => "CreateVm",
            Op::Boot => "BootVm",
            Op::Pause => "PauseVm",
            Op::Resume => "ResumeVm",
            Op::Reboot => "RebootVm",
            Op::Shutdown => "ShutdownVm",
            Op::Delete => "DeleteVm",
            Op::Info => "GetVmInfo",
            Op::List => "ListVms",
        }
    }
}

/// What one phase's clients measured.
#[derive(Default)]
struct Stats {
    /// Latency of every call, by operation.
    latency: BTreeMap<Op, Vec<Duration>>,
    /// Failed calls by Connect code.
    errors: BTreeMap<String, u64>,
    /// Failed calls whose code maps to an HTTP 5xx status.
    server_errors: u64,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        for (op, mut l) in other.latency {
            self.latency.entry(op).or_default().append(&mut l);
        }
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.server_errors += other.server_errors;
    }

    fn calls(&self) -> usize {
        self.latency.values().map(Vec::len).sum()
    }

    fn all(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self.latency.values().flatten().copied().collect();
        all.sort();
        all
    }
}

/// One client: random operations on its own VMs until `until`, then it
/// deletes what it still has (not measured).
async fn client_loop(i: usize, endpoint: String, kernel: String, until: Instant) -> Stats {
    let proto = WireProtocol::ALL[i % WireProtocol::ALL.len()];
    let c = vm_client(&endpoint, &format!("dev_customer_soak{i}"), proto, Duration::from_secs(30)).unwrap();
    let mut rng = StdRng::seed_from_u64(i as u64);
    let mut stats = Stats::default();
    let mut vms: Vec<String> = Vec::new();
    let mut next = 0usize;
    while Instant::now() < until {
        let op = match vms.len() {
            0 => Op::Create,
            n if n >= VMS_PER_CLIENT => Op::ALL[rng.random_range(1..Op::ALL.len())],
            _ => Op::ALL[rng.random_range(0..Op::ALL.len())],
        };
        let id = match op {
            Op::Create => {
                next += 1;
                format!("soak-{i:03}-{next:06}")
            }
            _ => vms[rng.random_range(0..vms.len())].clone(),
        };
        let force = rng.random_bool(0.5);
        let t = Instant::now();
        let r = call(&c, op, &id, &kernel, force).await;
        stats.latency.entry(op).or_default().push(t.elapsed());
        match r {
            Ok(()) => match op {
                Op::Create => vms.push(id),
                Op::Delete => vms.retain(|v| *v != id),
                _ => {}
            },
            Err(e) => {
                if e.code.http_status().is_server_error() {
                    stats.server_errors += 1;
                    if stats.server_errors <= 3 {
                        eprintln!("client {i} ({proto:?}): {} {id}: {e:?}", op.name());
                    }
                }
                *stats.errors.entry(format!("{} {}", op.name(), e.code.as_str())).or_default() += 1;
            }
        }
    }
    for id in vms {
        if let Err(e) = call(&c, Op::Delete, &id, &kernel, true).await {
            eprintln!("client {i}: cleanup delete {id}: {e:?}");
        }
    }
    stats
}

async fn call(c: &VmClient, op: Op, id: &str, kernel: &str, force: bool) -> Result<(), ConnectError> {
    let vm_id = id.to_owned();
    match op {
        Op::Create => c
            .create_vm(pb::CreateVmRequest { vm_id, config: support::vm_config(kernel).into(), ..Default::default() })
            .await
            .map(drop),
        Op::Boot => c.boot_vm(pb::BootVmRequest { vm_id, ..Default::default() }).await.map(drop),
        Op::Pause => c.pause_vm(pb::PauseVmRequest { vm_id, ..Default::default() }).await.map(drop),
        Op::Resume => c.resume_vm(pb::ResumeVmRequest { vm_id, ..Default::default() }).await.map(drop),
        Op::Reboot => c.reboot_vm(pb::RebootVmRequest { vm_id, force, ..Default::default() }).await.map(drop),
        Op::Shutdown => c.shutdown_vm(pb::ShutdownVmRequest { vm_id, force, ..Default::default() }).await.map(drop),
        Op::Delete => c.delete_vm(pb::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.map(drop),
        Op::Info => c.get_vm_info(pb::GetVmInfoRequest { vm_id, ..Default::default() }).await.map(drop),
        Op::List => c.list_vms(pb::ListVmsRequest { page_size: 100, ..Default::default() }).await.map(drop),
    }
}

/// Runs `clients` clients for `secs`; their stats and the wall time.
async fn phase(clients: usize, secs: f64, endpoint: &str, kernel: &str) -> (Stats, Duration) {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> =
        (0..clients).map(|i| tokio::spawn(client_loop(i, endpoint.to_owned(), kernel.to_owned(), until))).collect();
    let mut stats = Stats::default();
    for t in tasks {
        stats.merge(t.await.unwrap());
    }
    // Calls end at `until`; the cleanup after it is not part of the rate.
    (stats, Duration::from_secs_f64(secs))
}

/// What the metald process holds: RSS (KiB), of it anonymous (heap,
/// stacks) and file-backed (mapped files: the binary, the store's and the
/// spool's mappings), and open fds.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss: u64,
    anon: u64,
    file: u64,
    fds: usize,
}

fn sample(pid: u32) -> Sample {
    Sample {
        rss: support::rss_kib(pid),
        anon: support::status_kib(pid, "RssAnon"),
        file: support::status_kib(pid, "RssFile"),
        fds: support::open_fds(pid),
    }
}

/// Waits until the process' fds are back to `before` (the server has seen
/// the clients' closes), at most 10 s, then 2 s more; then samples it.
async fn settle(pid: u32, before: Sample) -> Sample {
    let start = Instant::now();
    while sample(pid).fds > before.fds && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sample(pid)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, stats: &Stats, wall: Duration) -> (f64, Duration) {
    let all = stats.all();
    let rate = all.len() as f64 / wall.as_secs_f64();
    let p99 = percentile(&all, 0.99);
    println!(
        "{name:<22} calls={:<7} {rate:>8.0} calls/s  p50={:>7.2} ms  p99={:>7.2} ms  max={:>8.2} ms",
        all.len(),
        ms(percentile(&all, 0.50)),
        ms(p99),
        ms(all.last().copied().unwrap_or_default())
    );
    (rate, p99)
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): a short smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (use `cargo bench --bench soak` for the real figures)");
    }
    let clients: usize = env_or("METALD_BENCH_CLIENTS", if full { 200 } else { 20 });
    let secs: f64 = env_or("METALD_BENCH_SECONDS", if full { 60.0 } else { 2.0 });
    let baseline_secs: f64 = env_or("METALD_BENCH_BASELINE_SECONDS", if full { 10.0 } else { 1.0 });
    let warmup_secs: f64 = env_or("METALD_BENCH_WARMUP_SECONDS", if full { 10.0 } else { 1.0 });
    let rounds: usize = env_or("METALD_BENCH_ROUNDS", 1).max(1);

    let host = support::Host::new();
    let port = support::free_port();
    let billing = std::env::var("METALD_BENCH_BILLING").unwrap_or_default();
    let outage = billing == "unreachable";
    let mut extra = vec![
        ("PORT", port.to_string()),
        ("LOG", "warn".to_string()),
        ("BILLING_ENABLED", (billing != "off").to_string()),
        ("BILLING_MOCK_MODE", (!outage).to_string()),
    ];
    if outage {
        extra.push(("BILLING_ENDPOINT", "http://127.0.0.1:9".into()));
        extra.push(("BILLING_FLUSH_MS", "1000".into()));
    }
    let env = host.env((clients + 1) * VMS_PER_CLIENT, &extra);
    let log = host.tmp.path().join("metald.log");
    let metald = support::spawn_metald(&env, &log);
    let pid = metald.pid();
    let endpoint = format!("http://127.0.0.1:{port}");
    let probe = vm_client(&endpoint, "dev_customer_probe", WireProtocol::ConnectProto, Duration::from_secs(5)).unwrap();
    support::wait_serving(&probe, Duration::from_secs(30), &log).await;
    drop(probe);
    let kernel = host.kernel.display().to_string();
    let at_start = sample(pid);

    // Baseline: the same mix from one client.
    let (base, base_wall) = phase(1, baseline_secs, &endpoint, &kernel).await;
    // Warm-up: the soak's load for a short while, so that "before" holds
    // what any busy metald holds from then on (the allocator's arenas and
    // free lists at that concurrency, thread stacks, caches): growth beyond
    // it is what the soak itself left behind.
    let (warm, _) = phase(clients, warmup_secs, &endpoint, &kernel).await;
    let before = settle(pid, at_start).await;

    // The soak, with the process sampled for its peak; `rounds` > 1 repeats
    // it, to tell memory kept by the allocator (flat after round 1) from a
    // leak (growing each round).
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = Sample::default();
            while sampling.load(Ordering::Relaxed) {
                let now = sample(pid);
                peak = Sample {
                    rss: peak.rss.max(now.rss),
                    anon: peak.anon.max(now.anon),
                    file: peak.file.max(now.file),
                    fds: peak.fds.max(now.fds),
                };
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak
        })
    };
    let mut soak = Stats::default();
    let mut soak_wall = Duration::ZERO;
    let mut rounds_after = Vec::new();
    for _ in 0..rounds {
        let (stats, wall) = phase(clients, secs, &endpoint, &kernel).await;
        soak.merge(stats);
        soak_wall += wall;
        // After: clients gone (their connections closed), VMs deleted.
        rounds_after.push(settle(pid, before).await);
    }
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let after = *rounds_after.last().unwrap();

    println!(
        "metald (fake backend, billing {}) on loopback; soak: {clients} clients (Connect proto/JSON, gRPC, gRPC-Web \
         in turn), {secs} s x {rounds}, up to {VMS_PER_CLIENT} VMs each, after a {warmup_secs} s warm-up; baseline: \
         1 client, {baseline_secs} s",
        match billing.as_str() {
            "off" => "off",
            "unreachable" => "ON against a closed port",
            _ => "ON (mock peer)",
        }
    );
    let (base_rate, _) = report("baseline (1 client)", &base, base_wall);
    let (soak_rate, _) = report(&format!("soak ({clients} clients)"), &soak, soak_wall);
    println!("throughput vs baseline: {:.2}x", soak_rate / base_rate);
    println!("per operation (soak):");
    for (op, l) in &soak.latency {
        let mut l = l.clone();
        l.sort();
        println!(
            "  {:<11} n={:<7} p50={:>7.2} ms  p99={:>7.2} ms  max={:>8.2} ms",
            op.name(),
            l.len(),
            ms(percentile(&l, 0.5)),
            ms(percentile(&l, 0.99)),
            ms(l.last().copied().unwrap_or_default())
        );
    }
    println!("errors by code (soak; a random op on a VM in the wrong state is refused, which is correct):");
    if soak.errors.is_empty() {
        println!("  none");
    }
    for (code, n) in &soak.errors {
        println!("  {code:<36} {n}");
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("metald process:             RSS (anon + file)            fds");
    let mut rows =
        vec![("at start".to_string(), at_start), ("before (warmed up)".into(), before), ("peak".into(), peak)];
    for (k, a) in rounds_after.iter().enumerate() {
        rows.push((if rounds == 1 { "after".into() } else { format!("after round {}", k + 1) }, *a));
    }
    for (name, x) in rows {
        println!("  {name:<20} {:>7.1} MiB ({:>6.1} + {:>5.1}) {:>7}", mib(x.rss), mib(x.anon), mib(x.file), x.fds);
    }
    let server_errors = base.server_errors + warm.server_errors + soak.server_errors;
    let rss_change = (after.rss as f64 - before.rss as f64) / before.rss as f64;
    println!("goals:");
    let calls = base.calls() + warm.calls() + soak.calls();
    println!(
        "  no 5xx answers: {server_errors} of {calls} calls (baseline, warm-up, soak) {}",
        pass(server_errors == 0)
    );
    println!(
        "  RSS after within 20 % of before: {:.1} -> {:.1} MiB ({:+.1} %; anon {:+.1}, file {:+.1} MiB) {}",
        mib(before.rss),
        mib(after.rss),
        rss_change * 100.0,
        mib(after.anon) - mib(before.anon),
        mib(after.file) - mib(before.file),
        pass(rss_change.abs() <= 0.20)
    );
    println!("  fds back to before: {} -> {} {}", before.fds, after.fds, pass(after.fds <= before.fds));
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let panics = log_text.matches("panicked").count();
    if panics > 0 {
        println!("  metald log has {panics} panic(s): {}", log.display());
    }
    drop(metald);
}
