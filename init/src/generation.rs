//! Fresh randomness for a guest started from a snapshot (docs/SNAPSHOTS.md, "Fresh
//! randomness"). Every clone of a snapshot wakes with the same kernel random-number state, so
//! two clones would make the same keys, nonces and TCP sequence numbers until the kernel next
//! reseeds (up to a minute later). Where the hypervisor has no VM generation ID device the guest
//! kernel acts on (QEMU microvm; Debian's cloud kernel has no vmgenid driver at all), metald
//! gives each clone a new generation on the virtio console port named [`PORT_NAME`] (QEMU), or
//! on the VM's one virtio console when the kernel command line says [`CMDLINE_FLAG`] (Cloud
//! Hypervisor, whose console cannot be named; metald writes through its pty): one line
//! `METALD_GENERATION <64 hex digits>`, 32 bytes from the host's CSPRNG, written before the
//! clone's vCPUs run. The watcher here mixes them into the kernel's pool (`RNDADDENTROPY`),
//! forces the kernel's generator to reseed from it (`RNDRESEEDCRNG`), prints `METALD_RESEED
//! <16 hex digits of the generator's next output>` on the console and answers `ok` on the port.
//!
//! It runs as a thread of metald-init (image guests) or as `metald-init generation` (the test
//! guest's busybox init). The two ioctls are hand-written: no crate wraps them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::console::marker;

/// The name metald gives the generation port (QEMU `virtconsole,name=...`).
pub const PORT_NAME: &str = "org.metald.generation";
/// The kernel command line's word for "the virtio console `hvc0` is metald's".
pub const CMDLINE_FLAG: &str = "metald.generation=hvc0";
/// How long the watcher waits for the port to appear after the module loads.
pub const PORT_WAIT: Duration = Duration::from_secs(30);
const LINE_PREFIX: &str = "METALD_GENERATION ";
/// `_IOW('R', 0x03, int[2])`, linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`, linux/random.h (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The seed of a `METALD_GENERATION` line, if `line` is one.
pub fn parse(line: &str) -> Option<[u8; 32]> {
    let hex = line.trim_end_matches(['\r', '\n']).strip_prefix(LINE_PREFIX)?;
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(seed)
}

/// Whether `sys` (normally `/sys`) shows a virtio console port named [`PORT_NAME`].
pub fn has_port(sys: &Path) -> bool {
    let Ok(entries) = fs::read_dir(sys.join("class/virtio-ports")) else {
        return false;
    };
    entries.flatten().any(|e| fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME))
}

/// Whether the VM has a generation console: a port named [`PORT_NAME`] under `sys`, or
/// [`CMDLINE_FLAG`] on the kernel command line `cmdline`.
pub fn has_channel(sys: &Path, cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == CMDLINE_FLAG) || has_port(sys)
}

/// The port's tty: a console port is read through `/dev/hvcN`, and metald's is the VM's only
/// virtio console, so `hvc0`.
pub fn port_tty() -> PathBuf {
    PathBuf::from("/dev/hvc0")
}

/// Mixes `seed` into the kernel's input pool, credited as 256 bits, and makes the generator
/// reseed from the pool now.
#[allow(unsafe_code)] // two ioctls on /dev/urandom: the one way the kernel takes them (SAFETY below)
pub fn reseed(seed: &[u8; 32]) -> io::Result<()> {
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 32],
    }
    let info = PoolInfo { entropy_count: 256, buf_size: 32, buf: *seed };
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` (two ints, then `buf_size` bytes)
    // from the pointer; `info` is that layout, alive for the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info as *const PoolInfo) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sample() -> String {
    let mut b = [0u8; 8];
    let _ = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Turns echo off on the port's tty, so what metald writes is not sent back to it.
fn quiet(tty: &File) {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    if let Ok(mut t) = tcgetattr(tty) {
        t.local_flags.remove(LocalFlags::ECHO | LocalFlags::ECHONL);
        let _ = tcsetattr(tty, SetArg::TCSANOW, &t);
    }
}

/// Waits for the port (up to [`PORT_WAIT`]; the virtio console module announces its ports
/// after it loads), then answers generations forever. `Ok(false)`: the VM has no such port.
pub fn watch(sys: &Path) -> io::Result<bool> {
    let start = Instant::now();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    while !has_channel(sys, &cmdline) || !port_tty().exists() {
        if start.elapsed() > PORT_WAIT {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tty = OpenOptions::new().read(true).write(true).open(port_tty())?;
    quiet(&tty);
    let mut lines = BufReader::new(tty.try_clone()?);
    let mut answer = tty;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            // A hang-up: nothing to read until metald connects again.
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let Some(seed) = parse(&line) else { continue };
        match reseed(&seed) {
            Ok(()) => {
                marker(&format!("METALD_RESEED {}", sample()));
                let _ = answer.write_all(b"ok\n");
            }
            Err(e) => {
                marker(&format!("METALD_RESEED_FAILED {e}"));
                let _ = answer.write_all(format!("error {e}\n").as_bytes());
            }
        }
    }
}

/// [`watch`] on its own thread (metald-init as PID 1).
pub fn spawn() {
    let _ = std::thread::Builder::new().name("generation".into()).spawn(|| {
        if let Err(e) = watch(Path::new("/sys")) {
            marker(&format!("METALD_RESEED_FAILED {e}"));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_whole_generation_lines() {
        let hex = "00ff".repeat(16);
        let seed = parse(&format!("METALD_GENERATION {hex}\n")).unwrap();
        assert_eq!(seed[0], 0x00);
        assert_eq!(seed[1], 0xff);
        assert_eq!(seed[31], 0xff);
        assert!(parse(&format!("METALD_GENERATION {hex}\r\n")).is_some());
        assert!(parse(&format!("METALD_GENERATION {}", &hex[..62])).is_none(), "short");
        assert!(parse(&format!("METALD_GENERATION {hex}00")).is_none(), "long");
        assert!(parse(&format!("METALD_GENERATION {}zz", &hex[..62])).is_none(), "not hex");
        assert!(parse(&format!("METALD_GENERATION +f{}", &hex[2..])).is_none(), "a sign is not a digit");
        assert!(parse(&format!("metald_generation {hex}")).is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn finds_the_port_by_name() {
        let sys = tempfile::tempdir().unwrap();
        assert!(!has_port(sys.path()));
        let other = sys.path().join("class/virtio-ports/vport0p1");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("name"), "org.qemu.guest_agent.0\n").unwrap();
        assert!(!has_port(sys.path()));
        let ours = sys.path().join("class/virtio-ports/vport0p0");
        fs::create_dir_all(&ours).unwrap();
        fs::write(ours.join("name"), format!("{PORT_NAME}\n")).unwrap();
        assert!(has_port(sys.path()));
    }

    #[test]
    fn the_command_line_can_name_the_console() {
        let sys = tempfile::tempdir().unwrap();
        assert!(!has_channel(sys.path(), "console=ttyS0 quiet"));
        assert!(!has_channel(sys.path(), "console=ttyS0 metald.generation=hvc1"));
        assert!(has_channel(sys.path(), "console=ttyS0 metald.generation=hvc0 quiet"));
    }
}
