//! Manager tests of image VMs against the fake backend and a
//! [`StaticImages`]: the spec an image VM runs with, its writable disk in
//! the VM's directory, the workload's exit read back, refusals and a failed
//! pull that leaves nothing (the real cache and guests are tested in
//! `tests/image_*.rs`).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use super::*;
use crate::backend::fake::FakeBackend;
use crate::model::{
    Code, CpuSpec, DiskSpec, GuestKernel, ImageSpec, MemorySpec, PreparedImage, RegistryAuth, VmSpec, WorkloadExit,
};

struct Env {
    mgr: Manager,
    store: Store,
    images: Option<Arc<StaticImages>>,
    dir: std::path::PathBuf,
}

async fn open(dir: &Path, with_images: bool) -> Env {
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"k").unwrap();
    let assets = std::fs::canonicalize(assets).unwrap();
    let images = with_images.then(|| {
        Arc::new(StaticImages::new(
            GuestKernel { kernel: "/guest/vmlinux".into(), initrd: "/guest/initramfs.cpio.gz".into() },
            PreparedImage {
                digest: "sha256:0123".into(),
                base: "/cache/bases/0123.ext4".into(),
                entrypoint: vec!["/bin/server".into()],
                cmd: vec!["--port".into(), "80".into()],
                env: vec!["PATH=/bin".into()],
                working_dir: "/srv".into(),
                user: "www".into(),
            },
        ))
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let store = Store::open(&dir.join("db")).unwrap();
    let mgr = Manager::open(
        ManagerConfig {
            snapshot_max_bytes: 1 << 40,
            vm_log_max_bytes: super::logs::DEFAULT_VM_LOG_MAX_BYTES,
            data_dir: dir.to_path_buf(),
            limits: Limits { max_vcpus: 8, max_memory_mb: 1024, asset_dirs: vec![assets] },
            max_vms: 100,
            net: Default::default(),
            images: ImageHandle(images.clone().map(|i| i as Arc<dyn ImageSource>)),
        },
        Arc::new(FakeBackend::new(tx)),
        store.clone(),
        rx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    Env { mgr, store, images, dir: dir.to_path_buf() }
}

fn image_spec(reference: &str) -> VmSpec {
    VmSpec {
        cpu: CpuSpec { vcpus: 1, ..Default::default() },
        memory: MemorySpec { size_bytes: 64 << 20, ..Default::default() },
        image: Some(ImageSpec {
            reference: reference.into(),
            env: [("GREETING".into(), "hi".into())].into(),
            credentials: Some(RegistryAuth { username: "u".into(), password: "secret-pw".into() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn c(s: &str) -> CustomerId {
    CustomerId(s.into())
}

#[tokio::test]
async fn an_image_vm_boots_the_guest_kernel_with_both_disks_and_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path(), true).await;
    let vm = env.mgr.create(&c("a"), Some(VmId::parse("web-1").unwrap()), image_spec("reg:5000/app:1")).await.unwrap();
    assert_eq!(env.images.as_ref().unwrap().asked.lock().unwrap().clone(), [("a".into(), "reg:5000/app:1".into())]);
    let s = &vm.spec;
    assert_eq!(s.boot.kernel, Path::new("/guest/vmlinux"));
    assert!(s.boot.kernel_args.starts_with("rdinit=/metald-init"), "{}", s.boot.kernel_args);
    assert_eq!(s.image.as_ref().unwrap().digest, "sha256:0123");
    let writable = env.dir.join("vms").join(vm.host_id.as_str()).join(WRITABLE_DISK);
    let disks: Vec<_> = s.storage.iter().map(|d| (d.path.clone(), d.read_only)).collect();
    assert_eq!(disks, [("/cache/bases/0123.ext4".into(), true), (writable.clone(), false)]);
    // The guest's config, as metald-init reads it (StaticImages writes the JSON as is).
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&writable).unwrap()).unwrap();
    assert_eq!(config["entrypoint"], serde_json::json!(["/bin/server"]));
    assert_eq!(config["cmd"], serde_json::json!(["--port", "80"]));
    assert_eq!(config["vm_env"], serde_json::json!(["GREETING=hi"]));
    assert_eq!(config["hostname"], "web-1");
    assert_eq!(config["user"], "www");
    // Credentials are in neither the store nor the answer.
    let row = env.store.get(&vm.host_id).unwrap().unwrap();
    assert_eq!(row.spec.image.as_ref().unwrap().credentials, None);
    assert!(!serde_json::to_string(&row.spec).unwrap().contains("secret-pw"));
    assert_eq!(vm.spec.image.as_ref().unwrap().credentials, None);
    // The workload's exit shows once the VM is shut down, from its console log.
    env.mgr.boot(&c("a"), &vm.id).await.unwrap();
    let console = writable.with_file_name("console.log");
    std::fs::write(&console, "METALD_WORKLOAD_START\nMETALD_WORKLOAD_EXIT code=4\n").unwrap();
    assert_eq!(env.mgr.info(&c("a"), &vm.id).await.unwrap().workload_exit, None, "running: none yet");
    env.mgr.shutdown(&c("a"), &vm.id, StopMode::Force).await.unwrap();
    assert_eq!(env.mgr.info(&c("a"), &vm.id).await.unwrap().workload_exit, Some(WorkloadExit::Code(4)));
    env.mgr.delete(&c("a"), &vm.id, true).await.unwrap();
    assert!(!writable.exists(), "the writable disk goes with the VM");
}

#[tokio::test]
async fn a_failed_pull_leaves_nothing_and_keeps_its_code() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path(), true).await;
    *env.images.as_ref().unwrap().fail_next.lock().unwrap() =
        Some(Error::Image { code: Code::NotFound, message: "reg:5000/app:nope: manifest unknown".into() });
    let e =
        env.mgr.create(&c("a"), Some(VmId::parse("x").unwrap()), image_spec("reg:5000/app:nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(env.store.load_all().unwrap().is_empty());
    assert!(env.store.intents().unwrap().is_empty());
    let vms = env.dir.join("vms");
    assert!(!vms.exists() || std::fs::read_dir(&vms).unwrap().next().is_none(), "no VM directory left");
    // The name is free again.
    env.mgr.create(&c("a"), Some(VmId::parse("x").unwrap()), image_spec("reg:5000/app:1")).await.unwrap();
}

#[tokio::test]
async fn image_vms_are_refused_without_images_or_with_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path(), false).await;
    let e = env.mgr.create(&c("a"), None, image_spec("reg/app")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.to_string().contains("UNKEY_METALD_IMAGES_ENABLED"), "{e}");
    let env = open(tmp.path(), true).await;
    let mut s = image_spec("reg/app");
    s.storage.push(DiskSpec { path: "/x".into(), ..Default::default() });
    let e = env.mgr.create(&c("a"), None, s).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.to_string().contains("config.storage"), "{e}");
    let mut s = image_spec("reg/app");
    s.image.as_mut().unwrap().reference = "oci-layout:/etc".into();
    let e = env.mgr.create(&c("a"), None, s).await.unwrap_err();
    assert!(e.to_string().contains("outside the asset directories"), "{e}");
    assert!(env.images.as_ref().unwrap().asked.lock().unwrap().is_empty(), "refused before any pull");
}

#[tokio::test]
async fn a_create_keeps_its_prepared_base_from_the_gc_until_its_vm_row_does() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path(), true).await;
    let images = env.images.clone().unwrap();
    assert!(env.mgr.image_digests().is_empty());
    // Stopped after the image is prepared, before the VM row exists.
    let gate = images.writable_gate.lock().await;
    let mgr = env.mgr.clone();
    let create = tokio::spawn(async move { mgr.create(&c("a"), None, image_spec("reg:5000/app:1")).await });
    let mut waited = 0;
    while env.mgr.image_digests().is_empty() {
        assert!(waited < 500, "the create never registered its digest");
        waited += 1;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(env.mgr.list(&c("a"), &ListQuery { page_size: 10, ..Default::default() }).total, 0, "no VM row yet");
    assert_eq!(env.mgr.image_digests(), ["sha256:0123".to_owned()].into());
    drop(gate);
    let vm = create.await.unwrap().unwrap();
    assert_eq!(env.mgr.image_digests(), ["sha256:0123".to_owned()].into(), "now through the VM row");
    env.mgr.delete(&c("a"), &vm.id, true).await.unwrap();
    assert!(env.mgr.image_digests().is_empty());
    // A create failing after the prepare does not keep the digest either.
    *images.fail_writable.lock().unwrap() = Some(Error::Internal("disk full".into()));
    env.mgr.create(&c("a"), None, image_spec("reg:5000/app:1")).await.unwrap_err();
    assert!(env.mgr.image_digests().is_empty());
}
