//! GetVmInfo and ListVms (page of 100) latency with 10,000 VMs in the store,
//! p50/p99, beside the latency of `GET /_/health` measured in the same run as
//! the baseline. Goal: GetVmInfo p99 < 1 ms, ListVms p99 < 5 ms.
//!
//! Run: `cargo bench --bench api_latency` (env `METALD_BENCH_VMS`, `METALD_BENCH_CALLS`;
//! `METALD_BENCH_BILLING=unreachable` meters against a closed port instead of the mock peer).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::client::{WireProtocol, vm_client};
use metald::daemon::Config;
use metald::pb::vmprovisioner::v1 as pb;
use support::{env_or, percentile};

fn report(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    println!(
        "{name:<28} n={:<6} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3
    );
    (p50, p99)
}

async fn health_once(addr: std::net::SocketAddr, conn: &mut Option<hyper::client::conn::http1::SendRequest<String>>) {
    if conn.is_none() {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, c) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(c);
        *conn = Some(send);
    }
    let send = conn.as_mut().unwrap();
    if send.ready().await.is_err() {
        *conn = None;
        return Box::pin(health_once(addr, conn)).await;
    }
    let req = http::Request::get("/_/health").header("host", "bench").body(String::new()).unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert!(resp.status().is_success());
    use http_body_util::BodyExt;
    resp.into_body().collect().await.unwrap();
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): a short smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (use `cargo bench` for the real figures)");
    }
    let vms: usize = env_or("METALD_BENCH_VMS", 10_000);
    let calls: usize = env_or("METALD_BENCH_CALLS", if full { 3_000 } else { 300 });
    // First the API alone, then with the 2,500 running VMs metered every
    // 100 ms in the same process (billing spooling to a mock peer), as on a
    // production host.
    for metering in [false, true] {
        measure(vms, calls, metering).await;
    }
}

async fn measure(vms: usize, calls: usize, metering: bool) {
    let host = support::Host::new();

    // Seed the store directly (one transaction) with 10,000 VMs of one
    // customer, a quarter of them running, as a busy host would have.
    let t0 = Instant::now();
    host.seed(vms, |i| i % 4 == 0);
    // METALD_BENCH_BILLING=unreachable: the metering pass sends to a closed
    // port instead of the mock peer (the API under a billing outage).
    let outage = std::env::var("METALD_BENCH_BILLING").is_ok_and(|v| v == "unreachable");
    let mut extra = vec![("BILLING_ENABLED", metering.to_string()), ("BILLING_MOCK_MODE", (!outage).to_string())];
    if outage {
        extra.push(("BILLING_ENDPOINT", "http://127.0.0.1:9".into()));
        // Batches fall due within the run, so the outage is exercised.
        extra.push(("BILLING_FLUSH_MS", "1000".into()));
    }
    let env = host.env(vms, &extra);
    let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    println!("seeded and recovered {vms} VMs in {:.2} s", t0.elapsed().as_secs_f64());
    let client = vm_client(
        &format!("http://{}", daemon.addr),
        "dev_customer_bench",
        WireProtocol::ConnectProto,
        Duration::from_secs(10),
    )
    .unwrap();

    // Warm up connections and caches.
    let mut health_conn = None;
    for i in 0..200 {
        health_once(daemon.addr, &mut health_conn).await;
        client
            .get_vm_info(pb::GetVmInfoRequest { vm_id: format!("vm-{:05}", i % vms), ..Default::default() })
            .await
            .unwrap();
        client.list_vms(pb::ListVmsRequest { page_size: 100, ..Default::default() }).await.unwrap();
    }

    let (mut health, mut info, mut list) = (Vec::new(), Vec::new(), Vec::new());
    let mut token = String::new();
    // Interleave the three so machine noise hits all alike.
    for i in 0..calls {
        let t = Instant::now();
        health_once(daemon.addr, &mut health_conn).await;
        health.push(t.elapsed());

        let id = format!("vm-{:05}", (i * 7919) % vms);
        let t = Instant::now();
        let r = client.get_vm_info(pb::GetVmInfoRequest { vm_id: id, ..Default::default() }).await.unwrap();
        info.push(t.elapsed());
        drop(r);

        let t = Instant::now();
        let r = client
            .list_vms(pb::ListVmsRequest { page_size: 100, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        list.push(t.elapsed());
        assert_eq!(r.vms.len(), 100);
        assert_eq!(r.total_count as usize, vms);
        token = r.next_page_token;
        if token.is_empty() || i % 50 == 49 {
            token.clear();
        }
    }
    println!(
        "latency over Connect/HTTP1.1 on loopback, {vms} VMs in the store, one client, sequential calls, metering {}:",
        if metering { "ON (2,500 running VMs sampled every 100 ms)" } else { "off" }
    );
    let (hp50, hp99) = report("GET /_/health (baseline)", health);
    let (ip50, ip99) = report("GetVmInfo", info);
    let (lp50, lp99) = report("ListVms (page of 100)", list);
    println!(
        "vs baseline: GetVmInfo p50 {:.2}x p99 {:.2}x | ListVms p50 {:.2}x p99 {:.2}x",
        ip50.as_secs_f64() / hp50.as_secs_f64(),
        ip99.as_secs_f64() / hp99.as_secs_f64(),
        lp50.as_secs_f64() / hp50.as_secs_f64(),
        lp99.as_secs_f64() / hp99.as_secs_f64()
    );
    println!(
        "goals: GetVmInfo p99 < 1 ms: {} | ListVms p99 < 5 ms: {}",
        if ip99 < Duration::from_millis(1) { "met" } else { "MISSED" },
        if lp99 < Duration::from_millis(5) { "met" } else { "MISSED" }
    );
    daemon.shutdown();
    daemon.wait().await.unwrap();
}
