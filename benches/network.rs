//! Host networking at scale: metald in-process with the fake backend and
//! host networking on (real TAPs, routes and nftables elements), in a
//! network namespace of its own. Creates N VMs with one managed NIC and a
//! port mapping each, one after another, then deletes them; prints per-VM
//! CreateVm and DeleteVm p50/p99 beside the same calls for VMs without a
//! NIC (the baseline, same run: the difference is what networking costs),
//! the nftables rule count at 0, 100 and N networked VMs (goal: constant),
//! the time to network all N, the process' RSS, and what metering's read
//! of every TAP's counters (once per 100 ms billing round) costs at N TAPs.
//!
//! Goals on the 2-core development machine: setup p99 < 20 ms, teardown
//! p99 < 20 ms, 1,000 VMs networked in < 20 s.
//!
//! Run: `cargo bench --bench network` (env `METALD_BENCH_VMS`, default
//! 1000). Without `--bench` (as `cargo test --all-targets` runs it) it does
//! a smoke run with 20 VMs. Needs root (it unshares a network namespace).

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::pb::vmprovisioner::v1 as pb;
use support::{env_or, percentile, rss_kib};

fn rules() -> usize {
    let out = std::process::Command::new("nft").args(["-j", "list", "table", "inet", "metald"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"].as_array().map_or(0, |a| a.iter().filter(|o| o.get("rule").is_some()).count())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = env_or("METALD_BENCH_VMS", if bench { 1000 } else { 20 });
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        assert!(std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap().success());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(n));
    })
    .join()
    .unwrap();
}

