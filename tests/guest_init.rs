//! metald-init (the `init/` crate) in real guests: QEMU microvm under TCG, started directly
//! (not through metald), with the guest image's kernel and initramfs and
//! `rdinit=/metald-init`, a read-only base disk built from busybox-static files with
//! `mkfs.ext4 -d` or `mkfs.erofs`, and a writable ext4 disk holding `metald/config.json`. The
//! workload is a shell script of the base image; everything is read from the serial console
//! (the markers of docs/IMAGES.md, "Guest init") and, after QEMU exited, from the disks with
//! `debugfs`. Every QEMU a test starts is killed when it ends, pass or fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{console_text, guest_image};

/// Upper bound for boot + workload under TCG on a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(90);
const MAC: &str = "52:54:00:12:34:56";

/// The workload: prints what it was given, writes over a file of the base image, and exits
/// with `$EXIT_CODE`; with `wait` as its first argument it waits for SIGTERM instead (its
/// trap prints a marker and exits 3; `ignore` ignores SIGTERM).
const WORKLOAD: &str = r#"#!/bin/sh
if [ "$1" = wait ]; then
  if [ "$2" = ignore ]; then trap '' TERM; else trap 'echo WL_GOT_TERM; exit 3' TERM; fi
  echo WL_WAITING
  while :; do sleep 1 & wait $!; done
fi
for a in "$@"; do echo "WL_ARG [$a]"; done
echo "WL_ID $(id)"
echo "WL_CWD $(pwd)"
env | sort | sed 's/^/WL_ENV /'
echo "WL_HOSTNAME $(hostname)"
ip -o -4 addr show eth0 | awk '{print "WL_IP4", $4}'
ip -o -6 addr show eth0 scope global | awk '{print "WL_IP6", $4}'
ip route | sed -n 's/^default via \([^ ]*\).*/WL_GW4 \1/p'
sed 's/^/WL_DNS /' /etc/resolv.conf
echo written-by-workload > /app/state.txt && echo WL_WROTE
exit "${EXIT_CODE:-0}"
"#;

/// A base filesystem image of the kinds metald-init mounts.
#[derive(Clone, Copy)]
enum Base {
    Ext4,
    Erofs,
}

