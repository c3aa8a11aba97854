//! Suspend, resume and clones of a real guest (issue 16): metald in-process
//! with the QEMU backend under TCG, no disks, no network (host networking
//! off: no root, no namespace). Every VM is the same: 1 vCPU, 256 MiB, the
//! guest image's `vmlinux` + `initramfs.cpio.gz`, `console=ttyS0 quiet`.
//! The guest prints `METALD_GUEST_READY` when its userspace is up, then
//! `METALD_TICK <n>` every 100 ms (`metald.tick=0.1`, so the tick after a
//! resume comes soon after the guest runs again); the bench polls the
//! console file every 2 ms. Each figure is printed beside a baseline measured in the same run,
//! with its goal and PASS/FAIL (printed, never asserted):
//!
//! (a) **resume**: ResumeVm call start (VM SUSPENDED) → a new
//!     `METALD_TICK` on its console, beside a **cold boot** of the same
//!     config (CreateVm call start, then BootVm → `METALD_GUEST_READY`).
//!     p50 of the rounds; goal resume ≤ 10 % of the cold boot.
//! (b) **clone**: CreateVm with `from_snapshot` call start → the clone's
//!     first `METALD_TICK`, beside the same cold boot; goal ≤ 10 %.
//! (c) **memory of N idle clones** of the 256 MiB VM vs N cold-booted ones
//!     (idle: 30 ticks, 3 s, on its console, after READY for a cold VM, from
//!     its first for a clone; all N running at once): the sum of each
//!     QEMU's `VmRSS`, and the sum of its `Pss` (`/proc/<pid>/smaps_rollup`:
//!     shared pages divided among their sharers, what they really cost).
//!     The goal, clones ≤ 0.5× the cold ones, is on RSS as the issue
//!     states it. Both are also split by mapping (`/proc/<pid>/smaps`):
//!     guest RAM, TCG's translated code, the kernel and initrd files QEMU
//!     maps, the rest of QEMU.
//! (d) **suspend**: the SuspendVm call's duration and
//!     `SuspendVmResponse.snapshot_size_bytes`, and a SnapshotVm call's
//!     duration and `Snapshot.size_bytes`, with the cold boot as reference.
//!
//! Rounds alternate cold boot, suspend + resume (of one long-lived VM) and
//! clone. The guest's tick is a `sleep 0.1` loop and a save stops its
//! clock: a guest saved `p` ms after a tick sleeps about `100 ms − p` more
//! after it runs on, which is inside (a) and (b). The bench saves
//! (SuspendVm, and the SnapshotVm the clones come from)
//! `METALD_BENCH_PHASE_MS` after a tick (default 50, the mean for a save at
//! a random moment) and prints
//! that remaining sleep, estimated from the measured tick period, beside
//! the ResumeVm / CreateVm call times and metald's own spans:
//! `backend.restore`, split at its first QMP command into QEMU's start
//! and the load of the saved state; `backend.save` (the migration to the
//! file); the cold boot's `backend.create` (QEMU's start) to compare.
//!
//! `cargo bench --bench snapshot`. Environment: `METALD_BENCH_ROUNDS`
//! (a, b, d; default 5), `METALD_BENCH_CLONES` (c; default 10),
//! `METALD_BENCH_PHASE_MS` (default 50, at most 90),
//! `METALD_GUEST_IMAGE_DIR` (built with `scripts/guest-image.sh`). Without
//! `--bench` (as `cargo test --all-targets` runs it) a smoke run: one round,
//! two clones. Needs `qemu-system-x86_64`; skipped without it. Every QEMU
//! it starts is under its temp dir and killed on exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::cast_precision_loss)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::Config;
use metald::pb::vmprovisioner::v1 as pb;
use support::{KillOnDrop, console_text, env_or, guest_image, metald_env, rss_kib};
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

const READY: &str = "METALD_GUEST_READY";
const TICK_LINE: &str = "METALD_TICK ";
const TIMEOUT: Duration = Duration::from_secs(240);
const POLL: Duration = Duration::from_millis(2);
const MEMORY: i64 = 256 << 20;
const KERNEL_ARGS: &str = "console=ttyS0 quiet metald.tick=0.1";
/// The tick period `KERNEL_ARGS` asks for (the bench measures the real one).
const TICK_PERIOD: Duration = Duration::from_millis(100);
/// "Idle": this many ticks on the console (3 s).
const IDLE_TICKS: usize = 30;
const TOKEN: &str = "dev_customer_bench";
const SNAPSHOT: &str = "warm";

