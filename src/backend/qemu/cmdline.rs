//! The QEMU command line and guest kernel command line for one VM.
//!
//! Pure functions of the spec, the accelerator and the VM's file paths, so
//! they are unit-tested here and the benchmark can start QEMU directly with
//! the very same arguments (they are also written to `<vm dir>/qemu.args`).
//!
//! The shape (QEMU 7.2, `-M microvm`):
//! ```text
//! qemu-system-x86_64 -M microvm,memory-backend=ram -accel tcg[,tb-size=N] | -accel kvm -cpu host
//!   -nodefaults -no-user-config -display none
//!   -object memory-backend-memfd,id=ram,size=<bytes>,share=on     (a restored guest:
//!     memory-backend-file,id=ram,size=<bytes>,mem-path=<saved guest.ram>,share=off)
//!   -m <MiB> -smp <n>[,sockets=..]
//!   -kernel K [-initrd I] -append "<args>"
//!   -chardev file,id=console,path=<dir>/console.log,append=on -serial chardev:console
//!   [-drive id=disk-<id>,file=<path>,format=raw,if=none[,readonly=on]
//!    -device virtio-blk-device,drive=disk-<id>]...   (root device first → /dev/vda)
//!   [-netdev tap,id=net-<id>,ifname=<tap>,script=no,downscript=no,vhost=off
//!    -device virtio-net-device,netdev=net-<id>,mac=<mac>]...   (in order → eth0, eth1, ...)
//!   -device virtio-serial-device,id=vser                      (the generation port, generation.rs)
//!   -chardev socket,id=generation,path=<dir>/generation.sock,server=on,wait=off
//!   -device virtconsole,bus=vser.0,chardev=generation,name=org.metald.generation
//!   -qmp unix:<dir>/qmp.sock,server=on,wait=off -pidfile <dir>/qemu.pid -S
//! ```
//! Neither `-no-reboot` (a guest reset must reboot, not exit) nor
//! `-no-shutdown` (a guest power-off must end the process) is passed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::model::ValidSpec;

/// The accelerator a backend runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg {
        /// TCG translation cache size in MiB; `None` keeps QEMU's default.
        tb_size_mb: Option<u32>,
        /// Host TSC frequency for `tsc_early_khz=`; without it about one
        /// TCG boot in ten hangs calibrating the TSC.
        tsc_khz: Option<u64>,
    },
}

impl Accel {
    pub fn name(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg { .. } => "tcg",
        }
    }
}

/// Files of one VM's QEMU process, all inside the VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// Host side of the guest's generation port (`generation.rs`).
    pub generation_socket: PathBuf,
    pub pidfile: PathBuf,
    pub qemu_log: PathBuf,
    pub args_file: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path) -> VmPaths {
        VmPaths {
            console_log: dir.join("console.log"),
            qmp_socket: dir.join("qmp.sock"),
            generation_socket: dir.join("generation.sock"),
            pidfile: dir.join("qemu.pid"),
            qemu_log: dir.join("qemu.log"),
            args_file: dir.join("qemu.args"),
        }
    }
}

/// QEMU's option syntax doubles commas inside a value.
fn escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The accelerator options (shared with the KVM probe).
pub fn accel_args(accel: &Accel) -> Vec<String> {
    match accel {
        Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
        Accel::Tcg { tb_size_mb: Some(tb), .. } => vec!["-accel".into(), format!("tcg,tb-size={tb}")],
        Accel::Tcg { tb_size_mb: None, .. } => vec!["-accel".into(), "tcg".into()],
    }
}

/// Where a guest's RAM lives (`-object memory-backend-*,id=ram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ram<'a> {
    /// Shared anonymous memory (a memfd): a save copies it out as a file
    /// instead of streaming it (`save.rs`).
    Memfd,
    /// Private anonymous memory: a guest loaded from a stream that holds
    /// its RAM (a save streams it again).
    Anonymous,
    /// A saved RAM image mapped private, copy-on-write: a restored or
    /// cloned guest starts at once, and clones of one snapshot share every
    /// page none of them wrote (the page cache's copy).
    Private(&'a Path),
}

/// The whole QEMU argument list (without the binary), guest RAM in a memfd.
pub fn qemu_args(spec: &ValidSpec, accel: &Accel, paths: &VmPaths) -> Vec<OsString> {
    qemu_args_with(spec, accel, paths, Ram::Memfd)
}

