//! Suspend, snapshots and clones on the Firecracker backend (a module of
//! `tests/firecracker.rs`): the request sequences the fake Firecracker saw,
//! checked against Firecracker's API reference (v1.16), the files, the
//! processes; the jailer; the fake's own ordering rules; and the real
//! Firecracker of `../shared/hypervisors/` at the API and process level.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use metald::backend::firecracker::api::fault_message;
use metald::backend::uds_http::UdsClient;
use metald::pb::vmprovisioner::v1 as pb;
use serde_json::{Value, json};

use super::support::{
    KillOnDrop, TestDaemon, assert_requests, boot_ids, canon, clone_vm, create, delete_snapshot, file_names,
    halting_kernel, halting_vm_config, info, process_alive, processes_under, real_hypervisor, requests, resume_vm,
    set_control, snapshot_dirs, snapshot_vm, suspend_vm, vm_dir, wait_until, without_usage,
};
use super::{FAKE_FC, FAKE_JAILER, WAIT, assert_nothing_left, full_config, start};

fn req(method: &str, path: &str, body: Value) -> Value {
    json!({"method": method, "path": path, "body": body})
}

/// What a save into `dir` sends (the guest already paused).
fn save_requests(dir: &Path) -> Vec<Value> {
    vec![
        req("GET", "/vm/config", Value::Null),
        req("GET", "/", Value::Null),
        req(
            "PUT",
            "/snapshot/create",
            json!({"mem_file_path": dir.join("memory"), "snapshot_path": dir.join("vmstate"), "snapshot_type": "Full"}),
        ),
    ]
}

/// What a fresh process of a VM sends to load a save
/// (`/`-prefixed names: inside the jail), then the core's resume.
fn load_requests(state: &str, memory: &str) -> Vec<Value> {
    vec![
        req("GET", "/", Value::Null),
        req(
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": memory},
                   "resume_vm": false}),
        ),
        req("GET", "/vm/config", Value::Null),
        req("GET", "/", Value::Null),
        req("PATCH", "/vm", json!({"state": "Resumed"})),
    ]
}

fn s(p: PathBuf) -> String {
    p.display().to_string()
}

fn pid_of(i: &pb::GetVmInfoResponse) -> i32 {
    i.backend_info["pid"].parse().unwrap()
}

