//! A clone's new generation on QEMU (docs/SNAPSHOTS.md, "Fresh randomness"). microvm has no VM
//! generation ID device (QEMU builds that ACPI table for pc/q35 only), so every QEMU guest gets
//! a virtio console port named `org.metald.generation` (`cmdline.rs`) whose host side is a Unix
//! socket QEMU listens on in the VM directory. metald connects, writes
//! `METALD_GENERATION <64 hex digits>` and keeps the connection until the guest's watcher
//! (metald-init, `init/src/generation.rs`) answers `ok`, or a minute: QEMU drops what a client
//! wrote when it hangs up before the guest has read it.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{debug, info, warn};

use crate::backend::{BackendError, Result};
use crate::model::VmId;

/// The port's name, which the guest finds it by.
pub const PORT_NAME: &str = "org.metald.generation";
/// How long the answer may take (a guest under TCG is slow, and it reads only once running).
pub const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// The line the guest reads (metald-init's `generation::parse`; the Cloud Hypervisor backend
/// writes the same).
pub fn line(seed: &[u8; 32]) -> String {
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    format!("METALD_GENERATION {hex}\n")
}

/// Logs the guest's answer, `None` when none came (`wait` is how long metald waited).
pub fn log_answer(vm: &VmId, answer: Option<Option<String>>, wait: Duration) {
    match answer {
        Some(Some(l)) if l.trim() == "ok" => {
            info!(vm_id = %vm, "the clone's guest took its new generation and reseeded its random number generator")
        }
        Some(Some(l)) => {
            warn!(vm_id = %vm, answer = %l.trim(), "the clone's guest could not reseed its random number generator")
        }
        Some(None) => debug!(vm_id = %vm, "the generation port closed before the guest answered"),
        None => warn!(
            vm_id = %vm,
            "no answer on the generation port within {} s: the guest runs no metald-init watcher, so its random \
             number generator goes on from the snapshot's state until the kernel reseeds by itself",
            wait.as_secs()
        ),
    }
}

/// Writes the generation to the port's socket `sock`; a task waits for the guest's answer and
/// logs it.
pub async fn send(sock: &Path, vm: &VmId, seed: &[u8; 32]) -> Result<()> {
    let mut s = UnixStream::connect(sock)
        .await
        .map_err(|e| BackendError::io(format!("connecting to the generation port {}", sock.display()), e))?;
    s.write_all(line(seed).as_bytes())
        .await
        .map_err(|e| BackendError::io(format!("writing to the generation port {}", sock.display()), e))?;
    let vm = vm.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(s).lines();
        let answer = tokio::time::timeout(ANSWER_WAIT, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) if l.trim() == "ok" || l.starts_with("error") => return Some(l),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await;
        log_answer(&vm, answer.ok(), ANSWER_WAIT);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_the_seed_in_hex() {
        let mut seed = [0u8; 32];
        seed[0] = 0xab;
        seed[31] = 0x01;
        let l = line(&seed);
        assert_eq!(l.len(), "METALD_GENERATION ".len() + 64 + 1);
        assert!(l.starts_with("METALD_GENERATION ab00"), "{l}");
        assert!(l.ends_with("01\n"), "{l}");
    }
}
