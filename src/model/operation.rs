//! The one list of the VM API's operations. Metric labels, span and RPC
//! names, the dense tables the telemetry binds per operation and the CLI's
//! subcommands all derive from [`Operation`]; the lifecycle changes with
//! their arguments are [`super::Op`], which names its operation
//! exhaustively.

/// Declares [`Operation`] from one table, so that `ALL`, the index of each
/// operation and its names cannot disagree.
macro_rules! operations {
    ($($variant:ident => $name:literal, $method:literal;)+) => {
        /// An operation of `vmprovisioner.v1.VmService`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Operation {
            $($variant,)+
        }

        impl Operation {
            /// Every operation, in declaration order: `ALL[op.index()] == op`.
            pub const ALL: [Operation; [$(stringify!($variant)),+].len()] = [$(Operation::$variant,)+];

            /// Stable lowercase name (metric label `operation`, CLI verb).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Operation::$variant => $name,)+
                }
            }

            /// The RPC's full name, `<service>/<method>` (its server span's name).
            pub fn rpc_name(self) -> &'static str {
                match self {
                    $(Operation::$variant => concat!("vmprovisioner.v1.VmService/", $method),)+
                }
            }
        }
    };
}

operations! {
    Create => "create", "CreateVm";
    Boot => "boot", "BootVm";
    Pause => "pause", "PauseVm";
    Resume => "resume", "ResumeVm";
    Reboot => "reboot", "RebootVm";
    Shutdown => "shutdown", "ShutdownVm";
    Delete => "delete", "DeleteVm";
    Info => "info", "GetVmInfo";
    List => "list", "ListVms";
    Suspend => "suspend", "SuspendVm";
    Snapshot => "snapshot", "SnapshotVm";
    Snapshots => "snapshots", "ListSnapshots";
    DeleteSnapshot => "snapshot-delete", "DeleteSnapshot";
    Console => "console", "StreamConsole";
}

impl Operation {
    /// Position in [`Operation::ALL`], for dense per-operation tables.
    pub fn index(self) -> usize {
        // The macro lists the variants and `ALL` in the same order, without
        // explicit discriminants, so the discriminant is the position.
        self as usize
    }

    /// The `VmService` method serving the operation (`rpc.method`): the
    /// part of [`Operation::rpc_name`] after the slash.
    pub fn rpc_method(self) -> &'static str {
        let name = self.rpc_name();
        &name["vmprovisioner.v1.VmService/".len()..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_indexed_by_position() {
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "{op:?}");
        }
    }

    #[test]
    fn names_are_distinct_and_methods_follow_the_service() {
        let mut names: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Operation::ALL.len());
        assert_eq!(Operation::Info.rpc_method(), "GetVmInfo");
        assert_eq!(Operation::Create.rpc_name(), "vmprovisioner.v1.VmService/CreateVm");
    }
}