async fn boot(t: &TestDaemon, id: &str) {
    let c = t.client(super::support::TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
}

fn state(i: &pb::GetVmInfoResponse) -> Option<pb::VmState> {
    i.state.as_known()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_saves_and_ends_the_vmm_and_resume_loads_it_into_a_new_one() {
    let (t, _g) = start(&[]).await;
    let dir = vm_dir(&t, "sus");
    create(&t, "sus", full_config(&t)).await.unwrap();
    boot(&t, "sus").await;
    let before = info(&t, "sus").await;
    let (pid, console) = (pid_of(&before), PathBuf::from(&before.backend_info["console_log"]));
    let booted = boot_ids(&console, "METALD_GUEST_BOOT");
    let n = without_usage(requests(&dir)).len();

    let r = suspend_vm(&t, "sus").await.unwrap();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED));
    assert!(r.snapshot_size_bytes > 0, "{r:?}");
    assert!(!process_alive(pid), "the suspended VM's Firecracker is gone");
    let saved = dir.join("suspended");
    assert_eq!(file_names(&saved), ["firecracker-save.json", "memory", "meta.json", "vmstate"]);
    assert_eq!(std::fs::metadata(saved.join("memory")).unwrap().len(), 128 << 20, "the guest's whole memory");
    let record: Value = serde_json::from_slice(&std::fs::read(saved.join("firecracker-save.json")).unwrap()).unwrap();
    assert_eq!(record["firecracker_version"], "1.16.1");
    assert_eq!(record["nics"][0]["host_dev_name"], super::support::test_tap(&t).as_str());
    assert_eq!(record["drives"][0]["path_on_host"], "drive-root");
    let i = info(&t, "sus").await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_SUSPENDED));
    assert!(!i.backend_info.contains_key("pid"), "{:?}", i.backend_info);

    let reqs = without_usage(requests(&dir));
    let mut want = vec![req("PATCH", "/vm", json!({"state": "Paused"}))];
    want.extend(save_requests(&dir.join("suspended.tmp")));
    assert_requests(&reqs[n..], &want);

    // A refused load leaves no process and the VM suspended, its save intact.
    set_control(t.tmp.path(), Some(json!({"fail": "/snapshot/load"})));
    let e = resume_vm(&t, "sus").await.unwrap_err();
    assert!(e.message.clone().unwrap_or_default().contains("PUT /snapshot/load: 400: injected fault"), "{e:?}");
    assert_eq!(state(&info(&t, "sus").await), Some(pb::VmState::VM_STATE_SUSPENDED));
    wait_until("no Firecracker", WAIT, || async { processes_under(t.tmp.path()).is_empty() }).await;
    assert_eq!(file_names(&saved), ["firecracker-save.json", "memory", "meta.json", "vmstate"]);
    set_control(t.tmp.path(), None);
    let failed = without_usage(requests(&dir)).len() - n - want.len();

    let r = resume_vm(&t, "sus").await.unwrap();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    let i = info(&t, "sus").await;
    let new_pid = pid_of(&i);
    assert!(new_pid != pid && process_alive(new_pid), "a new Firecracker runs the guest");
    assert!(!saved.exists() && !dir.join("restore-source").exists(), "the save is gone once the guest runs");
    let reqs = without_usage(requests(&dir));
    let loaded = &reqs[n + want.len() + failed..];
    let (state_file, memory) = (s(saved.join("vmstate")), s(saved.join("memory")));
    assert_requests(loaded, &load_requests(&state_file, &memory));
    assert!(loaded.iter().all(|r| r["pid"] == new_pid), "all from the new process: {loaded:?}");
    assert_eq!(boot_ids(&console, "METALD_GUEST_RESUMED"), booted, "the same guest runs on");
    // The restored process meters like a booted one (FlushMetrics works).
    assert!(info(&t, "sus").await.metrics.is_set());

    t.client(super::support::TOKEN_A)
        .delete_vm(pb::DeleteVmRequest { vm_id: "sus".into(), force: true, ..Default::default() })
        .await
        .unwrap();
    assert_nothing_left(&t, "sus").await;
}