// ------------------------------------------------------------ metald's spans

/// metald's spans the bench times: the backend's create, restore and
/// save, and the QMP commands (`hypervisor.api`) of a restore.
const TIMED: &[&str] = &["backend.create", "backend.restore", "backend.save", "hypervisor.api"];
/// `(name, opened, closed)` of the [`TIMED`] spans closed so far.
static CLOSED: Mutex<Vec<(&'static str, Instant, Instant)>> = Mutex::new(Vec::new());

/// Records when each [`TIMED`] span opened and closed.
struct SpanClock;
struct Opened(Instant);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanClock {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let name = attrs.metadata().name();
        if TIMED.contains(&name)
            && let Some(span) = ctx.span(id)
            && (name != "hypervisor.api" || span.scope().skip(1).any(|s| s.name() == "backend.restore"))
        {
            span.extensions_mut().insert(Opened(Instant::now()));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(o) = span.extensions().get::<Opened>()
        {
            CLOSED.lock().unwrap().push((span.name(), o.0, Instant::now()));
        }
    }
}

/// The spans closed since the last call.
struct Spans(Vec<(&'static str, Instant, Instant)>);

fn spans() -> Spans {
    Spans(CLOSED.lock().unwrap().drain(..).collect())
}

impl Spans {
    /// How long the spans called `name` lived, summed.
    fn time(&self, name: &str) -> Duration {
        self.0.iter().filter(|(n, ..)| *n == name).map(|(_, o, c)| *c - *o).sum()
    }

    /// Within the (last) `backend.restore`: from its start to its first
    /// QMP command, which waits for the load (QEMU started and serving QMP).
    fn qmp_up(&self) -> Duration {
        let Some((_, start, end)) = self.0.iter().rev().find(|(n, ..)| *n == "backend.restore") else {
            return Duration::ZERO;
        };
        let first =
            self.0.iter().filter(|(n, o, _)| *n == "hypervisor.api" && o >= start && o <= end).map(|s| s.1).min();
        first.map_or(Duration::ZERO, |f| f - *start)
    }
}

// ------------------------------------------------------------ figures

use support::{median as p50, mib, ms};

/// `p50 X ms (min .. max)` of `v`.
fn summary(v: &[Duration]) -> String {
    let (lo, hi) = (v.iter().min().copied().unwrap_or_default(), v.iter().max().copied().unwrap_or_default());
    format!("p50 {:7.1} ms (min {:.1}, max {:.1})", ms(p50(v)), ms(lo), ms(hi))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

// ------------------------------------------------------------ the console

fn tick_count(text: &str) -> usize {
    text.lines().filter(|l| l.trim_start().starts_with(TICK_LINE)).count()
}

/// Polls `console` every 2 ms until `done(its text)`; the time since `started`.
async fn wait_console(console: &Path, what: &str, started: Instant, done: impl Fn(&str) -> bool) -> Duration {
    loop {
        let text = console_text(console);
        if done(&text) {
            return started.elapsed();
        }
        assert!(started.elapsed() < TIMEOUT, "no {what} in {} within {TIMEOUT:?}:\n{text}", console.display());
        tokio::time::sleep(POLL).await;
    }
}

/// `Pss` of `/proc/<pid>/smaps_rollup` in KiB (0 if unknown).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Where a QEMU's resident pages are, by mapping (`/proc/<pid>/smaps`).
const PARTS: [&str; 4] = ["guest RAM", "TCG code", "kernel+initrd files", "QEMU itself"];

/// `[rss, pss]` KiB of each of [`PARTS`] for `pid`: the guest's RAM (the
/// memfd of a cold-started guest, the saved `guest.ram` a restored one
/// maps, or an anonymous mapping of the guest's memory size), anonymous
/// executable mappings (TCG's
/// translated code), mappings of files in the guest image directory
/// (QEMU maps `-kernel` and `-initrd`), everything else.
fn smaps_parts(pid: u32, image: &Path) -> [[u64; 2]; 4] {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let image = image.display().to_string();
    let guest_kib = u64::try_from(MEMORY >> 10).unwrap();
    let mut out = [[0u64; 2]; 4];
    let mut part = 3;
    let kib = |v: &str| v.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 5 && f[0].contains('-') && !f[0].ends_with(':') {
            // A mapping's header: range, perms, offset, dev, inode[, path].
            let anon = f[4] == "0" && f.len() == 5;
            let ram_file = f.get(5).is_some_and(|p| p.starts_with("/memfd:memory-backend") || p.ends_with("guest.ram"));
            part = if ram_file {
                0
            } else if f.get(5).is_some_and(|p| p.starts_with(&image)) {
                2
            } else if anon && f[1].contains('x') {
                1
            } else if anon {
                4 // the guest's RAM if its size says so (next line)
            } else {
                3
            };
        } else if let Some(v) = l.strip_prefix("Size:") {
            if part == 4 {
                part = if kib(v) == guest_kib { 0 } else { 3 };
            }
        } else if let Some(v) = l.strip_prefix("Rss:") {
            out[part][0] += kib(v);
        } else if let Some(v) = l.strip_prefix("Pss:") {
            out[part][1] += kib(v);
        }
    }
    out
}

// ------------------------------------------------------------ the VMs

fn vm_config(image: &Path) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: MEMORY, ..Default::default() }.into(),
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

struct Bench {
    c: VmClient,
    data: PathBuf,
    image: &'static Path,
    phase: Duration,
    /// The guest's tick period, measured once over several ticks.
    period: Duration,
}

/// One suspend + resume round.
struct ResumeRound {
    suspend: Duration,
    size: u64,
    save: Duration,
    /// ResumeVm call start → the next tick.
    to_tick: Duration,
    call: Duration,
    restore: Duration,
    /// Of `restore`: QEMU started and serving QMP (the rest is the load).
    qmp_up: Duration,
    /// When SuspendVm was called, after the last tick seen.
    saved_at: Duration,
}

/// One clone round.
struct CloneRound {
    to_tick: Duration,
    call: Duration,
    restore: Duration,
    /// Of `restore`: QEMU started and serving QMP (the rest is the load).
    qmp_up: Duration,
}

/// The named snapshot the clones come from.
struct Snap {
    call: Duration,
    size: u64,
    save: Duration,
    saved_at: Duration,
}

/// The memory of N VMs running at once.
struct Memory {
    rss_kib: u64,
    pss_kib: u64,
    /// `[rss, pss]` KiB of each of [`PARTS`], summed.
    parts: [[u64; 2]; 4],
}

impl Bench {
    fn console(&self, id: &str) -> PathBuf {
        self.data.join("vms").join(id).join("console.log")
    }

    /// The tick period of running guest `id` over `n` ticks (one
    /// interval alone is skewed by when each poll sees its line).
    async fn measure_period(&mut self, id: &str, n: usize) {
        let con = self.console(id);
        let c0 = tick_count(&console_text(&con));
        wait_console(&con, "a tick", Instant::now(), |s| tick_count(s) > c0).await;
        let first = Instant::now();
        wait_console(&con, "ticks", first, |s| tick_count(s) > c0 + n).await;
        self.period = first.elapsed() / u32::try_from(n).unwrap();
    }

    async fn info(&self, id: &str) -> pb::GetVmInfoResponse {
        self.c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("info {id}: {e:?}"))
            .into_owned()
    }

    async fn pid(&self, id: &str) -> u32 {
        self.info(id).await.backend_info["pid"].parse().unwrap()
    }

    async fn create(&self, id: &str) {
        let req = pb::CreateVmRequest { vm_id: id.into(), config: vm_config(self.image).into(), ..Default::default() };
        self.c.create_vm(req).await.unwrap_or_else(|e| panic!("create {id}: {e:?}"));
        self.c
            .boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("boot {id}: {e:?}"));
    }

    async fn delete(&self, id: &str) {
        self.c
            .delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e:?}"));
    }

    async fn clone_vm(&self, id: &str) {
        let req = pb::CreateVmRequest { vm_id: id.into(), from_snapshot: SNAPSHOT.into(), ..Default::default() };
        let r = self.c.create_vm(req).await.unwrap_or_else(|e| panic!("clone {id}: {e:?}")).into_owned();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "clone {id}");
    }

    /// Cold boot: CreateVm call start, BootVm → READY. The VM stays.
    /// Also the `backend.create` span.
    async fn cold_boot(&self, id: &str) -> (Duration, Duration) {
        spans();
        let t = Instant::now();
        self.create(id).await;
        let took = wait_console(&self.console(id), READY, t, |s| s.lines().any(|l| l.trim() == READY)).await;
        (took, spans().time("backend.create"))
    }

    /// Waits for the next tick on `id`'s console; when it was seen.
    async fn next_tick(&self, id: &str) -> Instant {
        let con = self.console(id);
        let before = tick_count(&console_text(&con));
        wait_console(&con, "a tick", Instant::now(), |s| tick_count(s) > before).await;
        Instant::now()
    }

    /// Waits for the next tick, then `phase`: the moment the bench saves.
    async fn save_point(&self, id: &str) -> Instant {
        let seen = self.next_tick(id).await;
        tokio::time::sleep_until((seen + self.phase).into()).await;
        seen
    }

    /// SuspendVm at the save point, then ResumeVm → the next tick.
    async fn resume_round(&self, id: &str) -> ResumeRound {
        let con = self.console(id);
        let seen = self.save_point(id).await;
        spans();
        let ts = Instant::now();
        let r = self
            .c
            .suspend_vm(pb::SuspendVmRequest { vm_id: id.into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("suspend {id}: {e:?}"))
            .into_owned();
        let suspend = ts.elapsed();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED), "suspend {id}");
        let size = u64::try_from(r.snapshot_size_bytes).unwrap_or(0);
        let save = spans().time("backend.save");
        let before = tick_count(&console_text(&con));
        let t = Instant::now();
        let r = self
            .c
            .resume_vm(pb::ResumeVmRequest { vm_id: id.into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("resume {id}: {e:?}"))
            .into_owned();
        let call = t.elapsed();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "resume {id}");
        let to_tick = wait_console(&con, "a tick after the resume", t, |s| tick_count(s) > before).await;
        let s = spans();
        let (restore, qmp_up) = (s.time("backend.restore"), s.qmp_up());
        ResumeRound { suspend, size, save, to_tick, call, restore, qmp_up, saved_at: ts - seen }
    }

    /// SnapshotVm [`SNAPSHOT`] of `id` at the save point.
    async fn snapshot(&self, id: &str) -> Snap {
        let seen = self.save_point(id).await;
        spans();
        let t = Instant::now();
        let r = self
            .c
            .snapshot_vm(pb::SnapshotVmRequest { vm_id: id.into(), name: SNAPSHOT.into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("snapshot {id}: {e:?}"))
            .into_owned();
        let call = t.elapsed();
        let size = u64::try_from(r.snapshot.as_option().expect("a snapshot").size_bytes).unwrap_or(0);
        let save = spans().time("backend.save");
        Snap { call, size, save, saved_at: t - seen }
    }

    /// CreateVm from [`SNAPSHOT`] → the clone's first tick. The clone stays.
    async fn clone_round(&self, id: &str) -> CloneRound {
        spans();
        let t = Instant::now();
        self.clone_vm(id).await;
        let call = t.elapsed();
        let to_tick = wait_console(&self.console(id), "the clone's first tick", t, |s| tick_count(s) > 0).await;
        let s = spans();
        let (restore, qmp_up) = (s.time("backend.restore"), s.qmp_up());
        CloneRound { to_tick, call, restore, qmp_up }
    }

    /// Waits until every VM of `ids` is idle (READY and [`IDLE_TICKS`]
    /// ticks on its console), then sums their QEMUs' RSS and PSS.
    async fn memory(&self, ids: &[String]) -> Memory {
        let t = Instant::now();
        for id in ids {
            wait_console(&self.console(id), "idle ticks", t, |s| tick_count(s) >= IDLE_TICKS).await;
        }
        let mut pids = Vec::new();
        for id in ids {
            pids.push(self.pid(id).await);
        }
        let mut parts = [[0u64; 2]; 4];
        for p in &pids {
            for (sum, part) in parts.iter_mut().zip(smaps_parts(*p, self.image)) {
                sum[0] += part[0];
                sum[1] += part[1];
            }
        }
        Memory {
            rss_kib: pids.iter().map(|p| rss_kib(*p)).sum(),
            pss_kib: pids.iter().map(|p| pss_kib(*p)).sum(),
            parts,
        }
    }
}

