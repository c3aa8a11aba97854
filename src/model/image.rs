//! Container-image VMs in the shared vocabulary: what a request asks for
//! ([`ImageSpec`], with registry credentials that are never stored, returned
//! or printed: [`RegistryAuth`]), what the host prepared for it
//! ([`PreparedImage`]), the guest init's `metald/config.json` built from
//! both by Docker's rules ([`InitConfig`], the contract in docs/IMAGES.md
//! "Guest init"), and the workload's exit as read back from the console log
//! ([`WorkloadExit`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::invalid::Invalid;

/// Longest image reference accepted (registry, repository, tag and digest).
pub const MAX_REFERENCE_LEN: usize = 512;
/// Most per-VM environment variables.
pub const MAX_ENV_ENTRIES: usize = 256;
/// Longest environment variable (key plus value).
pub const MAX_ENV_LEN: usize = 32 * 1024;
/// Most words in an entrypoint or command override.
pub const MAX_ARGV: usize = 256;
/// Longest credential part (user name, password or token).
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// The container image a VM runs, as requested (`VmConfig.image`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ImageSpec {
    /// `registry/repository[:tag][@sha256:…]`, or `oci-layout:<dir>[:tag]` /
    /// `docker-archive:<file>` inside an asset directory.
    pub reference: String,
    /// The VM's own environment, over the image's `Env`.
    pub env: BTreeMap<String, String>,
    /// Replaces the image's `Entrypoint` (and then its `Cmd`, as Docker).
    pub entrypoint: Vec<String>,
    /// Replaces the image's `Cmd`.
    pub cmd: Vec<String>,
    /// The manifest digest the reference resolved to at create (empty in a
    /// request).
    pub digest: String,
    /// Registry credentials of this request: used for the pull, never
    /// stored (skipped by serde), never returned, redacted in `Debug`.
    #[serde(skip)]
    pub credentials: Option<RegistryAuth>,
}

/// User name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryAuth(redacted)")
    }
}

impl ImageSpec {
    /// Checks the request's image fields; errors name the field.
    pub fn check(&self) -> Result<(), Invalid> {
        let r = &self.reference;
        if r.is_empty() {
            return Err(Invalid::new("config.image.reference", "is required with an image"));
        }
        if r.len() > MAX_REFERENCE_LEN {
            return Err(Invalid::new(
                "config.image.reference",
                format!("is {} bytes long, at most {MAX_REFERENCE_LEN} are allowed", r.len()),
            ));
        }
        if r.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Invalid::new("config.image.reference", "must not contain spaces or control characters"));
        }
        if self.env.len() > MAX_ENV_ENTRIES {
            return Err(Invalid::new(
                "config.image.env",
                format!("has {} entries, at most {MAX_ENV_ENTRIES} are allowed", self.env.len()),
            ));
        }
        for (k, v) in &self.env {
            let name_ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
            if !name_ok {
                return Err(Invalid::new(
                    "config.image.env",
                    format!("key {k:?} is not a variable name (letters, digits, _ . -; not starting with a digit)"),
                ));
            }
            if k.len() + v.len() > MAX_ENV_LEN || v.contains('\0') {
                return Err(Invalid::new(
                    "config.image.env",
                    format!("value of {k} is longer than {MAX_ENV_LEN} bytes or contains NUL"),
                ));
            }
        }
        for (field, argv) in [("config.image.entrypoint", &self.entrypoint), ("config.image.cmd", &self.cmd)] {
            if argv.len() > MAX_ARGV || argv.iter().any(|a| a.len() > MAX_ENV_LEN || a.contains('\0')) {
                return Err(Invalid::new(
                    field,
                    format!("must have at most {MAX_ARGV} words of at most {MAX_ENV_LEN} bytes, without NUL"),
                ));
            }
        }
        if let Some(c) = &self.credentials
            && (c.username.is_empty() || c.username.len() > MAX_CREDENTIAL_LEN || c.password.len() > MAX_CREDENTIAL_LEN)
        {
            return Err(Invalid::new(
                "config.image.credentials",
                format!("needs a user name; each part at most {MAX_CREDENTIAL_LEN} bytes"),
            ));
        }
        Ok(())
    }

    /// A local source (`oci-layout:` / `docker-archive:`): its host path,
    /// which validation confines to the asset directories.
    pub fn local_path(&self) -> Option<(&'static str, &str)> {
        for scheme in ["oci-layout:", "docker-archive:"] {
            if let Some(rest) = self.reference.strip_prefix(scheme) {
                // `oci-layout:<dir>:<tag>`: the tag follows the last ':' after the last '/'.
                let path = match (scheme, rest.rfind(':')) {
                    ("oci-layout:", Some(i)) if !rest[i..].contains('/') => &rest[..i],
                    _ => rest,
                };
                return Some((scheme, path));
            }
        }
        None
    }
}