/// A snapshot of a VM without NICs, its clones (each its own process and
/// disk copy, the guest of the snapshot), one made after the source VM and
/// its disk are gone: the drive names a snapshot records are the same in
/// every VM directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_clones_run_the_saved_guest_on_their_own_disks() {
    let (t, _g) = start(&[]).await;
    std::fs::copy(t.assets().join("rootfs.ext4"), t.assets().join("src.ext4")).unwrap();
    let mut config = full_config(&t);
    config.network.clear();
    config.storage[0].path = t.assets().join("src.ext4").display().to_string();
    let src = vm_dir(&t, "src");
    create(&t, "src", config).await.unwrap();
    boot(&t, "src").await;
    let before = info(&t, "src").await;
    let pid = pid_of(&before);
    let booted = boot_ids(&PathBuf::from(&before.backend_info["console_log"]), "METALD_GUEST_BOOT");
    let n = without_usage(requests(&src)).len();

    let snap = snapshot_vm(&t, "src", "s1").await.unwrap();
    assert_eq!(
        (snap.name.as_str(), snap.source_vm_id.as_str(), snap.hypervisor.as_str()),
        ("s1", "src", "firecracker")
    );
    let after = info(&t, "src").await;
    assert_eq!((state(&after), pid_of(&after)), (Some(pb::VmState::VM_STATE_RUNNING), pid), "the source runs on");
    let snaps = snapshot_dirs(&t);
    assert_eq!(snaps.len(), 1);
    let sdir = &snaps[0];
    assert_eq!(file_names(sdir), ["disk-root.img", "firecracker-save.json", "memory", "meta.json", "vmstate"]);
    let tmp = sdir.with_file_name(format!(".tmp-{}", sdir.file_name().unwrap().to_string_lossy()));
    let mut want = vec![req("PATCH", "/vm", json!({"state": "Paused"}))];
    want.extend(save_requests(&tmp));
    want.push(req("PATCH", "/vm", json!({"state": "Resumed"})));
    assert_requests(&without_usage(requests(&src))[n..], &want);

    let (state_file, memory) = (s(sdir.join("vmstate")), s(sdir.join("memory")));
    // A clone whose load fails leaves no VM, directory or process.
    set_control(t.tmp.path(), Some(json!({"fail": "/snapshot/load"})));
    let e = clone_vm(&t, "cx", "s1").await.unwrap_err();
    assert!(e.message.clone().unwrap_or_default().contains("/snapshot/load: 400"), "{e:?}");
    set_control(t.tmp.path(), None);
    assert!(!vm_dir(&t, "cx").exists());
    wait_until("no clone process", WAIT, || async { processes_under(&vm_dir(&t, "cx")).is_empty() }).await;
    let mut clone_pids = vec![];
    for (k, clone) in ["c1", "c2"].into_iter().enumerate() {
        if k == 1 {
            // The source and its disk go: a clone needs neither.
            t.client(super::support::TOKEN_A)
                .delete_vm(pb::DeleteVmRequest { vm_id: "src".into(), force: true, ..Default::default() })
                .await
                .unwrap();
            std::fs::remove_file(t.assets().join("src.ext4")).unwrap();
        }
        let r = clone_vm(&t, clone, "s1").await.unwrap();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "{clone}");
        let cdir = vm_dir(&t, clone);
        let i = info(&t, clone).await;
        let cpid = pid_of(&i);
        assert!(cpid != pid && process_alive(cpid) && !clone_pids.contains(&cpid), "{clone} has its own process");
        clone_pids.push(cpid);
        assert_eq!(std::fs::read_link(cdir.join("drive-root")).unwrap(), cdir.join("disk-root.img"));
        let reqs = without_usage(requests(&cdir));
        assert_requests(&reqs, &load_requests(&state_file, &memory));
        let console = PathBuf::from(&i.backend_info["console_log"]);
        assert_eq!(boot_ids(&console, "METALD_GUEST_RESUMED"), booted, "{clone} runs the snapshot's guest");
        // The restored microVM has the saved configuration.
        let fc = UdsClient::new(cdir.join("firecracker.sock"), "firecracker", WAIT, fault_message);
        let config: Value = fc.get("/vm/config").await.unwrap();
        assert_eq!(config["machine-config"]["mem_size_mib"], 128);
        assert_eq!(config["drives"][0]["path_on_host"], "drive-root");
    }
    assert!(!vm_dir(&t, "src").exists());

    // Clones do not need the snapshot once they run.
    delete_snapshot(&t, "s1").await;
    assert!(snapshot_dirs(&t).is_empty());
    for (clone, cpid) in ["c1", "c2"].into_iter().zip(clone_pids) {
        assert!(process_alive(cpid));
        t.client(super::support::TOKEN_A)
            .delete_vm(pb::DeleteVmRequest { vm_id: clone.into(), force: true, ..Default::default() })
            .await
            .unwrap();
    }
    for clone in ["c1", "c2"] {
        assert_nothing_left(&t, clone).await;
    }
}

