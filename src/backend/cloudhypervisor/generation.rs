//! A clone's new generation on Cloud Hypervisor (docs/SNAPSHOTS.md, "Fresh randomness"). v53
//! has no VM generation ID device and its virtio console cannot be a socket, so every guest's
//! virtio console (`hvc0` in the guest) is a pty (`console: {"mode": "Pty"}`) and its kernel
//! command line says [`CMDLINE_FLAG`], which tells metald-init's watcher the console is
//! metald's. Cloud Hypervisor reports the pty's path in `vm.info` (`config.console.file`);
//! metald opens it raw, writes the generation line (the QEMU backend's format) and a thread
//! waits up to a minute for the guest's `ok`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::termios::{SetArg, SpecialCharacterIndices, cfmakeraw, tcgetattr, tcsetattr};

use super::api::VmInfo;
use crate::backend::qemu::generation::{ANSWER_WAIT, line, log_answer};
use crate::backend::{BackendError, Result};
use crate::model::VmId;

/// On the kernel command line: "hvc0 is metald's generation console" (metald-init reads it).
pub const CMDLINE_FLAG: &str = "metald.generation=hvc0";

/// The guest console's pty, as `vm.info` reports it.
pub fn pty_of(info: &VmInfo) -> Option<PathBuf> {
    let c = &info.config["console"];
    (c["mode"] == "Pty").then(|| c["file"].as_str().map(PathBuf::from)).flatten()
}

/// The pty raw (nothing echoed back to the guest, newlines as they are), reads returning after
/// at most a second without data.
fn open_raw(pty: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(pty)?;
    let mut t = tcgetattr(&f)?;
    cfmakeraw(&mut t);
    t.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
    t.control_chars[SpecialCharacterIndices::VTIME as usize] = 10;
    tcsetattr(&f, SetArg::TCSANOW, &t)?;
    Ok(f)
}

/// Writes the generation to `pty`; a thread waits for the guest's answer and logs it.
pub async fn send(pty: PathBuf, vm: &VmId, seed: &[u8; 32]) -> Result<()> {
    let text = line(seed);
    let what = pty.display().to_string();
    let mut f = tokio::task::spawn_blocking(move || {
        let mut f = open_raw(&pty)?;
        f.write_all(text.as_bytes())?;
        Ok::<File, std::io::Error>(f)
    })
    .await
    .map_err(|e| BackendError::failed(format!("the generation task: {e}")))?
    .map_err(|e| BackendError::io(format!("writing to the guest console {what}"), e))?;
    let vm = vm.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let answer = loop {
            if start.elapsed() > ANSWER_WAIT {
                break None;
            }
            match f.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break Some(None),
            }
            let text = String::from_utf8_lossy(&got);
            if let Some(l) = text.lines().find(|l| l.trim() == "ok" || l.trim_start().starts_with("error")) {
                break Some(Some(l.to_owned()));
            }
            if got.len() > 64 * 1024 {
                got.drain(..32 * 1024);
            }
        };
        log_answer(&vm, answer, ANSWER_WAIT);
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_pty_is_read_from_vm_info() {
        let info = |c| VmInfo { state: "Paused".into(), memory_actual_size: None, config: json!({ "console": c }) };
        assert_eq!(pty_of(&info(json!({"mode": "Pty", "file": "/dev/pts/7"}))), Some(PathBuf::from("/dev/pts/7")));
        assert_eq!(pty_of(&info(json!({"mode": "Pty"}))), None, "no pty yet");
        assert_eq!(pty_of(&info(json!({"mode": "File", "file": "/c.log"}))), None);
        assert_eq!(pty_of(&info(json!({"mode": "Off"}))), None);
    }
}