/// What the host prepared for an image: the shared read-only base and the
/// image's run configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedImage {
    /// The manifest digest, `sha256:…`.
    pub digest: String,
    /// The read-only base filesystem (one per digest, shared).
    pub base: PathBuf,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` each.
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// The kernel and initramfs (with metald-init) image VMs boot by default
/// (`UNKEY_METALD_GUEST_KERNEL`, `UNKEY_METALD_GUEST_INITRD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Id of an image VM's first disk: the image's read-only base.
pub const BASE_DISK_ID: &str = "image";
/// Id of an image VM's second disk: its own writable layer.
pub const WRITABLE_DISK_ID: &str = "writable";

/// Schema version of [`InitConfig`] metald-init accepts.
pub const INIT_CONFIG_VERSION: u32 = 1;

/// `metald/config.json` on the VM's writable disk (docs/IMAGES.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InitConfig {
    pub version: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vm_env: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    pub hostname: String,
    pub grace_seconds: u64,
}

impl InitConfig {
    /// The guest's configuration from the image and the request, by
    /// Docker's rules: an entrypoint override drops the image's `Cmd`
    /// (unless the request gives one); the VM's environment goes in
    /// `vm_env`, which metald-init lays over the image's.
    pub fn new(spec: &ImageSpec, image: &PreparedImage, hostname: &str, grace_seconds: u64) -> InitConfig {
        let (entrypoint, cmd) = match (spec.entrypoint.is_empty(), spec.cmd.is_empty()) {
            (true, true) => (image.entrypoint.clone(), image.cmd.clone()),
            (true, false) => (image.entrypoint.clone(), spec.cmd.clone()),
            (false, _) => (spec.entrypoint.clone(), spec.cmd.clone()),
        };
        InitConfig {
            version: INIT_CONFIG_VERSION,
            entrypoint,
            cmd,
            env: image.env.clone(),
            vm_env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            working_dir: image.working_dir.clone(),
            user: image.user.clone(),
            hostname: hostname_of(hostname),
            grace_seconds,
        }
    }
}

/// A host name metald-init accepts (1–64 of `[A-Za-z0-9.-]`) from a VM name.
fn hostname_of(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
        .take(64)
        .collect();
    if h.is_empty() { "localhost".into() } else { h }
}

