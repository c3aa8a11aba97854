//! Validation: checks a requested [`VmSpec`] against the host's [`Limits`]
//! and confines every host path to the configured asset directories. The
//! result is a [`ValidSpec`] with canonical paths; nothing else makes one.
//! Errors name the field and say what to change.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::invalid::Invalid;
use super::spec::{ValidSpec, VmSpec};

const MIB: i64 = 1024 * 1024;
/// Smallest guest memory we accept: below this no Linux guest boots.
pub const MIN_MEMORY_BYTES: i64 = 16 * MIB;
/// x86_64 COMMAND_LINE_SIZE.
pub const MAX_KERNEL_ARGS_LEN: usize = 2048;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
pub const MAX_OPTION_ENTRIES: usize = 32;

/// Host limits a request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory_mb: u64,
    /// Canonical asset directories; every host path must resolve inside one.
    pub asset_dirs: Vec<PathBuf>,
}

/// Checks `spec` against `limits` and returns it with canonical host paths.
///
/// Errors name the field and say what to change.
pub fn validate(mut spec: VmSpec, limits: &Limits) -> Result<ValidSpec, Invalid> {
    // CPU
    let max_vcpus = i64::from(limits.max_vcpus);
    if spec.cpu.vcpus < 1 || spec.cpu.vcpus > max_vcpus {
        return Err(Invalid::new(
            "config.cpu.vcpu_count",
            format!("is {}, must be between 1 and {max_vcpus}", spec.cpu.vcpus),
        ));
    }
    if spec.cpu.max_vcpus != 0 {
        if spec.cpu.max_vcpus < spec.cpu.vcpus {
            return Err(Invalid::new(
                "config.cpu.max_vcpu_count",
                format!("is {}, must be at least vcpu_count ({}) or 0", spec.cpu.max_vcpus, spec.cpu.vcpus),
            ));
        }
        if spec.cpu.max_vcpus > max_vcpus {
            return Err(Invalid::new(
                "config.cpu.max_vcpu_count",
                format!("is {}, must be at most {max_vcpus}", spec.cpu.max_vcpus),
            ));
        }
    }
    if let Some(t) = spec.cpu.topology {
        let product = t.sockets.saturating_mul(t.cores_per_socket).saturating_mul(t.threads_per_core);
        if t.sockets < 1 || t.cores_per_socket < 1 || t.threads_per_core < 1 {
            return Err(Invalid::new(
                "config.cpu.topology",
                "sockets, cores_per_socket and threads_per_core must all be at least 1",
            ));
        }
        let ceiling = spec.cpu.max_vcpus.max(spec.cpu.vcpus);
        if product != ceiling {
            return Err(Invalid::new(
                "config.cpu.topology",
                format!("describes {product} vCPUs, but the VM has {ceiling}"),
            ));
        }
    }
    check_map("config.cpu.features", &spec.cpu.features, MAX_OPTION_ENTRIES)?;

    // Memory
    let max_mem = i64::try_from(limits.max_memory_mb).unwrap_or(i64::MAX).saturating_mul(MIB);
    let min_mem = MIN_MEMORY_BYTES;
    if spec.memory.size_bytes < min_mem || spec.memory.size_bytes > max_mem {
        return Err(Invalid::new(
            "config.memory.size_bytes",
            format!(
                "is {}, must be between {min_mem} (16 MiB) and {max_mem} ({} MiB)",
                spec.memory.size_bytes, limits.max_memory_mb
            ),
        ));
    }
    if spec.memory.size_bytes % MIB != 0 {
        return Err(Invalid::new(
            "config.memory.size_bytes",
            format!("is {}, must be a whole number of MiB", spec.memory.size_bytes),
        ));
    }
    if spec.memory.hotplug
        && spec.memory.max_size_bytes != 0
        && (spec.memory.max_size_bytes < spec.memory.size_bytes || spec.memory.max_size_bytes > max_mem)
    {
        return Err(Invalid::new(
            "config.memory.max_size_bytes",
            format!("is {}, must be between size_bytes and {max_mem}", spec.memory.max_size_bytes),
        ));
    }
    check_map("config.memory.backing", &spec.memory.backing, MAX_OPTION_ENTRIES)?;

    // Image: the host supplies the kernel (when the request names none)
    // and both disks (docs/IMAGES.md); a local source is a host path.
    if let Some(image) = &mut spec.image {
        image.check()?;
        image.digest.clear();
        if !spec.storage.is_empty() {
            return Err(Invalid::new(
                "config.storage",
                "must be empty with an image: the image's base and the VM's writable disk are its disks",
            ));
        }
        if let Some((scheme, path)) = image.local_path() {
            let real = confine_source("config.image.reference", Path::new(path), limits)?;
            image.reference = match image.reference[scheme.len() + path.len()..].to_string() {
                tag if tag.is_empty() => format!("{scheme}{}", real.display()),
                tag => format!("{scheme}{}{tag}", real.display()),
            };
        }
    }

    // Boot
    if spec.boot.kernel.as_os_str().is_empty() && spec.image.is_none() {
        return Err(Invalid::new("config.boot.kernel_path", "is required (or give an image: config.image)"));
    }
    if !spec.boot.kernel.as_os_str().is_empty() {
        spec.boot.kernel = confine("config.boot.kernel_path", &spec.boot.kernel, limits, false)?;
    } else if spec.boot.initrd.is_some() {
        return Err(Invalid::new(
            "config.boot.initrd_path",
            "needs kernel_path (an image VM's default kernel comes with its initramfs)",
        ));
    }
    if let Some(initrd) = spec.boot.initrd.take() {
        spec.boot.initrd = Some(confine("config.boot.initrd_path", &initrd, limits, false)?);
    }
    if spec.boot.kernel_args.len() > MAX_KERNEL_ARGS_LEN {
        return Err(Invalid::new(
            "config.boot.kernel_args",
            format!("is {} bytes long, at most {MAX_KERNEL_ARGS_LEN} are allowed", spec.boot.kernel_args.len()),
        ));
    }
    if spec.boot.kernel_args.contains(['\n', '\0']) {
        return Err(Invalid::new("config.boot.kernel_args", "must not contain newlines or NUL bytes"));
    }
    check_map("config.boot.boot_options", &spec.boot.options, MAX_OPTION_ENTRIES)?;

    // Storage
    if spec.storage.len() > MAX_DISKS {
        return Err(Invalid::new(
            "config.storage",
            format!("has {} devices, at most {MAX_DISKS} are allowed", spec.storage.len()),
        ));
    }
    let roots = spec.storage.iter().filter(|d| d.is_root).count();
    if roots > 1 {
        return Err(Invalid::new(
            "config.storage",
            format!("marks {roots} devices as is_root_device, at most one may be"),
        ));
    }
    let mut ids = HashSet::new();
    for (i, disk) in spec.storage.iter_mut().enumerate() {
        let field = format!("config.storage[{i}]");
        if disk.id.is_empty() {
            disk.id = format!("disk{i}");
        }
        check_device_id(&format!("{field}.id"), &disk.id)?;
        if !ids.insert(disk.id.clone()) {
            return Err(Invalid::new(format!("{field}.id"), format!("{:?} is used twice", disk.id)));
        }
        if disk.path.as_os_str().is_empty() {
            return Err(Invalid::new(format!("{field}.path"), "is required"));
        }
        disk.path = confine(&format!("{field}.path"), &disk.path, limits, true)?;
        match disk.interface.as_str() {
            "" => disk.interface = "virtio-blk".into(),
            "virtio-blk" => {}
            other => {
                return Err(Invalid::new(
                    format!("{field}.interface_type"),
                    format!("{other:?} is not supported; use \"virtio-blk\""),
                ));
            }
        }
        check_map(&format!("{field}.options"), &disk.options, MAX_OPTION_ENTRIES)?;
    }

    // Network
    if spec.network.len() > MAX_NICS {
        return Err(Invalid::new(
            "config.network",
            format!("has {} interfaces, at most {MAX_NICS} are allowed", spec.network.len()),
        ));
    }
    let mut ids = HashSet::new();
    let mut macs = HashSet::new();
    let mut taps = HashSet::new();
    for (i, nic) in spec.network.iter_mut().enumerate() {
        let field = format!("config.network[{i}]");
        if nic.id.is_empty() {
            nic.id = format!("eth{i}");
        }
        check_device_id(&format!("{field}.id"), &nic.id)?;
        if !ids.insert(nic.id.clone()) {
            return Err(Invalid::new(format!("{field}.id"), format!("{:?} is used twice", nic.id)));
        }
        if !nic.mac.is_empty() && !is_unicast_mac(&nic.mac) {
            // (checked before `check_nic` fills in a missing one)
            return Err(Invalid::new(
                format!("{field}.mac_address"),
                format!("{:?} is not a unicast MAC address like 02:00:00:00:00:01", nic.mac),
            ));
        }
        // Two NICs with one MAC confuse the guest's and the bridge's
        // neighbour tables; two on one TAP device cannot both attach.
        if !nic.mac.is_empty() && !macs.insert(nic.mac.to_ascii_lowercase()) {
            return Err(Invalid::new(
                format!("{field}.mac_address"),
                format!("{:?} is used by another interface of this VM; give each its own", nic.mac),
            ));
        }
        if !nic.tap.is_empty() && !is_valid_ifname(&nic.tap) {
            return Err(Invalid::new(
                format!("{field}.tap_device"),
                format!("{:?} is not a valid interface name (1-15 of letters, digits, '-', '_', '.')", nic.tap),
            ));
        }
        if !nic.tap.is_empty() && !taps.insert(nic.tap.clone()) {
            return Err(Invalid::new(
                format!("{field}.tap_device"),
                format!("{:?} is used by another interface of this VM; give each its own", nic.tap),
            ));
        }
        match nic.interface.as_str() {
            "" => nic.interface = "virtio-net".into(),
            "virtio-net" => {}
            other => {
                return Err(Invalid::new(
                    format!("{field}.interface_type"),
                    format!("{other:?} is not supported; use \"virtio-net\""),
                ));
            }
        }
        for (name, rl) in [("rx_rate_limit", &nic.rx_rate_limit), ("tx_rate_limit", &nic.tx_rate_limit)] {
            if let Some(rl) = rl
                && (rl.bandwidth < 0 || rl.refill_time_ms < 0 || rl.burst < 0)
            {
                return Err(Invalid::new(format!("{field}.{name}"), "values must not be negative"));
            }
        }
        check_map(&format!("{field}.options"), &nic.options, MAX_OPTION_ENTRIES)?;
        super::net::check_nic(&field, nic)?;
    }

    check_map("config.metadata", &spec.metadata, MAX_METADATA_ENTRIES)?;
    Ok(ValidSpec::accepted(spec))
}

