//! An in-memory backend for tests and API development (`UNKEY_METALD_BACKEND=fake`).
//!
//! It starts no hypervisor: VMs are entries in a map whose usage counters grow
//! with wall time while "running". It writes a console log so paths in
//! `backend_info` are real, and it offers failure and exit injection through
//! [`FakeControl`] so tests can drive error paths.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::Instrument;

use super::{
    Backend, BackendError, BackendHealth, BackendKind, ExitEvent, ExitSink, Observed, Result, Runtime, Stamped,
    StopMode, Usage, UsageTarget, VmContext,
};
use crate::model::{ValidSpec, VmId};
use crate::util::logs::LogFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FakeState {
    Created,
    Running,
    Paused,
}

#[derive(Debug)]
struct FakeVm {
    pid: u32,
    state: FakeState,
    /// CPU time accumulated while running, plus the start of the current run.
    cpu: Duration,
    running_since: Option<Instant>,
    memory_bytes: u64,
    boots: u32,
}

impl FakeVm {
    fn cpu_at(&self, now: Instant) -> Duration {
        self.cpu + self.running_since.map(|s| now.saturating_duration_since(s)).unwrap_or_default()
    }
}

/// The fake's "processes", keyed by pid like real ones: usage sampling
/// (100,000 lookups a second at 10,000 VMs) finds a VM by the pid in its
/// runtime. The fake hands out its pids in sequence (and reattaches the
/// ones the store remembers, also dense in practice), so the table is a
/// vector indexed by `pid - base`: one memory access per sample, where a
/// hash table lookup was a cache miss into a 1 MB bucket array that cost
/// more than all of metald's own per-sample work. Pids that would stretch
/// the window past [`DENSE_MAX`] slots go to `sparse`.
#[derive(Default)]
struct Procs {
    base: u32,
    dense: Vec<Option<FakeVm>>,
    sparse: HashMap<u32, FakeVm>,
    pids: HashMap<VmId, u32>,
}

/// How many recent calls [`FakeControl::calls`] remembers (at least half
/// as many after it trims).
const CALLS_KEPT: usize = 10_000;

/// Largest pid window kept as a vector (slots of ~64 bytes).
const DENSE_MAX: usize = 1 << 20;

impl Procs {
    fn slot(&self, pid: u32) -> Option<usize> {
        usize::try_from(pid.checked_sub(self.base)?).ok().filter(|&k| k < self.dense.len())
    }

    fn by_pid(&self, pid: u32) -> Option<&FakeVm> {
        match self.slot(pid) {
            Some(k) => self.dense[k].as_ref(),
            None => self.sparse.get(&pid),
        }
    }

    fn by_pid_mut(&mut self, pid: u32) -> Option<&mut FakeVm> {
        match self.slot(pid) {
            Some(k) => self.dense[k].as_mut(),
            None => self.sparse.get_mut(&pid),
        }
    }

    fn take(&mut self, pid: u32) -> Option<FakeVm> {
        match self.slot(pid) {
            Some(k) => self.dense[k].take(),
            None => self.sparse.remove(&pid),
        }
    }

    fn put(&mut self, vm: FakeVm) {
        let pid = vm.pid;
        if self.dense.is_empty() && self.sparse.is_empty() {
            self.base = pid;
        }
        let fits = pid >= self.base && usize::try_from(pid - self.base).is_ok_and(|k| k < DENSE_MAX);
        if !fits {
            self.sparse.insert(pid, vm);
            return;
        }
        let mut k = usize::try_from(pid - self.base).unwrap_or(0);
        if k >= self.dense.len() && self.dense.len() == self.dense.capacity() {
            // About to reallocate: drop the front slots of exited "processes"
            // first when they are half the table (pids only grow, so a long
            // run would otherwise keep a slot for every pid ever handed out).
            let gone = self.dense.iter().take_while(|v| v.is_none()).count();
            if gone * 2 >= self.dense.len() {
                self.dense.drain(..gone);
                self.base += u32::try_from(gone).unwrap_or(0);
                k -= gone;
            }
        }
        if k >= self.dense.len() {
            self.dense.resize_with(k + 1, || None);
        }
        self.dense[k] = Some(vm);
    }

