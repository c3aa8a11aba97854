//! metald-init: PID 1 of a metald guest that runs a container image (docs/IMAGES.md, "Guest
//! init"). The kernel starts it with `rdinit=/metald-init`; it mounts the image's read-only base
//! (disk 1) and the VM's writable disk (disk 2) as an overlay root, applies the network from the
//! kernel command line, reads the workload from `<writable disk>/metald/config.json`, runs it as
//! the image's user with its environment and working directory, forwards stop requests, reaps
//! zombies and powers off when the workload exits, printing `METALD_WORKLOAD_EXIT ...` for metald.
//!
//! | module      | owns                                                                  |
//! |-------------|-----------------------------------------------------------------------|
//! | `config`    | `config.json`: schema, validation, Docker's argv and env rules         |
//! | `user`      | the image's `User` against its `/etc/passwd` and `/etc/group`         |
//! | `cmdline`   | the kernel command line and its network plan                          |
//! | `boot`      | mounts, modules, disks, overlay, switch root                          |
//! | `net`       | applying the network plan (busybox `ip` from the initramfs)            |
//! | `supervise` | the workload process, signals, power button, reaping, power-off       |
//! | `console`   | the marker lines                                                      |
//! | `generation`| a clone's new generation: reseeding the kernel's random generator      |
//!
//! The first three are pure and unit-tested; the rest is exercised by the QEMU tests
//! (`tests/guest_init.rs` of the metald package; `generation` by `tests/snapshot_e2e.rs`).

pub mod boot;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod generation;
pub mod net;
pub mod supervise;
pub mod user;

use std::convert::Infallible;
use std::fs;
use std::path::Path;
use std::time::Duration;

use boot::BootError;
use cmdline::Cmdline;
use console::marker;
use supervise::{Shutdown, Start};

/// Default base image device (the first virtio-blk disk).
pub const BASE_DEV: &str = "/dev/vda";
/// Default writable disk (the second virtio-blk disk).
pub const RW_DEV: &str = "/dev/vdb";
/// The workload configuration, relative to the writable disk's root.
pub const CONFIG_PATH: &str = "metald/config.json";
/// How long the disks may take to appear.
const DISK_TIMEOUT: Duration = Duration::from_secs(10);

fn err(what: &str) -> impl FnOnce(String) -> BootError + '_ {
    move |e| BootError(format!("{what}: {e}"))
}

/// Everything from the first instruction to the workload's supervision; returns only with the
/// error that stopped it (the caller reports it and powers off).
pub fn run() -> Result<Infallible, BootError> {
    let signals = supervise::signal_fd().map_err(|e| err("signalfd")(e.to_string()))?;
    boot::early_mounts()?;
    // Ctrl-Alt-Del becomes SIGINT to PID 1 instead of an immediate reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let cmdline =
        Cmdline::parse(&fs::read_to_string("/proc/cmdline").map_err(|e| err("/proc/cmdline")(e.to_string()))?);
    boot::load_modules("/etc/metald/modules")?;
    generation::spawn();
    let mut buttons = supervise::power_buttons();
    let plan = cmdline.net_plan().map_err(|e| BootError(e.to_string()))?;
    net::apply(&plan);
    let base_dev = cmdline.get("metald.base").unwrap_or(BASE_DEV);
    let rw_dev = cmdline.get("metald.rw").unwrap_or(RW_DEV);
    boot::wait_for(base_dev, DISK_TIMEOUT)?;
    boot::wait_for(rw_dev, DISK_TIMEOUT)?;
    let fstype = boot::mount_base(base_dev)?;
    let rw_disk = boot::mount_overlay(rw_dev)?;
    let config_file = Path::new(boot::RW_MNT).join(CONFIG_PATH);
    let json = fs::read(&config_file)
        .map_err(|e| err("reading the workload config")(format!("{}: {e}", config_file.display())))?;
    let workload = config::parse(&json).map_err(|e| BootError(e.to_string()))?;
    boot::switch_root()?;
    boot::late_mounts()?;
    marker(&format!("METALD_GUEST_ROOT=image base={fstype}"));

    nix::unistd::sethostname(&workload.hostname).map_err(|e| err("sethostname")(e.to_string()))?;
    let own_addr = plan.nics.iter().find_map(|n| n.v4).map_or("127.0.1.1".to_owned(), |a| a.addr.to_string());
    let etc = [
        ("hostname", format!("{}\n", workload.hostname)),
        ("hosts", hosts(&workload.hostname, &own_addr)),
        ("resolv.conf", net::resolv_conf(&plan).unwrap_or_default()),
    ];
    for (name, content) in etc {
        if name == "resolv.conf" && plan.dns.is_empty() {
            continue; // the image's own, if any
        }
        boot::write_etc(name, &content).map_err(|e| err("writing /etc")(format!("{name}: {e}")))?;
    }

    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let id = user::resolve(&workload.user, &passwd, &group).map_err(|e| BootError(e.to_string()))?;
    let env = config::finish_env(workload.env.clone(), &workload.hostname, &id.home);
    let off = Shutdown { rw_disk: Some(rw_disk) };
    marker("METALD_WORKLOAD_START");
    let start = Start { argv: &workload.argv, env: &env, working_dir: &workload.working_dir, id: &id };
    match supervise::spawn(&start) {
        Ok(pid) => supervise::supervise(pid, workload.grace, &signals, &mut buttons, off),
        Err(e) => {
            marker(&format!("METALD_INIT_ERROR cannot execute {:?}: {e}", workload.argv[0]));
            marker(&format!("METALD_WORKLOAD_EXIT code={}", supervise::exec_error_code(&e)));
            marker("METALD_GUEST_SHUTDOWN_REASON=workload-exit");
            supervise::power_off(off)
        }
    }
}

/// `/etc/hosts` as Docker writes it: localhost, and the hostname on the guest's address.
fn hosts(hostname: &str, addr: &str) -> String {
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{hostname}\n")
}
