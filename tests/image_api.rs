//! Image VMs at the API: the in-process daemon (fake backend: nothing
//! boots, which is all these tests need) with its real image cache, pulling
//! from Debian's `docker-registry` on 127.0.0.1 (one open, one behind
//! htpasswd auth), images built offline with `umoci` and pushed with
//! `skopeo`. Checked at the wire: `GetVmInfo` reports the manifest digest
//! and the disks (the shared read-only base, the VM's writable disk), and
//! never the request's registry password (nor does metald's log); image
//! errors keep their codes (`NOT_FOUND`, `UNAVAILABLE`,
//! `PERMISSION_DENIED`, `INVALID_ARGUMENT`) and leave no VM, no VM
//! directory and nothing in the cache's work area; a second customer gets a
//! cached private image only with credentials of its own. Skipped (with a
//! message) when the tools are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use connectrpc::ErrorCode;
use metald::client::VmClient;
use metald::pb::vmprovisioner::v1 as pb;
use serde_json::json;
use support::registry::{ImageBuilder, Registry, files_under, run};
use support::{TOKEN_A, TOKEN_B, TestDaemon, connect_json, free_port, start};

macro_rules! require_tools {
    () => {
        support::registry::require_image_tools(&[])
    };
}

/// The private registry's account. The password must never show up in a
/// response or a log line.
const USER: &str = "alice";
const PASSWORD: &str = "pw-Zq81-never-echoed";

/// Everything metald logs in this test binary (every test's daemon), at
/// debug level, as the daemon's own subscriber writes it (JSON lines).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&buf));
        let filter = tracing_subscriber::EnvFilter::new("debug");
        let sub = metald::telemetry::subscriber(metald::telemetry::LogFormat::Json, filter, writer, false);
        tracing::subscriber::set_global_default(sub).expect("the only subscriber of this test binary");
        buf
    })
    .clone()
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// A small image: a file and a config.
fn push_image(dir: &Path, reg: &Registry, repo: &str) {
    let img = ImageBuilder::new(dir, "v1");
    img.layer(|root| {
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(root.join("app/hello"), "hello\n").unwrap();
    });
    img.config(&["--config.entrypoint=/app/hello", "--config.env=GREETING=hi", "--config.workingdir=/app"]);
    reg.push(&img.layout, "v1", repo);
}

/// The manifest digest the registry serves for `repo:v1` (asked with skopeo).
fn manifest_digest(reg: &Registry, repo: &str) -> String {
    let mut cmd = std::process::Command::new("skopeo");
    cmd.args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"]);
    if let Some((u, p)) = &reg.creds {
        cmd.arg("--creds").arg(format!("{u}:{p}"));
    }
    run(cmd.arg(format!("docker://{}/{repo}:v1", reg.host))).trim().to_owned()
}

/// The daemon with images on: a fake guest kernel and initramfs (the fake
/// backend checks nothing; they live in the returned directory), small
/// writable disks, plain HTTP for `insecure`.
async fn daemon(insecure: &[&str]) -> (TestDaemon, tempfile::TempDir) {
    let guest = tempfile::tempdir().unwrap();
    let kernel = guest.path().join("vmlinux");
    let initrd = guest.path().join("initrd");
    std::fs::write(&kernel, b"\x7fELF fake guest kernel").unwrap();
    std::fs::write(&initrd, b"fake initramfs").unwrap();
    let (k, i, reg) = (kernel.display().to_string(), initrd.display().to_string(), insecure.join(","));
    let t = start(&[
        ("GUEST_KERNEL", k.as_str()),
        ("GUEST_INITRD", i.as_str()),
        ("IMAGE_WRITABLE_MB", "16"),
        ("IMAGE_INSECURE_REGISTRIES", reg.as_str()),
        ("IMAGE_PULL_RETRIES", "0"),
    ])
    .await;
    (t, guest)
}

