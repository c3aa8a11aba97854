//! Rate limits of a QEMU guest's managed NIC, end to end: metald
//! in-process with the QEMU backend (TCG) and host networking on, inside a
//! network namespace this test makes (its thread unshares one; metald's
//! threads and QEMU inherit it). No packet leaves this machine.
//!
//! Two guests: `slow`, whose NIC is limited to 64 KiB/s each way, and
//! `fast`, unlimited. The guest image's transfer probes (`metald.sink=`,
//! `metald.source=`) are reached from the host through port mappings on
//! 127.0.0.1. Uploading 512 KiB to a guest crosses the TAP's egress (its
//! rx: the `tbf` qdisc); downloading 512 KiB from it crosses the TAP's
//! ingress (its tx: the nftables `limit`). Each limited transfer must take
//! at least 0.7× the time the limit implies — a lower bound only, never a
//! tighter wall-clock one — and the same transfers with `fast` must be
//! quicker than that bound (the baseline: without the limit the bound
//! would fail). A metald restart rebuilds the limits from the store (one
//! qdisc, one object); a delete removes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::ip;

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::{Config, Daemon};
use metald::pb::vmprovisioner::v1 as pb;
use support::{console_text, guest_image, metald_env, wait_until};

const BOOT: Duration = Duration::from_secs(120);
/// The limit, bytes per second, each way.
const RATE: u64 = 64 * 1024;
/// Bytes moved per transfer.
const BYTES: u64 = 512 * 1024;
/// What may pass at once before the limit bites (README "Rate limits": the
/// buckets are at least this deep so that a guest's 64 KiB GSO packets
/// pass; here deeper than `RATE × refill_time`).
const FREE: u64 = 128 * 1024;
const SINK: i32 = 9000;
const SOURCE: i32 = 9001;

/// Sends `BYTES` to the guest's sink; returns how long until the guest
/// answered that it had them all.
fn upload(port: u16) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&vec![b'x'; usize::try_from(BYTES).unwrap()]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let took = t.elapsed();
    assert_eq!(answer.trim(), BYTES.to_string(), "the guest's count");
    took
}

/// Asks the guest's source for `BYTES`; returns how long until the last
/// one arrived.
fn download(port: u16) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    writeln!(s, "{BYTES}").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let took = t.elapsed();
    assert_eq!(got.len() as u64, BYTES, "bytes from the guest");
    took
}

/// Makes VM `id` with one managed NIC (limited to `RATE` each way when
/// `limited`) mapping the sink and source ports; returns those host ports.
async fn create(c: &VmClient, id: &str, limited: bool) -> (u16, u16, String) {
    let limit = || {
        // refill_time 100 ms: a bucket of 6.4 KiB, deepened to the minimum.
        let r =
            pb::RateLimit { bandwidth: i64::try_from(RATE).unwrap(), refill_time: 100, burst: 0, ..Default::default() };
        if limited { r.into() } else { Default::default() }
    };
    let nic = pb::NetworkInterface {
        port_mappings: [SINK, SOURCE]
            .iter()
            .map(|&g| pb::PortMapping { host_port: 0, guest_port: g, ..Default::default() })
            .collect(),
        rx_rate_limit: limit(),
        tx_rate_limit: limit(),
        ..Default::default()
    };
    let config = pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: guest_image().join("vmlinux").display().to_string(),
            initrd_path: guest_image().join("initramfs.cpio.gz").display().to_string(),
            kernel_args: format!("console=ttyS0 quiet metald.sink={SINK} metald.source={SOURCE}"),
            ..Default::default()
        }
        .into(),
        network: vec![nic],
        ..Default::default()
    };
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: config.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e:?}"));
    let info =
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned();
    let n = info.network_info.as_option().expect("network_info").clone();
    let port = |g| n.port_mappings.iter().find(|p| p.guest_port == g).map(|p| u16::try_from(p.host_port).unwrap());
    (port(SINK).unwrap(), port(SOURCE).unwrap(), n.tap_device.clone())
}

/// What the host holds for `tap`'s limits: its root qdisc kinds, and how
/// often the table names its `limit` object (definition and map element).
fn host_limits(tap: &str) -> (Vec<String>, usize) {
    let out = Command::new("tc").args(["-j", "qdisc", "show", "dev", tap, "root"]).output().unwrap();
    let q: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let kinds = q.iter().map(|q| q["kind"].as_str().unwrap_or_default().to_owned()).collect();
    let table = Command::new("nft").args(["list", "table", "inet", "metald"]).output().unwrap();
    (kinds, String::from_utf8_lossy(&table.stdout).matches(&format!("tx_{tap}")).count())
}

async fn boot(c: &VmClient, id: &str) -> PathBuf {
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let info =
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned();
    PathBuf::from(&info.backend_info["console_log"])
}