/// [`qemu_args`] with the guest's RAM where `ram` says.
pub fn qemu_args_with(spec: &ValidSpec, accel: &Accel, paths: &VmPaths, ram: Ram<'_>) -> Vec<OsString> {
    let mut a: Vec<String> = vec!["-M".into(), "microvm,memory-backend=ram".into()];
    a.extend(accel_args(accel));
    a.extend(["-nodefaults", "-no-user-config", "-display", "none"].map(String::from));
    let size = spec.memory_bytes();
    a.push("-object".into());
    a.push(match ram {
        Ram::Memfd => format!("memory-backend-memfd,id=ram,size={size},share=on"),
        Ram::Anonymous => format!("memory-backend-ram,id=ram,size={size}"),
        Ram::Private(file) => format!("memory-backend-file,id=ram,size={size},mem-path={},share=off", escape(file)),
    });
    a.push("-m".into());
    a.push((size / (1024 * 1024)).to_string());
    a.push("-smp".into());
    a.push(match spec.cpu.topology {
        Some(t) => format!(
            "{},sockets={},cores={},threads={}",
            spec.vcpus(),
            t.sockets,
            t.cores_per_socket,
            t.threads_per_core
        ),
        None => spec.vcpus().to_string(),
    });
    let mut out: Vec<OsString> = a.into_iter().map(OsString::from).collect();
    out.push("-kernel".into());
    out.push(spec.boot.kernel.clone().into_os_string());
    if let Some(initrd) = &spec.boot.initrd {
        out.push("-initrd".into());
        out.push(initrd.clone().into_os_string());
    }
    out.push("-append".into());
    out.push(kernel_cmdline(spec, accel).into());
    let mut rest: Vec<String> = vec![
        "-chardev".into(),
        format!("file,id=console,path={},append=on", escape(&paths.console_log)),
        "-serial".into(),
        "chardev:console".into(),
    ];
    for disk in ordered_disks(spec) {
        let id = format!("disk-{}", disk.id);
        let ro = if disk.read_only { ",readonly=on" } else { "" };
        rest.push("-drive".into());
        rest.push(format!("id={id},file={},format=raw,if=none{ro}", escape(&disk.path)));
        rest.push("-device".into());
        rest.push(format!("virtio-blk-device,drive={id}"));
    }
    // No /dev/vhost-net on these hosts, and vhost would bypass nothing we
    // filter (the host's nftables sees the TAP either way): vhost=off.
    for nic in &spec.network {
        let id = format!("net-{}", nic.id);
        rest.push("-netdev".into());
        rest.push(format!("tap,id={id},ifname={},script=no,downscript=no,vhost=off", nic.tap));
        rest.push("-device".into());
        rest.push(format!("virtio-net-device,netdev={id},mac={}", nic.mac));
    }
    // The generation port (a clone's fresh randomness, generation.rs), after the disks and NICs
    // so their virtio-mmio slots, and the guest's names for them, stay as they were.
    rest.extend([
        "-device".into(),
        "virtio-serial-device,id=vser".into(),
        "-chardev".into(),
        format!("socket,id=generation,path={},server=on,wait=off", escape(&paths.generation_socket)),
        "-device".into(),
        format!("virtconsole,bus=vser.0,chardev=generation,name={}", super::generation::PORT_NAME),
    ]);
    rest.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", escape(&paths.qmp_socket)),
        "-pidfile".into(),
        paths.pidfile.display().to_string(),
    ]);
    out.extend(rest.into_iter().map(OsString::from));
    out.push("-S".into());
    out
}

/// Disks in device order: the root device first so it is `/dev/vda`.
fn ordered_disks(spec: &ValidSpec) -> impl Iterator<Item = &crate::model::DiskSpec> {
    spec.storage.iter().filter(|d| d.is_root).chain(spec.storage.iter().filter(|d| !d.is_root))
}

