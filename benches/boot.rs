//! Boot benchmark (issue 3): time from the CreateVm call to the guest's
//! `METALD_GUEST_READY` through metald (A), versus the same kernel +
//! initramfs booted by starting QEMU directly with the equivalent command
//! line (B: metald's own `qemu.args` of the previous A run, without `-S`),
//! alternating A/B; prints both medians and the ratio (goal ≤ 1.05). Then
//! metald's RSS with 0 and with 10 VMs.
//!
//! Runs the release `metald` binary as a separate process on 127.0.0.1 and
//! drives it with the library client.
//!
//! `cargo bench --bench boot` (or `bench/boot.sh`). Environment:
//! `METALD_BENCH_ROUNDS` (default 10), `METALD_BENCH_ACCEL` (tcg|kvm|auto,
//! default tcg), `METALD_BENCH_VMS` (default 10), `METALD_GUEST_IMAGE_DIR`
//! (default `target/guest-image`, built with `scripts/guest-image.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::pb::vmprovisioner::v1 as pb;
use support::{
    KillOnDrop, MetaldProcess, count_lines, env_or, free_port, guest_image, metald_env, rss_kib, spawn_metald,
    wait_serving,
};

const READY: &str = "METALD_GUEST_READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const KERNEL_ARGS: &str = "quiet";

/// Kills metald and every QEMU under the bench's temp dir on the way out
/// (fields drop in order: metald first).
struct Cleanup {
    _metald: MetaldProcess,
    _qemus: KillOnDrop,
}

async fn wait_ready(console: &Path, started: Instant) -> Duration {
    loop {
        if count_lines(console, READY) > 0 {
            return started.elapsed();
        }
        assert!(started.elapsed() < BOOT_TIMEOUT, "no {READY} in {} within {BOOT_TIMEOUT:?}", console.display());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn vm_config(image: &Path) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: image.join("vmlinux").display().to_string(),
            initrd_path: image.join("initramfs.cpio.gz").display().to_string(),
            kernel_args: KERNEL_ARGS.into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

async fn create_and_boot(c: &VmClient, image: &Path, id: &str) {
    let t = Instant::now();
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: vm_config(image).into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e:?}"));
    let tc = t.elapsed();
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("boot {id}: {e:?}"));
    if std::env::var_os("METALD_BENCH_VERBOSE").is_some() {
        eprintln!("  {id}: CreateVm {:.1} ms, BootVm {:.1} ms", ms(tc), ms(t.elapsed() - tc));
    }
}

async fn delete(c: &VmClient, id: &str) {
    c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("delete {id}: {e:?}"));
}

/// A: CreateVm + BootVm through metald until READY. Returns the time and
/// the QEMU arguments metald used.
async fn run_metald(c: &VmClient, image: &Path, data: &Path, id: &str) -> (Duration, Vec<String>) {
    let dir = data.join("vms").join(id);
    let started = Instant::now();
    create_and_boot(c, image, id).await;
    let took = wait_ready(&dir.join("console.log"), started).await;
    let args: Vec<String> = serde_json::from_slice(&std::fs::read(dir.join("qemu.args")).unwrap()).unwrap();
    delete(c, id).await;
    (took, args)
}

/// B: the same command line started directly (no `-S`, so no `cont`).
async fn run_direct(qemu: &Path, metald_args: &[String], metald_dir: &str, dir: &Path) -> Duration {
    std::fs::create_dir_all(dir).unwrap();
    let here = dir.display().to_string();
    let args: Vec<String> = metald_args.iter().filter(|a| *a != "-S").map(|a| a.replace(metald_dir, &here)).collect();
    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let took = wait_ready(&dir.join("console.log"), started).await;
    child.kill().await.unwrap();
    took
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2 }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): a short smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (use `cargo bench` for the real figures)");
    }
    let rounds: usize = env_or("METALD_BENCH_ROUNDS", if full { 10 } else { 2 });
    let nvms: usize = env_or("METALD_BENCH_VMS", if full { 10 } else { 2 });
    let accel: String = env_or("METALD_BENCH_ACCEL", "tcg".to_owned());
    let image = guest_image();
    let qemu = metald::backend::process::resolve_binary("qemu-system-x86_64").expect("qemu-system-x86_64 in PATH");
    let tmp = tempfile::Builder::new().prefix("metald-bench-").tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let log = tmp.path().join("metald.log");
    let env = metald_env([
        ("BACKEND", "qemu".to_owned()),
        ("QEMU_ACCEL", accel.clone()),
        ("AUTH_DEV_TOKENS", "true".to_owned()),
        ("ADDRESS", "127.0.0.1".to_owned()),
        ("PORT", port.to_string()),
        ("DATA_DIR", data.display().to_string()),
        ("ASSET_DIRS", image.display().to_string()),
    ]);
    let metald = spawn_metald(&env, &log);
    let metald_pid = metald.pid();
    let _cleanup = Cleanup { _metald: metald, _qemus: KillOnDrop(tmp.path().to_path_buf()) };
    let c = vm_client(
        &format!("http://127.0.0.1:{port}"),
        "dev_customer_bench",
        WireProtocol::ConnectProto,
        Duration::from_secs(120),
    )
    .unwrap();
    wait_serving(&c, Duration::from_secs(60), &log).await;
    let rss_idle = rss_kib(metald_pid);

    // Warm-up (page cache, first connections), not counted.
    let (_, mut args) = run_metald(&c, image, &data, "warmup").await;
    let mut metald_dir = data.join("vms/warmup").display().to_string();
    run_direct(&qemu, &args, &metald_dir, &tmp.path().join("direct-warmup")).await;

    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let id = format!("a{i}");
        let (took, new_args) = run_metald(&c, image, &data, &id).await;
        a.push(took);
        (args, metald_dir) = (new_args, data.join("vms").join(&id).display().to_string());
        b.push(run_direct(&qemu, &args, &metald_dir, &tmp.path().join(format!("direct{i}"))).await);
        eprintln!("round {:2}: metald {:7.1} ms   direct {:7.1} ms", i + 1, ms(a[i]), ms(b[i]));
    }
    let (ma, mb) = (median(&a), median(&b));
    println!(
        "boot to {READY} ({rounds} rounds, A/B alternating, accel {accel}, 1 vCPU, 128 MiB, vmlinux + initramfs):"
    );
    println!("  A metald (CreateVm call -> READY):    median {:7.1} ms", ms(ma));
    println!("  B direct QEMU (same command line):   median {:7.1} ms", ms(mb));
    println!("  ratio A/B: {:.3} (goal <= 1.05)", ma.as_secs_f64() / mb.as_secs_f64());
    println!("  QEMU command line: {} {}", qemu.display(), args.join(" "));

    // RSS with N VMs running.
    let ids: Vec<String> = (0..nvms).map(|i| format!("rss{i}")).collect();
    for id in &ids {
        create_and_boot(&c, image, id).await;
    }
    let started = Instant::now();
    for id in &ids {
        wait_ready(&data.join("vms").join(id).join("console.log"), started).await;
    }
    let rss_busy = rss_kib(metald_pid);
    for id in &ids {
        delete(&c, id).await;
    }
    println!(
        "metald RSS: {:.1} MiB with 0 VMs, {:.1} MiB with {nvms} VMs running (all {nvms} reached READY in {:.1} s)",
        rss_idle as f64 / 1024.0,
        rss_busy as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
}
