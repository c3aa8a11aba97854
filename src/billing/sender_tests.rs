//! Paused-clock tests of the sender: batch boundaries, flush interval,
//! per-VM order under failures, back-off.

#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;

use super::*;
use crate::billing::counters::NoopMetrics;
use crate::billing::spool::Msg;
use crate::billing::writer;

#[derive(Default)]
struct Script {
    calls: Mutex<Vec<(Instant, Request, bool)>>,
    /// Calls for VM "a" that fail before it succeeds again.
    fail_a: AtomicU32,
    /// The whole service is unreachable (every call fails `unavailable`).
    outage: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Transport for Arc<Script> {
    async fn call(&self, req: &Request) -> Result<(), SendError> {
        if self.outage.load(Ordering::SeqCst) {
            self.calls.lock().unwrap().push((Instant::now(), req.clone(), false));
            return Err(SendError::Rpc(connectrpc::ConnectError::unavailable("connection refused")));
        }
        let vm_a = matches!(req, Request::Batch { vm, .. } if &**vm == "a");
        let fail = vm_a && self.fail_a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        self.calls.lock().unwrap().push((Instant::now(), req.clone(), !fail));
        if fail { Err(SendError::Refused("down".into())) } else { Ok(()) }
    }
}

impl Script {
    fn ok_calls(&self) -> Vec<Request> {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| c.2 && !matches!(c.1, Request::Heartbeat { .. })).map(|c| c.1.clone()).collect()
    }
}

struct Rig {
    script: Arc<Script>,
    acks: Arc<Mutex<Vec<Msg>>>,
    stop: CancellationToken,
    _notices: mpsc::UnboundedSender<Notice>,
    _tmp: tempfile::TempDir,
}

fn sample(ts: i64, cpu: i64) -> Record {
    Record { kind: Kind::Sample, ts_ns: ts, v: [cpu, 0, 0, 0, 0, 0] }
}

/// Spools `chunks` (vm, records) and starts a sender on them.
fn rig(cfg: BillingConfig, clock: Clock, chunks: Vec<(&str, Vec<Record>)>, script: Arc<Script>) -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let chunks: Vec<(&str, &str, Vec<Record>)> = chunks.into_iter().map(|(vm, rs)| (vm, "cust", rs)).collect();
    let backlog: Vec<ChunkMeta> = spool::seed(tmp.path(), &chunks).unwrap();
    let (log, _) = crate::billing::log::Log::open(&spool::spool_dir(tmp.path())).unwrap();
    let (handle, acks) = SpoolHandle::detached();
    let s = Sender::new(
        &cfg,
        Arc::new(script.clone()),
        log.reader(),
        handle,
        Arc::new(MeterSet::default()),
        Arc::new(NoopMetrics),
        Arc::new(Shared::default()),
        clock,
        backlog,
    )
    .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    tokio::spawn(run(s, rx, stop.clone()));
    Rig { script, acks, stop, _notices: tx, _tmp: tmp }
}

fn cfg(batch: usize, flush_secs: u64) -> BillingConfig {
    BillingConfig {
        batch_size: batch,
        flush: Duration::from_secs(flush_secs),
        heartbeat: Duration::from_secs(3600),
        retry_min: Duration::from_millis(500),
        retry_max: Duration::from_secs(8),
        ..BillingConfig::default()
    }
}