/// The guest kernel command line: the user's arguments plus what this
/// backend needs, never repeating a parameter the user already set:
/// `console=ttyS0` (the serial console is the console log),
/// `tsc_early_khz=` under TCG, and `root=/dev/vda rw|ro` when a root device
/// is given (the guest image convention also honours `metald.root=`).
/// Arguments after `--` (for init) stay last.
pub fn kernel_cmdline(spec: &ValidSpec, accel: &Accel) -> String {
    let user: Vec<&str> = spec.boot.kernel_args.split_whitespace().collect();
    let split = user.iter().position(|t| *t == "--").unwrap_or(user.len());
    let (kernel, init) = user.split_at(split);
    let has_key = |key: &str| kernel.iter().any(|t| t.split('=').next() == Some(key));
    let has_flag = |flag: &str| kernel.contains(&flag);
    let mut out: Vec<String> = kernel.iter().map(|s| s.to_string()).collect();
    if !has_key("console") {
        out.push("console=ttyS0".into());
    }
    if let Accel::Tcg { tsc_khz: Some(khz), .. } = accel
        && !has_key("tsc_early_khz")
    {
        out.push(format!("tsc_early_khz={khz}"));
    }
    if let Some(root) = spec.root_disk() {
        if !has_key("root") && !has_key("metald.root") {
            out.push("root=/dev/vda".into());
        }
        if !has_flag("ro") && !has_flag("rw") {
            out.push(if root.read_only { "ro" } else { "rw" }.into());
        }
    }
    out.extend(init.iter().map(|s| s.to_string()));
    out.join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::DiskSpec;
    use crate::model::VmSpec;

    fn spec(args: &str) -> VmSpec {
        let mut s = VmSpec::default();
        s.cpu.vcpus = 2;
        s.memory.size_bytes = 256 * 1024 * 1024;
        s.boot.kernel = "/a/vmlinux".into();
        s.boot.initrd = Some("/a/initramfs.cpio.gz".into());
        s.boot.kernel_args = args.into();
        s
    }

    const TCG: Accel = Accel::Tcg { tb_size_mb: None, tsc_khz: Some(2_596_140) };

    #[test]
    fn adds_console_and_tsc_but_never_twice() {
        assert_eq!(
            kernel_cmdline(&ValidSpec::unchecked(spec("quiet")), &TCG),
            "quiet console=ttyS0 tsc_early_khz=2596140"
        );
        assert_eq!(
            kernel_cmdline(&ValidSpec::unchecked(spec("console=hvc0 tsc_early_khz=1 -- init-arg")), &TCG),
            "console=hvc0 tsc_early_khz=1 -- init-arg"
        );
        assert_eq!(kernel_cmdline(&ValidSpec::unchecked(spec("")), &Accel::Kvm), "console=ttyS0");
        // Init arguments stay behind `--`.
        assert_eq!(kernel_cmdline(&ValidSpec::unchecked(spec("a -- b")), &Accel::Kvm), "a console=ttyS0 -- b");
    }

    #[test]
    fn root_device_is_first_and_named_in_the_cmdline() {
        let mut s = spec("");
        s.storage = vec![
            DiskSpec { id: "data".into(), path: "/a/data.img".into(), ..Default::default() },
            DiskSpec {
                id: "root".into(),
                path: "/a/root,fs.ext4".into(),
                is_root: true,
                read_only: true,
                ..Default::default()
            },
        ];
        assert_eq!(kernel_cmdline(&ValidSpec::unchecked(s.clone()), &Accel::Kvm), "console=ttyS0 root=/dev/vda ro");
        s.boot.kernel_args = "metald.root=/dev/vda rw".into();
        assert_eq!(
            kernel_cmdline(&ValidSpec::unchecked(s.clone()), &Accel::Kvm),
            "metald.root=/dev/vda rw console=ttyS0"
        );

        let args: Vec<String> =
            qemu_args(&ValidSpec::unchecked(s.clone()), &Accel::Kvm, &VmPaths::new(Path::new("/d")))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect();
        let drives: Vec<&String> = args.iter().filter(|a| a.starts_with("id=disk-")).collect();
        assert_eq!(
            drives,
            [
                "id=disk-root,file=/a/root,,fs.ext4,format=raw,if=none,readonly=on",
                "id=disk-data,file=/a/data.img,format=raw,if=none"
            ]
        );
    }

    #[test]
    fn full_command_line() {
        let accel = Accel::Tcg { tb_size_mb: Some(64), tsc_khz: Some(1000) };
        let args: Vec<String> = qemu_args(&ValidSpec::unchecked(spec("quiet")), &accel, &VmPaths::new(Path::new("/d")))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "-M microvm,memory-backend=ram -accel tcg,tb-size=64 -nodefaults -no-user-config -display none \
             -object memory-backend-memfd,id=ram,size=268435456,share=on -m 256 -smp 2 \
             -kernel /a/vmlinux -initrd /a/initramfs.cpio.gz -append quiet console=ttyS0 tsc_early_khz=1000 \
             -chardev file,id=console,path=/d/console.log,append=on -serial chardev:console \
             -device virtio-serial-device,id=vser \
             -chardev socket,id=generation,path=/d/generation.sock,server=on,wait=off \
             -device virtconsole,bus=vser.0,chardev=generation,name=org.metald.generation \
             -qmp unix:/d/qmp.sock,server=on,wait=off -pidfile /d/qemu.pid -S"
        );
        assert!(!args.iter().any(|a| a == "-no-reboot" || a == "-no-shutdown"));
        let restored: Vec<String> = qemu_args_with(
            &ValidSpec::unchecked(spec("quiet")),
            &accel,
            &VmPaths::new(Path::new("/d")),
            Ram::Private(Path::new("/s/a,b/guest.ram")),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        assert!(
            restored
                .contains(&"memory-backend-file,id=ram,size=268435456,mem-path=/s/a,,b/guest.ram,share=off".to_owned()),
            "{restored:?}"
        );
    }
}