// ------------------------------------------------------------ the report

/// `first line` of `qemu --version`.
fn qemu_version(qemu: &Path) -> String {
    let out = std::process::Command::new(qemu).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).lines().next().unwrap_or("?").to_owned()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':')).map_or("?", |(_, m)| m.trim());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let total = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    format!(
        "{cores} cores ({model}), {:.1} GiB RAM, load average {} at start",
        total as f64 / f64::from(1 << 20),
        load.join(" ")
    )
}

fn p50_f(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) }
}

fn report_a(cold: &[Duration], rounds: &[ResumeRound], period: Duration, create_span: Duration) {
    let cold50 = p50(cold);
    let to_tick: Vec<Duration> = rounds.iter().map(|r| r.to_tick).collect();
    let r50 = p50(&to_tick);
    let calls: Vec<Duration> = rounds.iter().map(|r| r.call).collect();
    let restores: Vec<Duration> = rounds.iter().map(|r| r.restore).collect();
    let qmp_up: Vec<Duration> = rounds.iter().map(|r| r.qmp_up).collect();
    let loads: Vec<Duration> = rounds.iter().map(|r| r.restore.saturating_sub(r.qmp_up)).collect();
    let after: Vec<Duration> = rounds.iter().map(|r| r.to_tick.saturating_sub(r.call)).collect();
    let sleeps: Vec<Duration> = rounds.iter().map(|r| period.saturating_sub(r.saved_at)).collect();
    let saved_at: Vec<Duration> = rounds.iter().map(|r| r.saved_at).collect();
    let mut rest: Vec<f64> =
        rounds.iter().map(|r| ms(r.to_tick) - ms(r.call) - ms(period.saturating_sub(r.saved_at))).collect();
    let mut net: Vec<f64> = rounds.iter().map(|r| ms(r.to_tick) - ms(period.saturating_sub(r.saved_at))).collect();
    println!();
    println!("(a) resume from SUSPENDED: ResumeVm call start -> a new METALD_TICK on the console");
    println!("    cold boot  (CreateVm+BootVm -> READY)   {}", summary(cold));
    println!("    resume     (ResumeVm -> next tick)      {}", summary(&to_tick));
    let ratio = r50.as_secs_f64() / cold50.as_secs_f64();
    println!("    ratio resume/cold: {ratio:.3} (goal <= 0.10) {}", verdict(ratio <= 0.10));
    println!("    where the resume goes (p50s):");
    println!(
        "      ResumeVm call {:.1} ms, of which backend.restore {:.1} ms: QEMU started and serving QMP {:.1} ms",
        ms(p50(&calls)),
        ms(p50(&restores)),
        ms(p50(&qmp_up))
    );
    println!(
        "        (a cold boot's backend.create, the same, takes {:.1} ms), then loading the saved state {:.1} ms",
        ms(create_span),
        ms(p50(&loads))
    );
    println!(
        "      then {:.1} ms to the tick, of which ~{:.1} ms is the guest's own remaining sleep (tick period {:.1} ms,",
        ms(p50(&after)),
        ms(p50(&sleeps)),
        ms(period)
    );
    println!(
        "        suspended {:.1} ms after a tick); the rest, the guest waking and printing: {:+.0} ms",
        ms(p50(&saved_at)),
        p50_f(&mut rest)
    );
    let net50 = p50_f(&mut net);
    println!(
        "      informative: resume -> tick less that remaining sleep ~{net50:.0} ms = {:.3} of the cold boot",
        net50 / ms(cold50)
    );
}

