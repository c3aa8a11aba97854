//! The daemon under test. In-process: a daemon on 127.0.0.1:0 with a temp
//! data dir, the fake backend and two customers' API tokens, plus typed
//! clients and a minimal `VmConfig`. As a child process: the real `metald`
//! binary, killed when the test or bench ends. And the environment both
//! read (`UNKEY_METALD_*`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::Config;
use metald::daemon::Daemon;
use metald::pb::vmprovisioner::v1 as pb;

pub struct TestDaemon {
    pub daemon: Option<Daemon>,
    pub tmp: tempfile::TempDir,
    pub env: HashMap<String, String>,
}

impl TestDaemon {
    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    pub fn assets(&self) -> PathBuf {
        self.tmp.path().join("assets")
    }

    pub fn kernel(&self) -> String {
        self.assets().join("vmlinux").display().to_string()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.d().addr)
    }

    pub fn d(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    pub fn client(&self, token: &str) -> VmClient {
        self.client_with(token, WireProtocol::ConnectProto)
    }

    pub fn client_with(&self, token: &str, proto: WireProtocol) -> VmClient {
        vm_client(&self.endpoint(), token, proto, Duration::from_secs(30)).unwrap()
    }

    /// Stops the daemon gracefully (VMs stay) and starts a new one on the
    /// same data directory.
    pub async fn restart(&mut self) {
        let d = self.daemon.take().unwrap();
        d.shutdown();
        d.wait().await.unwrap();
        let cfg = Config::from_source(&self.env).unwrap();
        self.daemon = Some(metald::daemon::start(cfg).await.unwrap());
    }

    pub fn config(&self, kernel: &str) -> pb::VmConfig {
        vm_config(kernel)
    }
}

pub fn vm_config(kernel: &str) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig { kernel_path: kernel.into(), kernel_args: "console=ttyS0".into(), ..Default::default() }
            .into(),
        ..Default::default()
    }
}

/// Starts metald with the fake backend; `extra` overrides env vars
/// (names without the `UNKEY_METALD_` prefix).
pub async fn start(extra: &[(&str, &str)]) -> TestDaemon {
    let tmp = tempfile::tempdir().unwrap();
    let assets = tmp.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"\x7fELF fake kernel").unwrap();
    std::fs::write(assets.join("rootfs.ext4"), b"fake rootfs").unwrap();
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, "# test tokens\ntoken-of-customer-a-0001 cust-a\ntoken-of-customer-b-0001 cust-b\n")
        .unwrap();
    let mut env = metald_env([
        ("ADDRESS", "127.0.0.1".to_string()),
        ("PORT", "0".to_string()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", assets.display().to_string()),
        ("BACKEND", "fake".to_string()),
        ("AUTH_TOKENS_FILE", tokens.display().to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_string()),
    ]);
    env.extend(metald_env(extra.iter().copied()));
    let cfg = Config::from_source(&env).unwrap();
    let daemon = metald::daemon::start(cfg).await.unwrap();
    TestDaemon { daemon: Some(daemon), tmp, env }
}

pub const TOKEN_A: &str = "token-of-customer-a-0001";
pub const TOKEN_B: &str = "token-of-customer-b-0001";

/// Host networking off unless the test turns it on: a daemon with it on
/// makes TAPs and an nftables table in its network namespace, which only
/// tests that run in a namespace of their own may do.
pub fn no_host_network(env: &mut HashMap<String, String>) {
    env.entry("UNKEY_METALD_NETWORK_ENABLED".into()).or_insert_with(|| "false".into());
}

/// The daemon's environment from `(name, value)` pairs, each name given
/// without its `UNKEY_METALD_` prefix; host networking off unless they
/// say otherwise ([`no_host_network`]).
pub fn metald_env<K: std::fmt::Display, V: ToString>(
    vars: impl IntoIterator<Item = (K, V)>,
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> =
        vars.into_iter().map(|(k, v)| (format!("UNKEY_METALD_{k}"), v.to_string())).collect();
    no_host_network(&mut env);
    env
}

/// The real `metald` binary as a child process; killed (and reaped) when
/// dropped, test failure included.
pub struct MetaldProcess(pub std::process::Child);

impl MetaldProcess {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for MetaldProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `metald` binary with `env` (full names) on top of this
/// process' environment; stdout and stderr are appended to `log`.
pub fn spawn_metald(env: &HashMap<String, String>, log: &Path) -> MetaldProcess {
    spawn(std::process::Command::new(env!("CARGO_BIN_EXE_metald")), env, log)
}

/// [`spawn_metald`] with its open-files limit, soft and hard, set to
/// `nofile` (so metald cannot raise it).
pub fn spawn_metald_with_fd_limit(env: &HashMap<String, String>, log: &Path, nofile: u64) -> MetaldProcess {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\""), env!("CARGO_BIN_EXE_metald")]);
    spawn(cmd, env, log)
}

fn spawn(mut cmd: std::process::Command, env: &HashMap<String, String>, log: &Path) -> MetaldProcess {
    let mut env = env.clone();
    no_host_network(&mut env);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child =
        cmd.envs(&env).stdin(std::process::Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    MetaldProcess(child)
}

/// Waits until a daemon answers `ListVms` through `c` (`log`, its log file,
/// is named in the failure).
pub async fn wait_serving(c: &VmClient, timeout: Duration, log: &Path) {
    let what = format!("metald to come up (log: {})", log.display());
    super::wait::wait_until(&what, timeout, || async { c.list_vms(pb::ListVmsRequest::default()).await.is_ok() }).await;
}
