//! The vocabulary every layer shares: ids, the requested and the validated
//! VM spec, lifecycle states and changes, the operation list, the error
//! [`Code`], and the persisted [`Runtime`] of a VM's hypervisor process.
//!
//! A leaf: it imports nothing else of the crate, so the core, the backends,
//! the store and the API can all speak it without importing each other.

mod code;
mod id;
pub mod image;
mod invalid;
pub mod net;
mod operation;
mod runtime;
pub mod snapshot;
mod spec;
pub mod state;
pub mod stop;
mod validate;

pub use code::Code;
pub use id::{CustomerId, VmId};
pub use image::{GuestKernel, ImageSpec, InitConfig, PreparedImage, RegistryAuth, WorkloadExit};
pub use invalid::Invalid;
pub use operation::Operation;
pub use runtime::{BackendKind, Runtime, StopMode, Usage};
pub use snapshot::{META_FILE, SavedDisk, SavedMeta, SnapshotRecord, compat_mismatch};
pub use spec::{
    BootSpec, ConsoleSpec, CpuSpec, DiskSpec, Ipv4Spec, Ipv6Spec, MemorySpec, NicSpec, PortSpec, RateLimit, Topology,
    ValidSpec, VmSpec,
};
pub use state::{InvalidTransition, Op, Plan, Status, Target, VmState, plan, transition};
pub use stop::{StopInfo, StopReason};
pub use validate::{
    Limits, MAX_DISKS, MAX_KERNEL_ARGS_LEN, MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN,
    MAX_NICS, MAX_OPTION_ENTRIES, MIN_MEMORY_BYTES, confine, validate,
};