fn report_b(cold: &[Duration], rounds: &[CloneRound], snap: &Snap, period: Duration) {
    let cold50 = p50(cold);
    let to_tick: Vec<Duration> = rounds.iter().map(|r| r.to_tick).collect();
    let calls: Vec<Duration> = rounds.iter().map(|r| r.call).collect();
    let restores: Vec<Duration> = rounds.iter().map(|r| r.restore).collect();
    let qmp_up: Vec<Duration> = rounds.iter().map(|r| r.qmp_up).collect();
    let loads: Vec<Duration> = rounds.iter().map(|r| r.restore.saturating_sub(r.qmp_up)).collect();
    let after: Vec<Duration> = rounds.iter().map(|r| r.to_tick.saturating_sub(r.call)).collect();
    let sleep = period.saturating_sub(snap.saved_at);
    let c50 = p50(&to_tick);
    println!();
    println!("(b) clone: CreateVm(from_snapshot) call start -> the clone's first METALD_TICK");
    println!("    cold boot  (CreateVm+BootVm -> READY)   {}", summary(cold));
    println!("    clone      (CreateVm -> first tick)     {}", summary(&to_tick));
    let ratio = c50.as_secs_f64() / cold50.as_secs_f64();
    println!("    ratio clone/cold: {ratio:.3} (goal <= 0.10) {}", verdict(ratio <= 0.10));
    println!("    where the clone goes (p50s):");
    println!(
        "      CreateVm call {:.1} ms, of which backend.restore {:.1} ms: QEMU started and serving QMP {:.1} ms,",
        ms(p50(&calls)),
        ms(p50(&restores)),
        ms(p50(&qmp_up))
    );
    println!("        then loading the snapshot's memory and devices {:.1} ms", ms(p50(&loads)));
    println!(
        "      then {:.1} ms to the tick, of which ~{:.1} ms is the guest's own remaining sleep (the snapshot was",
        ms(p50(&after)),
        ms(sleep)
    );
    println!(
        "        taken {:.1} ms after a tick; tick period {:.1} ms); the rest: {:+.0} ms",
        ms(snap.saved_at),
        ms(period),
        ms(p50(&after)) - ms(sleep)
    );
    let net = ms(c50) - ms(sleep);
    println!(
        "      informative: clone -> tick less that remaining sleep ~{net:.0} ms = {:.3} of the cold boot",
        net / ms(cold50)
    );
}

