//! The `CreateVm` decoding + validation fuzz target (`tests/support/fuzz.rs`)
//! run on stable for a bounded number of inputs: a seed corpus of requests a
//! client could send (valid ones, and ones that try to escape the asset
//! directories or the limits), in binary protobuf and Connect JSON, and
//! deterministic mutations of them — bit flips, byte changes, insertions,
//! deletions, truncations, splices of two seeds, random bytes.
//! `METALD_FUZZ_ITERATIONS` runs longer, `METALD_FUZZ_SEED` another stream.
//! The same target runs under libFuzzer with `cargo +nightly fuzz run
//! create_vm` in `fuzz/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use buffa::Message;
use metald::model::Limits;
use metald::pb::vmprovisioner::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::fuzz::{Outcome, create_vm};

fn seeds(assets: &std::path::Path) -> Vec<Vec<u8>> {
    let kernel = assets.join("vmlinux").display().to_string();
    let disk = assets.join("rootfs.ext4").display().to_string();
    let base = |vcpus: i32, mem: i64, kernel: &str, disk: &str| pb::CreateVmRequest {
        vm_id: "fuzz-1".into(),
        config: pb::VmConfig {
            cpu: pb::CpuConfig { vcpu_count: vcpus, ..Default::default() }.into(),
            memory: pb::MemoryConfig { size_bytes: mem, ..Default::default() }.into(),
            boot: pb::BootConfig {
                kernel_path: kernel.into(),
                initrd_path: String::new(),
                kernel_args: "console=ttyS0".into(),
                ..Default::default()
            }
            .into(),
            storage: vec![pb::StorageDevice {
                id: "root".into(),
                path: disk.into(),
                is_root_device: true,
                ..Default::default()
            }],
            network: vec![pb::NetworkInterface {
                id: "eth0".into(),
                mac_address: "02:00:00:00:00:01".into(),
                tap_device: "tap0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .into(),
        ..Default::default()
    };
    let escape = format!("{}/../../etc/passwd", assets.display());
    let requests = [
        base(1, 128 << 20, &kernel, &disk),
        base(4, 512 << 20, &kernel, &disk),
        base(0, 128 << 20, &kernel, &disk),
        base(64, 1 << 40, &kernel, &disk),
        base(1, 128 << 20, &escape, &disk),
        base(1, 128 << 20, &kernel, "/etc/shadow"),
        base(1, (128 << 20) + 1, "relative/vmlinux", &disk),
    ];
    let mut out = Vec::new();
    for r in &requests {
        out.push(r.encode_to_vec());
        out.push(serde_json::to_vec(r).unwrap());
    }
    out
}

/// One mutation of `input` (another seed may be spliced in).
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=2) {
        let at = if b.is_empty() { 0 } else { rng.random_range(0..b.len()) };
        match rng.random_range(0..7) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.random_range(0..8),
            1 if !b.is_empty() => b[at] = rng.random(),
            2 => b.insert(at, rng.random()),
            3 if !b.is_empty() => {
                b.remove(at);
            }
            4 => b.truncate(at),
            5 if !other.is_empty() => {
                let from = rng.random_range(0..other.len());
                b.splice(at..at, other[from..].iter().take(rng.random_range(1..64)).copied());
            }
            _ => {
                // Interesting protobuf bytes: varint edges and lengths.
                let magic = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x0a, 0x12, 0x1a, 0x22];
                if !b.is_empty() {
                    b[at] = magic[rng.random_range(0..magic.len())];
                }
            }
        }
    }
    b
}

#[test]
fn create_vm_decoding_and_validation_hold_their_invariants() {
    let tmp = tempfile::tempdir().unwrap();
    let assets = tmp.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"k").unwrap();
    std::fs::write(assets.join("rootfs.ext4"), b"r").unwrap();
    let assets = std::fs::canonicalize(assets).unwrap();
    let limits = Limits { max_vcpus: 8, max_memory_mb: 4096, asset_dirs: vec![assets.clone()] };
    let corpus = seeds(&assets);
    let iterations: usize =
        std::env::var("METALD_FUZZ_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("METALD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(17);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = |o: Outcome| *outcomes.entry(format!("{o:?}")).or_default() += 1;
    // The seeds themselves: the valid ones are accepted, the others refused.
    let first: Vec<Outcome> = corpus.iter().map(|s| create_vm(s, &limits)).collect();
    assert_eq!(&first[..4], [Outcome::Accepted; 4], "valid seeds, protobuf and JSON");
    assert!(first[4..].iter().all(|o| *o == Outcome::Refused), "{first:?}");
    for k in 0..iterations {
        let input = if k % 50 == 0 {
            (0..rng.random_range(0..256)).map(|_| rng.random()).collect()
        } else {
            let a = &corpus[rng.random_range(0..corpus.len())];
            let b = &corpus[rng.random_range(0..corpus.len())];
            mutate(&mut rng, a, b)
        };
        let outcome = std::panic::catch_unwind(|| create_vm(&input, &limits))
            .unwrap_or_else(|_| panic!("input #{k} (seed {seed}) broke an invariant: {input:?}"));
        count(outcome);
    }
    eprintln!("{iterations} inputs (seed {seed}): {outcomes:?}");
    // The mutations reach every outcome (a check that they explore).
    for o in ["Undecodable", "Refused", "Accepted"] {
        assert!(outcomes.get(o).copied().unwrap_or(0) > 0, "no {o} input among {outcomes:?}");
    }
}