fn batches(calls: &[Request], vm: &str) -> Vec<Vec<Record>> {
    calls
        .iter()
        .filter_map(|c| match c {
            Request::Batch { vm: v, samples, .. } if &**v == vm => Some(samples.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn plan_stops_at_notices_and_batch_size() {
    let start = Record::notice(Kind::Started, 1);
    let rs = [start, sample(2, 1), sample(3, 2), Record::notice(Kind::Stopped, 4), sample(5, 0)];
    assert_eq!(plan(rs.to_vec(), 10), Some(Plan::Notice(start)));
    assert_eq!(plan(rs[1..].to_vec(), 10), Some(Plan::Batch(vec![sample(2, 1), sample(3, 2)])));
    assert_eq!(plan(rs[1..].to_vec(), 1), Some(Plan::Batch(vec![sample(2, 1)])));
    assert_eq!(plan(Vec::new(), 1), None);
}

#[test]
fn backoff_doubles_is_capped_and_jittered() {
    let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
    for attempt in 1..40 {
        let base = min.saturating_mul(1 << (attempt - 1).min(20)).min(max);
        let lo = backoff(attempt, min, max, 0.0);
        let hi = backoff(attempt, min, max, 0.999);
        assert_eq!(lo, base / 2, "attempt {attempt}");
        assert!(hi > lo && hi <= max, "attempt {attempt}: {hi:?}");
    }
    assert_eq!(backoff(1, min, max, 0.0), Duration::from_millis(250));
    assert_eq!(backoff(3, min, max, 0.0), Duration::from_secs(1));
    assert!(backoff(30, min, max, 0.999) <= max);
}

#[tokio::test(start_paused = true)]
async fn batches_of_batch_size_then_on_the_flush_interval() {
    let clock = Clock::new();
    let t0 = clock.unix_ns();
    let ms = 1_000_000i64;
    // A start notice, then 1,300 samples 100 ms apart in 1 s chunks.
    let mut chunks = vec![("a", vec![Record::notice(Kind::Started, t0)])];
    for c in 0..130 {
        chunks.push(("a", (0..10).map(|k| sample(t0 + (c * 10 + k) * 100 * ms, c * 10 + k)).collect()));
    }
    let r = rig(cfg(600, 60), clock, chunks, Arc::new(Script::default()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = r.script.ok_calls();
    assert!(matches!(calls[0], Request::Started { ts, .. } if ts == t0), "{:?}", calls.first());
    let b = batches(&calls, "a");
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![600, 600]);
    // The last 100 samples start at t0+120 s: sent once they are 60 s old.
    tokio::time::sleep(Duration::from_secs(178)).await;
    assert_eq!(batches(&r.script.ok_calls(), "a").len(), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = batches(&r.script.ok_calls(), "a");
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![600, 600, 100]);
    let cpu: Vec<i64> = b.concat().iter().map(|s| s.v[0]).collect();
    assert_eq!(cpu, (0..1300).collect::<Vec<_>>(), "every sample once, in order");
    // The spool was told to delete every chunk.
    let mut deleted = Vec::new();
    for m in std::mem::take(&mut *r.acks.lock().unwrap()) {
        if let Msg::Ack { delete, .. } = m {
            deleted.extend(delete);
        }
    }
    assert_eq!(deleted.len(), 131);
    assert!(deleted.windows(2).all(|w| w[0] < w[1]), "acks in order");
    r.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_and_never_reorder_a_vm() {
    let clock = Clock::new();
    let t0 = clock.unix_ns();
    let script = Arc::new(Script::default());
    script.fail_a.store(4, Ordering::SeqCst);
    let chunk = |vm, from: i64| (vm, (from..from + 5).map(|k| sample(t0 + k, k)).collect::<Vec<_>>());
    let chunks = vec![chunk("a", 0), chunk("b", 0), chunk("a", 5), chunk("b", 5), chunk("a", 10)];
    let r = rig(cfg(5, 60), clock, chunks, script.clone());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let all = script.calls.lock().unwrap().clone();
    let a: Vec<&(Instant, Request, bool)> =
        all.iter().filter(|c| matches!(&c.1, Request::Batch { vm, .. } if &**vm == "a")).collect();
    // 4 failures, then the three batches in order.
    assert_eq!(a.iter().map(|c| c.2).collect::<Vec<_>>(), vec![false, false, false, false, true, true, true]);
    let first_cpu: Vec<i64> = a
        .iter()
        .map(|c| match &c.1 {
            Request::Batch { samples, .. } => samples[0].v[0],
            _ => -1,
        })
        .collect();
    assert_eq!(first_cpu, vec![0, 0, 0, 0, 0, 5, 10], "a failed batch is retried before any newer one");
    // Retry delays: jittered within [base/2, base], base = 500 ms doubling.
    for (k, w) in a.windows(2).take(4).enumerate() {
        let gap = w[1].0 - w[0].0;
        let base = Duration::from_millis(500 * (1 << k));
        assert!(gap >= base / 2 && gap <= base + Duration::from_millis(300), "retry {k}: {gap:?}");
    }
    // VM b was not held up by a's failures.
    let b = batches(&script.ok_calls(), "b");
    assert_eq!(b.len(), 2);
    let b_done = all.iter().filter(|c| matches!(&c.1, Request::Batch { vm, .. } if &**vm == "b")).map(|c| c.0).max();
    assert!(b_done.unwrap() < a[4].0, "b finished before a recovered");
    r.stop.cancel();
}

/// An unreachable service costs one probe per endpoint back-off, not one
/// call per VM per back-off; when it is back, everything goes at once.
#[tokio::test(start_paused = true)]
async fn an_outage_is_probed_by_one_call_at_a_time() {
    let clock = Clock::new();
    let t0 = clock.unix_ns();
    let script = Arc::new(Script::default());
    script.outage.store(true, Ordering::SeqCst);
    let names: Vec<String> = (0..50).map(|k| format!("vm-{k}")).collect();
    let chunks: Vec<(&str, Vec<Record>)> =
        names.iter().map(|n| (n.as_str(), (0..5).map(|k| sample(t0 + k, k)).collect())).collect();
    let r = rig(cfg(5, 60), clock, chunks, script.clone());
    // 60 s of outage: retry_min 500 ms doubling to retry_max 8 s.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let failed = script.calls.lock().unwrap().iter().filter(|c| matches!(c.1, Request::Batch { .. })).count();
    // The first wave (up to the concurrency) fails together; after it, one
    // probe per back-off: well under one call per VM per back-off period
    // (50 VMs × ~10 retries each would be ~500).
    assert!(failed <= DEFAULT_CONCURRENCY + 20, "{failed} calls during the outage");
    script.outage.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ok = script.ok_calls();
    for n in &names {
        assert_eq!(batches(&ok, n).len(), 1, "{n} delivered once");
    }
    r.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_spool_limit_old_chunks_are_thinned_and_gaps_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = Arc::new(Shared::default());
    // Five chunks of 50 samples (~2 KB) against a 512-byte limit.
    let chunks: Vec<(&str, &str, Vec<Record>)> =
        (0..5).map(|c| ("a", "cust", (0..50).map(|k| sample(1_000 + c * 50 + k, c * 50 + k)).collect())).collect();
    spool::seed(tmp.path(), &chunks).unwrap();
    let (spool, writer, notices, backlog, reader) =
        writer::start(tmp.path(), Duration::from_millis(20), Arc::default(), shared.clone(), Arc::new(NoopMetrics))
            .unwrap();
    let script = Arc::new(Script::default());
    script.fail_a.store(u32::MAX, Ordering::SeqCst); // the service is down
    let cfg = BillingConfig {
        spool_max_bytes: 512,
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(50),
        ..cfg(100, 0)
    };
    let s = Sender::new(
        &cfg,
        Arc::new(script.clone()),
        reader,
        spool.clone(),
        Arc::new(MeterSet::default()),
        Arc::new(NoopMetrics),
        shared.clone(),
        Clock::new(),
        backlog,
    )
    .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(s, notices, stop.clone()));
    // Thinning runs with the once-a-second housekeeping.
    let t0 = std::time::Instant::now();
    while shared.counters().get("a").map_or(0, |c| c.thinned) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no thinning");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    script.fail_a.store(0, Ordering::SeqCst); // the service is back
    while shared.spool_chunks.load(Ordering::Relaxed) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "spool not drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    spool.close();
    tokio::task::spawn_blocking(move || writer.join()).await.unwrap().unwrap();

    let calls = script.ok_calls();
    let cpu: Vec<i64> = batches(&calls, "a").concat().iter().map(|s| s.v[0]).collect();
    let gaps: Vec<(i64, i64)> = calls
        .iter()
        .filter_map(|c| match c {
            Request::Gap { last_sent, resume, .. } => Some((*last_sent, *resume)),
            _ => None,
        })
        .collect();
    // The front chunk is kept whole; of the others the first and last
    // sample remain, and a gap notice covers each thinned span.
    let mut want: Vec<i64> = (0..50).collect();
    for c in 1..5 {
        want.extend([c * 50, c * 50 + 49]);
    }
    assert_eq!(cpu, want);
    assert_eq!(gaps, (1..5).map(|c| (1_000 + c * 50, 1_000 + c * 50 + 49)).collect::<Vec<_>>());
    let counters = shared.counters()["a"];
    assert_eq!((counters.thinned, counters.delivered), (4 * 48, 58));
}

/// A sender that is not running, over an empty spool (its parts live as
/// long as the returned directory).
fn idle_sender(flush_secs: u64) -> (Sender, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (log, _) = crate::billing::log::Log::open(&spool::spool_dir(tmp.path())).unwrap();
    let (handle, _acks) = SpoolHandle::detached();
    let s = Sender::new(
        &cfg(100, flush_secs),
        Arc::new(Arc::new(Script::default())),
        log.reader(),
        handle,
        Arc::new(MeterSet::default()),
        Arc::new(NoopMetrics),
        Arc::new(Shared::default()),
        Clock::new(),
        Vec::new(),
    )
    .unwrap();
    (s, tmp)
}

fn chunk(id: i64, vm: &str, first_ts: i64) -> ChunkMeta {
    ChunkMeta {
        id,
        vm: Arc::from(vm),
        customer: Arc::from("cust"),
        records: 1,
        events: 0,
        first_ts,
        bytes: 10,
        skip: 0,
        thinned: false,
    }
}

#[tokio::test]
async fn wake_ups_stay_one_per_queue_and_stale_ones_are_dropped() {
    let (mut s, _tmp) = idle_sender(60);
    let now_ns = s.clock.unix_ns();
    s.absorb(Notice::Committed(vec![chunk(1, "a", now_ns)]));
    assert_eq!(s.timers.len(), 1);
    // Later deadlines (each delivered batch re-arms the next front's) do
    // not pile up; an earlier one (a retry) replaces the armed one.
    let vm: Arc<str> = Arc::from("a");
    let base = Instant::now();
    for i in 0..10_000u64 {
        let q = s.queues.get_mut(&vm).unwrap();
        arm(&mut s.timers, q, &vm, base + Duration::from_secs(61) + Duration::from_millis(i));
    }
    assert_eq!(s.timers.len(), 1);
    let retry = base + Duration::from_secs(1);
    arm(&mut s.timers, s.queues.get_mut(&vm).unwrap(), &vm, retry);
    assert_eq!(s.timers.len(), 2);
    assert_eq!(s.queues[&vm].timer, Some(retry));
    // Queues drained and gone leave their entries behind until there are
    // more stale than live ones, then only the live ones are kept.
    for i in 0..3_000 {
        let id = format!("gone-{i}");
        s.absorb(Notice::Committed(vec![chunk(10 + i, &id, now_ns)]));
        s.queues.remove(id.as_str());
    }
    assert_eq!(s.timers.len(), 3_002);
    s.compact_timers();
    assert_eq!(s.timers.len(), 1);
    assert_eq!(s.timers.peek().map(|Reverse((at, vm))| (*at, vm.to_string())), Some((retry, "a".to_owned())));
}
