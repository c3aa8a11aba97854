//! `contrib/systemd/metald.service` is a unit systemd accepts: `systemd-analyze
//! verify` of it (with `ExecStart` pointed at the metald this build made, since
//! verify checks the binary exists) prints nothing, while a copy with a broken
//! directive is reported (so the check can fail). And it keeps what metald
//! needs: `KillMode=process` (VMs outlive a metald restart) and a writable
//! data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

const METALD: &str = env!("CARGO_BIN_EXE_metald");

/// `systemd-analyze verify` of `unit`: its success and what it printed.
fn verify(unit: &Path) -> (bool, String) {
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/install-deps.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_service_unit_verifies_and_keeps_vms_across_restarts() {
    let unit = std::fs::read_to_string(support::repo_root().join("contrib/systemd/metald.service")).unwrap();
    let lines: Vec<&str> = unit.lines().collect();
    for needed in ["KillMode=process", "ExecStart=/usr/local/bin/metald", "StateDirectory=metald", "Restart=on-failure"]
    {
        assert!(lines.contains(&needed), "the unit lacks {needed}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let here = unit.replace("ExecStart=/usr/local/bin/metald", &format!("ExecStart={METALD}"));
    let path = tmp.path().join("metald.service");
    std::fs::write(&path, &here).unwrap();
    let (ok, text) = verify(&path);
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify: {text}");

    let broken = tmp.path().join("broken.service");
    std::fs::write(&broken, here.replace("KillMode=process", "KillMode=bogus")).unwrap();
    let (_, text) = verify(&broken);
    assert!(text.contains("KillMode") || text.contains("kill mode"), "a broken unit is reported: {text:?}");
}
