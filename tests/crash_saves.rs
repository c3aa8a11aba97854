//! `kill -9` of the real `metald` binary in the middle of suspends and
//! resumes of one real guest (QEMU under TCG, the guest image with an ext4
//! root copy and `metald.tickfile=`: each second the guest prints
//! `METALD_TICK <n>` and appends `n` to `/ticks.log` on its disk).
//!
//! Each iteration starts a suspend (the guest runs) or a resume (it is
//! suspended), kills metald after a random delay of 0 to 1.5 s (0 to 1.25
//! times the longest such call took so far), so before, during or after
//! QEMU's save or load, starts it again and checks the harness' invariants
//! (`tests/support/crash.rs`: no intent, no `suspended.tmp`, no
//! `cont-pending`, a suspended VM's save complete and no process, one
//! recorded QEMU for a running one, no other process in its directory),
//! and that:
//!
//! - the VM is RUNNING or SUSPENDED;
//! - the console's ticks are 1, 2, ..., n: the guest was never lost
//!   (restarted from 1) nor restored twice from one save (a number again);
//! - a RUNNING guest ticks on.
//!
//! Then once a save still being written when metald dies (its `cat`
//! stopped across the restart: the save must be ended, the guest run on,
//! nothing left behind). At the end the guest runs, is shut down, and its
//! disk's `/ticks.log` holds 1, 2, ..., n too. `METALD_CRASH_SEED` replays
//! a run; `METALD_CRASH_ITERATIONS` runs longer; `METALD_CRASH_MAX_KILL_MS`
//! narrows the kill window; `METALD_CRASH_GUEST_MB` sizes the guest (MiB,
//! 128).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use metald::pb::vmprovisioner::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::crash::{Host, Kind, Vms, check_common, ticks, wait_ticks};
use support::guest_image;

const ID: &str = "sleeper";
/// Kills land up to this long after the call starts (a 128 MiB guest
/// saves in well under a second under TCG and loads in about one), and up
/// to 1.25 times the longest the call took uncut once that is known.
const MAX_KILL: Duration = Duration::from_millis(1500);

/// The kill window: [`MAX_KILL`], or `METALD_CRASH_MAX_KILL_MS`.
fn max_kill() -> Duration {
    std::env::var("METALD_CRASH_MAX_KILL_MS").ok().and_then(|s| s.parse().ok()).map_or(MAX_KILL, Duration::from_millis)
}