fn report_c(n: usize, cold: &Memory, clones: &Memory, source: &Memory, took: (Duration, Duration)) {
    let per = |kib: u64| kib as f64 / 1024.0 / n as f64;
    println!();
    println!(
        "(c) memory of {n} idle VMs (256 MiB each, all {n} running, {IDLE_TICKS} ticks on each console): sum over"
    );
    println!("    their QEMU processes of VmRSS (/proc/<pid>/status) and of Pss (/proc/<pid>/smaps_rollup)");
    println!(
        "    {n} cold-booted: RSS {:8.1} MiB ({:.1} per VM)   PSS {:8.1} MiB ({:.1} per VM)   [all idle {:.1} s after the first CreateVm]",
        cold.rss_kib as f64 / 1024.0,
        per(cold.rss_kib),
        cold.pss_kib as f64 / 1024.0,
        per(cold.pss_kib),
        took.0.as_secs_f64()
    );
    println!(
        "    {n} clones:      RSS {:8.1} MiB ({:.1} per VM)   PSS {:8.1} MiB ({:.1} per VM)   [all idle {:.1} s after the first CreateVm]",
        clones.rss_kib as f64 / 1024.0,
        per(clones.rss_kib),
        clones.pss_kib as f64 / 1024.0,
        per(clones.pss_kib),
        took.1.as_secs_f64()
    );
    println!(
        "    per VM, MiB RSS / PSS, by mapping (/proc/<pid>/smaps; kernel+initrd: QEMU maps -kernel and -initrd):"
    );
    println!("      {:<14}{}", "", PARTS.map(|p| format!("{p:>22}")).concat());
    for (what, m) in [("cold-booted", cold), ("clones", clones)] {
        let cells = m.parts.map(|[r, p]| format!("{:>22}", format!("{:.1} / {:.1}", per(r), per(p))));
        println!("      {what:<14}{}", cells.concat());
    }
    let ratio = clones.rss_kib as f64 / cold.rss_kib as f64;
    println!(
        "    ratio clones/cold on RSS: {ratio:.3} (goal <= 0.5, on RSS as issue 16 states it) {}",
        verdict(ratio <= 0.5)
    );
    println!(
        "    ratio clones/cold on PSS: {:.3} (informative: what the pages really cost, shared ones divided)",
        clones.pss_kib as f64 / cold.pss_kib as f64
    );
    println!(
        "    the snapshot's source (suspended and resumed each round): RSS {:.1} MiB, PSS {:.1} MiB",
        source.rss_kib as f64 / 1024.0,
        source.pss_kib as f64 / 1024.0
    );
}

