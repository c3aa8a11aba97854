//! The fuzz target for request decoding and validation, shared by the
//! stable runner (`tests/fuzz_create_vm.rs`, in `make test`) and the
//! cargo-fuzz target (`fuzz/fuzz_targets/create_vm.rs`, libFuzzer on
//! nightly). It uses nothing else of `tests/support`.
//!
//! One input is a `CreateVmRequest` as a client sends it — binary protobuf,
//! or Connect JSON when it starts with `{` — carried the way `CreateVm`
//! carries it: decode → `VmId::parse` → `api::convert::spec_in` →
//! `model::validate`. Invariants: nothing panics; an accepted spec is within
//! the limits, its host paths are inside an asset directory, and it
//! validates again to itself; a refusal names a field.

use std::path::Path;

use buffa::Message;
use metald::model::{Limits, VmId, validate};
use metald::pb::vmprovisioner::v1 as pb;

/// What one input did (for the runner's statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Undecodable,
    NoConfig,
    Refused,
    Accepted,
}

/// Runs one input; panics when an invariant does not hold.
pub fn create_vm(data: &[u8], limits: &Limits) -> Outcome {
    let decoded = if data.first() == Some(&b'{') {
        serde_json::from_slice::<pb::CreateVmRequest>(data).ok()
    } else {
        pb::CreateVmRequest::decode_from_slice(data).ok()
    };
    let Some(req) = decoded else { return Outcome::Undecodable };
    if !req.vm_id.is_empty()
        && let Ok(id) = VmId::parse(&req.vm_id)
    {
        assert_eq!(id.as_str(), req.vm_id, "an accepted id is the id sent");
    }
    let Some(config) = req.config.as_option() else { return Outcome::NoConfig };
    let spec = metald::api::convert::spec_in(config);
    match validate(spec, limits) {
        Err(e) => {
            assert!(!e.field.is_empty() && !e.reason.is_empty(), "a refusal names a field and a reason: {e:?}");
            Outcome::Refused
        }
        Ok(valid) => {
            let max_mem = i64::try_from(limits.max_memory_mb).unwrap() << 20;
            assert!((1..=i64::from(limits.max_vcpus)).contains(&valid.cpu.vcpus), "vcpus {}", valid.cpu.vcpus);
            assert!(valid.memory.size_bytes > 0 && valid.memory.size_bytes <= max_mem, "memory");
            let inside = |p: &Path| limits.asset_dirs.iter().any(|d| p.starts_with(d));
            assert!(inside(&valid.boot.kernel), "kernel {:?} outside the asset dirs", valid.boot.kernel);
            if let Some(initrd) = &valid.boot.initrd {
                assert!(inside(initrd), "initrd {initrd:?} outside the asset dirs");
            }
            for d in &valid.storage {
                assert!(inside(&d.path), "disk {:?} outside the asset dirs", d.path);
            }
            let again = validate((*valid).clone(), limits).expect("an accepted spec validates again");
            assert_eq!(*again, *valid, "validation is idempotent");
            Outcome::Accepted
        }
    }
}
