//! Suspend, snapshots and clones on the Cloud Hypervisor backend (a module
//! of `tests/cloudhypervisor.rs`): the request sequences the fake saw,
//! checked against Cloud Hypervisor's API reference (v53), the files, the
//! processes, the configuration a restored VM runs with; the snapshot rules
//! as the fake and the real Cloud Hypervisor of `../shared/hypervisors/`
//! enforce them; and the real one behind metald at the API and process
//! level.

use std::path::Path;

use connectrpc::ErrorCode;
use metald::backend::uds_http::{UdsClient, text_error_body};
use metald::pb::vmprovisioner::v1 as pb;
use serde_json::{Value, json};

use super::support::{
    KillOnDrop, TOKEN_A, TestDaemon, assert_requests, boot_ids, clone_vm, create, delete_snapshot, file_names,
    halting_kernel, halting_vm_config, info, process_alive, processes_under, real_hypervisor, requests, resume_vm,
    set_control, snapshot_dirs, snapshot_vm, suspend_vm, vm_dir, wait_until, without_usage,
};
use super::{FAKE_CH, WAIT, full_config, get, put, start};

fn put_body(path: &str, body: Value) -> Value {
    json!({"method": "PUT", "path": format!("/api/v1/{path}"), "body": body})
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// What a fresh VMM of the VM in `vm` is sent to restore a save, then the
/// core's resume.
fn restore_requests(vm: &Path) -> Vec<Value> {
    vec![
        get("vmm.ping"),
        put_body("vm.restore", json!({"source_url": url(&vm.join("restore-source"))})),
        put("vm.resume"),
    ]
}

/// A clone's: [`restore_requests`] with, before the resume, the look up of
/// its console's pty, where its guest's new generation goes.
fn clone_requests(vm: &Path) -> Vec<Value> {
    let mut r = restore_requests(vm);
    r.insert(2, get("vm.info"));
    r
}

fn pid_of(i: &pb::GetVmInfoResponse) -> i32 {
    i.backend_info["pid"].parse().unwrap()
}

fn state(i: &pb::GetVmInfoResponse) -> Option<pb::VmState> {
    i.state.as_known()
}

async fn boot(t: &TestDaemon, id: &str) {
    let c = t.client(TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
}

async fn delete(t: &TestDaemon, id: &str) {
    let c = t.client(TOKEN_A);
    c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
}

/// `GET vm.info` of the VM's Cloud Hypervisor.
async fn vm_info(dir: &Path) -> Value {
    let c = UdsClient::new(dir.join("cloud-hypervisor.sock"), "cloud-hypervisor", WAIT, text_error_body);
    c.get("/api/v1/vm.info").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_saves_and_ends_the_vmm_and_resume_restores_it_into_a_new_one() {
    let (t, _g) = start(&[]).await;
    let dir = vm_dir(&t, "sus");
    create(&t, "sus", full_config(&t)).await.unwrap();
    boot(&t, "sus").await;
    let pid = pid_of(&info(&t, "sus").await);
    let console = dir.join("console.log");
    let booted = boot_ids(&console, "METALD_GUEST_BOOT");
    let n = without_usage(requests(&dir)).len();

    let r = suspend_vm(&t, "sus").await.unwrap();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED));
    assert!(r.snapshot_size_bytes > 0);
    assert!(!process_alive(pid), "the suspended VM's Cloud Hypervisor is gone");
    let saved = dir.join("suspended");
    assert_eq!(file_names(&saved), ["config.json", "memory-ranges", "meta.json", "state.json"]);
    assert_eq!(std::fs::metadata(saved.join("memory-ranges")).unwrap().len(), 128 << 20);
    let reqs = without_usage(requests(&dir));
    let want = [
        put("vm.pause"),
        put_body("vm.snapshot", json!({"destination_url": url(&dir.join("suspended.tmp"))})),
        put("vm.shutdown"),
        put("vmm.shutdown"),
    ];
    assert_requests(&reqs[n..], &want);

    // A refused restore leaves no process, no copy and the VM suspended.
    set_control(t.tmp.path(), Some(json!({"fail": "vm.restore"})));
    let e = resume_vm(&t, "sus").await.unwrap_err();
    assert!(e.message.clone().unwrap_or_default().contains("vm.restore: 500: injected failure"), "{e:?}");
    assert_eq!(state(&info(&t, "sus").await), Some(pb::VmState::VM_STATE_SUSPENDED));
    wait_until("no Cloud Hypervisor", WAIT, || async { processes_under(t.tmp.path()).is_empty() }).await;
    assert!(!dir.join("restore-source").exists());
    assert_eq!(file_names(&saved), ["config.json", "memory-ranges", "meta.json", "state.json"]);
    set_control(t.tmp.path(), None);
    let failed = without_usage(requests(&dir)).len() - n - want.len();

    resume_vm(&t, "sus").await.unwrap();
    let i = info(&t, "sus").await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    let new_pid = pid_of(&i);
    assert!(new_pid != pid && process_alive(new_pid));
    assert!(!saved.exists() && !dir.join("restore-source").exists(), "save and its copy are gone");
    let reqs = without_usage(requests(&dir));
    let restored = &reqs[n + want.len() + failed..];
    assert_requests(restored, &restore_requests(&dir));
    assert!(restored.iter().all(|r| r["pid"] == new_pid));
    assert_eq!(boot_ids(&console, "METALD_GUEST_RESUMED"), booted, "the same guest runs on");
    let ch = vm_info(&dir).await;
    assert_eq!(ch["state"], "Running");
    assert_eq!(ch["config"]["net"][0]["tap"], super::support::test_tap(&t).as_str());
    assert_eq!(ch["config"]["serial"]["mode"], "Tty", "to its stdout, the VM's console.log");
    assert!(ch["config"]["serial"]["file"].is_null(), "{ch}");

    delete(&t, "sus").await;
    assert!(!dir.exists());
    wait_until("no processes", WAIT, || async { processes_under(t.tmp.path()).is_empty() }).await;
}

/// A snapshot, its clones (own process, own disk copy in the restored
/// configuration, own console, the snapshot's guest), one made after the
/// source VM and its disk are gone; the snapshot itself is never changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_clones_restore_with_their_own_disks_and_console() {
    let (t, _g) = start(&[]).await;
    std::fs::copy(t.assets().join("rootfs.ext4"), t.assets().join("src.ext4")).unwrap();
    let mut config = full_config(&t);
    config.network.clear();
    config.storage[0].path = t.assets().join("src.ext4").display().to_string();
    config.storage[0].read_only = false;
    let src = vm_dir(&t, "src");
    create(&t, "src", config).await.unwrap();
    boot(&t, "src").await;
    let pid = pid_of(&info(&t, "src").await);
    let booted = boot_ids(&src.join("console.log"), "METALD_GUEST_BOOT");
    let n = without_usage(requests(&src)).len();

    snapshot_vm(&t, "src", "s1").await.unwrap();
    let i = info(&t, "src").await;
    assert_eq!((state(&i), pid_of(&i)), (Some(pb::VmState::VM_STATE_RUNNING), pid), "the source runs on");
    let sdir = snapshot_dirs(&t).remove(0);
    assert_eq!(file_names(&sdir), ["config.json", "disk-root.img", "memory-ranges", "meta.json", "state.json"]);
    let tmp = sdir.with_file_name(format!(".tmp-{}", sdir.file_name().unwrap().to_string_lossy()));
    let want = [put("vm.pause"), put_body("vm.snapshot", json!({"destination_url": url(&tmp)})), put("vm.resume")];
    assert_requests(&without_usage(requests(&src))[n..], &want);
    let saved_config = std::fs::read(sdir.join("config.json")).unwrap();

    let mut pids = vec![pid];
    let mut ptys: Vec<String> = Vec::new();
    for (k, clone) in ["c1", "c2"].into_iter().enumerate() {
        if k == 1 {
            delete(&t, "src").await;
            std::fs::remove_file(t.assets().join("src.ext4")).unwrap();
        }
        let r = clone_vm(&t, clone, "s1").await.unwrap();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "{clone}");
        let cdir = vm_dir(&t, clone);
        let cpid = pid_of(&info(&t, clone).await);
        assert!(process_alive(cpid) && !pids.contains(&cpid), "{clone} has its own process");
        pids.push(cpid);
        assert_requests(&without_usage(requests(&cdir)), &clone_requests(&cdir));
        assert!(!cdir.join("restore-source").exists());
        let ch = vm_info(&cdir).await;
        assert_eq!(ch["state"], "Running");
        assert_eq!(ch["config"]["disks"][0]["path"], cdir.join("disk-root.img").display().to_string());
        assert_eq!(ch["config"]["serial"]["mode"], "Tty", "to its stdout, the clone's console.log");
        assert!(ch["config"]["serial"]["file"].is_null(), "{ch}");
        assert_eq!(ch["config"]["payload"]["kernel"], super::support::canon(t.assets().join("vmlinux")));
        assert_eq!(boot_ids(&cdir.join("console.log"), "METALD_GUEST_RESUMED"), booted, "{clone}");
        // Fresh randomness: its own pty as the virtio console, the new
        // generation written to it, the (fake) guest's answer.
        let pty = ch["config"]["console"]["file"].as_str().unwrap_or_default().to_owned();
        assert!(pty.starts_with("/dev/pts/") && !ptys.contains(&pty), "{clone}'s own pty: {ch}");
        ptys.push(pty);
        let con = cdir.join("console.log");
        wait_until(&format!("{clone}'s guest to take its generation"), WAIT, || async {
            std::fs::read_to_string(&con).unwrap_or_default().contains("METALD_RESEED fake")
        })
        .await;
    }
    assert_eq!(std::fs::read(sdir.join("config.json")).unwrap(), saved_config, "the snapshot is not changed");
    delete_snapshot(&t, "s1").await;
    for clone in ["c1", "c2"] {
        delete(&t, clone).await;
    }
    assert!(snapshot_dirs(&t).is_empty());
    wait_until("no processes", WAIT, || async { processes_under(t.tmp.path()).is_empty() }).await;
}

