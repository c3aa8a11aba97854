//! The VM lifecycle: states, the changes that move between them ([`Op`],
//! with their arguments) and the one transition function, [`plan`].
//!
//! Every state change in metald goes through [`plan`]: it refuses what the
//! state does not allow and otherwise says what to do, handing over the
//! runtime the step acts on, so the core's dispatch is an exhaustive match
//! with no "cannot happen" arm. [`transition`] is the same function seen from
//! states alone; the table test at the bottom covers every (state, op) pair.

use std::fmt;

use super::operation::Operation;
use super::runtime::{Runtime, StopMode};

/// Lifecycle state of a VM as persisted and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmState {
    /// Hypervisor prepared, guest not started.
    Created,
    Running,
    Paused,
    /// Guest stopped, hypervisor released; can boot again or be deleted.
    Shutdown,
    /// Guest memory and devices saved to disk, hypervisor released;
    /// resuming continues the guest where it was.
    Suspended,
}

impl VmState {
    pub const ALL: [VmState; 5] =
        [VmState::Created, VmState::Running, VmState::Paused, VmState::Shutdown, VmState::Suspended];

    /// Stable lowercase name, used in the store, logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
            VmState::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(VmState::Created),
            "running" => Some(VmState::Running),
            "paused" => Some(VmState::Paused),
            "shutdown" => Some(VmState::Shutdown),
            "suspended" => Some(VmState::Suspended),
            _ => None,
        }
    }

    /// Whether a hypervisor process belongs to a VM in this state.
    pub fn has_process(self) -> bool {
        match self {
            VmState::Created | VmState::Running | VmState::Paused => true,
            VmState::Shutdown | VmState::Suspended => false,
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that may change a VM's state: a caller's operation, with its
/// arguments, or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Boot,
    Pause,
    Resume,
    Reboot {
        /// A hard reset instead of a guest reboot.
        force: bool,
    },
    Shutdown {
        mode: StopMode,
    },
    Delete {
        /// Delete even a running or paused VM.
        force: bool,
    },
    /// Save memory and devices to disk and release the hypervisor.
    Suspend,
    /// Save a named snapshot; the VM goes on as it was (the name travels
    /// beside the op, see `core::snapshot`).
    Snapshot,
    /// The guest or its hypervisor process ended on its own.
    GuestExited,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Boot => "boot",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Reboot { .. } => "reboot",
            Op::Shutdown { .. } => "shutdown",
            Op::Delete { .. } => "delete",
            Op::Suspend => "suspend",
            Op::Snapshot => "snapshot",
            Op::GuestExited => "guest exit",
        }
    }

    /// The API operation that asks for this change (`None` for events).
    pub fn operation(self) -> Option<Operation> {
        match self {
            Op::Boot => Some(Operation::Boot),
            Op::Pause => Some(Operation::Pause),
            Op::Resume => Some(Operation::Resume),
            Op::Reboot { .. } => Some(Operation::Reboot),
            Op::Shutdown { .. } => Some(Operation::Shutdown),
            Op::Delete { .. } => Some(Operation::Delete),
            Op::Suspend => Some(Operation::Suspend),
            Op::Snapshot => Some(Operation::Snapshot),
            Op::GuestExited => None,
        }
    }
}

/// A VM's lifecycle state together with the runtime handle it owns: a VM
/// with a hypervisor process cannot be expressed without its runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Created(Runtime),
    Running(Runtime),
    Paused(Runtime),
    Shutdown,
    /// No process; the saved state is in the VM's directory.
    Suspended,
}

impl Status {
    pub fn state(&self) -> VmState {
        match self {
            Status::Created(_) => VmState::Created,
            Status::Running(_) => VmState::Running,
            Status::Paused(_) => VmState::Paused,
            Status::Shutdown => VmState::Shutdown,
            Status::Suspended => VmState::Suspended,
        }
    }

    pub fn runtime(&self) -> Option<&Runtime> {
        match self {
            Status::Created(rt) | Status::Running(rt) | Status::Paused(rt) => Some(rt),
            Status::Shutdown | Status::Suspended => None,
        }
    }

