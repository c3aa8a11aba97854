//! The one support module of metald's integration tests (`tests/*.rs`) and
//! benches (`benches/*.rs`). Tests include it with `mod support;`, benches
//! with `#[path = "../tests/support/mod.rs"] mod support;` (a directory, so
//! cargo builds it as neither a test nor a bench of its own).
//!
//! | file         | owns                                                              |
//! |--------------|-------------------------------------------------------------------|
//! | `crash.rs`   | the crash harnesses' host (`metald` killed and restarted) and the |
//! |              | invariants after a restart (not re-exported: `support::crash::…`) |
//! | `daemon.rs`  | the daemon: in-process (fake backend, tokens, clients) or the     |
//! |              | `metald` binary as a child; `UNKEY_METALD_*` environments         |
//! | `vmm.rs`     | the fake Firecracker / Cloud Hypervisor: their calls, request     |
//! |              | logs, faults                                                      |
//! | `saves.rs`   | suspend / snapshot / clone calls, snapshot files, the real        |
//! |              | hypervisors of `../shared/hypervisors`, a halting guest kernel    |
//! | `guest.rs`   | the real guest image of `scripts/guest-image.sh`, console logs    |
//! | `process.rs` | `/proc`: live or unreaped pids, a test's processes, CPU, RSS, fds |
//! | `wait.rs`    | bounded polling (`wait_until`, `wait_for`, `eventually`)          |
//! | `net.rs`     | a free port, a bare HTTP GET, a raw Connect JSON call             |
//! |              | ; a network namespace of the test's own (`in_netns`), `ip` in it  |
//! | `registry.rs` | a real `docker-registry` (htpasswd or token auth), images built with |
//! |              | `umoci` and pushed with `skopeo`, ext4 contents via `debugfs`     |
//! | `repo.rs`    | paths in the checkout: its root, the npm peers in `tests/js`      |
//! | `fuzz.rs`    | the CreateVm decoding + validation fuzz target (also cargo-fuzz's) |
//! | `bench.rs`   | bench hosts (VMs seeded into the store), `METALD_BENCH_*`, stats  |
//!
//! Everything is re-exported here: `support::start`, `support::wait_until`, ...

// Each test and bench crate compiles this module on its own and uses only
// part of it; the rest would be dead code there. Test code may unwrap.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod crash;
pub mod daemon;
pub mod fuzz;
pub mod guest;
pub mod net;
pub mod process;
pub mod registry;
pub mod repo;
pub mod saves;
pub mod vmm;
pub mod wait;

// Flat re-exports (`support::start`); a crate that uses nothing from one
// submodule would otherwise be told its glob is unused.
#[allow(unused_imports)]
pub use bench::*;
#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use guest::*;
#[allow(unused_imports)]
pub use net::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use repo::*;
#[allow(unused_imports)]
pub use saves::*;
#[allow(unused_imports)]
pub use vmm::*;
#[allow(unused_imports)]
pub use wait::*;