async fn spawn(binary: &str, dir: &Path, name: &str) -> (std::process::Child, UdsClient) {
    let sock = dir.join(format!("{name}.sock"));
    let child = std::process::Command::new(binary)
        .arg("--api-socket")
        .arg(format!("path={}", sock.display()))
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = UdsClient::new(&sock, "cloud-hypervisor", WAIT, text_error_body);
    wait_until("vmm.ping", WAIT, || async { c.get::<Value>("/api/v1/vmm.ping").await.is_ok() }).await;
    (child, c)
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The error chain of a 500 answer.
fn chain(e: metald::backend::uds_http::ApiError) -> String {
    assert_eq!(e.status(), Some(500), "{e}");
    e.to_string()
}

/// Cloud Hypervisor's snapshot rules as `binary` enforces them (run against
/// the fake and the real one). Returns whether the paused VM's snapshot
/// was taken (the real one cannot on these machines: their nested KVM has
/// no `KVM_GET_NESTED_STATE`); when it was, a fresh VMM restores it.
async fn check_snapshot_rules(binary: &str, d: &Path) -> bool {
    halting_kernel(&d.join("vmlinux"));
    std::fs::write(d.join("disk"), vec![0u8; 1 << 20]).unwrap();
    let snap = d.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let to = json!({"destination_url": url(&snap)});
    let (a, c) = spawn(binary, d, "a").await;
    let m = chain(c.put("/api/v1/vm.snapshot", &to).await.unwrap_err());
    assert!(m.contains("The VM could not be snapshotted") && m.contains("VM is not running"), "{m}");
    let config = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64u64 << 20},
        "payload": {"kernel": d.join("vmlinux"), "cmdline": "console=ttyS0"},
        "disks": [{"path": d.join("disk"), "readonly": false, "id": "root"}],
        "serial": {"mode": "File", "file": d.join("console.log")},
        "console": {"mode": "Off"}
    });
    c.put("/api/v1/vm.create", &config).await.unwrap();
    c.put_empty("/api/v1/vm.boot").await.unwrap();
    let m = chain(c.put("/api/v1/vm.snapshot", &to).await.unwrap_err());
    assert!(m.contains("Trying to snapshot while VM is running"), "{m}");
    let from = json!({"source_url": url(&snap)});
    let m = chain(c.put("/api/v1/vm.restore", &from).await.unwrap_err());
    assert!(m.contains("The VM could not be restored") && m.contains("VM is already created"), "{m}");
    c.put_empty("/api/v1/vm.pause").await.unwrap();
    let taken = match c.put("/api/v1/vm.snapshot", &to).await {
        Ok(()) => true,
        Err(e) => {
            let m = chain(e);
            assert!(m.contains("Could not get vCPU state"), "only KVM may refuse it: {m}");
            eprintln!("note: {binary} cannot snapshot on this host's KVM ({m}); its restore is not checked");
            false
        }
    };
    stop(a);
    let (b, c) = spawn(binary, d, "b").await;
    let m = chain(c.put("/api/v1/vm.restore", &json!({"source_url": url(&d.join("none"))})).await.unwrap_err());
    assert!(m.contains("Destination is not a directory"), "{m}");
    stop(b);
    if taken {
        assert_eq!(file_names(&snap), ["config.json", "memory-ranges", "state.json"]);
        let (r, c) = spawn(binary, d, "r").await;
        c.put("/api/v1/vm.restore", &from).await.unwrap();
        let i: Value = c.get("/api/v1/vm.info").await.unwrap();
        assert_eq!(i["state"], "Paused");
        assert_eq!(i["config"]["disks"][0]["path"], d.join("disk").display().to_string());
        c.put_empty("/api/v1/vm.resume").await.unwrap();
        stop(r);
    }
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_cloud_hypervisor_enforces_the_snapshot_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(tmp.path().to_path_buf());
    assert!(check_snapshot_rules(FAKE_CH, tmp.path()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cloud_hypervisor_enforces_the_same_snapshot_rules() {
    let Some(ch) = real_hypervisor("cloud-hypervisor") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(tmp.path().to_path_buf());
    check_snapshot_rules(ch.to_str().unwrap(), tmp.path()).await;
}

/// The real Cloud Hypervisor (v53 in `../shared/hypervisors/`) behind
/// metald, with a guest kernel that only halts. Where KVM lets it save a
/// vCPU's state, a snapshot is cloned and a VM suspended and resumed; on
/// these machines it cannot, and metald must then report Cloud
/// Hypervisor's reason, run the guest on and leave no files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cloud_hypervisor_snapshots_behind_metald() {
    let Some(ch) = real_hypervisor("cloud-hypervisor") else { return };
    let (t, _g) = start(&[("CLOUD_HYPERVISOR_BINARY", ch.to_str().unwrap())]).await;
    let config = halting_vm_config(&t);
    create(&t, "rch", config).await.unwrap();
    boot(&t, "rch").await;
    let dir = vm_dir(&t, "rch");
    let pid = pid_of(&info(&t, "rch").await);
    match snapshot_vm(&t, "rch", "rs").await {
        Ok(_) => {
            let sdir = snapshot_dirs(&t).remove(0);
            assert_eq!(file_names(&sdir), ["config.json", "disk-root.img", "memory-ranges", "meta.json", "state.json"]);
            clone_vm(&t, "rcl", "rs").await.unwrap();
            let cdir = vm_dir(&t, "rcl");
            assert_eq!(
                vm_info(&cdir).await["config"]["disks"][0]["path"],
                cdir.join("disk-root.img").display().to_string()
            );
            suspend_vm(&t, "rcl").await.unwrap();
            resume_vm(&t, "rcl").await.unwrap();
            assert_eq!(vm_info(&cdir).await["state"], "Running");
            delete(&t, "rcl").await;
            delete_snapshot(&t, "rs").await;
        }
        Err(e) => {
            assert_eq!(e.code, ErrorCode::Internal, "{e:?}");
            let m = e.message.unwrap_or_default();
            assert!(
                m.contains("vm.snapshot: 500: The VM could not be snapshotted: Cannot snapshot VM")
                    && m.contains("Could not get vCPU state")
                    && !m.contains("backtrace"),
                "{m}"
            );
            eprintln!("note: the real Cloud Hypervisor cannot snapshot on this host's KVM: {m}");
            let snaps = t.data_dir().join("snapshots");
            assert!(file_names(&snaps).is_empty(), "nothing left of the failed snapshot");
        }
    }
    // Either way the source runs on in its own process.
    let i = info(&t, "rch").await;
    assert_eq!((state(&i), pid_of(&i)), (Some(pb::VmState::VM_STATE_RUNNING), pid));
    assert_eq!(vm_info(&dir).await["state"], "Running");
    let m = suspend_vm(&t, "rch").await;
    if let Err(e) = &m {
        // Same reason; the VM keeps running.
        assert!(e.message.clone().unwrap_or_default().contains("Could not get vCPU state"), "{e:?}");
        assert_eq!(state(&info(&t, "rch").await), Some(pb::VmState::VM_STATE_RUNNING));
        assert!(!dir.join("suspended").exists() && !dir.join("suspended.tmp").exists());
    }
    delete(&t, "rch").await;
    wait_until("no processes", WAIT, || async { processes_under(t.tmp.path()).is_empty() }).await;
}