fn config(disk: &Path) -> pb::VmConfig {
    let mb: i64 = std::env::var("METALD_CRASH_GUEST_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: mb << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: guest_image().join("vmlinux").display().to_string(),
            initrd_path: guest_image().join("initramfs.cpio.gz").display().to_string(),
            kernel_args: "console=ttyS0 quiet metald.root=/dev/vda rw metald.tickfile=/ticks.log".into(),
            ..Default::default()
        }
        .into(),
        storage: vec![pb::StorageDevice {
            id: "root".into(),
            path: disk.display().to_string(),
            is_root_device: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// 1, 2, ..., n with nothing missing or repeated.
fn assert_consecutive(what: &str, v: &[u64]) {
    for (i, t) in v.iter().enumerate() {
        assert_eq!(*t, i as u64 + 1, "{what}: {v:?}");
    }
}

/// `/ticks.log` of an ext4 image, read from the host (the guest is off).
fn disk_ticks(disk: &Path) -> Vec<u64> {
    let out = std::process::Command::new("debugfs").args(["-R", "cat /ticks.log"]).arg(disk).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The VM's state after a restart, with every invariant of the module doc
/// checked (a running guest is waited for to tick on).
async fn check(host: &Host, round: usize) -> pb::VmState {
    let (vms, ctx): (Vms, String) = check_common(host, round).await;
    let state = vms[ID].0;
    assert!(
        matches!(state, pb::VmState::VM_STATE_RUNNING | pb::VmState::VM_STATE_SUSPENDED),
        "the VM is {state:?}: {ctx}"
    );
    let console = host.console(ID);
    let seen = ticks(&console);
    assert_consecutive(&format!("ticks on the console: {ctx}"), &seen);
    if state == pb::VmState::VM_STATE_RUNNING {
        let more = wait_ticks(&console, seen.len()).await;
        assert_consecutive(&format!("ticks on the console after the restart: {ctx}"), &more);
    }
    state
}

/// The pid of the process whose parent's command line holds `needle`.
fn child_of(needle: &str) -> Option<i32> {
    let pids = || {
        std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse().ok())
    };
    let parent: i32 = pids().find(|pid: &i32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(needle)
    })?;
    pids().find(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()) == Some(parent)
    })
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// A save still being written when metald dies: metald is killed, the
/// `cat` QEMU writes the save with (the child of `sh -c 'cat > …/memory.part
/// && mv …'`) is stopped, so the migration stalls, metald starts again, and
/// the `cat` goes on only a second later, once the new metald has found
/// the VM. That restart must end the save: left running, the migration would
/// complete after the guest was run on and QEMU would stop the guest again
/// (the guest then ticks no more), and the `cat` would outlive it.
async fn stalled_save(host: &mut Host) {
    let needle = host.vms_dir().join(ID).join("suspended.tmp").join("memory.part").display().to_string();
    let c = host.client();
    let call = tokio::spawn(async move {
        c.suspend_vm(pb::SuspendVmRequest { vm_id: ID.into(), ..Default::default() }).await.map(|_| ())
    });
    let mut writer = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while writer.is_none() && !call.is_finished() && std::time::Instant::now() < deadline {
        writer = child_of(&needle);
    }
    let writer = writer.expect("the save's cat (the suspend ended before it was seen)");
    // Stopped only once metald is gone: the exit of QEMU's parent orphans
    // QEMU's process group, and the kernel hangs up on an orphaned group
    // that holds a stopped process (the cat would die of it).
    host.kill9();
    signal(writer, nix::sys::signal::Signal::SIGSTOP);
    assert!(call.await.unwrap().is_err(), "the suspend ended before the kill");
    assert!(support::process_alive(writer), "the save ended before the kill");
    host.spawn();
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(writer, nix::sys::signal::Signal::SIGCONT);
    host.wait_up().await;
    // However the save ended, its cat ends with it; the guest must run on
    // after that (the caller's check waits for its next tick).
    support::wait_for("the save's cat to end", Duration::from_secs(30), || !support::process_alive(writer)).await;
    eprintln!("stalled save: cat {writer} stopped across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_suspend_and_resume_of_a_real_guest() {
    let seed: u64 = std::env::var("METALD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let iterations = std::env::var("METALD_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    eprintln!("suspend/resume crash test: seed {seed} (METALD_CRASH_SEED), {iterations} iterations");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut host = Host::new(Kind::Qemu);
    let disk = host.assets().join("sleeper.ext4");
    std::fs::copy(guest_image().join("rootfs.ext4"), &disk).unwrap();
    host.up().await;
    let c = host.client();
    c.create_vm(pb::CreateVmRequest { vm_id: ID.into(), config: config(&disk).into(), ..Default::default() })
        .await
        .unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: ID.into(), ..Default::default() }).await.unwrap();
    wait_ticks(&host.console(ID), 1).await;
    let mut state = pb::VmState::VM_STATE_RUNNING;
    // The longest each operation took when no kill cut it (suspend, resume).
    let mut took: [Option<Duration>; 2] = [None; 2];
    for round in 0..iterations {
        let suspend = state == pb::VmState::VM_STATE_RUNNING;
        let (op, k) = if suspend { ("suspend", 0) } else { ("resume", 1) };
        let c = host.client();
        let mut call = tokio::spawn(async move {
            if suspend {
                c.suspend_vm(pb::SuspendVmRequest { vm_id: ID.into(), ..Default::default() }).await.map(|_| ())
            } else {
                c.resume_vm(pb::ResumeVmRequest { vm_id: ID.into(), ..Default::default() }).await.map(|_| ())
            }
        });
        // Mostly within the call (once its length is known), sometimes after it.
        let window = took[k].map_or(max_kill(), |d| (d * 5 / 4).min(max_kill()));
        let delay = Duration::from_millis(rng.random_range(0..=u64::try_from(window.as_millis()).unwrap()));
        let started = tokio::time::Instant::now();
        let answered = tokio::time::timeout(delay, &mut call).await.ok().map(Result::unwrap);
        if answered.is_some() {
            let d = started.elapsed();
            took[k] = Some(took[k].map_or(d, |t| t.max(d)));
            tokio::time::sleep_until(started + delay).await;
        }
        host.kill9();
        host.up().await;
        state = check(&host, round).await;
        let how = match answered {
            Some(Ok(())) => "done before the kill".to_owned(),
            Some(Err(e)) => format!("failed before the kill: {e:?}"),
            None => "interrupted".to_owned(),
        };
        eprintln!("round {round}: {op}, killed after {delay:?} of {window:?} ({how}); now {state:?}");
    }

    // The guest runs on to the end, and its disk holds every tick.
    let c = host.client();
    if state == pb::VmState::VM_STATE_SUSPENDED {
        let r = c.resume_vm(pb::ResumeVmRequest { vm_id: ID.into(), ..Default::default() }).await.unwrap();
        assert_eq!(r.into_owned().state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    }
    assert_eq!(check(&host, iterations).await, pb::VmState::VM_STATE_RUNNING);
    stalled_save(&mut host).await;
    assert_eq!(check(&host, iterations + 1).await, pb::VmState::VM_STATE_RUNNING);
    let printed = *ticks(&host.console(ID)).last().unwrap();
    let r = c.shutdown_vm(pb::ShutdownVmRequest { vm_id: ID.into(), timeout_seconds: 60, ..Default::default() }).await;
    assert_eq!(r.unwrap().into_owned().state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    let on_disk = disk_ticks(&disk);
    assert_consecutive("ticks on the disk", &on_disk);
    assert!(on_disk.len() as u64 >= printed, "{} ticks on the disk, {printed} printed", on_disk.len());
    eprintln!("{printed} ticks printed, {} on the disk", on_disk.len());
    c.delete_vm(pb::DeleteVmRequest { vm_id: ID.into(), ..Default::default() }).await.unwrap();
    assert!(check_common(&host, iterations + 2).await.0.is_empty());
}