/// One guest: its files and its QEMU process (killed on drop).
struct Guest {
    dir: tempfile::TempDir,
    qemu: Child,
    started: Instant,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Guest {
    /// Builds both disks and boots.
    fn boot(base: Base, config: &str, net: bool) -> Guest {
        let image = guest_image();
        let dir = tempfile::Builder::new().prefix("metald-guest-init-").tempdir().unwrap();
        let base_path = build_base(dir.path(), base);
        let rw_path = build_rw(dir.path(), config);
        let khz = metald::backend::qemu::accel::host_tsc_khz().expect("host TSC kHz for tsc_early_khz");
        let mut append = format!("console=ttyS0 tsc_early_khz={khz} quiet cryptomgr.notests rdinit=/metald-init");
        if net {
            append.push_str(&format!(" metald.net={MAC},10.0.2.15/24,10.0.2.2,fd00::15/128,fe80::1"));
            append.push_str(" metald.dns=10.0.2.3,fd00::3");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "microvm", "-accel", "tcg,tb-size=64", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", dir.path().join("console.log").display()))
            .arg("-kernel")
            .arg(image.join("vmlinux"))
            .arg("-initrd")
            .arg(image.join("initramfs.cpio.gz"))
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("id=base,file={},format=raw,if=none,readonly=on", base_path.display()))
            .args(["-device", "virtio-blk-device,drive=base"])
            .arg("-drive")
            .arg(format!("id=rw,file={},format=raw,if=none", rw_path.display()))
            .args(["-device", "virtio-blk-device,drive=rw"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.path().join("qmp.sock").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.log")).unwrap());
        if net {
            // Slirp: the guest's packets never leave QEMU (no host interface involved).
            cmd.args(["-netdev", "user,id=n0,restrict=on", "-device"])
                .arg(format!("virtio-net-device,netdev=n0,mac={MAC}"));
        }
        let qemu = cmd.spawn().expect("starting qemu-system-x86_64");
        Guest { dir, qemu, started: Instant::now() }
    }

    fn console(&self) -> String {
        console_text(&self.dir.path().join("console.log"))
    }

    /// Waits for a console line that is exactly `marker`; returns the time since boot.
    fn wait_line(&self, marker: &str) -> Duration {
        while self.started.elapsed() < TIMEOUT {
            if self.console().lines().any(|l| l.trim() == marker) {
                return self.started.elapsed();
            }
            assert!(self.qemu_running(), "QEMU exited before {marker:?}; console:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no {marker:?} within {TIMEOUT:?}; console:\n{}", self.console());
    }

    fn qemu_running(&self) -> bool {
        // `try_wait` needs `&mut`; the pid's /proc entry without a zombie state tells the same.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.qemu.id())).unwrap_or_default();
        !stat.is_empty() && !stat.contains(") Z ")
    }

    /// Waits for QEMU to exit by itself (the guest powered off); returns the console.
    fn wait_exit(&mut self) -> String {
        while self.started.elapsed() < TIMEOUT {
            if let Some(status) = self.qemu.try_wait().unwrap() {
                assert!(status.success(), "QEMU exited with {status}; console:\n{}", self.console());
                return self.console();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("QEMU still running after {TIMEOUT:?}; console:\n{}", self.console());
    }

    /// A QMP command (after the capabilities handshake).
    fn qmp(&self, command: &str) {
        let sock = UnixStream::connect(self.dir.path().join("qmp.sock")).unwrap();
        let mut lines = BufReader::new(sock.try_clone().unwrap()).lines();
        let mut w = sock;
        lines.next().unwrap().unwrap(); // greeting
        for c in ["qmp_capabilities", command] {
            writeln!(w, r#"{{"execute":"{c}"}}"#).unwrap();
            loop {
                let reply = lines.next().unwrap().unwrap();
                assert!(!reply.contains("\"error\""), "{c}: {reply}");
                if reply.contains("\"return\"") {
                    break;
                }
            }
        }
    }

    /// A file's content on one of the (unmounted) disks, read with debugfs; `None` if absent.
    fn disk_file(&self, disk: &str, path: &str) -> Option<String> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(self.dir.path().join(disk))
            .output()
            .expect("running debugfs (e2fsprogs)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("File not found") { None } else { Some(text) }
    }
}

/// The base image: busybox-static and its applets in /bin, passwd/group with a user `app` in
/// groups `app` (primary) and `extra` (supplementary), and /app (owned by app) with the workload
/// and a file it overwrites.
fn build_base(dir: &Path, kind: Base) -> PathBuf {
    let tree = dir.join("base");
    for d in ["bin", "etc", "app", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    let busybox = Path::new("/bin/busybox");
    std::fs::copy(busybox, tree.join("bin/busybox")).expect("busybox-static's /bin/busybox");
    let list = Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n")
        .unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\napp:x:1000:\nextra:x:2000:app\nother:x:3000:root\n").unwrap();
    std::fs::write(tree.join("app/run.sh"), WORKLOAD).unwrap();
    std::fs::write(tree.join("app/state.txt"), "from-base\n").unwrap();
    let chmod = |p: &str, mode: u32| {
        std::fs::set_permissions(tree.join(p), std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    chmod("app/run.sh", 0o755);
    chmod("tmp", 0o1777);
    for p in ["app", "app/run.sh", "app/state.txt"] {
        std::os::unix::fs::chown(tree.join(p), Some(1000), Some(1000)).unwrap();
    }
    match kind {
        Base::Ext4 => mkfs_ext4(&tree, &dir.join("base.img"), 16),
        Base::Erofs => run(Command::new("mkfs.erofs").arg(dir.join("base.img")).arg(&tree)),
    }
    dir.join("base.img")
}

/// The writable disk: an ext4 with `metald/config.json`.
fn build_rw(dir: &Path, config: &str) -> PathBuf {
    let tree = dir.join("rw");
    std::fs::create_dir_all(tree.join("metald")).unwrap();
    std::fs::write(tree.join("metald/config.json"), config).unwrap();
    mkfs_ext4(&tree, &dir.join("rw.img"), 16);
    dir.join("rw.img")
}

fn mkfs_ext4(tree: &Path, img: &Path, mib: u64) {
    std::fs::File::create(img).unwrap().set_len(mib << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(tree).arg(img));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The values of the console lines starting with `prefix ` (the workload's own lines).
fn values(console: &str, prefix: &str) -> Vec<String> {
    let p = format!("{prefix} ");
    console.lines().filter_map(|l| l.trim_end().strip_prefix(&p)).map(str::to_owned).collect()
}

/// Position of the first line that is exactly `line` (panics with the console if none).
fn pos(console: &str, line: &str) -> usize {
    console.lines().position(|l| l.trim() == line).unwrap_or_else(|| panic!("no {line:?} in:\n{console}"))
}

#[test]
fn the_workload_runs_as_the_image_says_and_its_exit_code_ends_the_vm() {
    let config = r#"{"version":1,"entrypoint":["/app/run.sh","from-entrypoint"],"cmd":["c1","c 2"],
        "env":["PATH=/bin","FOO=image","EXIT_CODE=7"],"vm_env":["FOO=vm","BAR=1"],
        "working_dir":"/app","user":"app","hostname":"imgvm","grace_seconds":2}"#;
    let mut g = Guest::boot(Base::Ext4, config, true);
    let to_start = g.wait_line("METALD_WORKLOAD_START");
    let console = g.wait_exit();
    eprintln!("boot to METALD_WORKLOAD_START: {} ms (QEMU spawn to console line)", to_start.as_millis());

    assert_eq!(values(&console, "WL_ARG"), ["[from-entrypoint]", "[c1]", "[c 2]"], "entrypoint + cmd:\n{console}");
    assert_eq!(values(&console, "WL_ID"), ["uid=1000(app) gid=1000(app) groups=2000(extra)"]);
    assert_eq!(values(&console, "WL_CWD"), ["/app"]);
    let env = values(&console, "WL_ENV");
    for want in ["FOO=vm", "BAR=1", "PATH=/bin", "HOME=/home/app", "HOSTNAME=imgvm", "EXIT_CODE=7"] {
        assert!(env.iter().any(|e| e == want), "{want} missing from the workload's env {env:?}");
    }
    assert!(!env.iter().any(|e| e == "FOO=image"), "the VM's env replaces the image's: {env:?}");
    assert_eq!(values(&console, "WL_HOSTNAME"), ["imgvm"]);
    assert_eq!(values(&console, "WL_IP4"), ["10.0.2.15/24"]);
    assert_eq!(values(&console, "WL_IP6"), ["fd00::15/128"]);
    assert_eq!(values(&console, "WL_GW4"), ["10.0.2.2"]);
    assert_eq!(values(&console, "WL_DNS"), ["nameserver 10.0.2.3", "nameserver fd00::3"]);
    assert_eq!(values(&console, "METALD_NET_UP"), ["eth0 10.0.2.15/24 fd00::15/128"]);

    // Markers in order, the workload's output (prefix-free) between start and exit.
    let order = ["METALD_GUEST_ROOT=image base=ext4", "METALD_WORKLOAD_START", "WL_WROTE"];
    let order = order.iter().chain(&["METALD_WORKLOAD_EXIT code=7", "METALD_GUEST_SHUTDOWN_REASON=workload-exit"]);
    let positions: Vec<usize> = order.chain(&["METALD_GUEST_POWEROFF"]).map(|l| pos(&console, l)).collect();
    assert!(positions.is_sorted(), "markers out of order ({positions:?}):\n{console}");

    // The write went to the writable disk's upper directory; the base is untouched.
    assert_eq!(g.disk_file("rw.img", "/root/app/state.txt").as_deref(), Some("written-by-workload\n"));
    assert_eq!(g.disk_file("base.img", "/app/state.txt").as_deref(), Some("from-base\n"));
    assert_eq!(
        g.disk_file("rw.img", "/root/etc/resolv.conf").as_deref(),
        Some("nameserver 10.0.2.3\nnameserver fd00::3\n")
    );
}

#[test]
fn the_power_button_sends_sigterm_to_the_workload_first_then_powers_off() {
    let config = r#"{"version":1,"cmd":["/app/run.sh","wait"],"grace_seconds":30}"#;
    let mut g = Guest::boot(Base::Erofs, config, false);
    g.wait_line("WL_WAITING");
    let pressed = Instant::now();
    g.qmp("system_powerdown");
    let console = g.wait_exit();
    eprintln!("power button to QEMU exit: {} ms", pressed.elapsed().as_millis());
    let order = [
        "METALD_GUEST_ROOT=image base=erofs",
        "WL_WAITING",
        "METALD_GUEST_SHUTDOWN_REASON=power-button",
        "WL_GOT_TERM",
        "METALD_WORKLOAD_EXIT code=3",
        "METALD_GUEST_POWEROFF",
    ];
    let positions: Vec<usize> = order.iter().map(|l| pos(&console, l)).collect();
    assert!(positions.is_sorted(), "markers out of order ({positions:?}):\n{console}");
    assert!(!console.contains("METALD_WORKLOAD_KILL"), "the workload exited within the grace period:\n{console}");
    assert!(pressed.elapsed() < Duration::from_secs(20), "a 30 s grace period was not waited out");
}

#[test]
fn a_workload_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let config = r#"{"version":1,"cmd":["/app/run.sh","wait","ignore"],"grace_seconds":2}"#;
    let mut g = Guest::boot(Base::Ext4, config, false);
    g.wait_line("WL_WAITING");
    let pressed = Instant::now();
    g.qmp("system_powerdown");
    let console = g.wait_exit();
    let took = pressed.elapsed();
    let order = [
        "METALD_GUEST_SHUTDOWN_REASON=power-button",
        "METALD_WORKLOAD_KILL grace_seconds=2",
        "METALD_WORKLOAD_EXIT signal=9",
        "METALD_GUEST_POWEROFF",
    ];
    let positions: Vec<usize> = order.iter().map(|l| pos(&console, l)).collect();
    assert!(positions.is_sorted(), "markers out of order ({positions:?}):\n{console}");
    assert!(took >= Duration::from_secs(2), "killed before the grace period ended ({took:?})");
}

#[test]
fn a_program_that_is_not_there_exits_127_like_docker() {
    let config = r#"{"version":1,"entrypoint":["/app/missing"],"cmd":["x"]}"#;
    let mut g = Guest::boot(Base::Ext4, config, false);
    let console = g.wait_exit();
    let order = ["METALD_WORKLOAD_START", "METALD_WORKLOAD_EXIT code=127", "METALD_GUEST_POWEROFF"];
    let positions: Vec<usize> = order.iter().map(|l| pos(&console, l)).collect();
    assert!(positions.is_sorted(), "markers out of order ({positions:?}):\n{console}");
    assert!(console.contains("METALD_INIT_ERROR cannot execute \"/app/missing\""), "{console}");
}

/// Ctrl-Alt-Del reaches PID 1 as SIGINT (the init turned the kernel's immediate reboot off with
/// `reboot(CAD_OFF)`); QEMU microvm has no i8042 to press it on, so the workload (root) sends
/// PID 1 the same SIGINT the kernel's `kill_cad_pid` would.
#[test]
fn sigint_to_pid_1_like_ctrl_alt_del_stops_the_workload_with_sigterm() {
    let config = r#"{"version":1,"cmd":["/bin/sh","-c",
        "trap 'echo WL_GOT_TERM; exit 5' TERM; echo WL_WAITING; kill -INT 1; while :; do sleep 1 & wait $!; done"],
        "grace_seconds":30}"#;
    let mut g = Guest::boot(Base::Ext4, config, false);
    let console = g.wait_exit();
    let order = [
        "WL_WAITING",
        "METALD_GUEST_SHUTDOWN_REASON=ctrl-alt-del",
        "WL_GOT_TERM",
        "METALD_WORKLOAD_EXIT code=5",
        "METALD_GUEST_POWEROFF",
    ];
    let positions: Vec<usize> = order.iter().map(|l| pos(&console, l)).collect();
    assert!(positions.is_sorted(), "markers out of order ({positions:?}):\n{console}");
    assert!(!console.contains("METALD_WORKLOAD_KILL"), "the workload exited within the grace period:\n{console}");
}

/// A config metald-init refuses (here an unknown field) is reported on the console and the guest
/// powers off instead of hanging or panicking the kernel; nothing runs.
#[test]
fn a_bad_config_is_reported_and_the_guest_powers_off() {
    let config = r#"{"version":1,"cmd":["/app/run.sh"],"entrypont":["/typo"]}"#;
    let mut g = Guest::boot(Base::Ext4, config, false);
    let console = g.wait_exit();
    let error = console.lines().find(|l| l.starts_with("METALD_INIT_ERROR")).unwrap_or_else(|| panic!("{console}"));
    assert!(error.contains("config.json") && error.contains("entrypont"), "{error}");
    let order = ["METALD_GUEST_SHUTDOWN_REASON=init-error", "METALD_GUEST_POWEROFF"];
    let positions: Vec<usize> = order.iter().map(|l| pos(&console, l)).collect();
    assert!(positions.is_sorted(), "markers out of order ({positions:?}):\n{console}");
    assert!(!console.contains("METALD_WORKLOAD_START"), "nothing may run:\n{console}");
}