    /// A status from its persisted parts; `None` when a state that owns a
    /// process comes without its runtime.
    pub fn from_parts(state: VmState, rt: Option<Runtime>) -> Option<Status> {
        match (state, rt) {
            (VmState::Created, Some(rt)) => Some(Status::Created(rt)),
            (VmState::Running, Some(rt)) => Some(Status::Running(rt)),
            (VmState::Paused, Some(rt)) => Some(Status::Paused(rt)),
            (VmState::Shutdown, _) => Some(Status::Shutdown),
            (VmState::Suspended, _) => Some(Status::Suspended),
            (VmState::Created | VmState::Running | VmState::Paused, None) => None,
        }
    }
}

/// What carrying out an allowed [`Op`] takes, with the runtime it acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Start the guest of a created VM.
    Boot(Runtime),
    /// Start a VMM for a shut-down VM and boot it.
    Start,
    Pause(Runtime),
    Resume(Runtime),
    Reboot {
        rt: Runtime,
        force: bool,
    },
    Shutdown {
        rt: Runtime,
        mode: StopMode,
    },
    /// Release everything, killing the VMM if there is one.
    Delete(Option<Runtime>),
    /// Clean up after a VMM that ended on its own.
    Reap(Runtime),
    /// Pause (if running), save the guest to disk, release the VMM.
    Suspend {
        rt: Runtime,
        running: bool,
    },
    /// Start a VMM from the saved state and run the guest on.
    Restore,
    /// Shut down a suspended VM: its saved state is dropped.
    Discard,
    /// Save a snapshot of the guest and go on in the state it was in.
    Snapshot {
        rt: Runtime,
        running: bool,
    },
}

