//! Why a VM stopped ([`StopInfo`]): recorded with every change to
//! `SHUTDOWN`, stored with the state, reported by `GetVmInfo`, the logs and
//! the `metald_vm_stops_total` metric. A VMM that exits with status 0 after
//! a KVM internal error looks like a clean power-off from its status
//! alone, so backends classify an exit from its status, the VMM's own log
//! and the kernel's OOM-killer messages ([`StopReason`]).

use serde::{Deserialize, Serialize};

/// The reasons a VM stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `ShutdownVm` (graceful or forced).
    Requested,
    /// The guest powered off (or halted) by itself: the VMM exited cleanly.
    GuestPowerOff,
    /// The VMM failed: a non-zero exit, a fatal signal, or an internal
    /// (e.g. KVM) error in its log.
    Crashed,
    /// Someone other than metald killed the VMM (`SIGKILL`).
    Killed,
    /// The kernel's OOM killer ended the VMM.
    OutOfMemory,
    /// The VMM was gone when metald looked (e.g. after a metald restart or a
    /// host reboot) and left no sign why.
    Unknown,
}

impl StopReason {
    pub const ALL: [StopReason; 6] = [
        StopReason::Requested,
        StopReason::GuestPowerOff,
        StopReason::Crashed,
        StopReason::Killed,
        StopReason::OutOfMemory,
        StopReason::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Requested => "requested",
            StopReason::GuestPowerOff => "guest_power_off",
            StopReason::Crashed => "crashed",
            StopReason::Killed => "killed",
            StopReason::OutOfMemory => "out_of_memory",
            StopReason::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why and when a VM last stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopInfo {
    pub reason: StopReason,
    /// What was seen: the exit status, the VMM's error line, the request.
    pub detail: String,
    /// Unix seconds.
    pub at: i64,
}

impl StopInfo {
    pub fn new(reason: StopReason, detail: impl Into<String>, at: i64) -> StopInfo {
        StopInfo { reason, detail: detail.into(), at }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reasons_have_stable_names_in_json_and_text() {
        for r in StopReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<StopReason>(&json).unwrap(), r);
        }
        let i = StopInfo::new(StopReason::Crashed, "exited with status 1", 7);
        let back: StopInfo = serde_json::from_str(&serde_json::to_string(&i).unwrap()).unwrap();
        assert_eq!(back, i);
    }
}
