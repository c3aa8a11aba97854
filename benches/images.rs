//! Container images as VMs (issue 15), three figures, each beside a
//! baseline measured in the same run, with its goal and PASS/FAIL (printed,
//! never asserted):
//!
//! (a) **pull + unpack + filesystem build** of a ~100 MB image (built here
//!     offline with `umoci`: busybox, the workload, three layers of
//!     incompressible random files and one of 3,000 small files; pushed to a
//!     local `docker-registry`) through `Images::prepare` on an empty cache,
//!     vs the stock tools on the same image: `skopeo copy docker://… oci:…`
//!     + `umoci unpack` + `mkfs.ext4 -d` of the rootfs with the options of
//!     `src/image/rootfs.rs` (same size and inode count as metald's base).
//!     Alternating, fresh directories each time; medians. Goal ≤ 1.0.
//! (b) **CreateVm from the cached image → the workload's first output line**
//!     through metald in-process (QEMU backend, TCG, no NIC), vs QEMU
//!     started by the bench with metald's own command line (`qemu.args`,
//!     without `-S`), the same base file and a writable disk made by hand
//!     with `mkfs.ext4 -d` holding the same `metald/config.json`: the same
//!     guest work, so the ratio is metald's overhead. Goal ≤ 1.1.
//! (c) **host disk used by 20 VMs of the image** (created, not booted) vs
//!     one VM's: allocated blocks (`st_blocks × 512`) of the shared base
//!     (counted once) plus every VM directory. Goal < 1.2×. Then two of
//!     them boot and write 8 MiB each, which lands in their writable disks
//!     (the base's blocks and content are unchanged).
//!
//! `cargo bench --bench images`. Environment: `METALD_BENCH_REPS` (a,
//! default 3), `METALD_BENCH_ROUNDS` (b, default 5), `METALD_BENCH_VMS` (c,
//! default 20), `METALD_BENCH_PARTS` (default `abc`), `METALD_GUEST_IMAGE_DIR` (built with
//! `scripts/guest-image.sh`). Without `--bench` (as `cargo test
//! --all-targets` runs it) a smoke run with a 3 MB image, one repetition,
//! one round and three VMs. Needs root, `docker-registry`, `skopeo`,
//! `umoci`, `mkfs.ext4` and `qemu-system-x86_64`; skipped without them.
//! Everything runs on 127.0.0.1; every process it starts is killed on exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::cast_precision_loss)]

use std::collections::HashSet;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::Config;
use metald::image::{ImageSettings, Images};
use metald::pb::vmprovisioner::v1 as pb;
use support::registry::{ImageBuilder, Registry, image_tools_present, run};
use support::{KillOnDrop, console_text, env_or, guest_image, metald_env, wait_until};

const TIMEOUT: Duration = Duration::from_secs(240);
const HELLO: &str = "WL_HELLO";
/// The workload: says hello (the first output), then with `write` writes
/// 8 MiB into its root (so into the VM's writable disk) and exits.
const RUN_SH: &str = r#"#!/bin/sh
echo WL_HELLO
if [ "$1" = write ]; then
  dd if=/dev/urandom of=/var/blob bs=1M count=8 2>/dev/null
  sync
  echo "WL_WROTE $(wc -c < /var/blob)"
fi
"#;
/// Same options as `src/image/rootfs.rs` (`build_ext4` and `build_writable`).
const MKFS_BASE: &[&str] = &["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-I", "256", "-O", "^has_journal"];
const MKFS_WRITABLE: &[&str] = &[
    "-q",
    "-F",
    "-t",
    "ext4",
    "-b",
    "4096",
    "-m",
    "0",
    "-E",
    "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
];

use support::{median, mib, ms};

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `n` files of `size` incompressible bytes under `dir`.
fn random_files(dir: &Path, n: usize, size: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    for i in 0..n {
        let mut f = std::fs::File::create(dir.join(format!("blob{i:02}.bin"))).unwrap();
        std::io::copy(&mut (&mut urandom).take(size), &mut f).unwrap();
    }
}