fn report_d(cold: &[Duration], rounds: &[ResumeRound], snap: &Snap) {
    let suspends: Vec<Duration> = rounds.iter().map(|r| r.suspend).collect();
    let saves: Vec<Duration> = rounds.iter().map(|r| r.save).collect();
    let mut sizes: Vec<u64> = rounds.iter().map(|r| r.size).collect();
    sizes.sort_unstable();
    println!();
    println!("(d) suspend of the 256 MiB guest (no goal set; the cold boot as the reference line)");
    println!("    cold boot  (CreateVm+BootVm -> READY)   {}", summary(cold));
    println!("    SuspendVm call                          {}", summary(&suspends));
    println!("      of which backend.save (QEMU migration to the file) p50 {:.1} ms", ms(p50(&saves)));
    println!(
        "    SuspendVmResponse.snapshot_size_bytes   p50 {:7.1} MiB (min {:.1}, max {:.1}) of 256 MiB guest memory",
        mib(sizes[sizes.len() / 2]),
        mib(sizes[0]),
        mib(sizes[sizes.len() - 1])
    );
    println!(
        "    SnapshotVm call (named snapshot)         {:7.1} ms (backend.save {:.1} ms); Snapshot.size_bytes {:.1} MiB",
        ms(snap.call),
        ms(snap.save),
        mib(snap.size)
    );
    println!("    ratio SuspendVm/cold boot: {:.3}", p50(&suspends).as_secs_f64() / p50(cold).as_secs_f64());
}