fn image_request(id: &str, reference: &str, creds: Option<(&str, &str)>) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        vm_id: id.into(),
        config: pb::VmConfig {
            cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
            memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
            image: pb::ContainerImage {
                reference: reference.into(),
                credentials: creds
                    .map(|(u, p)| pb::RegistryCredentials {
                        username: u.into(),
                        password: p.into(),
                        ..Default::default()
                    })
                    .into(),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

async fn create(c: &VmClient, id: &str, reference: &str, creds: Option<(&str, &str)>) -> Result<(), ErrorCode> {
    c.create_vm(image_request(id, reference, creds)).await.map(|_| ()).map_err(|e| e.code)
}

async fn info(c: &VmClient, id: &str) -> pb::GetVmInfoResponse {
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned()
}

async fn vm_ids(c: &VmClient) -> Vec<String> {
    c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned().vms.into_iter().map(|v| v.vm_id).collect()
}

/// A failed create left nothing: no VM directory besides `existing`, and
/// nothing in the cache's work area (so no partial base either).
fn assert_nothing_left(t: &TestDaemon, existing: &[&str]) {
    let vms = t.data_dir().join("vms");
    let mut dirs: Vec<String> = std::fs::read_dir(&vms)
        .map(|rd| rd.flatten().map(|e| e.file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    dirs.sort();
    let mut want: Vec<String> = existing.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(dirs, want, "VM directories");
    let work = files_under(&t.data_dir().join("images/work"));
    assert!(work.is_empty(), "the cache's work/ is not empty: {work:?}");
    for e in std::fs::read_dir(t.data_dir().join("images/bases")).unwrap().flatten() {
        assert!(e.path().join("image.json").exists(), "a partial base: {:?}", e.path());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_vm_reports_its_digest_and_disks_and_is_only_shared_with_credentials() {
    require_tools!();
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(Some((USER, PASSWORD)));
    push_image(dir.path(), &reg, "private/app");
    let digest = manifest_digest(&reg, "private/app");
    let (t, _guest) = daemon(&[&reg.host]).await;
    let (a, b) = (t.client(TOKEN_A), t.client(TOKEN_B));
    let reference = format!("{}/private/app:v1", reg.host);

    // Without credentials, or with wrong ones: refused, nothing left.
    assert_eq!(create(&a, "a-1", &reference, None).await, Err(ErrorCode::PermissionDenied));
    assert_eq!(create(&a, "a-1", &reference, Some((USER, "wrong-pw"))).await, Err(ErrorCode::PermissionDenied));
    assert!(vm_ids(&a).await.is_empty());
    assert_nothing_left(&t, &[]);

    // Customer A, with credentials in the request.
    create(&a, "a-1", &reference, Some((USER, PASSWORD))).await.unwrap();
    let vm = info(&a, "a-1").await;
    let image = &vm.config.image;
    assert_eq!(image.digest, digest, "the manifest digest");
    assert_eq!(image.reference, reference);
    assert!(!image.credentials.is_set(), "credentials are never returned: {:?}", image.credentials);
    let storage = &vm.config.storage;
    assert_eq!(storage.len(), 2, "{storage:?}");
    let base = t.data_dir().join("images/bases").join(&digest["sha256:".len()..]).join("base.ext4");
    assert_eq!((storage[0].path.as_str(), storage[0].read_only), (base.to_str().unwrap(), true), "{storage:?}");
    let writable = t.data_dir().join("vms/a-1/writable.ext4");
    assert_eq!((storage[1].path.as_str(), storage[1].read_only), (writable.to_str().unwrap(), false));
    assert!(base.is_file() && writable.is_file());
    assert_eq!(vm.config.boot.kernel_path, t.env["UNKEY_METALD_GUEST_KERNEL"], "the host's guest kernel");

    // Customer B, same reference, no credentials: the registry decides,
    // although the base is cached. By digest too; wrong credentials too.
    let by_digest = format!("{}/private/app@{digest}", reg.host);
    assert_eq!(create(&b, "b-1", &reference, None).await, Err(ErrorCode::PermissionDenied));
    assert_eq!(create(&b, "b-1", &by_digest, None).await, Err(ErrorCode::PermissionDenied));
    assert_eq!(create(&b, "b-1", &reference, Some((USER, "guessed"))).await, Err(ErrorCode::PermissionDenied));
    assert!(vm_ids(&b).await.is_empty(), "a failed create leaves no VM");
    assert_nothing_left(&t, &["a-1"]);
    // With the right credentials B gets it, sharing A's base.
    create(&b, "b-1", &by_digest, Some((USER, PASSWORD))).await.unwrap();
    let vm_b = info(&b, "b-1").await;
    assert_eq!(vm_b.config.image.digest, digest);
    assert_eq!(vm_b.config.storage[0].path, base.to_str().unwrap(), "one base for both");
    assert_eq!(std::fs::read_dir(t.data_dir().join("images/bases")).unwrap().count(), 1);
    assert_eq!(vm_ids(&a).await, ["a-1"], "each customer sees its own VMs");
    assert_eq!(vm_ids(&b).await, ["b-1"]);

    // The password is nowhere in the JSON responses ...
    let addr = t.d().addr;
    for (token, id) in [(TOKEN_A, "a-1"), (TOKEN_B, "b-1")] {
        let (status, body) = connect_json(&addr, "GetVmInfo", token, &[], &json!({ "vmId": id })).await;
        assert!(status.contains("200"), "{status} {body}");
        let text = body.to_string();
        assert!(text.contains(&digest), "{text}");
        assert!(!text.contains(PASSWORD) && !text.contains("credentials"), "{text}");
        let (_, list) = connect_json(&addr, "ListVms", token, &[], &json!({})).await;
        assert!(!list.to_string().contains(PASSWORD), "{list}");
    }
    // ... nor in the daemon's state on disk, nor in its logs.
    for f in files_under(&t.data_dir()) {
        let p = t.data_dir().join(&f);
        if p.is_file() && std::fs::metadata(&p).unwrap().len() < (1 << 20) {
            let bytes = std::fs::read(&p).unwrap();
            assert!(!bytes.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes()), "the password is in {f:?}");
        }
    }
    let _ = std::io::stderr().flush();
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(log.contains("a-1"), "the log capture works: {} bytes", log.len());
    assert!(!log.contains(PASSWORD), "the password is in metald's log");
    assert!(!log.contains(&base64(&format!("{USER}:{PASSWORD}"))), "the encoded password is in metald's log");
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_errors_keep_their_codes_at_the_wire_and_leave_nothing() {
    require_tools!();
    let _ = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    push_image(dir.path(), &reg, "t/app");
    let dead = format!("127.0.0.1:{}", free_port());
    let (t, _guest) = daemon(&[&reg.host, &dead]).await;
    let a = t.client(TOKEN_A);

    let cases = [
        (format!("{}/t/app:nope", reg.host), ErrorCode::NotFound),
        (format!("{}/t/missing:v1", reg.host), ErrorCode::NotFound),
        (format!("{dead}/t/app:v1"), ErrorCode::Unavailable),
        ("Not A Reference".to_owned(), ErrorCode::InvalidArgument),
        (format!("{}/t/app@sha256:1234", reg.host), ErrorCode::InvalidArgument),
        ("oci-layout:relative/dir".to_owned(), ErrorCode::InvalidArgument),
    ];
    for (i, (reference, want)) in cases.iter().enumerate() {
        let got = create(&a, &format!("vm-{i}"), reference, None).await;
        assert_eq!(got, Err(*want), "{reference}");
        assert!(vm_ids(&a).await.is_empty(), "{reference}: a failed create leaves no VM");
        assert_nothing_left(&t, &[]);
        assert_eq!(std::fs::read_dir(t.data_dir().join("images/bases")).unwrap().count(), 0, "{reference}");
    }
    // The registry going down after a VM was made from it: a new reference
    // is UNAVAILABLE, the same one is still served (the customer's record).
    create(&a, "ok", &format!("{}/t/app:v1", reg.host), None).await.unwrap();
    let reg_host = reg.host.clone();
    drop(reg);
    assert_eq!(create(&a, "other", &format!("{reg_host}/t/other:v1"), None).await, Err(ErrorCode::Unavailable));
    create(&a, "again", &format!("{reg_host}/t/app:v1"), None).await.unwrap();
    assert_eq!(vm_ids(&a).await.len(), 2);
    assert_nothing_left(&t, &["ok", "again"]);
}