/// Under the jailer a save is written inside the jail and moved out, a
/// restore's files are linked into the new jail (and unlinked once
/// loaded), and a clone's jail holds its own disk copy as `/drive-root`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_saves_are_moved_out_of_the_jail_and_restores_linked_in() {
    let jail_tmp = tempfile::tempdir().unwrap();
    let jail_base = jail_tmp.path().join("jail");
    let base = jail_base.display().to_string();
    let (t, _g) =
        start(&[("JAILER_ENABLED", "true"), ("JAILER_BINARY", FAKE_JAILER), ("JAILER_CHROOT_DIR", &base)]).await;
    let _g2 = KillOnDrop(jail_tmp.path().to_path_buf());
    let root = |id: &str| jail_base.join("metald-fake-firecracker").join(id).join("root");
    std::fs::copy(t.assets().join("rootfs.ext4"), t.assets().join("js.ext4")).unwrap();
    let mut config = full_config(&t);
    config.network.clear();
    config.storage[0].path = t.assets().join("js.ext4").display().to_string();
    create(&t, "js", config).await.unwrap();
    boot(&t, "js").await;

    snapshot_vm(&t, "js", "sj").await.unwrap();
    let sdir = snapshot_dirs(&t).remove(0);
    assert_eq!(file_names(&sdir), ["disk-root.img", "firecracker-save.json", "memory", "meta.json", "vmstate"]);
    let jailed = |name: &str| format!("/{name}");
    let create_body = requests(&root("js")).into_iter().find(|r| r["path"] == "/snapshot/create").unwrap();
    assert_eq!(
        create_body["body"],
        json!({"mem_file_path": jailed("save-memory"), "snapshot_path": jailed("save-vmstate"), "snapshot_type": "Full"})
    );
    let names = file_names(&root("js"));
    assert!(!names.iter().any(|n| n.starts_with("save-")), "moved out of the jail: {names:?}");

    clone_vm(&t, "jc", "sj").await.unwrap();
    let croot = root("jc");
    let load = requests(&croot).into_iter().find(|r| r["path"] == "/snapshot/load").unwrap();
    assert_eq!(
        load["body"],
        json!({"snapshot_path": jailed("restore-vmstate"),
               "mem_backend": {"backend_type": "File", "backend_path": jailed("restore-memory")}, "resume_vm": false})
    );
    let names = file_names(&croot);
    assert!(!names.iter().any(|n| n.starts_with("restore-")), "unlinked once loaded: {names:?}");
    let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(croot.join("drive-root")), ino(vm_dir(&t, "jc").join("disk-root.img")), "the clone's own disk");
    assert_eq!(state(&info(&t, "jc").await), Some(pb::VmState::VM_STATE_RUNNING));

    // Suspend releases the jail; resume builds a new one.
    suspend_vm(&t, "jc").await.unwrap();
    assert!(!croot.exists(), "the suspended VM's jail is gone");
    resume_vm(&t, "jc").await.unwrap();
    assert_eq!(state(&info(&t, "jc").await), Some(pb::VmState::VM_STATE_RUNNING));
    assert!(croot.join("drive-root").exists());

    let c = t.client(super::support::TOKEN_A);
    for id in ["js", "jc"] {
        c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
        assert!(!root(id).exists(), "jail removed");
    }
    assert!(processes_under(jail_tmp.path()).is_empty() && processes_under(t.tmp.path()).is_empty());
}

/// Starts `binary` (the fake or a real Firecracker) on `<dir>/<name>.sock`
/// in `dir`; returns it and its client.
async fn spawn(binary: &str, dir: &Path, name: &str) -> (std::process::Child, UdsClient) {
    let sock = dir.join(format!("{name}.sock"));
    let child = std::process::Command::new(binary)
        .args(["--api-sock", sock.to_str().unwrap(), "--id", name])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = UdsClient::new(&sock, "firecracker", WAIT, fault_message);
    wait_until("the API", WAIT, || async { c.get::<Value>("/").await.is_ok() }).await;
    (child, c)
}