    fn insert(&mut self, id: &VmId, vm: FakeVm) {
        if let Some(old) = self.pids.insert(id.clone(), vm.pid) {
            self.take(old);
        }
        self.put(vm);
    }

    fn remove(&mut self, id: &VmId) -> Option<FakeVm> {
        let pid = self.pids.remove(id)?;
        self.take(pid)
    }

    fn get_mut(&mut self, id: &VmId) -> Option<&mut FakeVm> {
        let pid = *self.pids.get(id)?;
        self.by_pid_mut(pid)
    }

    fn get(&self, id: &VmId) -> Option<&FakeVm> {
        self.by_pid(*self.pids.get(id)?)
    }

    fn contains_key(&self, id: &VmId) -> bool {
        self.pids.contains_key(id)
    }

    fn len(&self) -> usize {
        self.pids.len()
    }
}

#[derive(Default)]
struct Shared {
    vms: Procs,
    /// Operation name -> error message returned by the next call of it.
    fail_next: HashMap<&'static str, String>,
    /// Artificial latency for every operation.
    delay: Duration,
    /// When set, every call waits here until as many calls have arrived.
    barrier: Option<Arc<tokio::sync::Barrier>>,
    calls: Vec<(String, &'static str)>,
    /// Reported by `health()`; tests flip it to check `/_/health` answers 503.
    unhealthy: Option<String>,
    /// Operations whose next call acts, then reports a timeout (a reply
    /// lost after the hypervisor did the work).
    time_out_after: std::collections::HashSet<&'static str>,
    /// `observe` gets no answer, as from a frozen hypervisor.
    unresponsive: bool,
}

/// A handle tests use to steer the fake.
#[derive(Clone)]
pub struct FakeControl {
    shared: Arc<Mutex<Shared>>,
    exits: ExitSink,
}

impl FakeControl {
    /// The next call of `op` ("create", "boot", ...) fails with `message`.
    pub fn fail_next(&self, op: &'static str, message: &str) {
        lock(&self.shared).fail_next.insert(op, message.to_owned());
    }

    /// The next call of `op` ("boot", "pause", "resume") takes effect, then
    /// fails as timed out.
    pub fn time_out_after_next(&self, op: &'static str) {
        lock(&self.shared).time_out_after.insert(op);
    }

    /// While set, `observe` times out, as a frozen hypervisor would.
    pub fn set_unresponsive(&self, on: bool) {
        lock(&self.shared).unresponsive = on;
    }

    /// Every backend call takes at least `d`.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.shared).delay = d;
    }

    /// Every backend call waits until `n` calls are inside the backend at
    /// once (tests prove concurrency with it: serialised calls would hang).
    pub fn set_barrier(&self, n: Option<usize>) {
        lock(&self.shared).barrier = n.map(|n| Arc::new(tokio::sync::Barrier::new(n)));
    }

    /// Makes the VM's "process" exit as if the guest powered off.
    pub fn simulate_exit(&self, vm: &VmId) -> bool {
        let pid = {
            let mut s = lock(&self.shared);
            match s.vms.remove(vm) {
                Some(v) => v.pid,
                None => return false,
            }
        };
        self.exits
            .send(ExitEvent {
                vm_id: vm.clone(),
                pid: Some(pid),
                reason: crate::model::StopReason::GuestPowerOff,
                detail: "simulated exit".into(),
                rebooted: false,
            })
            .is_ok()
    }

    /// Whether the fake holds a live "process" for `vm`.
    pub fn is_alive(&self, vm: &VmId) -> bool {
        lock(&self.shared).vms.contains_key(vm)
    }

    /// `(vm_id, operation)` of the calls so far (the last 5,000 to 10,000), in order.
    pub fn calls(&self) -> Vec<(String, &'static str)> {
        lock(&self.shared).calls.clone()
    }

    /// Makes `health()` report the backend as unusable (`None` heals it).
    pub fn set_unhealthy(&self, why: Option<&str>) {
        lock(&self.shared).unhealthy = why.map(str::to_owned);
    }