/// The bench image: busybox-static and the workload; `big_layers` layers
/// of 8 random files of `file_size` each; one layer of 3,000 small files
/// (500 B – 8 KiB, a source tree's shape).
fn build_image(dir: &Path, big_layers: usize, file_size: u64, small_files: usize) -> ImageBuilder {
    let img = ImageBuilder::new(dir, "v1");
    img.layer(|root| {
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
        for d in ["etc", "app", "var"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        write_exec(&root.join("app/run.sh"), RUN_SH);
    });
    for l in 0..big_layers {
        img.layer(|root| random_files(&root.join(format!("data/layer{l}")), 8, file_size));
    }
    img.layer(|root| {
        let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
        for i in 0..small_files {
            let d = root.join(format!("src/pkg{:03}", i / 30));
            std::fs::create_dir_all(&d).unwrap();
            let mut f = std::fs::File::create(d.join(format!("f{i}.txt"))).unwrap();
            std::io::copy(&mut (&mut urandom).take(500 + (i as u64 * 2_654_435_761) % 7700), &mut f).unwrap();
        }
    });
    img.config(&["--config.entrypoint=/app/run.sh", "--config.workingdir=/app"]);
    img
}

/// Allocated bytes (`st_blocks × 512`) of everything under `path`, each
/// inode counted once across calls sharing `seen` (`du`'s rule).
fn allocated(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(path) else { return 0 };
    let mut total = if seen.insert((md.dev(), md.ino())) { md.blocks() * 512 } else { 0 };
    if md.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            total += allocated(&e.path(), seen);
        }
    }
    total
}

/// `Inode count` of an ext4 file (`dumpe2fs -h`).
fn inode_count(ext4: &Path) -> u64 {
    let out = run(Command::new("dumpe2fs").arg("-h").arg(ext4).stderr(Stdio::null()));
    out.lines().find_map(|l| l.strip_prefix("Inode count:")).unwrap().trim().parse().unwrap()
}

fn sha256_of(path: &Path) -> String {
    metald::image::digest::of_file(path).unwrap().0
}

// ---------------------------------------------------------------- (a)

/// metald: `Images::prepare` on an empty cache in `dir`. Time and base.
async fn pull_metald(host: &str, reference: &str, dir: &Path) -> (Duration, PathBuf) {
    let mut settings = ImageSettings::new(dir.join("cache"));
    settings.insecure_registries = vec![host.to_owned()];
    let images = Images::open(settings).unwrap();
    let t = Instant::now();
    let prepared = images.prepare("bench", reference, None).await.unwrap();
    (t.elapsed(), prepared.base)
}

/// The stock tools on the same image into `dir`: total and per tool.
fn pull_stock(reference: &str, dir: &Path, size: u64, inodes: u64) -> (Duration, [Duration; 3]) {
    std::fs::create_dir_all(dir).unwrap();
    let layout = format!("{}:v1", dir.join("layout").display());
    let t = Instant::now();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--insecure-policy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{layout}")));
    let copied = t.elapsed();
    run(Command::new("umoci").args(["unpack", "--image", &layout]).arg(dir.join("bundle")));
    let unpacked = t.elapsed();
    let out = dir.join("base.ext4");
    let f = std::fs::File::create(&out).unwrap();
    f.set_len(size).unwrap();
    run(Command::new("mkfs.ext4")
        .args(MKFS_BASE)
        .args(["-N", &inodes.to_string(), "-E", "root_owner=0:0", "-d"])
        .arg(dir.join("bundle/rootfs"))
        .arg(&out)
        .env("LC_ALL", "C"));
    f.sync_all().unwrap();
    let total = t.elapsed();
    (total, [copied, unpacked - copied, total - unpacked])
}

