//! The check of a TAP device a VM's spec names, made before a hypervisor
//! opens it. Left to the hypervisors, a name that does not exist is
//! silently created as a new, unconfigured TAP (Firecracker, Cloud
//! Hypervisor and QEMU all open `/dev/net/tun` with `TUNSETIFF`, which
//! creates a missing device), and a TAP another process holds fails with
//! `EBUSY` as an internal error — Firecracker's at create, Cloud
//! Hypervisor's only at boot. So: a missing device or one that is not a
//! TAP is `InvalidArgument`, a busy one `FailedPrecondition`, each naming
//! the device and what to do.
//!
//! "Busy" is read from `/proc`: the kernel shows a TUN/TAP file's device as
//! `iff: <name>` in its `fdinfo`, so the holder is found (and named) without
//! attaching to the device. Hand-written: no crate reads this.

use std::path::Path;

use super::{BackendError, Result};

/// `IFF_TAP` in `tun_flags`.
const IFF_TAP: u32 = 0x0002;

/// Checks the TAP `name` of `config.network[index]`; `own` is a process
/// allowed to hold it (the VM's own VMM, e.g. at a reboot), if any.
pub fn check(index: usize, name: &str, own: Option<u32>) -> Result<()> {
    let field = format!("config.network[{index}].tap_device");
    // This thread's network namespace (sysfs shows the one it was mounted in).
    let here = std::fs::read_to_string("/proc/thread-self/net/dev").map(|dev| has_device(&dev, name));
    let sys = Path::new("/sys/class/net").join(name);
    if here.as_ref().is_ok_and(|h| !h) || (here.is_err() && !sys.exists()) {
        return Err(BackendError::unsupported(format!(
            "{field}: TAP device {name:?} does not exist on this host; create it first \
             (e.g. `ip tuntap add dev {name} mode tap`), or let metald manage the interface"
        )));
    }
    let flags = std::fs::read_to_string(sys.join("tun_flags")).ok().and_then(|f| parse_flags(&f));
    match flags {
        // Not in this sysfs: metald runs in a network namespace sysfs was not
        // mounted for; the kind of the device cannot be read there.
        None if !sys.exists() => {}
        None => {
            return Err(BackendError::unsupported(format!(
                "{field}: {name:?} is a network device but not a TUN/TAP device"
            )));
        }
        Some(f) if f & IFF_TAP == 0 => {
            return Err(BackendError::unsupported(format!("{field}: {name:?} is a TUN device, not a TAP device")));
        }
        Some(_) => {}
    }
    if let Some((pid, comm)) = holder(name).filter(|(pid, _)| Some(*pid) != own) {
        return Err(BackendError::conflict(format!(
            "{field}: TAP device {name:?} is in use by process {pid} ({comm}); a TAP device carries one VM's \
             traffic: stop that process or give this VM another device"
        )));
    }
    Ok(())
}

/// [`check`] of every NIC of `spec` that names its own TAP device (a
/// metald-managed NIC's TAP was just made for this VM by metald).
pub fn check_all(spec: &crate::model::ValidSpec, own: Option<u32>) -> Result<()> {
    spec.network.iter().enumerate().filter(|(_, n)| !n.managed).try_for_each(|(i, n)| check(i, &n.tap, own))
}

/// Whether `/proc/net/dev` text lists device `name`.
fn has_device(dev: &str, name: &str) -> bool {
    dev.lines().skip(2).any(|l| l.split(':').next().is_some_and(|n| n.trim() == name))
}

fn parse_flags(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The process holding TUN/TAP device `name` open, with its command name.
fn holder(name: &str) -> Option<(u32, String)> {
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/net/tun"))
                && std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                    .is_ok_and(|info| holds(&info, name))
            {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some((pid, comm.trim().to_owned()));
            }
        }
    }
    None
}

/// Whether a `/dev/net/tun` file's `fdinfo` names device `name`.
fn holds(fdinfo: &str, name: &str) -> bool {
    fdinfo.lines().any(|l| l.strip_prefix("iff:").is_some_and(|v| v.trim() == name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_and_flags_are_read_as_the_kernel_writes_them() {
        let info = "pos:\t0\nflags:\t02100002\nmnt_id:\t24\nino:\t104\niff:\tmtr1\n";
        assert!(holds(info, "mtr1"));
        assert!(!holds(info, "mtr"), "whole names only");
        assert!(!holds("pos:\t0\n", "mtr1"));
        assert_eq!(parse_flags("0x1802\n"), Some(0x1802));
        assert_eq!(parse_flags("0x1802").map(|f| f & IFF_TAP != 0), Some(true));
        assert_eq!(parse_flags("0x1001").map(|f| f & IFF_TAP != 0), Some(false));
        assert_eq!(parse_flags("junk"), None);
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n mtr1: 0 0 0\n";
        assert!(has_device(dev, "mtr1") && has_device(dev, "lo"));
        assert!(!has_device(dev, "mtr") && !has_device(dev, "face"));
    }

    #[test]
    fn a_missing_device_or_one_that_is_no_tap_is_refused() {
        let e = check(2, "mtr-no-such0", None).unwrap_err();
        assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("config.network[2].tap_device") && msg.contains("does not exist"), "{msg}");
        let e = check(0, "lo", None).unwrap_err().to_string();
        assert!(e.contains("not a TUN/TAP device"), "{e}");
    }
}
