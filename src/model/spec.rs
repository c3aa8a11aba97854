//! A VM's configuration as requested ([`VmSpec`], plain data the API fills
//! in) and as accepted ([`ValidSpec`], which only [`super::validate`] makes:
//! whatever receives one may rely on its limits and confined host paths).

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::image::{BASE_DISK_ID, GuestKernel, PreparedImage, WRITABLE_DISK_ID};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VmSpec {
    pub cpu: CpuSpec,
    pub memory: MemorySpec,
    pub boot: BootSpec,
    pub storage: Vec<DiskSpec>,
    pub network: Vec<NicSpec>,
    pub console: Option<ConsoleSpec>,
    pub metadata: BTreeMap<String, String>,
    /// A container image to run (metald supplies kernel and disks).
    #[serde(default)]
    pub image: Option<super::image::ImageSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CpuSpec {
    pub vcpus: i64,
    /// Hotplug ceiling; 0 means the same as `vcpus`.
    pub max_vcpus: i64,
    pub topology: Option<Topology>,
    pub features: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Topology {
    pub sockets: i64,
    pub cores_per_socket: i64,
    pub threads_per_core: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemorySpec {
    pub size_bytes: i64,
    pub hotplug: bool,
    pub max_size_bytes: i64,
    pub backing: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_args: String,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DiskSpec {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub is_root: bool,
    pub interface: String,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NicSpec {
    pub id: String,
    pub mac: String,
    pub tap: String,
    pub interface: String,
    pub options: BTreeMap<String, String>,
    pub ipv4: Option<Ipv4Spec>,
    pub ipv6: Option<Ipv6Spec>,
    /// Wire value of `NetworkMode`.
    pub mode: i32,
    pub rx_rate_limit: Option<RateLimit>,
    pub tx_rate_limit: Option<RateLimit>,
    /// No `tap` was given: metald provides the TAP, addresses and port
    /// mappings (set by validation; after create `tap` names metald's TAP).
    #[serde(default)]
    pub managed: bool,
    /// Host ports mapped to guest ports (managed NICs only).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// A host port mapped to a guest port, as requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PortSpec {
    /// `tcp` (the default when empty) or `udp`.
    pub protocol: String,
    /// 0: allocate one from the configured range.
    pub host_port: i64,
    pub guest_port: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ipv4Spec {
    pub address: String,
    pub netmask: String,
    pub gateway: String,
    pub dns_servers: Vec<String>,
    pub dhcp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ipv6Spec {
    pub address: String,
    pub prefix_length: i64,
    pub gateway: String,
    pub dns_servers: Vec<String>,
    pub slaac: bool,
    pub privacy_extensions: bool,
    pub link_local: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RateLimit {
    pub bandwidth: i64,
    pub refill_time_ms: i64,
    pub burst: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConsoleSpec {
    pub enabled: bool,
    pub output: String,
    pub input: String,
    pub console_type: String,
}

impl VmSpec {
    pub fn memory_bytes(&self) -> u64 {
        u64::try_from(self.memory.size_bytes).unwrap_or(0)
    }
    pub fn vcpus(&self) -> u32 {
        u32::try_from(self.cpu.vcpus).unwrap_or(0)
    }
    pub fn root_disk(&self) -> Option<&DiskSpec> {
        self.storage.iter().find(|d| d.is_root)
    }
}

/// A [`VmSpec`] that passed [`super::validate`]: limits checked, device ids
/// defaulted and unique, every host path canonical and inside an asset
/// directory. Only validation constructs one (and deserialisation, which
/// reads back what the store persisted from a `ValidSpec`); backends and the
/// store take this type, so an unvalidated spec cannot reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ValidSpec(VmSpec);

impl ValidSpec {
    /// Only [`super::validate`] calls this.
    pub(super) fn accepted(spec: VmSpec) -> ValidSpec {
        ValidSpec(spec)
    }

    /// The same spec with the disks `path_of` names elsewhere (a clone's
    /// own copies of its snapshot's disks); `None` keeps a disk's path.
    pub fn with_disk_paths(&self, path_of: impl Fn(&DiskSpec) -> Option<std::path::PathBuf>) -> ValidSpec {
        let mut spec = self.0.clone();
        for d in &mut spec.storage {
            if let Some(p) = path_of(d) {
                d.path = p;
            }
        }
        ValidSpec(spec)
    }

    /// The spec as a plain value (e.g. to convert it back to the wire).
    pub fn as_spec(&self) -> &VmSpec {
        &self.0
    }

    /// A spec taken as valid without checks, for the crate's unit tests of
    /// layers below validation.
    #[cfg(test)]
    pub(crate) fn unchecked(spec: VmSpec) -> ValidSpec {
        ValidSpec(spec)
    }
}

impl Deref for ValidSpec {
    type Target = VmSpec;
    fn deref(&self) -> &VmSpec {
        &self.0
    }
}

impl ValidSpec {
    /// The spec an image VM runs with: the resolved digest recorded, the
    /// host's guest kernel unless the request named one, metald-init as
    /// the initramfs's init (`rdinit=`, first so the request's arguments
    /// follow it), the base read-only as disk 1 and `writable` as disk 2
    /// (the order metald-init expects: `/dev/vda`, `/dev/vdb`). The
    /// request's registry credentials are dropped.
    pub fn with_image(&self, image: &PreparedImage, guest: &GuestKernel, writable: &std::path::Path) -> ValidSpec {
        let mut spec: VmSpec = (**self).clone();
        if let Some(i) = &mut spec.image {
            i.digest = image.digest.clone();
            // Used for the pull; the VM's spec does not keep them.
            i.credentials = None;
        }
        if spec.boot.kernel.as_os_str().is_empty() {
            spec.boot.kernel = guest.kernel.clone();
            spec.boot.initrd = Some(guest.initrd.clone());
        }
        spec.boot.kernel_args = match spec.boot.kernel_args.as_str() {
            "" => "rdinit=/metald-init".into(),
            args => format!("rdinit=/metald-init {args}"),
        };
        let disk = |id: &str, path: PathBuf, read_only| DiskSpec {
            id: id.into(),
            path,
            read_only,
            is_root: false,
            interface: "virtio-blk".into(),
            options: BTreeMap::new(),
        };
        spec.storage =
            vec![disk(BASE_DISK_ID, image.base.clone(), true), disk(WRITABLE_DISK_ID, writable.to_path_buf(), false)];
        ValidSpec::accepted(spec)
    }
}