fn check_device_id(field: &str, id: &str) -> Result<(), Invalid> {
    if id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Invalid::new(field, format!("{id:?} must be 1-32 of letters, digits, '-' and '_'")));
    }
    Ok(())
}

fn check_map(field: &str, map: &BTreeMap<String, String>, max_entries: usize) -> Result<(), Invalid> {
    if map.len() > max_entries {
        return Err(Invalid::new(field, format!("has {} entries, at most {max_entries} are allowed", map.len())));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(Invalid::new(field, format!("key {k:?} must be 1-{MAX_METADATA_KEY_LEN} bytes")));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(Invalid::new(
                field,
                format!("value of {k:?} is {} bytes, at most {MAX_METADATA_VALUE_LEN} are allowed", v.len()),
            ));
        }
    }
    Ok(())
}

fn is_unicast_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 || !parts.iter().all(|p| p.len() == 2) {
        return false;
    }
    let Ok(bytes) = parts.iter().map(|p| u8::from_str_radix(p, 16)).collect::<Result<Vec<u8>, _>>() else {
        return false;
    };
    bytes[0] & 1 == 0
}

fn is_valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Resolves `path` (following symlinks and `..`) and requires the result to be
/// inside one of the asset directories and to be a regular file (or, for
/// disks, a block device).
pub fn confine(field: &str, path: &Path, limits: &Limits, allow_block: bool) -> Result<PathBuf, Invalid> {
    if !path.is_absolute() {
        return Err(Invalid::new(field, format!("{} is not an absolute path", path.display())));
    }
    let real = std::fs::canonicalize(path)
        .map_err(|e| Invalid::new(field, format!("{} cannot be resolved: {e}", path.display())))?;
    if !limits.asset_dirs.iter().any(|dir| real.starts_with(dir)) {
        let dirs: Vec<String> = limits.asset_dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(Invalid::new(
            field,
            format!(
                "{} resolves to {}, which is outside the asset directories ({}); place the file there or add its directory to UNKEY_METALD_ASSET_DIRS",
                path.display(),
                real.display(),
                dirs.join(":")
            ),
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| Invalid::new(field, format!("{}: {e}", real.display())))?;
    let ft = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(ft.is_file() || (allow_block && ft.is_block_device())) {
        return Err(Invalid::new(
            field,
            format!("{} is not a regular file{}", real.display(), if allow_block { " or block device" } else { "" }),
        ));
    }
    Ok(real)
}

/// [`confine`] for a local image source: a regular file (`docker save`
/// archive) or a directory (OCI layout) inside an asset directory.
fn confine_source(field: &str, path: &Path, limits: &Limits) -> Result<PathBuf, Invalid> {
    if !path.is_absolute() {
        return Err(Invalid::new(field, format!("{} is not an absolute path", path.display())));
    }
    let real = std::fs::canonicalize(path)
        .map_err(|e| Invalid::new(field, format!("{} cannot be resolved: {e}", path.display())))?;
    if !limits.asset_dirs.iter().any(|dir| real.starts_with(dir)) {
        return Err(Invalid::new(
            field,
            format!(
                "{} resolves to {}, which is outside the asset directories; place the image there or add its \
                 directory to UNKEY_METALD_ASSET_DIRS",
                path.display(),
                real.display()
            ),
        ));
    }
    Ok(real)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{BootSpec, CpuSpec, DiskSpec, MemorySpec, NicSpec, VmId};

    struct Fixture {
        _tmp: tempfile::TempDir,
        assets: PathBuf,
        outside: PathBuf,
        limits: Limits,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let assets = tmp.path().join("assets");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(assets.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(assets.join("vmlinux"), b"k").unwrap();
        std::fs::write(assets.join("sub/rootfs.ext4"), b"r").unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        let assets = std::fs::canonicalize(&assets).unwrap();
        let outside = std::fs::canonicalize(&outside).unwrap();
        let limits = Limits { max_vcpus: 32, max_memory_mb: 65536, asset_dirs: vec![assets.clone()] };
        Fixture { _tmp: tmp, assets, outside, limits }
    }

    fn spec(f: &Fixture) -> VmSpec {
        VmSpec {
            cpu: CpuSpec { vcpus: 2, ..Default::default() },
            memory: MemorySpec { size_bytes: 128 * MIB, ..Default::default() },
            boot: BootSpec { kernel: f.assets.join("vmlinux"), ..Default::default() },
            ..Default::default()
        }
    }

    fn field_of(err: Invalid) -> String {
        err.field
    }

    #[test]
    fn a_good_spec_passes_and_defaults_ids() {
        let f = fixture();
        let mut s = spec(&f);
        s.storage.push(DiskSpec { path: f.assets.join("sub/rootfs.ext4"), is_root: true, ..Default::default() });
        s.network.push(NicSpec::default());
        let v = validate(s, &f.limits).unwrap();
        assert_eq!(v.storage[0].id, "disk0");
        assert_eq!(v.storage[0].interface, "virtio-blk");
        assert_eq!(v.network[0].id, "eth0");
    }

    #[test]
    fn cpu_bounds() {
        let f = fixture();
        for (vcpus, ok) in [(0, false), (1, true), (32, true), (33, false), (-1, false)] {
            let mut s = spec(&f);
            s.cpu.vcpus = vcpus;
            let r = validate(s, &f.limits);
            assert_eq!(r.is_ok(), ok, "vcpus={vcpus}");
            if let Err(e) = r {
                assert_eq!(field_of(e), "config.cpu.vcpu_count");
            }
        }
        let mut s = spec(&f);
        s.cpu.max_vcpus = 1;
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.cpu.max_vcpu_count");
        let mut s = spec(&f);
        s.cpu.max_vcpus = 4;
        assert!(validate(s, &f.limits).is_ok());
    }

    #[test]
    fn memory_bounds() {
        let f = fixture();
        let mib = MIB;
        for (bytes, ok) in
            [(15 * mib, false), (16 * mib, true), (65536 * mib, true), (65537 * mib, false), (16 * mib + 1, false)]
        {
            let mut s = spec(&f);
            s.memory.size_bytes = bytes;
            let r = validate(s, &f.limits);
            assert_eq!(r.is_ok(), ok, "bytes={bytes}");
            if let Err(e) = r {
                assert_eq!(field_of(e), "config.memory.size_bytes");
            }
        }
    }

    #[test]
    fn kernel_is_required_and_confined() {
        let f = fixture();
        let mut s = spec(&f);
        s.boot.kernel = PathBuf::new();
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.boot.kernel_path");

        let mut s = spec(&f);
        s.boot.kernel = f.outside.join("secret");
        let e = validate(s, &f.limits).unwrap_err();
        assert!(e.to_string().contains("outside the asset directories"), "{e}");
    }

    #[test]
    fn dot_dot_escapes_are_refused() {
        let f = fixture();
        let mut s = spec(&f);
        s.boot.kernel = f.assets.join("../outside/secret");
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.boot.kernel_path");
        // `..` that stays inside is fine and is canonicalised away.
        let mut s = spec(&f);
        s.boot.kernel = f.assets.join("sub/../vmlinux");
        assert_eq!(validate(s, &f.limits).unwrap().boot.kernel, f.assets.join("vmlinux"));
    }

    #[test]
    fn symlinks_are_followed_before_the_check() {
        let f = fixture();
        let link = f.assets.join("evil");
        std::os::unix::fs::symlink(f.outside.join("secret"), &link).unwrap();
        let mut s = spec(&f);
        s.storage.push(DiskSpec { path: link, ..Default::default() });
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.storage[0].path");

        // A symlink from outside pointing inside is accepted (the target counts).
        let inward = f.outside.join("inward");
        std::os::unix::fs::symlink(f.assets.join("vmlinux"), &inward).unwrap();
        let mut s = spec(&f);
        s.boot.kernel = inward;
        assert_eq!(validate(s, &f.limits).unwrap().boot.kernel, f.assets.join("vmlinux"));
    }

    #[test]
    fn relative_missing_and_directory_paths_are_refused() {
        let f = fixture();
        for p in ["vmlinux".into(), f.assets.join("missing"), f.assets.join("sub")] {
            let mut s = spec(&f);
            s.boot.initrd = Some(p.clone());
            assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.boot.initrd_path", "{p:?}");
        }
    }

    #[test]
    fn prefix_sibling_directory_is_not_inside() {
        // /x/assets2 must not count as inside /x/assets.
        let f = fixture();
        let sibling = f.assets.with_file_name("assets2");
        std::fs::create_dir_all(&sibling).unwrap();
        std::fs::write(sibling.join("k"), b"k").unwrap();
        let mut s = spec(&f);
        s.boot.kernel = sibling.join("k");
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.boot.kernel_path");
    }

    #[test]
    fn at_most_one_root_device_and_unique_ids() {
        let f = fixture();
        let disk = DiskSpec { path: f.assets.join("sub/rootfs.ext4"), is_root: true, ..Default::default() };
        let mut s = spec(&f);
        s.storage = vec![disk.clone(), disk.clone()];
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.storage");
        let mut s = spec(&f);
        let mut a = disk.clone();
        a.id = "x".into();
        a.is_root = false;
        s.storage = vec![a.clone(), a];
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.storage[1].id");
    }

    #[test]
    fn nic_fields_are_checked() {
        let f = fixture();
        let mut s = spec(&f);
        s.network.push(NicSpec { mac: "01:00:00:00:00:01".into(), ..Default::default() });
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.network[0].mac_address");
        let mut s = spec(&f);
        s.network.push(NicSpec { tap: "a-name-that-is-too-long".into(), ..Default::default() });
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.network[0].tap_device");
        let mut s = spec(&f);
        s.network.push(NicSpec { mac: "02:aa:bb:cc:dd:ee".into(), tap: "tap0".into(), ..Default::default() });
        assert!(validate(s, &f.limits).is_ok());
    }

    #[test]
    fn two_nics_may_not_share_a_mac_or_a_device() {
        let f = fixture();
        let nic = |mac: &str, tap: &str| NicSpec { mac: mac.into(), tap: tap.into(), ..Default::default() };
        let mut s = spec(&f);
        s.network = vec![nic("02:aa:bb:cc:dd:ee", "tap0"), nic("02:AA:BB:CC:DD:EE", "tap1")];
        let e = validate(s, &f.limits).unwrap_err();
        assert_eq!(e.field, "config.network[1].mac_address");
        assert!(e.reason.contains("another interface"), "{e}");
        let mut s = spec(&f);
        s.network = vec![nic("02:aa:bb:cc:dd:01", "tap0"), nic("02:aa:bb:cc:dd:02", "tap0")];
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.network[1].tap_device");
        // Unset MACs and devices (chosen by the host) do not collide.
        let mut s = spec(&f);
        s.network = vec![nic("", ""), nic("", ""), nic("02:aa:bb:cc:dd:01", "tap0"), nic("02:aa:bb:cc:dd:02", "tap1")];
        assert!(validate(s, &f.limits).is_ok());
    }

    #[test]
    fn vm_ids() {
        for ok in ["a", "vm-1", "0", &"a".repeat(63)] {
            assert!(VmId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "vm_1", "vm 1", "vm/1", "é", &"a".repeat(64)] {
            let e = VmId::parse(bad).unwrap_err();
            assert_eq!(e.field, "vm_id", "{bad}");
        }
        let g = VmId::generate();
        assert!(VmId::parse(g.as_str()).is_ok());
        assert_ne!(g, VmId::generate());
    }

    #[test]
    fn kernel_args_and_metadata_limits() {
        let f = fixture();
        let mut s = spec(&f);
        s.boot.kernel_args = "x".repeat(MAX_KERNEL_ARGS_LEN + 1);
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.boot.kernel_args");
        let mut s = spec(&f);
        for i in 0..=MAX_METADATA_ENTRIES {
            s.metadata.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(field_of(validate(s, &f.limits).unwrap_err()), "config.metadata");
    }
}