#[test]
fn a_qemu_guests_transfers_take_at_least_the_time_its_rate_limits_imply() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run());
    })
    .join()
    .unwrap();
}

async fn run() {
    ip(&["link", "set", "lo", "up"]);
    let tmp = tempfile::Builder::new().prefix("metald-rl-").tempdir().unwrap();
    let env = metald_env([
        ("BACKEND", "qemu".to_owned()),
        ("QEMU_ACCEL", "tcg".to_owned()),
        ("AUTH_DEV_TOKENS", "true".to_owned()),
        ("PORT", "0".to_owned()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", guest_image().display().to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ("NETWORK_ENABLED", "true".to_owned()),
    ]);
    let _kill = support::KillOnDrop(tmp.path().to_path_buf());
    let daemon: Daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    let c = vm_client(
        &format!("http://127.0.0.1:{}", daemon.addr.port()),
        "dev_customer_acme",
        WireProtocol::ConnectProto,
        Duration::from_secs(120),
    )
    .unwrap();

    let (slow_sink, slow_source, slow_tap) = create(&c, "slow", true).await;
    let (fast_sink, fast_source, fast_tap) = create(&c, "fast", false).await;
    assert_eq!(host_limits(&slow_tap), (vec!["tbf".to_owned()], 2));
    assert_ne!(host_limits(&fast_tap).0, vec!["tbf".to_owned()]);
    assert_eq!(host_limits(&fast_tap).1, 0);
    let consoles = [boot(&c, "slow").await, boot(&c, "fast").await];
    for console in &consoles {
        wait_until(&format!("the guest to be up (console {})", console.display()), BOOT, || {
            let t = console_text(console);
            let up = t.contains("METALD_NET_UP") && t.contains("METALD_GUEST_READY");
            async move { up }
        })
        .await;
    }

    let implied = Duration::from_secs_f64((BYTES - FREE) as f64 / RATE as f64);
    let bound = implied.mul_f64(0.7);
    // Blocking I/O on this thread: metald runs on the runtime's workers.
    let (fast_up, fast_down) = (upload(fast_sink), download(fast_source));
    let (slow_up, slow_down) = (upload(slow_sink), download(slow_source));
    eprintln!(
        "{BYTES} bytes at {RATE} B/s imply >= {implied:?} (bound {bound:?}): limited upload (guest rx) {slow_up:?}, \
         download (guest tx) {slow_down:?}; unlimited upload {fast_up:?}, download {fast_down:?}"
    );
    assert!(slow_up >= bound, "rx limit not enforced: {BYTES} bytes reached the guest in {slow_up:?} < {bound:?}");
    assert!(slow_down >= bound, "tx limit not enforced: {BYTES} bytes left the guest in {slow_down:?} < {bound:?}");
    // The baseline: unlimited, the same transfers beat the bound by far.
    assert!(fast_up < bound / 2, "unlimited upload took {fast_up:?}: the bound proves nothing here");
    assert!(fast_down < bound / 2, "unlimited download took {fast_down:?}: the bound proves nothing here");
    for console in &consoles {
        let t = console_text(console);
        assert!(t.contains(&format!("METALD_SINK {BYTES}")) && t.contains(&format!("METALD_SOURCE {BYTES}")), "{t}");
    }

    // A restart rebuilds them from the store, once.
    daemon.shutdown();
    daemon.wait().await.unwrap();
    let daemon: Daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    assert_eq!(host_limits(&slow_tap), (vec!["tbf".to_owned()], 2), "after a restart");
    let c = vm_client(
        &format!("http://127.0.0.1:{}", daemon.addr.port()),
        "dev_customer_acme",
        WireProtocol::ConnectProto,
        Duration::from_secs(120),
    )
    .unwrap();

    // Delete: the limit object, its element and the TAP (with its qdisc) go.
    c.delete_vm(pb::DeleteVmRequest { vm_id: "slow".into(), force: true, ..Default::default() }).await.unwrap();
    // Removal is batched off the call's path (network::reap): wait for it.
    let table = || {
        let out = Command::new("nft").args(["list", "table", "inet", "metald"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the limit object and its element to be deleted", Duration::from_secs(10), || {
        let t = table();
        async move { !t.contains("limit tx_mt-") && !t.contains(": \"tx_mt-") }
    })
    .await;
    wait_until(&format!("TAP {slow_tap} to be deleted"), Duration::from_secs(10), || {
        let links = Command::new("ip").args(["link", "show"]).output().unwrap();
        let gone = !String::from_utf8_lossy(&links.stdout).contains(&slow_tap);
        async move { gone }
    })
    .await;
    daemon.shutdown();
    daemon.wait().await.unwrap();
}