async fn part_a(registry: &Registry, tmp: &Path, reps: usize, compressed: u64) {
    let host = &registry.host;
    let reference = format!("{host}/big:v1");
    println!();
    println!("(a) pull + unpack + ext4 build of {reference} ({:.1} MiB compressed) on an empty cache", mib(compressed));
    println!("    metald Images::prepare  vs  skopeo copy docker:// oci: + umoci unpack + mkfs.ext4 -d");
    println!(
        "    (mkfs: {} -N <metald's inode count> -E root_owner=0:0, same size as metald's base)",
        MKFS_BASE.join(" ")
    );
    println!("    goal: ratio metald/stock <= 1.0; {reps} alternating repetitions, fresh directories, medians");
    // Warm-up (page cache of the registry's blobs), and the base's geometry.
    let dir = tmp.join("a-warm");
    let (warm, base) = pull_metald(host, &reference, &dir).await;
    let (size, inodes) = (std::fs::metadata(&base).unwrap().len(), inode_count(&base));
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("    warm-up metald {:.0} ms; base {:.1} MiB, {inodes} inodes", ms(warm), mib(size));
    let (mut m, mut s, mut parts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps {
        let dir = tmp.join(format!("a-stock{i}"));
        let (took, p) = pull_stock(&reference, &dir, size, inodes);
        std::fs::remove_dir_all(&dir).unwrap();
        s.push(took);
        parts.push(p);
        let dir = tmp.join(format!("a-metald{i}"));
        let (took, _) = pull_metald(host, &reference, &dir).await;
        std::fs::remove_dir_all(&dir).unwrap();
        m.push(took);
        eprintln!(
            "    rep {}: metald {:7.0} ms   stock {:7.0} ms (skopeo {:.0}, umoci {:.0}, mkfs {:.0})",
            i + 1,
            ms(m[i]),
            ms(s[i]),
            ms(p[0]),
            ms(p[1]),
            ms(p[2])
        );
    }
    let (mm, ms_) = (median(&m), median(&s));
    let part = |k: usize| ms(median(&parts.iter().map(|p| p[k]).collect::<Vec<_>>()));
    println!("    metald Images::prepare         median {:7.0} ms", ms(mm));
    println!(
        "    stock skopeo+umoci+mkfs        median {:7.0} ms (skopeo {:.0}, umoci unpack {:.0}, mkfs.ext4 {:.0})",
        ms(ms_),
        part(0),
        part(1),
        part(2)
    );
    let ratio = mm.as_secs_f64() / ms_.as_secs_f64();
    println!("    ratio metald/stock: {ratio:.2} (goal <= 1.0) {}", verdict(ratio <= 1.0));
}

// ---------------------------------------------------------------- (b), (c)

fn vm_config(reference: &str, cmd: &[&str]) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig { kernel_args: "quiet".into(), ..Default::default() }.into(),
        image: pb::ContainerImage {
            reference: reference.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

async fn info(c: &VmClient, id: &str) -> pb::GetVmInfoResponse {
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned()
}

async fn create(c: &VmClient, reference: &str, id: &str, cmd: &[&str]) {
    let req = pb::CreateVmRequest { vm_id: id.into(), config: vm_config(reference, cmd).into(), ..Default::default() };
    c.create_vm(req).await.unwrap_or_else(|e| panic!("create {id}: {e:?}"));
}

async fn boot(c: &VmClient, id: &str) {
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("boot {id}: {e:?}"));
}

async fn delete(c: &VmClient, id: &str) {
    c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("delete {id}: {e:?}"));
}