    pub fn live_count(&self) -> usize {
        lock(&self.shared).vms.len()
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding this lock can only come from a bug in a test;
    // the data (a map of fake VMs) stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct FakeBackend {
    shared: Arc<Mutex<Shared>>,
    next_pid: AtomicU32,
    control: FakeControl,
}

impl FakeBackend {
    pub fn new(exits: ExitSink) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        FakeBackend {
            control: FakeControl { shared: shared.clone(), exits },
            shared,
            next_pid: AtomicU32::new(100_000),
        }
    }

    pub fn control(&self) -> FakeControl {
        self.control.clone()
    }

    /// The fake's "hypervisor API call": a client span like the real
    /// backends' (`hypervisor.api`, `rpc.system`, `rpc.method`, `outcome`).
    async fn enter(&self, vm: &VmId, op: &'static str) -> Result<()> {
        let span = tracing::info_span!(
            "hypervisor.api",
            otel.kind = "client",
            rpc.system = "fake",
            rpc.method = op,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = self.enter_inner(vm, op).instrument(span.clone()).await;
        span.record("outcome", if result.is_ok() { "ok" } else { "error" });
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    async fn enter_inner(&self, vm: &VmId, op: &'static str) -> Result<()> {
        let (delay, fail, barrier) = {
            let mut s = lock(&self.shared);
            // Keep the recent calls only: a long run (the soak bench) must
            // not grow the fake's memory with every call.
            if s.calls.len() >= CALLS_KEPT {
                s.calls.drain(..CALLS_KEPT / 2);
            }
            s.calls.push((vm.to_string(), op));
            (s.delay, s.fail_next.remove(op), s.barrier.clone())
        };
        if let Some(b) = barrier {
            b.wait().await;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match fail {
            Some(msg) => Err(BackendError::failed(format!("fake {op}: {msg}"))),
            None => Ok(()),
        }
    }

    /// The end of an operation that acted: a timeout if one was asked for.
    fn leave(&self, op: &'static str) -> Result<()> {
        if lock(&self.shared).time_out_after.remove(op) {
            return Err(BackendError::timeout(format!("fake {op}: the reply was lost")));
        }
        Ok(())
    }

    fn with_vm<T>(&self, vm: &VmId, f: impl FnOnce(&mut FakeVm) -> Result<T>) -> Result<T> {
        let mut s = lock(&self.shared);
        let v = s.vms.get_mut(vm).ok_or_else(|| BackendError::failed(format!("fake: no process for {vm}")))?;
        f(v)
    }
}

/// Usage of `id`'s fake process, found by the pid in its runtime (by id
/// when the runtime has none).
fn usage_of(procs: &Procs, id: &VmId, pid: Option<u32>, now: Instant) -> Result<Usage> {
    let v = pid
        .and_then(|pid| procs.by_pid(pid))
        .or_else(|| procs.pids.get(id).and_then(|pid| procs.by_pid(*pid)))
        .ok_or_else(|| BackendError::failed(format!("fake: no process for {id}")))?;
    let cpu = v.cpu_at(now);
    let secs = cpu.as_secs();
    Ok(Usage {
        cpu_time_ns: u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX),
        memory_bytes: v.memory_bytes,
        disk_read_bytes: secs * 4096,
        disk_write_bytes: secs * 1024,
        disk_read_ops: secs,
        disk_write_ops: secs / 4,
        net_rx_bytes: secs * 1500,
        net_tx_bytes: secs * 500,
        net_rx_packets: secs,
        net_tx_packets: secs,
    })
}

/// The fake's saved state ([`Backend::save`]).
const FAKE_STATE: &str = "fake-state.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct FakeSaved {
    cpu_ns: u64,
    boots: u32,
}

fn console_line(vm: &VmContext<'_>, line: &str) {
    use std::io::Write;
    let path = vm.dir.join("console.log");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Fake
    }