/// How an image VM's workload ended, from metald-init's console markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadExit {
    /// It exited with this status (126/127: it could not be executed).
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl WorkloadExit {
    /// The last run's exit in a console log (its end is enough): the last
    /// `METALD_WORKLOAD_EXIT` line, unless a `METALD_WORKLOAD_START` came
    /// after it (the workload runs again, or was stopped without one).
    pub fn from_console(log: &[u8]) -> Option<WorkloadExit> {
        let text = String::from_utf8_lossy(log);
        let mut exit = None;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line == "METALD_WORKLOAD_START" {
                exit = None;
            } else if let Some(rest) = line.strip_prefix("METALD_WORKLOAD_EXIT ") {
                exit = if let Some(n) = rest.strip_prefix("code=") {
                    n.parse().ok().map(WorkloadExit::Code)
                } else {
                    rest.strip_prefix("signal=").and_then(|n| n.parse().ok()).map(WorkloadExit::Signal)
                };
            }
        }
        exit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ValidSpec, VmSpec};

    fn image() -> PreparedImage {
        PreparedImage {
            digest: "sha256:ab".into(),
            base: "/b".into(),
            entrypoint: vec!["/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into()],
            working_dir: "/w".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn init_config_follows_dockers_override_rules() {
        let spec = ImageSpec { reference: "r".into(), ..Default::default() };
        let c = InitConfig::new(&spec, &image(), "vm_1", 10);
        assert_eq!((c.entrypoint.clone(), c.cmd.clone()), (vec!["/app".into()], vec!["--serve".into()]));
        assert_eq!(c.hostname, "vm-1");
        let cmd = ImageSpec { cmd: vec!["--other".into()], ..spec.clone() };
        assert_eq!(InitConfig::new(&cmd, &image(), "h", 10).entrypoint, vec!["/app".to_string()]);
        assert_eq!(InitConfig::new(&cmd, &image(), "h", 10).cmd, vec!["--other".to_string()]);
        let ep = ImageSpec { entrypoint: vec!["/bin/sh".into()], ..spec.clone() };
        let c = InitConfig::new(&ep, &image(), "h", 10);
        assert_eq!((c.entrypoint, c.cmd), (vec!["/bin/sh".to_string()], vec![]), "the image's Cmd is dropped");
        let env = ImageSpec { env: [("A".into(), "1".into())].into(), ..spec };
        let c = InitConfig::new(&env, &image(), "h", 3);
        assert_eq!(c.vm_env, vec!["A=1".to_string()]);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["grace_seconds"], 3);
        assert_eq!(json["working_dir"], "/w");
    }

    #[test]
    fn the_last_runs_exit_is_read_from_the_console() {
        let log = b"boot\nMETALD_WORKLOAD_START\nhello\nMETALD_WORKLOAD_EXIT code=3\nMETALD_GUEST_POWEROFF\n";
        assert_eq!(WorkloadExit::from_console(log), Some(WorkloadExit::Code(3)));
        let again = [&log[..], b"METALD_WORKLOAD_START\n"].concat();
        assert_eq!(WorkloadExit::from_console(&again), None, "running again: no exit yet");
        let killed = [&again[..], b"METALD_WORKLOAD_EXIT signal=9\r\n"].concat();
        assert_eq!(WorkloadExit::from_console(&killed), Some(WorkloadExit::Signal(9)));
        assert_eq!(WorkloadExit::from_console(b"METALD_INIT_ERROR x\n"), None);
        assert_eq!(WorkloadExit::from_console(b"METALD_WORKLOAD_EXIT code=x\n"), None);
    }

    #[test]
    fn requests_are_checked_and_credentials_never_printed() {
        let ok = ImageSpec { reference: "127.0.0.1:5000/app:1".into(), ..Default::default() };
        assert!(ok.check().is_ok());
        for bad in ["", "a b", &"x".repeat(MAX_REFERENCE_LEN + 1)] {
            assert!(ImageSpec { reference: bad.into(), ..Default::default() }.check().is_err(), "{bad:?}");
        }
        let env = ImageSpec { env: [("1A".into(), "v".into())].into(), ..ok.clone() };
        assert!(env.check().unwrap_err().to_string().contains("1A"));
        let creds = ImageSpec {
            credentials: Some(RegistryAuth { username: "u".into(), password: "hunter2".into() }),
            ..ok.clone()
        };
        assert!(!format!("{creds:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&creds).unwrap().contains("hunter2"));
        let back: ImageSpec = serde_json::from_str(&serde_json::to_string(&creds).unwrap()).unwrap();
        assert_eq!(back.credentials, None);
    }

    #[test]
    fn an_image_spec_gets_the_guest_kernel_metald_init_and_both_disks() {
        let spec = VmSpec {
            image: Some(ImageSpec { reference: "r".into(), ..Default::default() }),
            boot: crate::model::BootSpec { kernel_args: "quiet".into(), ..Default::default() },
            ..Default::default()
        };
        let guest = GuestKernel { kernel: "/g/vmlinux".into(), initrd: "/g/initrd".into() };
        let s = ValidSpec::unchecked(spec).with_image(&image(), &guest, std::path::Path::new("/vm/rw.ext4"));
        assert_eq!(s.boot.kernel, PathBuf::from("/g/vmlinux"));
        assert_eq!(s.boot.initrd, Some(PathBuf::from("/g/initrd")));
        assert_eq!(s.boot.kernel_args, "rdinit=/metald-init quiet");
        assert_eq!(s.image.as_ref().unwrap().digest, "sha256:ab");
        let disks: Vec<_> = s.storage.iter().map(|d| (d.id.as_str(), d.path.to_str().unwrap(), d.read_only)).collect();
        assert_eq!(disks, [("image", "/b", true), ("writable", "/vm/rw.ext4", false)]);
    }

    #[test]
    fn local_sources_name_their_host_path() {
        let s = |r: &str| ImageSpec { reference: r.into(), ..Default::default() };
        assert_eq!(s("oci-layout:/a/img:v1").local_path(), Some(("oci-layout:", "/a/img")));
        assert_eq!(s("oci-layout:/a/img").local_path(), Some(("oci-layout:", "/a/img")));
        assert_eq!(s("docker-archive:/a/x.tar").local_path(), Some(("docker-archive:", "/a/x.tar")));
        assert_eq!(s("registry:5000/a").local_path(), None);
    }
}
