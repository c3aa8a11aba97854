//! For the benches: a temp host with a fake kernel, VMs seeded straight into
//! the store (one transaction), the daemon environment for the fake
//! backend, settings from `METALD_BENCH_*` and percentiles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::model::Runtime;
use metald::model::VmState;
use metald::model::{BootSpec, CpuSpec, CustomerId, Limits, MemorySpec, VmId, VmSpec, validate};
use metald::store::{Store, VmRow};

/// A data dir and an asset dir holding a (fake) kernel, under a temp dir.
pub struct Host {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub assets: PathBuf,
    pub kernel: PathBuf,
}

impl Host {
    pub fn new() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let assets = tmp.path().join("assets");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&assets).unwrap();
        std::fs::write(assets.join("vmlinux"), b"k").unwrap();
        let kernel = std::fs::canonicalize(assets.join("vmlinux")).unwrap();
        Host { tmp, data, assets, kernel }
    }

    /// Inserts `vms` VMs `vm-00000`.. of customer `bench`; those for which
    /// `running(i)` holds are stored RUNNING (the fake backend reattaches
    /// them as running), the others CREATED.
    pub fn seed(&self, vms: usize, running: impl Fn(usize) -> bool) {
        seed(&self.data, &self.kernel, vms, running);
    }

    /// The daemon environment: loopback, port 0, fake backend, dev tokens,
    /// room for `vms`, plus `extra` (names without the prefix).
    pub fn env(&self, vms: usize, extra: &[(&str, String)]) -> HashMap<String, String> {
        let mut env: Vec<(&str, String)> = vec![
            ("ADDRESS", "127.0.0.1".to_string()),
            ("PORT", "0".into()),
            ("DATA_DIR", self.data.display().to_string()),
            ("ASSET_DIRS", self.assets.display().to_string()),
            ("BACKEND", "fake".into()),
            ("AUTH_DEV_TOKENS", "true".into()),
            ("MAX_VMS", (vms + 10).to_string()),
        ];
        env.extend(extra.iter().cloned());
        super::daemon::metald_env(env)
    }
}

/// See [`Host::seed`].
pub fn seed(data: &Path, kernel: &Path, vms: usize, running: impl Fn(usize) -> bool) {
    let store = Store::open(&data.join("metald.db")).unwrap();
    let spec = VmSpec {
        cpu: CpuSpec { vcpus: 2, ..Default::default() },
        memory: MemorySpec { size_bytes: 256 << 20, ..Default::default() },
        boot: BootSpec { kernel: kernel.to_path_buf(), kernel_args: "console=ttyS0".into(), ..Default::default() },
        ..Default::default()
    };
    let assets = kernel.parent().unwrap().to_path_buf();
    let limits = Limits { max_vcpus: 32, max_memory_mb: 65536, asset_dirs: vec![assets] };
    let spec = validate(spec, &limits).unwrap();
    let now = metald::util::unix_now();
    let rows: Vec<VmRow> = (0..vms)
        .map(|i| {
            let run = running(i);
            let id = VmId::parse(&format!("vm-{i:05}")).unwrap();
            VmRow {
                name: id.clone(),
                id,
                customer: CustomerId("bench".into()),
                state: if run { VmState::Running } else { VmState::Created },
                spec: spec.clone(),
                runtime: Some(Runtime {
                    pid: Some(1_000_000 + u32::try_from(i).unwrap()),
                    booted_at: run.then_some(now),
                    ..Default::default()
                }),
                created_at: now,
                modified_at: now,
                stopped: None,
            }
        })
        .collect();
    store.insert_batch(&rows).unwrap();
}

/// The environment variable `name` parsed, or `default` if unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// MiB, for printing.
#[allow(clippy::cast_precision_loss)]
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The median of `v` (not empty; the mean of the middle two when even).
pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2 }
}

/// The `p` quantile (0..=1, nearest rank, rounded) of `sorted`; zero when
/// it is empty.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
