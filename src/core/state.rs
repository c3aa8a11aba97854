//! The VM lifecycle: states, operations and the one transition function.
//!
//! Every state change in metald goes through [`transition`]; the manager
//! validates with it before any side effect and commits its result after.
//! The table test at the bottom covers every (state, operation) pair.

use std::fmt;

/// Lifecycle state of a VM as persisted and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmState {
    /// Hypervisor prepared, guest not started.
    Created,
    Running,
    Paused,
    /// Guest stopped, hypervisor released; can boot again or be deleted.
    Shutdown,
}

impl VmState {
    pub const ALL: [VmState; 4] = [VmState::Created, VmState::Running, VmState::Paused, VmState::Shutdown];

    /// Stable lowercase name, used in the store, logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(VmState::Created),
            "running" => Some(VmState::Running),
            "paused" => Some(VmState::Paused),
            "shutdown" => Some(VmState::Shutdown),
            _ => None,
        }
    }

    /// Whether a hypervisor process belongs to a VM in this state.
    pub fn has_process(self) -> bool {
        match self {
            VmState::Created | VmState::Running | VmState::Paused => true,
            VmState::Shutdown => false,
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that may change a VM's state: an API operation or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Boot,
    Pause,
    Resume,
    Reboot,
    Shutdown,
    Delete {
        force: bool,
    },
    /// The guest or its hypervisor process ended on its own.
    GuestExited,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Boot => "boot",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Reboot => "reboot",
            Op::Shutdown => "shutdown",
            Op::Delete { .. } => "delete",
            Op::GuestExited => "guest exit",
        }
    }
}

/// Where an allowed operation leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    State(VmState),
    /// The VM record and all its resources are removed.
    Deleted,
}

/// Why a transition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {op} a VM that is {state}{hint}", op = op.name(), hint = hint(*op, *state))]
pub struct InvalidTransition {
    pub state: VmState,
    pub op: Op,
}

fn hint(op: Op, state: VmState) -> &'static str {
    match (op, state) {
        (Op::Delete { force: false }, VmState::Running | VmState::Paused) => {
            " (shut it down first, or delete with force=true)"
        }
        (Op::Boot, VmState::Running) => " (it is already running)",
        (Op::Boot, VmState::Paused) => " (resume it instead)",
        (Op::Resume, VmState::Running) => " (it is not paused)",
        (Op::Pause, VmState::Paused) => " (it is already paused)",
        (Op::Shutdown, VmState::Shutdown) => " (it is already shut down)",
        (Op::Pause | Op::Reboot | Op::Shutdown | Op::Resume, VmState::Created) => " (boot it first)",
        _ => "",
    }
}

/// The one lifecycle function: is `op` allowed in `state`, and where does it lead?
pub fn transition(state: VmState, op: Op) -> Result<Target, InvalidTransition> {
    use VmState::*;
    let target = match (op, state) {
        (Op::Boot, Created | Shutdown) => Target::State(Running),
        (Op::Pause, Running) => Target::State(Paused),
        (Op::Resume, Paused) => Target::State(Running),
        (Op::Reboot, Running) => Target::State(Running),
        (Op::Shutdown, Running | Paused) => Target::State(Shutdown),
        (Op::Delete { .. }, Created | Shutdown) => Target::Deleted,
        (Op::Delete { force: true }, Running | Paused) => Target::Deleted,
        (Op::GuestExited, Created | Running | Paused) => Target::State(Shutdown),
        (Op::Boot, Running | Paused)
        | (Op::Pause, Created | Paused | Shutdown)
        | (Op::Resume, Created | Running | Shutdown)
        | (Op::Reboot, Created | Paused | Shutdown)
        | (Op::Shutdown, Created | Shutdown)
        | (Op::Delete { force: false }, Running | Paused)
        | (Op::GuestExited, Shutdown) => return Err(InvalidTransition { state, op }),
    };
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    const OPS: [Op; 8] = [
        Op::Boot,
        Op::Pause,
        Op::Resume,
        Op::Reboot,
        Op::Shutdown,
        Op::Delete { force: false },
        Op::Delete { force: true },
        Op::GuestExited,
    ];

    /// The complete table: every state × every operation, written out.
    fn expected(state: VmState, op: Op) -> Option<Target> {
        let s = Target::State;
        let table: &[(VmState, Op, Option<Target>)] = &[
            (Created, Op::Boot, Some(s(Running))),
            (Created, Op::Pause, None),
            (Created, Op::Resume, None),
            (Created, Op::Reboot, None),
            (Created, Op::Shutdown, None),
            (Created, Op::Delete { force: false }, Some(Target::Deleted)),
            (Created, Op::Delete { force: true }, Some(Target::Deleted)),
            (Created, Op::GuestExited, Some(s(Shutdown))),
            (Running, Op::Boot, None),
            (Running, Op::Pause, Some(s(Paused))),
            (Running, Op::Resume, None),
            (Running, Op::Reboot, Some(s(Running))),
            (Running, Op::Shutdown, Some(s(Shutdown))),
            (Running, Op::Delete { force: false }, None),
            (Running, Op::Delete { force: true }, Some(Target::Deleted)),
            (Running, Op::GuestExited, Some(s(Shutdown))),
            (Paused, Op::Boot, None),
            (Paused, Op::Pause, None),
            (Paused, Op::Resume, Some(s(Running))),
            (Paused, Op::Reboot, None),
            (Paused, Op::Shutdown, Some(s(Shutdown))),
            (Paused, Op::Delete { force: false }, None),
            (Paused, Op::Delete { force: true }, Some(Target::Deleted)),
            (Paused, Op::GuestExited, Some(s(Shutdown))),
            (Shutdown, Op::Boot, Some(s(Running))),
            (Shutdown, Op::Pause, None),
            (Shutdown, Op::Resume, None),
            (Shutdown, Op::Reboot, None),
            (Shutdown, Op::Shutdown, None),
            (Shutdown, Op::Delete { force: false }, Some(Target::Deleted)),
            (Shutdown, Op::Delete { force: true }, Some(Target::Deleted)),
            (Shutdown, Op::GuestExited, None),
        ];
        assert_eq!(table.len(), VmState::ALL.len() * OPS.len());
        table
            .iter()
            .find(|(st, o, _)| *st == state && *o == op)
            .map(|(_, _, t)| *t)
            .unwrap_or_else(|| panic!("table misses ({state:?}, {op:?})"))
    }

    #[test]
    fn every_pair_matches_the_table() {
        for state in VmState::ALL {
            for op in OPS {
                let got = transition(state, op).ok();
                assert_eq!(got, expected(state, op), "({state:?}, {op:?})");
            }
        }
    }

    #[test]
    fn refusals_name_the_current_state() {
        let err = transition(Running, Op::Delete { force: false }).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("running"), "{msg}");
        assert!(msg.contains("force=true"), "{msg}");
        let err = transition(Created, Op::Pause).unwrap_err();
        assert_eq!(err.to_string(), "cannot pause a VM that is created (boot it first)");
    }

    #[test]
    fn state_names_round_trip() {
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmState::parse("bogus"), None);
    }

    #[test]
    fn process_ownership_follows_state() {
        assert!(Created.has_process());
        assert!(Running.has_process());
        assert!(Paused.has_process());
        assert!(!Shutdown.has_process());
    }
}