fn fault(e: metald::backend::uds_http::ApiError) -> String {
    assert_eq!(e.status(), Some(400), "{e}");
    e.to_string()
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Firecracker's snapshot rules as `binary` enforces them, with its
/// messages; run against the fake and, when present, the real Firecracker,
/// so the fake is known to refuse what Firecracker refuses.
async fn check_snapshot_rules(binary: &str, d: &Path) {
    halting_kernel(&d.join("vmlinux"));
    std::fs::write(d.join("disk"), vec![0u8; 4096]).unwrap();
    std::fs::write(d.join("fc.log"), b"").unwrap();
    let create =
        json!({"snapshot_path": d.join("vmstate"), "mem_file_path": d.join("memory"), "snapshot_type": "Full"});
    let (a, c) = spawn(binary, d, "a").await;
    assert!(fault(c.put("/snapshot/create", &create).await.unwrap_err()).contains("before starting the microVM"));
    c.put("/machine-config", &json!({"vcpu_count": 1, "mem_size_mib": 64})).await.unwrap();
    c.put("/boot-source", &json!({"kernel_image_path": d.join("vmlinux"), "boot_args": "console=ttyS0"}))
        .await
        .unwrap();
    let drive = json!({"drive_id": "root", "path_on_host": "disk", "is_root_device": false, "is_read_only": false});
    c.put("/drives/root", &drive).await.unwrap();
    c.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap();
    let m = fault(c.put("/snapshot/create", &create).await.unwrap_err());
    assert!(m.contains("save/restore unavailable while running"), "{m}");
    c.patch("/vm", &json!({"state": "Paused"})).await.unwrap();
    c.put("/snapshot/create", &create).await.unwrap();
    assert_eq!(std::fs::metadata(d.join("memory")).unwrap().len(), 64 << 20);
    let load = json!({"snapshot_path": d.join("vmstate"),
                      "mem_backend": {"backend_type": "File", "backend_path": d.join("memory")}, "resume_vm": false});
    let m = fault(c.put("/snapshot/load", &load).await.unwrap_err());
    assert!(m.contains("not supported after starting the microVM"), "{m}");
    stop(a);

    // Only before any configuration but the logger and metrics.
    let (b, c) = spawn(binary, d, "b").await;
    c.put("/machine-config", &json!({"vcpu_count": 1, "mem_size_mib": 64})).await.unwrap();
    let m = fault(c.put("/snapshot/load", &load).await.unwrap_err());
    assert!(m.contains("Load snapshot error: Loading a microVM snapshot not allowed after configuring"), "{m}");
    stop(b);

    // A failed load ends the process.
    let (mut f, c) = spawn(binary, d, "f").await;
    let mut bad = load.clone();
    bad["snapshot_path"] = json!(d.join("no-such-state"));
    let m = fault(c.put("/snapshot/load", &bad).await.unwrap_err());
    assert!(m.contains("Failed to open snapshot file: No such file or directory"), "{m}");
    let pid = i32::try_from(f.id()).unwrap();
    wait_until("the process to end after a failed load", WAIT, || async { !process_alive(pid) }).await;
    let _ = f.wait();

    // A load (after the logger) brings back the saved microVM, paused.
    let (g, c) = spawn(binary, d, "g").await;
    let m = fault(c.put("/snapshot/load", &json!({"snapshot_path": d.join("vmstate")})).await.unwrap_err());
    assert!(m.contains("either `mem_backend` or `mem_file_path` is required"), "{m}");
    c.put("/logger", &json!({"log_path": d.join("fc.log"), "level": "Info"})).await.unwrap();
    c.put("/snapshot/load", &load).await.unwrap();
    let i: Value = c.get("/").await.unwrap();
    assert_eq!(i["state"], "Paused");
    let config: Value = c.get("/vm/config").await.unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 64);
    assert_eq!(config["drives"][0]["path_on_host"], "disk");
    let m = fault(c.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap_err());
    assert!(m.contains("not supported after starting the microVM"), "{m}");
    // PATCH /drives swaps a drive's file after the load.
    std::fs::write(d.join("disk2"), vec![0u8; 4096]).unwrap();
    let m = fault(c.patch("/drives/root", &json!({"drive_id": "root", "path_on_host": "nope"})).await.unwrap_err());
    assert!(m.contains("Unable to patch the block device"), "{m}");
    c.patch("/drives/root", &json!({"drive_id": "root", "path_on_host": d.join("disk2")})).await.unwrap();
    let config: Value = c.get("/vm/config").await.unwrap();
    assert_eq!(config["drives"][0]["path_on_host"], s(d.join("disk2")));
    c.patch("/vm", &json!({"state": "Resumed"})).await.unwrap();
    let i: Value = c.get("/").await.unwrap();
    assert_eq!(i["state"], "Running");
    stop(g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_firecracker_enforces_the_snapshot_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(tmp.path().to_path_buf());
    check_snapshot_rules(FAKE_FC, tmp.path()).await;

    // Network overrides (a real run would need TAP devices): an unknown
    // interface ends the process; a known one moves the NIC.
    let d = tmp.path().join("nics");
    std::fs::create_dir_all(&d).unwrap();
    let (a, c) = spawn(FAKE_FC, &d, "a").await;
    halting_kernel(&d.join("vmlinux"));
    c.put("/boot-source", &json!({"kernel_image_path": d.join("vmlinux")})).await.unwrap();
    c.put("/network-interfaces/eth0", &json!({"iface_id": "eth0", "host_dev_name": "tap-a"})).await.unwrap();
    c.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap();
    c.patch("/vm", &json!({"state": "Paused"})).await.unwrap();
    c.put("/snapshot/create", &json!({"snapshot_path": d.join("s"), "mem_file_path": d.join("m")})).await.unwrap();
    stop(a);
    let load = |iface: &str| {
        json!({"snapshot_path": d.join("s"), "mem_file_path": d.join("m"),
               "network_overrides": [{"iface_id": iface, "host_dev_name": "tap-b"}]})
    };
    let (mut f, c) = spawn(FAKE_FC, &d, "f").await;
    assert!(fault(c.put("/snapshot/load", &load("eth9")).await.unwrap_err()).contains("Unknown Network Device"));
    assert!(f.wait().unwrap().success());
    let (g, c) = spawn(FAKE_FC, &d, "g").await;
    c.put("/snapshot/load", &load("eth0")).await.unwrap();
    let config: Value = c.get("/vm/config").await.unwrap();
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap-b");
    stop(g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_firecracker_enforces_the_same_snapshot_rules() {
    let Some(fc) = real_hypervisor("firecracker") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(tmp.path().to_path_buf());
    check_snapshot_rules(fc.to_str().unwrap(), tmp.path()).await;
}

/// The real Firecracker (v1.16.1 in `../shared/hypervisors/`), at the API
/// and process level: its guest is a kernel that only halts (real guests
/// do not run on these machines' KVM). A snapshot of the paused microVM is
/// written, a clone's fresh process loads it and opens the clone's own
/// disk copy, suspend ends the process and resume loads the save into a
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_firecracker_snapshots_clones_and_suspends() {
    let Some(fc) = real_hypervisor("firecracker") else { return };
    let (t, _g) = start(&[("FIRECRACKER_BINARY", fc.to_str().unwrap())]).await;
    let config = halting_vm_config(&t);
    create(&t, "rf", config).await.unwrap();
    boot(&t, "rf").await;
    let pid = pid_of(&info(&t, "rf").await);

    snapshot_vm(&t, "rf", "rs").await.unwrap();
    let sdir = snapshot_dirs(&t).remove(0);
    assert_eq!(file_names(&sdir), ["disk-root.img", "firecracker-save.json", "memory", "meta.json", "vmstate"]);
    assert_eq!(std::fs::metadata(sdir.join("memory")).unwrap().len(), 64 << 20);
    let record: Value = serde_json::from_slice(&std::fs::read(sdir.join("firecracker-save.json")).unwrap()).unwrap();
    assert_eq!(record["firecracker_version"], "1.16.1");
    assert_eq!(record["drives"][0]["path_on_host"], "drive-root", "Firecracker reports the path it was given");
    let i = info(&t, "rf").await;
    assert_eq!((state(&i), pid_of(&i)), (Some(pb::VmState::VM_STATE_RUNNING), pid));

    clone_vm(&t, "rc", "rs").await.unwrap();
    let i = info(&t, "rc").await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    let cpid = pid_of(&i);
    assert!(cpid != pid && process_alive(cpid));
    let disk = canon(vm_dir(&t, "rc").join("disk-root.img"));
    let open: Vec<String> = std::fs::read_dir(format!("/proc/{cpid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(open.contains(&disk), "the clone's Firecracker has its own disk open: {open:?}");
    assert!(!open.iter().any(|p| p.ends_with("real.ext4")), "not the source's: {open:?}");
    let fc_api = UdsClient::new(vm_dir(&t, "rc").join("firecracker.sock"), "firecracker", WAIT, fault_message);
    let fi: Value = fc_api.get("/").await.unwrap();
    assert_eq!(fi["state"], "Running");

    let r = suspend_vm(&t, "rc").await.unwrap();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED));
    assert!(!process_alive(cpid));
    assert_eq!(
        file_names(&vm_dir(&t, "rc").join("suspended")),
        ["firecracker-save.json", "memory", "meta.json", "vmstate"]
    );
    resume_vm(&t, "rc").await.unwrap();
    let i = info(&t, "rc").await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    assert!(pid_of(&i) != cpid && process_alive(pid_of(&i)));
    let fi: Value = fc_api.get("/").await.unwrap();
    assert_eq!(fi["state"], "Running");

    let c = t.client(super::support::TOKEN_A);
    for id in ["rf", "rc"] {
        c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
    }
    for id in ["rf", "rc"] {
        assert_nothing_left(&t, id).await;
    }
    delete_snapshot(&t, "rs").await;
    assert!(snapshot_dirs(&t).is_empty());
}
