//! `metaldctl` as a user runs it: the real binary against a daemon on
//! 127.0.0.1:0 (fake backend).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

use support::{TOKEN_A, start};

fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metaldctl"))
        .env("METALD_ENDPOINT", endpoint)
        .env("METALD_TOKEN", TOKEN_A)
        .args(args)
        .output()
        .expect("running metaldctl")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metaldctl_drives_the_whole_lifecycle() {
    let t = start(&[]).await;
    let ep = t.endpoint();
    let kernel = t.kernel();
    let rootfs = t.assets().join("rootfs.ext4").display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut log = Vec::new();
        log.push(ok(&ctl(
            &ep,
            &[
                "create",
                "--id",
                "cli-1",
                "--vcpus",
                "2",
                "--memory-mb",
                "128",
                "--kernel",
                &kernel,
                "--rootfs",
                &rootfs,
                "--meta",
                "team=a",
            ],
        )));
        for args in [
            vec!["boot", "cli-1"],
            vec!["pause", "cli-1"],
            vec!["resume", "cli-1"],
            vec!["reboot", "cli-1", "--force"],
            vec!["--protocol", "grpc", "info", "cli-1", "--json"],
            vec!["--protocol", "grpc-web", "list", "--state", "running"],
            vec!["list", "--json"],
            vec!["shutdown", "cli-1", "--timeout", "5"],
            vec!["delete", "cli-1"],
        ] {
            log.push(ok(&ctl(&ep, &args)));
        }
        let missing = ctl(&ep, &["info", "cli-1"]);
        let unauth = Command::new(env!("CARGO_BIN_EXE_metaldctl"))
            .env("METALD_ENDPOINT", &ep)
            .args(["--token", "bogus-token-000000", "list"])
            .output()
            .unwrap();
        (log, missing, unauth)
    })
    .await
    .unwrap();
    let (log, missing, unauth) = out;
    assert_eq!(log[0].trim(), "cli-1\tCREATED");
    assert_eq!(log[1].trim(), "cli-1\tRUNNING");
    assert_eq!(log[2].trim(), "cli-1\tPAUSED");
    let info: serde_json::Value = serde_json::from_str(&log[5]).unwrap();
    assert_eq!(info["vmId"], "cli-1");
    assert_eq!(info["config"]["cpu"]["vcpuCount"], 2);
    assert_eq!(info["config"]["storage"][0]["isRootDevice"], true);
    assert_eq!(info["config"]["metadata"]["team"], "a");
    assert!(log[6].contains("cli-1") && log[6].contains("RUNNING"), "{}", log[6]);
    let list: serde_json::Value = serde_json::from_str(&log[7]).unwrap();
    assert_eq!(list["total_count"], 1);
    assert_eq!(log[8].trim(), "cli-1\tSHUTDOWN");
    assert_eq!(log[9].trim(), "cli-1\tDELETED");
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("not_found") && err.contains("VM cli-1 not found"), "{err}");
    assert_eq!(unauth.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unauth.stderr).contains("unauthenticated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metaldctl_console_prints_raw_bytes_and_follows_until_ctrl_c() {
    use std::io::Read;
    let t = start(&[]).await;
    let ep = t.endpoint();
    let kernel = t.kernel();
    let log = tokio::task::spawn_blocking({
        let ep = ep.clone();
        move || {
            ok(&ctl(&ep, &["create", "--id", "cli-c", "--kernel", &kernel]));
            ok(&ctl(&ep, &["boot", "cli-c"]));
            let info: serde_json::Value = serde_json::from_str(&ok(&ctl(&ep, &["info", "cli-c", "--json"]))).unwrap();
            std::path::PathBuf::from(info["backendInfo"]["console_log"].as_str().unwrap())
        }
    })
    .await
    .unwrap();
    // Bytes that are not UTF-8 come out as they are.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"\xff\xfe raw\n").unwrap();
    let on_disk = std::fs::read(&log).unwrap();

    let (history, tail, missing, followed, status) = tokio::task::spawn_blocking(move || {
        let history = ctl(&ep, &["console", "cli-c"]);
        let tail = ctl(&ep, &["console", "cli-c", "--tail", "6"]);
        let missing = ctl(&ep, &["console", "nope"]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_metaldctl"))
            .env("METALD_ENDPOINT", &ep)
            .env("METALD_TOKEN", TOKEN_A)
            .args(["console", "cli-c", "--follow"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut followed = Vec::new();
        let mut buf = [0u8; 4096];
        std::io::Write::write_all(&mut f, b"followed line\n").unwrap();
        while !String::from_utf8_lossy(&followed).contains("followed line\n") {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "metaldctl ended early: {}", String::from_utf8_lossy(&followed));
            followed.extend_from_slice(&buf[..n]);
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let status = child.wait().unwrap();
        (history, tail, missing, followed, status)
    })
    .await
    .unwrap();
    assert!(history.status.success(), "{}", String::from_utf8_lossy(&history.stderr));
    assert_eq!(history.stdout, on_disk);
    assert_eq!(tail.stdout, b"\xfe raw\n");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not_found"));
    let mut want = on_disk.clone();
    want.extend(b"followed line\n");
    assert_eq!(followed, want);
    assert!(status.success(), "Ctrl-C ends it cleanly: {status:?}");
}
