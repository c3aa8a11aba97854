//! `metald-fake-jailer`: a TEST DOUBLE of Firecracker's `jailer` for
//! metald's tests. It parses and validates the jailer's documented command
//! line (`--id`, `--exec-file` whose name contains "firecracker", `--uid`,
//! `--gid`, `--chroot-base-dir`, `--netns`, `--cgroup-version`,
//! `--parent-cgroup`, `--cgroup <file>=<value>`, `--resource-limit`, then
//! `--` and Firecracker's arguments), records them as JSON in
//! `<chroot base>/<exec file name>/<id>/jailer-args.json`, and execs the
//! exec file the way the jailer does (`--id=<id> --start-time-us=…
//! --start-time-cpu-us=…` plus the extra arguments, same pid, cleared
//! environment, working directory = the jail root).
//!
//! What it does NOT do: chroot/pivot_root, setns, setuid/setgid, mknod and
//! cgroup writes. Instead it sets `METALD_FAKE_CHROOT=<jail root>` so the
//! fake Firecracker resolves every API path inside the jail (which proves
//! metald put the files there and sent jail-relative paths).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde_json::json;

fn fail(msg: &str) -> ! {
    eprintln!("Jailer error: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (ours, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (&args[..], &[][..]),
    };
    let mut id = None;
    let mut exec_file = None;
    let mut uid = None;
    let mut gid = None;
    let mut base = PathBuf::from("/srv/jailer");
    let mut netns = None;
    let mut cgroup_version = String::from("1");
    let mut parent_cgroup = None;
    let mut cgroups = Vec::new();
    let mut limits = Vec::new();
    let mut i = 0;
    while i < ours.len() {
        let flag = ours[i].as_str();
        let value = || ours.get(i + 1).cloned().unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag {
            "--id" => id = Some(value()),
            "--exec-file" => exec_file = Some(PathBuf::from(value())),
            "--uid" => uid = Some(value().parse::<u32>().unwrap_or_else(|_| fail("invalid --uid"))),
            "--gid" => gid = Some(value().parse::<u32>().unwrap_or_else(|_| fail("invalid --gid"))),
            "--chroot-base-dir" => base = PathBuf::from(value()),
            "--netns" => netns = Some(value()),
            "--cgroup-version" => cgroup_version = value(),
            "--parent-cgroup" => parent_cgroup = Some(value()),
            "--cgroup" => cgroups.push(value()),
            "--resource-limit" => limits.push(value()),
            "--daemonize" | "--new-pid-ns" => fail(&format!("{flag} is not supported by the fake jailer")),
            other => fail(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    let id = id.unwrap_or_else(|| fail("--id is required"));
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        fail("invalid --id");
    }
    let exec_file = exec_file.unwrap_or_else(|| fail("--exec-file is required"));
    let (Some(uid), Some(gid)) = (uid, gid) else { fail("--uid and --gid are required") };
    let exec_name = exec_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !exec_name.contains("firecracker") {
        fail("the exec file name must contain \"firecracker\"");
    }
    if !exec_file.is_file() {
        fail(&format!("exec file {} does not exist", exec_file.display()));
    }
    if !matches!(cgroup_version.as_str(), "1" | "2") {
        fail("--cgroup-version must be 1 or 2");
    }
    for c in &cgroups {
        if !c.split_once('=').is_some_and(|(k, v)| k.contains('.') && !v.is_empty()) {
            fail(&format!("invalid --cgroup {c:?}: expected <file>=<value>"));
        }
    }
    if let Some(ns) = &netns
        && !Path::new(ns).exists()
    {
        fail(&format!("netns {ns} does not exist"));
    }
    let vm_dir = base.join(&exec_name).join(&id);
    let root = vm_dir.join("root");
    if let Err(e) = std::fs::create_dir_all(&root) {
        fail(&format!("creating {}: {e}", root.display()));
    }
    let record = json!({
        "argv": args,
        "id": id,
        "exec_file": exec_file,
        "uid": uid,
        "gid": gid,
        "chroot_base_dir": base,
        "netns": netns,
        "cgroup_version": cgroup_version,
        "parent_cgroup": parent_cgroup,
        "cgroups": cgroups,
        "resource_limits": limits,
        "firecracker_args": extra,
    });
    if let Err(e) = std::fs::write(vm_dir.join("jailer-args.json"), record.to_string()) {
        fail(&format!("recording arguments: {e}"));
    }
    let mut cmd = std::process::Command::new(&exec_file);
    cmd.arg(format!("--id={id}"))
        .arg("--start-time-us=0")
        .arg("--start-time-cpu-us=0")
        .args(extra)
        .current_dir(&root)
        .env_clear()
        .env("METALD_FAKE_CHROOT", &root);
    for (k, v) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("METALD_FAKE_") {
            cmd.env(k, v);
        }
    }
    let err = cmd.exec();
    fail(&format!("exec {}: {err}", exec_file.display()));
}