async fn run(n: usize) {
    let max = (2 * n + 10).to_string();
    let d = support::daemon::start(&[
        ("NETWORK_ENABLED", "true"),
        ("MAX_VMS", &max),
        ("NETWORK_PORT_RANGE", "20000-29999"),
        ("AUTH_DEV_TOKENS", "true"),
    ])
    .await;
    let c = d.client("dev_customer_bench");
    let kernel = d.tmp.path().join("assets").join("vmlinux");
    let config = |net: bool| {
        let mut cfg = support::vm_config(&kernel.display().to_string());
        if net {
            cfg.network = vec![pb::NetworkInterface {
                port_mappings: vec![pb::PortMapping { guest_port: 80, ..Default::default() }],
                ..Default::default()
            }];
        }
        cfg
    };
    let rss_start = rss_kib(std::process::id());
    let rules_0 = rules();

    // Baseline: the same calls without a NIC.
    let (mut base_create, mut base_delete) = (Vec::new(), Vec::new());
    for i in 0..n.min(200) {
        let t = Instant::now();
        c.create_vm(pb::CreateVmRequest {
            vm_id: format!("b-{i}"),
            config: config(false).into(),
            ..Default::default()
        })
        .await
        .unwrap();
        base_create.push(t.elapsed());
    }
    for i in 0..n.min(200) {
        let t = Instant::now();
        c.delete_vm(pb::DeleteVmRequest { vm_id: format!("b-{i}"), force: true, ..Default::default() }).await.unwrap();
        base_delete.push(t.elapsed());
    }

    let (mut create, mut delete) = (Vec::new(), Vec::new());
    let mut rules_100 = None;
    let all = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        c.create_vm(pb::CreateVmRequest { vm_id: format!("n-{i}"), config: config(true).into(), ..Default::default() })
            .await
            .unwrap();
        create.push(t.elapsed());
        if i + 1 == 100 {
            rules_100 = Some(rules());
        }
    }
    let networked = all.elapsed();
    let rules_n = rules();
    let rss_peak = rss_kib(std::process::id());
    // Metering: one read of every TAP's counters, as each billing round
    // with managed NICs does.
    let net = d.d().manager.host_net().expect("host networking");
    let mut reads = Vec::new();
    let mut seen = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let all = net.tap_counters().expect("TAP counters");
        reads.push(t.elapsed());
        seen = all.len();
    }
    assert!(seen >= n, "every TAP read: {seen} of {n}");
    reads.sort();
    for i in 0..n {
        let t = Instant::now();
        c.delete_vm(pb::DeleteVmRequest { vm_id: format!("n-{i}"), force: true, ..Default::default() }).await.unwrap();
        delete.push(t.elapsed());
    }
    let deleted = Instant::now();
    // DeleteVm removes a NIC's table elements at once and its TAP right
    // after, off the call's path: wait for the kernel to finish.
    let taps = || {
        let links = std::process::Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
        String::from_utf8_lossy(&links.stdout).lines().filter(|l| l.contains(" mt-")).count()
    };
    while taps() > 0 && deleted.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = deleted.elapsed();
    let left = taps();
    // Churn: each create right after a delete, so each setup's transaction
    // also deletes the previous VM's elements (the worst case for setup).
    let (mut churn_create, mut churn_delete) = (Vec::new(), Vec::new());
    for i in 0..n.min(200) {
        let t = Instant::now();
        c.create_vm(pb::CreateVmRequest { vm_id: format!("c-{i}"), config: config(true).into(), ..Default::default() })
            .await
            .unwrap();
        churn_create.push(t.elapsed());
        let t = Instant::now();
        c.delete_vm(pb::DeleteVmRequest { vm_id: format!("c-{i}"), force: true, ..Default::default() }).await.unwrap();
        churn_delete.push(t.elapsed());
    }
    for v in [&mut base_create, &mut base_delete, &mut create, &mut delete, &mut churn_create, &mut churn_delete] {
        v.sort();
    }
    println!(
        "metald (fake backend, host networking on, own network namespace): {n} VMs with one managed NIC + one port mapping"
    );
    println!("                         p50 ms    p99 ms   (baseline, no NIC: p50 / p99 ms)");
    println!(
        "CreateVm (setup)     {:>9.2} {:>9.2}   ({:.2} / {:.2})",
        ms(percentile(&create, 0.5)),
        ms(percentile(&create, 0.99)),
        ms(percentile(&base_create, 0.5)),
        ms(percentile(&base_create, 0.99))
    );
    println!(
        "DeleteVm (teardown)  {:>9.2} {:>9.2}   ({:.2} / {:.2})",
        ms(percentile(&delete, 0.5)),
        ms(percentile(&delete, 0.99)),
        ms(percentile(&base_delete, 0.5)),
        ms(percentile(&base_delete, 0.99))
    );
    println!(
        "churn ({} x create, then delete at once): CreateVm p50 {:.2} p99 {:.2} ms, DeleteVm p50 {:.2} p99 {:.2} ms",
        churn_create.len(),
        ms(percentile(&churn_create, 0.5)),
        ms(percentile(&churn_create, 0.99)),
        ms(percentile(&churn_delete, 0.5)),
        ms(percentile(&churn_delete, 0.99))
    );
    println!(
        "nftables rules: {rules_0} at 0 VMs, {} at 100, {rules_n} at {n} (goal: constant) {}",
        rules_100.map_or("-".into(), |r| r.to_string()),
        if rules_100.is_none_or(|r| r == rules_0) && rules_n == rules_0 { "PASS" } else { "FAIL" }
    );
    println!(
        "{n} VMs networked in {:.1} s ({:.0} per s; goal at 1,000: < 20 s {}); DeleteVm queues a NIC's elements \
         and TAP for removal in batches: after the last DeleteVm the kernel held none of them {:.2} s later; \
         TAPs left: {left}",
        networked.as_secs_f64(),
        n as f64 / networked.as_secs_f64(),
        if n < 1000 || networked < Duration::from_secs(20) { "PASS" } else { "FAIL" },
        drain.as_secs_f64()
    );
    println!(
        "setup p99 < 20 ms: {}; teardown p99 < 20 ms: {}",
        if percentile(&create, 0.99) < Duration::from_millis(20) { "PASS" } else { "FAIL" },
        if percentile(&delete, 0.99) < Duration::from_millis(20) { "PASS" } else { "FAIL" }
    );
    println!(
        "TAP counters, one read of all {n} TAPs (a billing round): p50 {:.0} us, p99 {:.0} us ({:.2} % of a core at 10 rounds/s)",
        percentile(&reads, 0.5).as_secs_f64() * 1e6,
        percentile(&reads, 0.99).as_secs_f64() * 1e6,
        percentile(&reads, 0.5).as_secs_f64() * 10.0 * 100.0
    );
    println!(
        "process RSS: {:.1} MiB at start, {:.1} MiB with {n} networked VMs",
        rss_start as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    );
    assert_eq!(left, 0, "TAPs left behind");
    let churned = Instant::now();
    while taps() > 0 && churned.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(taps(), 0, "TAPs left behind by the churn");
    let out = std::process::Command::new("nft").args(["list", "set", "inet", "metald", "vm_taps"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("mt-"), "elements left behind");
}