    async fn create(&self, vm: &VmContext<'_>) -> Result<Runtime> {
        self.enter(vm.id, "create").await?;
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared).vms.insert(
            vm.id,
            FakeVm {
                pid,
                state: FakeState::Created,
                cpu: Duration::ZERO,
                running_since: None,
                memory_bytes: vm.spec.memory_bytes() / 4,
                boots: 0,
            },
        );
        console_line(vm, "fake: created");
        let mut extra = BTreeMap::new();
        extra.insert("fake".into(), "true".into());
        Ok(Runtime {
            pid: Some(pid),
            pid_start_ticks: None,
            api_socket: Some(vm.dir.join("fake.sock")),
            console_log: Some(vm.dir.join("console.log")),
            booted_at: None,
            extra,
        })
    }

    async fn boot(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.enter(vm.id, "boot").await?;
        self.with_vm(vm.id, |v| {
            v.state = FakeState::Running;
            v.running_since = Some(Instant::now());
            v.boots += 1;
            Ok(())
        })?;
        rt.booted_at = Some(crate::util::unix_now());
        console_line(vm, "METALD_GUEST_READY");
        self.leave("boot")
    }

    async fn pause(&self, vm: &VmContext<'_>, _rt: &mut Runtime) -> Result<()> {
        self.enter(vm.id, "pause").await?;
        self.with_vm(vm.id, |v| {
            if let Some(s) = v.running_since.take() {
                v.cpu += s.elapsed();
            }
            v.state = FakeState::Paused;
            Ok(())
        })?;
        self.leave("pause")
    }

    async fn resume(&self, vm: &VmContext<'_>, _rt: &mut Runtime) -> Result<()> {
        self.enter(vm.id, "resume").await?;
        self.with_vm(vm.id, |v| {
            v.state = FakeState::Running;
            v.running_since = Some(Instant::now());
            Ok(())
        })?;
        self.leave("resume")
    }

    async fn reboot(&self, vm: &VmContext<'_>, rt: &mut Runtime, _force: bool) -> Result<()> {
        self.enter(vm.id, "reboot").await?;
        self.with_vm(vm.id, |v| {
            v.boots += 1;
            Ok(())
        })?;
        rt.booted_at = Some(crate::util::unix_now());
        console_line(vm, "METALD_GUEST_READY");
        Ok(())
    }

    async fn shutdown(&self, vm: &VmContext<'_>, _rt: &Runtime, mode: StopMode) -> Result<()> {
        self.enter(vm.id, "shutdown").await?;
        lock(&self.shared).vms.remove(vm.id);
        console_line(vm, &format!("fake: shutdown ({mode:?})"));
        Ok(())
    }

    async fn delete(&self, vm: &VmContext<'_>, _rt: Option<&Runtime>) -> Result<()> {
        self.enter(vm.id, "delete").await?;
        lock(&self.shared).vms.remove(vm.id);
        Ok(())
    }

    async fn reap(&self, vm: &VmContext<'_>, _rt: &Runtime) -> Result<()> {
        lock(&self.shared).vms.remove(vm.id);
        Ok(())
    }

    /// The console log it writes (opened to append, as QEMU's is).
    fn log_files(&self, vm: &VmContext<'_>) -> Vec<LogFile> {
        vec![LogFile::appended(vm.dir.join("console.log"))]
    }

    fn compat(&self, spec: &ValidSpec) -> BTreeMap<String, String> {
        super::base_compat(self.kind(), "fake", spec)
    }

    /// Writes the "guest's" CPU time and boot count to `fake-state.json`,
    /// so a restore continues them (what the real backends' saves do for
    /// memory and devices).
    async fn save(&self, vm: &VmContext<'_>, _rt: &Runtime, dir: &Path) -> Result<()> {
        self.enter(vm.id, "save").await?;
        let saved = self.with_vm(vm.id, |v| {
            if v.state == FakeState::Running {
                return Err(BackendError::failed("fake save: the guest is running (pause it first)"));
            }
            Ok(FakeSaved { cpu_ns: u64::try_from(v.cpu.as_nanos()).unwrap_or(u64::MAX), boots: v.boots })
        })?;
        let path = dir.join(FAKE_STATE);
        let json = serde_json::to_vec(&saved).unwrap_or_default();
        std::fs::write(&path, json).map_err(|e| BackendError::io(format!("writing {}", path.display()), e))?;
        self.leave("save")
    }

    async fn new_generation(&self, vm: &VmContext<'_>, _rt: &Runtime, _seed: &[u8; 32]) -> Result<&'static str> {
        self.enter(vm.id, "new_generation").await?;
        self.leave("new_generation").map(|()| "fake")
    }

    async fn restore(&self, vm: &VmContext<'_>, dir: &Path) -> Result<Runtime> {
        self.enter(vm.id, "restore").await?;
        let path = dir.join(FAKE_STATE);
        let raw = std::fs::read(&path).map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
        let saved: FakeSaved = serde_json::from_slice(&raw).map_err(|e| {
            BackendError::failed(format!("fake restore: {} is not a saved state", path.display())).caused_by(e)
        })?;
        let mut rt = self.create(vm).await?;
        self.with_vm(vm.id, |v| {
            v.state = FakeState::Paused;
            v.cpu = Duration::from_nanos(saved.cpu_ns);
            v.boots = saved.boots;
            Ok(())
        })?;
        rt.booted_at = Some(crate::util::unix_now());
        console_line(vm, "fake: restored");
        if let Err(e) = self.leave("restore") {
            // Like the real backends: a restore that failed releases its VMM.
            lock(&self.shared).vms.remove(vm.id);
            return Err(e);
        }
        Ok(rt)
    }

    async fn usage(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Usage> {
        usage_of(&lock(&self.shared).vms, vm.id, rt.pid, Instant::now())
    }

    /// One lock, one clock reading and a loop: the fake answers from
    /// memory, so every VM of the call is measured at the same instant.
    async fn usage_many(
        &self,
        vms: &[UsageTarget<'_>],
        _concurrency: usize,
        stamp: &(dyn Fn() -> i64 + Send + Sync),
        out: &mut Vec<Stamped>,
    ) {
        out.clear();
        // A client span, as a backend that asks its hypervisor for counters
        // opens (QMP `query-blockstats`, Cloud Hypervisor `vm.counters`);
        // telemetry leaves it out inside a metering round.
        let _call =
            tracing::info_span!("hypervisor.api", otel.kind = "client", rpc.system = "fake", rpc.method = "usage")
                .entered();
        // Two short passes (pids, then lookups) instead of one long one let
        // the CPU overlap the cache misses of many VMs.
        let pids: Vec<Option<u32>> = vms.iter().map(|t| t.rt.pid).collect();
        let s = lock(&self.shared);
        let (ts, now) = (stamp(), Instant::now());
        out.extend(vms.iter().zip(pids).map(|(t, pid)| (ts, usage_of(&s.vms, t.vm.id, pid, now))));
    }

    async fn observe(&self, vm: &VmContext<'_>, _rt: &Runtime) -> Result<Observed> {
        let shared = lock(&self.shared);
        if shared.unresponsive {
            return Err(BackendError::timeout("fake observe: the hypervisor does not answer"));
        }
        Ok(match shared.vms.get(vm.id).map(|v| v.state) {
            Some(FakeState::Created) => Observed::Created,
            Some(FakeState::Running) => Observed::Running,
            Some(FakeState::Paused) => Observed::Paused,
            None => Observed::Gone,
        })
    }

    async fn reattach(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<bool> {
        // The fake's "processes" live in memory, so after a restart they are
        // recreated in the state the store says; this lets restart tests run
        // without a hypervisor. Real backends check the process instead.
        let pid = rt.pid.unwrap_or_else(|| self.next_pid.fetch_add(1, Ordering::Relaxed));
        lock(&self.shared).vms.insert(
            vm.id,
            FakeVm {
                pid,
                state: if rt.booted_at.is_some() { FakeState::Running } else { FakeState::Created },
                cpu: Duration::ZERO,
                running_since: rt.booted_at.map(|_| Instant::now()),
                memory_bytes: vm.spec.memory_bytes() / 4,
                boots: 0,
            },
        );
        Ok(true)
    }

    async fn health(&self) -> BackendHealth {
        match lock(&self.shared).unhealthy.clone() {
            None => BackendHealth { ok: true, version: "fake".into(), detail: "in-memory test backend".into() },
            Some(why) => BackendHealth { ok: false, version: "fake".into(), detail: why },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::VmSpec;

    fn proc(pid: u32) -> FakeVm {
        FakeVm {
            pid,
            state: FakeState::Created,
            cpu: Duration::ZERO,
            running_since: None,
            memory_bytes: u64::from(pid),
            boots: 0,
        }
    }

    #[test]
    fn process_table_is_dense_with_a_sparse_overflow() {
        let mut p = Procs::default();
        let id = |s: &str| VmId::parse(s).unwrap();
        p.insert(&id("a"), proc(100));
        p.insert(&id("b"), proc(102));
        p.insert(&id("c"), proc(99)); // below the window's base
        p.insert(&id("d"), proc(100 + u32::try_from(DENSE_MAX).unwrap())); // past its end
        assert_eq!(p.dense.len(), 3, "100..=102");
        assert_eq!(p.sparse.len(), 2);
        for pid in [99, 100, 102, 100 + u32::try_from(DENSE_MAX).unwrap()] {
            assert_eq!(p.by_pid(pid).map(|v| v.memory_bytes), Some(u64::from(pid)));
        }
        assert!(p.by_pid(101).is_none() && p.by_pid(5).is_none());
        // A VM that gets a new process leaves no stale entry behind.
        p.insert(&id("a"), proc(101));
        assert!(p.by_pid(100).is_none());
        assert_eq!(p.get_mut(&id("a")).map(|v| v.pid), Some(101));
        assert_eq!(p.remove(&id("c")).map(|v| v.pid), Some(99));
        assert!(p.by_pid(99).is_none());
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn the_table_does_not_keep_a_slot_for_every_pid_ever() {
        let mut p = Procs::default();
        let id = |i: u32| VmId::parse(&format!("vm-{}", i % 10)).unwrap();
        // Ten VMs that get new processes over and over (boots, reboots).
        for pid in 1000..101_000 {
            p.insert(&id(pid), proc(pid));
        }
        assert_eq!(p.len(), 10);
        assert!(p.dense.len() < 64, "{} slots for 10 processes", p.dense.len());
        for pid in 100_990..101_000 {
            assert_eq!(p.by_pid(pid).map(|v| v.pid), Some(pid));
        }
        assert!(p.by_pid(1000).is_none() && p.sparse.is_empty());
    }

    #[tokio::test]
    async fn usage_grows_only_while_running() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let b = FakeBackend::new(tx);
        let tmp = tempfile::tempdir().unwrap();
        let id = VmId::parse("a").unwrap();
        let spec = crate::model::ValidSpec::unchecked(VmSpec::default());
        let ctx = VmContext { id: &id, spec: &spec, dir: tmp.path().into() };
        let mut rt = b.create(&ctx).await.unwrap();
        assert_eq!(b.usage(&ctx, &rt).await.unwrap().cpu_time_ns, 0);
        b.boot(&ctx, &mut rt).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.pause(&ctx, &mut rt).await.unwrap();
        let a = b.usage(&ctx, &rt).await.unwrap().cpu_time_ns;
        assert!(a >= 20_000_000, "{a}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b.usage(&ctx, &rt).await.unwrap().cpu_time_ns, a);
    }

    #[tokio::test]
    async fn injected_failures_fire_once() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let b = FakeBackend::new(tx);
        let tmp = tempfile::tempdir().unwrap();
        let id = VmId::parse("a").unwrap();
        let spec = crate::model::ValidSpec::unchecked(VmSpec::default());
        let ctx = VmContext { id: &id, spec: &spec, dir: tmp.path().into() };
        b.control().fail_next("create", "boom");
        let e = b.create(&ctx).await.unwrap_err();
        assert_eq!(e.to_string(), "fake create: boom");
        assert!(b.create(&ctx).await.is_ok());
    }
}