impl Plan {
    /// Where the VM is once the plan is carried out.
    pub fn target(&self) -> Target {
        match self {
            Plan::Boot(_) | Plan::Start | Plan::Resume(_) | Plan::Reboot { .. } | Plan::Restore => {
                Target::State(VmState::Running)
            }
            Plan::Pause(_) | Plan::Snapshot { running: false, .. } => Target::State(VmState::Paused),
            Plan::Snapshot { running: true, .. } => Target::State(VmState::Running),
            Plan::Shutdown { .. } | Plan::Reap(_) | Plan::Discard => Target::State(VmState::Shutdown),
            Plan::Suspend { .. } => Target::State(VmState::Suspended),
            Plan::Delete(_) => Target::Deleted,
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
        (Op::Boot, VmState::Paused | VmState::Suspended) => " (resume it instead)",
        (Op::Resume, VmState::Shutdown) => " (boot it instead)",
        (Op::Suspend, VmState::Suspended) => " (it is already suspended)",
        (Op::Suspend | Op::Snapshot, VmState::Created | VmState::Shutdown) => {
            " (only a running or paused guest can be saved)"
        }
        (Op::Snapshot | Op::Pause | Op::Reboot { .. }, VmState::Suspended) => " (resume it first)",
        (Op::Resume, VmState::Running) => " (it is not paused)",
        (Op::Pause, VmState::Paused) => " (it is already paused)",
        (Op::Shutdown { .. }, VmState::Shutdown) => " (it is already shut down)",
        (Op::Pause | Op::Reboot { .. } | Op::Shutdown { .. } | Op::Resume, VmState::Created) => " (boot it first)",
        _ => "",
    }
}

/// The one lifecycle function: is `op` allowed in `status`, and what does
/// carrying it out take? Every (op, status) pair is written out: adding an
/// [`Op`] or a [`Status`] does not compile until this says what it does.
pub fn plan(status: &Status, op: Op) -> Result<Plan, InvalidTransition> {
    use Status::*;
    let plan = match (op, status) {
        (Op::Boot, Created(rt)) => Plan::Boot(rt.clone()),
        (Op::Boot, Shutdown) => Plan::Start,
        (Op::Pause, Running(rt)) => Plan::Pause(rt.clone()),
        (Op::Resume, Paused(rt)) => Plan::Resume(rt.clone()),
        (Op::Reboot { force }, Running(rt)) => Plan::Reboot { rt: rt.clone(), force },
        (Op::Shutdown { mode }, Running(rt) | Paused(rt)) => Plan::Shutdown { rt: rt.clone(), mode },
        (Op::Delete { .. }, Created(rt)) => Plan::Delete(Some(rt.clone())),
        (Op::Delete { .. }, Shutdown) => Plan::Delete(None),
        (Op::Delete { force: true }, Running(rt) | Paused(rt)) => Plan::Delete(Some(rt.clone())),
        (Op::GuestExited, Created(rt) | Running(rt) | Paused(rt)) => Plan::Reap(rt.clone()),
        (Op::Suspend, Running(rt)) => Plan::Suspend { rt: rt.clone(), running: true },
        (Op::Suspend, Paused(rt)) => Plan::Suspend { rt: rt.clone(), running: false },
        (Op::Resume, Suspended) => Plan::Restore,
        (Op::Shutdown { .. }, Suspended) => Plan::Discard,
        (Op::Delete { .. }, Suspended) => Plan::Delete(None),
        (Op::Snapshot, Running(rt)) => Plan::Snapshot { rt: rt.clone(), running: true },
        (Op::Snapshot, Paused(rt)) => Plan::Snapshot { rt: rt.clone(), running: false },
        (Op::Boot, Running(_) | Paused(_) | Suspended)
        | (Op::Pause, Created(_) | Paused(_) | Shutdown | Suspended)
        | (Op::Resume, Created(_) | Running(_) | Shutdown)
        | (Op::Reboot { .. }, Created(_) | Paused(_) | Shutdown | Suspended)
        | (Op::Shutdown { .. }, Created(_) | Shutdown)
        | (Op::Delete { force: false }, Running(_) | Paused(_))
        | (Op::Suspend, Created(_) | Shutdown | Suspended)
        | (Op::Snapshot, Created(_) | Shutdown | Suspended)
        | (Op::GuestExited, Shutdown | Suspended) => return Err(InvalidTransition { state: status.state(), op }),
    };
    Ok(plan)
}

/// [`plan`] seen from states alone: is `op` allowed in `state`, and where
/// does it lead?
pub fn transition(state: VmState, op: Op) -> Result<Target, InvalidTransition> {
    let status = match state {
        VmState::Created => Status::Created(Runtime::default()),
        VmState::Running => Status::Running(Runtime::default()),
        VmState::Paused => Status::Paused(Runtime::default()),
        VmState::Shutdown => Status::Shutdown,
        VmState::Suspended => Status::Suspended,
    };
    plan(&status, op).map(|p| p.target())
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    const GRACEFUL: StopMode = StopMode::Graceful { timeout: std::time::Duration::from_secs(30) };
    const OPS: [Op; 10] = [
        Op::Boot,
        Op::Pause,
        Op::Resume,
        Op::Reboot { force: false },
        Op::Shutdown { mode: GRACEFUL },
        Op::Delete { force: false },
        Op::Delete { force: true },
        Op::Suspend,
        Op::Snapshot,
        Op::GuestExited,
    ];

    /// The complete table: every state × every operation, written out.
    fn expected(state: VmState, op: Op) -> Option<Target> {
        let s = Target::State;
        let table: &[(VmState, Op, Option<Target>)] = &[
            (Created, Op::Boot, Some(s(Running))),
            (Created, Op::Pause, None),
            (Created, Op::Resume, None),
            (Created, Op::Reboot { force: false }, None),
            (Created, Op::Shutdown { mode: GRACEFUL }, None),
            (Created, Op::Delete { force: false }, Some(Target::Deleted)),
            (Created, Op::Delete { force: true }, Some(Target::Deleted)),
            (Created, Op::Suspend, None),
            (Created, Op::Snapshot, None),
            (Created, Op::GuestExited, Some(s(Shutdown))),
            (Running, Op::Boot, None),
            (Running, Op::Pause, Some(s(Paused))),
            (Running, Op::Resume, None),
            (Running, Op::Reboot { force: false }, Some(s(Running))),
            (Running, Op::Shutdown { mode: GRACEFUL }, Some(s(Shutdown))),
            (Running, Op::Delete { force: false }, None),
            (Running, Op::Delete { force: true }, Some(Target::Deleted)),
            (Running, Op::Suspend, Some(s(Suspended))),
            (Running, Op::Snapshot, Some(s(Running))),
            (Running, Op::GuestExited, Some(s(Shutdown))),
            (Paused, Op::Boot, None),
            (Paused, Op::Pause, None),
            (Paused, Op::Resume, Some(s(Running))),
            (Paused, Op::Reboot { force: false }, None),
            (Paused, Op::Shutdown { mode: GRACEFUL }, Some(s(Shutdown))),
            (Paused, Op::Delete { force: false }, None),
            (Paused, Op::Delete { force: true }, Some(Target::Deleted)),
            (Paused, Op::Suspend, Some(s(Suspended))),
            (Paused, Op::Snapshot, Some(s(Paused))),
            (Paused, Op::GuestExited, Some(s(Shutdown))),
            (Shutdown, Op::Boot, Some(s(Running))),
            (Shutdown, Op::Pause, None),
            (Shutdown, Op::Resume, None),
            (Shutdown, Op::Reboot { force: false }, None),
            (Shutdown, Op::Shutdown { mode: GRACEFUL }, None),
            (Shutdown, Op::Delete { force: false }, Some(Target::Deleted)),
            (Shutdown, Op::Delete { force: true }, Some(Target::Deleted)),
            (Shutdown, Op::Suspend, None),
            (Shutdown, Op::Snapshot, None),
            (Shutdown, Op::GuestExited, None),
            (Suspended, Op::Boot, None),
            (Suspended, Op::Pause, None),
            (Suspended, Op::Resume, Some(s(Running))),
            (Suspended, Op::Reboot { force: false }, None),
            (Suspended, Op::Shutdown { mode: GRACEFUL }, Some(s(Shutdown))),
            (Suspended, Op::Delete { force: false }, Some(Target::Deleted)),
            (Suspended, Op::Delete { force: true }, Some(Target::Deleted)),
            (Suspended, Op::Suspend, None),
            (Suspended, Op::Snapshot, None),
            (Suspended, Op::GuestExited, None),
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
    fn plans_carry_the_runtime_of_the_status_they_act_on() {
        let rt = Runtime { pid: Some(42), ..Default::default() };
        let force = StopMode::Force;
        assert_eq!(plan(&Status::Created(rt.clone()), Op::Boot), Ok(Plan::Boot(rt.clone())));
        assert_eq!(plan(&Status::Shutdown, Op::Boot), Ok(Plan::Start));
        assert_eq!(plan(&Status::Running(rt.clone()), Op::Pause), Ok(Plan::Pause(rt.clone())));
        assert_eq!(
            plan(&Status::Paused(rt.clone()), Op::Shutdown { mode: force }),
            Ok(Plan::Shutdown { rt: rt.clone(), mode: force })
        );
        assert_eq!(
            plan(&Status::Running(rt.clone()), Op::Reboot { force: true }),
            Ok(Plan::Reboot { rt: rt.clone(), force: true })
        );
        assert_eq!(plan(&Status::Shutdown, Op::Delete { force: false }), Ok(Plan::Delete(None)));
        assert_eq!(plan(&Status::Paused(rt.clone()), Op::Delete { force: true }), Ok(Plan::Delete(Some(rt.clone()))));
        assert_eq!(plan(&Status::Running(rt.clone()), Op::GuestExited), Ok(Plan::Reap(rt)));
    }

    #[test]
    fn every_change_a_caller_asks_for_names_its_operation() {
        for op in OPS {
            assert_eq!(op.operation().is_some(), op != Op::GuestExited, "{op:?}");
            if let Some(o) = op.operation() {
                assert_eq!(o.as_str(), op.name());
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
        assert!(!Suspended.has_process());
    }

    #[test]
    fn a_suspended_vm_resumes_from_disk_and_refuses_what_needs_a_process() {
        assert_eq!(plan(&Status::Suspended, Op::Resume), Ok(Plan::Restore));
        assert_eq!(plan(&Status::Suspended, Op::Shutdown { mode: GRACEFUL }), Ok(Plan::Discard));
        assert_eq!(plan(&Status::Suspended, Op::Delete { force: false }), Ok(Plan::Delete(None)));
        let e = transition(Suspended, Op::Boot).unwrap_err();
        assert_eq!(e.to_string(), "cannot boot a VM that is suspended (resume it instead)");
        let e = transition(Shutdown, Op::Suspend).unwrap_err();
        assert!(e.to_string().contains("only a running or paused guest"), "{e}");
    }
}