/// Waits (polling every 2 ms) for a console line starting with `marker`.
async fn wait_line(console: &Path, marker: &str, started: Instant) -> Duration {
    loop {
        if console_text(console).lines().any(|l| l.trim_start().starts_with(marker)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "no {marker} in {} within {TIMEOUT:?}:\n{}",
            console.display(),
            console_text(console)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_shutdown(c: &VmClient, id: &str) {
    wait_until(&format!("{id} to be SHUTDOWN"), TIMEOUT, || async {
        info(c, id).await.state.as_known() == Some(pb::VmState::VM_STATE_SHUTDOWN)
    })
    .await;
}

/// A writable disk made by hand, as `build_writable` does: a sparse ext4
/// of `size` holding `metald/config.json` = `config`.
fn hand_writable(dir: &Path, config: &[u8], size: u64) -> PathBuf {
    let staging = dir.join("writable-staging");
    std::fs::create_dir_all(staging.join("metald")).unwrap();
    std::fs::write(staging.join("metald/config.json"), config).unwrap();
    let out = dir.join("writable.ext4");
    std::fs::File::create(&out).unwrap().set_len(size).unwrap();
    run(Command::new("mkfs.ext4").args(MKFS_WRITABLE).arg("-d").arg(&staging).arg(&out).env("LC_ALL", "C"));
    std::fs::remove_dir_all(&staging).unwrap();
    out
}

/// QEMU started directly with metald's arguments (without `-S`), the
/// VM directory `vm_dir` replaced by `dir` (console log, QMP socket,
/// pidfile, the hand-made writable disk). Time to the first output.
async fn boot_direct(qemu: &Path, args: &[String], vm_dir: &str, dir: &Path) -> Duration {
    let here = dir.display().to_string();
    let args: Vec<String> = args.iter().filter(|a| *a != "-S").map(|a| a.replace(vm_dir, &here)).collect();
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
    let took = wait_line(&dir.join("console.log"), HELLO, started).await;
    child.kill().await.unwrap();
    took
}

async fn part_b(c: &VmClient, reference: &str, data: &Path, tmp: &Path, rounds: usize) {
    let qemu = metald::backend::process::resolve_binary("qemu-system-x86_64").expect("qemu-system-x86_64 in PATH");
    println!();
    println!("(b) CreateVm (cached image) -> the workload's first output line ({HELLO}), QEMU TCG, 1 vCPU, 128 MiB");
    println!("    metald in-process (CreateVm + BootVm)  vs  QEMU started directly with metald's command line,");
    println!("    the same base and a hand-made writable disk with the same config.json (same guest work)");
    println!("    goal: ratio <= 1.1; {rounds} alternating rounds, medians");
    // Warm-up: the image is cached (by part (c)'s pull or this create);
    // metald's command line and config are taken from this VM.
    let t = Instant::now();
    create(c, reference, "warm", &[]).await;
    boot(c, "warm").await;
    let vm_dir = data.join("vms/warm");
    wait_line(&vm_dir.join("console.log"), HELLO, t).await;
    wait_shutdown(c, "warm").await;
    let args: Vec<String> = serde_json::from_slice(&std::fs::read(vm_dir.join("qemu.args")).unwrap()).unwrap();
    let config = run(Command::new("debugfs")
        .args(["-R", "cat /metald/config.json"])
        .arg(vm_dir.join("writable.ext4"))
        .stderr(Stdio::null()));
    let writable_size = std::fs::metadata(vm_dir.join("writable.ext4")).unwrap().len();
    delete(c, "warm").await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut last_args = args.clone();
    for i in 0..rounds {
        let id = format!("b{i}");
        let t = Instant::now();
        create(c, reference, &id, &[]).await;
        boot(c, &id).await;
        let dir = data.join("vms").join(&id);
        a.push(wait_line(&dir.join("console.log"), HELLO, t).await);
        last_args = serde_json::from_slice(&std::fs::read(dir.join("qemu.args")).unwrap()).unwrap();
        delete(c, &id).await;
        let direct = tmp.join(format!("direct{i}"));
        std::fs::create_dir_all(&direct).unwrap();
        hand_writable(&direct, config.as_bytes(), writable_size);
        b.push(boot_direct(&qemu, &last_args, &dir.display().to_string(), &direct).await);
        std::fs::remove_dir_all(&direct).unwrap();
        eprintln!("    round {}: metald {:7.0} ms   direct {:7.0} ms", i + 1, ms(a[i]), ms(b[i]));
    }
    let (ma, mb) = (median(&a), median(&b));
    println!("    metald CreateVm -> {HELLO}      median {:7.0} ms", ms(ma));
    println!("    direct QEMU start -> {HELLO}    median {:7.0} ms", ms(mb));
    let ratio = ma.as_secs_f64() / mb.as_secs_f64();
    println!("    ratio metald/direct: {ratio:.2} (goal <= 1.1) {}", verdict(ratio <= 1.1));
    println!(
        "    metald's QEMU command line (direct: without -S, its own directory): {} {}",
        qemu.display(),
        last_args.join(" ")
    );
}

async fn part_c(c: &VmClient, reference: &str, data: &Path, n: usize) {
    println!();
    println!("(c) host disk used by {n} VMs of {reference} (created, not booted) vs one VM's");
    println!("    allocated blocks (st_blocks x 512) of the shared base (once) + every VM directory; goal < 1.2x");
    let ids: Vec<String> = (0..n).map(|i| format!("c{i:02}")).collect();
    let t = Instant::now();
    create(c, reference, &ids[0], &["write"]).await;
    let cold = t.elapsed();
    let base = PathBuf::from(&info(c, &ids[0]).await.config.storage[0].path);
    let t = Instant::now();
    for id in &ids[1..] {
        create(c, reference, id, &["write"]).await;
    }
    let rest = t.elapsed();
    let usage = |ids: &[String]| {
        let mut seen = HashSet::new();
        let b = allocated(&base, &mut seen);
        let dirs: Vec<u64> = ids.iter().map(|id| allocated(&data.join("vms").join(id), &mut seen)).collect();
        (b, dirs)
    };
    let (base_bytes, dirs) = usage(&ids);
    let one = base_bytes + dirs[0];
    let all = base_bytes + dirs.iter().sum::<u64>();
    let ratio = all as f64 / one as f64;
    println!(
        "    first CreateVm (pull + build) {:.0} ms; the other {} CreateVm {:.0} ms each",
        ms(cold),
        n - 1,
        ms(rest) / (n - 1).max(1) as f64
    );
    println!(
        "    base {:.1} MiB (file {:.1} MiB); one VM directory {:.2} MiB (writable.ext4 {:.0} MiB sparse)",
        mib(base_bytes),
        mib(std::fs::metadata(&base).unwrap().len()),
        mib(dirs[0]),
        mib(std::fs::metadata(data.join("vms").join(&ids[0]).join("writable.ext4")).unwrap().len())
    );
    println!(
        "    1 VM: {:.1} MiB   {n} VMs: {:.1} MiB   ratio {ratio:.3} (goal < 1.2) {}",
        mib(one),
        mib(all),
        verdict(ratio < 1.2)
    );
    // Writes land in the writable disks, not in the base.
    let (blocks, sum) = (std::fs::metadata(&base).unwrap().blocks(), sha256_of(&base));
    let booted = &ids[..2.min(n)];
    for id in booted {
        boot(c, id).await;
    }
    for id in booted {
        let console = data.join("vms").join(id).join("console.log");
        wait_line(&console, "WL_WROTE", Instant::now()).await;
        wait_shutdown(c, id).await;
    }
    let (_, after) = usage(&ids);
    let unchanged = std::fs::metadata(&base).unwrap().blocks() == blocks && sha256_of(&base) == sum;
    for (i, id) in booted.iter().enumerate() {
        println!(
            "    {id} booted, its workload wrote 8 MiB: its directory {:.2} -> {:.2} MiB (+{:.2})",
            mib(dirs[i]),
            mib(after[i]),
            mib(after[i].saturating_sub(dirs[i]))
        );
    }
    println!("    base unchanged (allocated blocks and sha256): {}", if unchanged { "yes" } else { "NO" });
    let all_after = base_bytes + after.iter().sum::<u64>();
    println!(
        "    {n} VMs after those writes: {:.1} MiB ({:.3}x one fresh VM)",
        mib(all_after),
        all_after as f64 / one as f64
    );
    for id in &ids {
        delete(c, id).await;
    }
}

fn tools_present() -> bool {
    image_tools_present()
        && metald::backend::process::resolve_binary("qemu-system-x86_64").is_some()
        && nix::unistd::geteuid().is_root()
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !tools_present() {
        println!("skipped: needs root, docker-registry, skopeo, umoci, mkfs.ext4 and qemu-system-x86_64");
        return;
    }
    if !full {
        println!("smoke run (use `cargo bench --bench images` for the real figures)");
    }
    let reps: usize = env_or("METALD_BENCH_REPS", if full { 3 } else { 1 });
    let rounds: usize = env_or("METALD_BENCH_ROUNDS", if full { 5 } else { 1 });
    let vms: usize = env_or("METALD_BENCH_VMS", if full { 20 } else { 3 }).max(2);
    // metald's own phase timings of each pull ("image base built":
    // download, unpack, mkfs, publish) on stderr.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("metald::image::build=info"))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let image = guest_image();
    let tmp = tempfile::Builder::new().prefix("metald-bench-images-").tempdir().unwrap();
    // Every QEMU is started with paths under `tmp`: killed however this ends.
    let _qemus = KillOnDrop(tmp.path().to_path_buf());
    let registry = Registry::start(None);

    let t = Instant::now();
    let (layers, file_size, small) = if full { (3, 4 << 20, 3000) } else { (1, 256 << 10, 100) };
    let img = build_image(&tmp.path().join("image"), layers, file_size, small);
    registry.push(&img.layout, "v1", "big");
    let compressed: u64 = {
        let mut seen = HashSet::new();
        allocated(&img.layout.join("blobs"), &mut seen)
    };
    std::fs::remove_dir_all(tmp.path().join("image")).unwrap();
    println!("images bench: image built with umoci and pushed with skopeo in {:.1} s", t.elapsed().as_secs_f64());

    let parts: String = env_or("METALD_BENCH_PARTS", "abc".to_owned());
    if parts.contains('a') {
        part_a(&registry, tmp.path(), reps, compressed).await;
    }
    if !parts.contains('b') && !parts.contains('c') {
        return;
    }

    let data = tmp.path().join("data");
    let env = metald_env([
        ("BACKEND", "qemu".to_owned()),
        ("QEMU_ACCEL", "tcg".to_owned()),
        ("AUTH_DEV_TOKENS", "true".to_owned()),
        ("ADDRESS", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("DATA_DIR", data.display().to_string()),
        ("ASSET_DIRS", image.display().to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ("MAX_VMS", (vms + 20).to_string()),
        ("GUEST_KERNEL", image.join("vmlinux").display().to_string()),
        ("GUEST_INITRD", image.join("initramfs.cpio.gz").display().to_string()),
        ("IMAGE_INSECURE_REGISTRIES", registry.host.clone()),
    ]);
    let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    let c = vm_client(
        &format!("http://{}", daemon.addr),
        "dev_customer_bench",
        WireProtocol::ConnectProto,
        Duration::from_secs(300),
    )
    .unwrap();
    let reference = format!("{}/big:v1", registry.host);
    // (c) first: its first CreateVm pulls the image into metald's cache.
    if parts.contains('c') {
        part_c(&c, &reference, &data, vms).await;
    }
    if parts.contains('b') {
        part_b(&c, &reference, &data, tmp.path(), rounds).await;
    }
    daemon.shutdown();
    daemon.wait().await.unwrap();
}