// ------------------------------------------------------------ main

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): a short smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    let Some(qemu) = metald::backend::process::resolve_binary("qemu-system-x86_64") else {
        println!("skipped: needs qemu-system-x86_64");
        return;
    };
    if !full {
        println!("smoke run (use `cargo bench --bench snapshot` for the real figures)");
    }
    let rounds: usize = env_or("METALD_BENCH_ROUNDS", if full { 5 } else { 1 }).max(1);
    let n: usize = env_or("METALD_BENCH_CLONES", if full { 10 } else { 2 }).max(1);
    let phase = Duration::from_millis(env_or("METALD_BENCH_PHASE_MS", 50u64).min(90));
    let metald_spans = tracing_subscriber::filter::Targets::new().with_target("metald", tracing::Level::INFO);
    let warnings = tracing_subscriber::filter::Targets::new().with_target("metald", tracing::Level::WARN);
    let _ = tracing_subscriber::registry()
        .with(SpanClock.with_filter(metald_spans))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(false)
                .with_filter(warnings),
        )
        .try_init();
    let image = guest_image();
    let tmp = tempfile::Builder::new().prefix("metald-bench-snap-").tempdir().unwrap();
    // Every QEMU is started with paths under `tmp`: killed however this ends.
    let _qemus = KillOnDrop(tmp.path().to_path_buf());
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
        ("MAX_VMS", (n + 20).to_string()),
        // Metering runs as usual; its batches are logged, not sent to a billing service.
        ("BILLING_MOCK_MODE", "true".to_owned()),
    ]);
    let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    let c = vm_client(&format!("http://{}", daemon.addr), TOKEN, WireProtocol::ConnectProto, Duration::from_secs(300))
        .unwrap();
    let mut b = Bench { c, data, image, phase, period: TICK_PERIOD };

    // The long-lived VM: booted once (warm-up, not counted), the clones'
    // snapshot is of it, and each round suspends and resumes it.
    let (warm, _) = b.cold_boot("src").await;
    let accel = b.info("src").await.backend_info;
    println!("snapshot bench (issue 16): suspend/resume and clones of a real guest through metald in-process");
    println!("  {}, accel {} as metald reports it ({})", qemu_version(&qemu), accel["accel"], accel["accel_reason"]);
    println!("  host: {}; other work on it makes the figures noisy", machine());
    println!("  every VM: 1 vCPU, 256 MiB, vmlinux + initramfs.cpio.gz, {KERNEL_ARGS:?}, no disks, no network;");
    println!("  TCG translation cache: QEMU's default (UNKEY_METALD_QEMU_TB_SIZE_MB unset)");
    println!(
        "  the guest prints {READY} when its userspace is up, then `{TICK_LINE}<n>` every {} ms (a `sleep`",
        TICK_PERIOD.as_millis()
    );
    println!("  loop, metald.tick=); the console file is polled every {} ms", POLL.as_millis());
    println!("  cold boot (the reference of a, b, d): CreateVm call start, then BootVm, until {READY}");
    println!("  rounds: {rounds} (METALD_BENCH_ROUNDS), each a cold boot, a SuspendVm + ResumeVm and a clone; p50s;");
    println!("  saves (SuspendVm, the SnapshotVm of the clones) are issued {} ms after a tick", phase.as_millis());
    println!(
        "  (METALD_BENCH_PHASE_MS): the guest then still has ~a tick period minus that of its sleep ahead when it runs on,"
    );
    println!("  which is inside (a) and (b); it is estimated and shown beside them");
    println!("  warm-up: the long-lived VM's cold boot took {:.1} ms", ms(warm));
    let n_ticks = if full { 8 } else { 3 };
    b.measure_period("src", n_ticks).await;
    println!("  the guest's tick period, over {n_ticks} ticks of the long-lived VM: {:.1} ms", ms(b.period));
    let snap = b.snapshot("src").await;

    let (mut cold, mut create_spans, mut resumes, mut clones) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let id = format!("cold{i}");
        let (took, span) = b.cold_boot(&id).await;
        b.delete(&id).await;
        cold.push(took);
        create_spans.push(span);
        let r = b.resume_round("src").await;
        let id = format!("clone{i}");
        let k = b.clone_round(&id).await;
        b.delete(&id).await;
        eprintln!(
            "  round {}: cold {:7.1} ms | suspend {:6.1} ms ({:.1} MiB) resume->tick {:6.1} ms (call {:.1}, saved {:.0} ms \
             after a tick; load {:.0}) | clone->tick {:6.1} ms (call {:.1}; load {:.0})",
            i + 1,
            ms(took),
            ms(r.suspend),
            mib(r.size),
            ms(r.to_tick),
            ms(r.call),
            ms(r.saved_at),
            ms(r.restore - r.qmp_up),
            ms(k.to_tick),
            ms(k.call),
            ms(k.restore - k.qmp_up)
        );
        resumes.push(r);
        clones.push(k);
    }
    let period = b.period;
    report_a(&cold, &resumes, period, p50(&create_spans));
    report_b(&cold, &clones, &snap, period);

    // (c): N cold-booted VMs, then N clones, each set idle and running at once.
    let ids: Vec<String> = (0..n).map(|i| format!("idle{i:02}")).collect();
    let t = Instant::now();
    for id in &ids {
        b.create(id).await;
    }
    let cold_mem = b.memory(&ids).await;
    let cold_took = t.elapsed();
    for id in &ids {
        b.delete(id).await;
    }
    let twins: Vec<String> = (0..n).map(|i| format!("twin{i:02}")).collect();
    let t = Instant::now();
    for id in &twins {
        b.clone_vm(id).await;
    }
    let clone_mem = b.memory(&twins).await;
    let clone_took = t.elapsed();
    let source = b.memory(&["src".to_owned()]).await;
    for id in &twins {
        b.delete(id).await;
    }
    report_c(n, &cold_mem, &clone_mem, &source, (cold_took, clone_took));
    report_d(&cold, &resumes, &snap);

    b.c.delete_snapshot(pb::DeleteSnapshotRequest { name: SNAPSHOT.into(), ..Default::default() }).await.unwrap();
    b.delete("src").await;
    daemon.shutdown();
    daemon.wait().await.unwrap();
}
