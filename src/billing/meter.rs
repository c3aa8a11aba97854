//! What the stages share about metering itself: the set of metered VMs
//! ([`MeterSet`], with the snapshot the collector samples), the collection
//! `Round`s queued in it for the spool writer, and the [`Clock`] that
//! stamps samples and notices. A leaf: it imports only [`super::codec`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::codec::Record;
use crate::model::Runtime;
use crate::model::{ValidSpec, VmId};

/// Unix nanoseconds derived from tokio's clock, anchored once at start, so
/// sample timestamps follow `tokio::time::pause`/`advance` in tests and stay
/// monotonic when the wall clock is stepped.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_unix_ns: i64,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { base_unix_ns: crate::util::unix_nanos(), base: tokio::time::Instant::now() }
    }

    pub fn unix_ns(&self) -> i64 {
        let d = tokio::time::Instant::now().saturating_duration_since(self.base);
        self.base_unix_ns.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// A VM being metered, as the collector needs it.
#[derive(Debug)]
pub struct Metered {
    pub id: VmId,
    pub key: Arc<str>,
    pub spec: Arc<ValidSpec>,
    pub rt: Runtime,
    pub dir: PathBuf,
    /// Metering run; samples of an older run are dropped by the spool.
    pub generation: u64,
}

/// One collection round: `samples[k]` is `vms[k]`'s sample (`None` when
/// the backend could not measure it). The collector queues whole rounds —
/// one dense vector a tick, no per-VM buffer or lock — and the spool
/// writer reads them VM by VM at each group commit.
#[derive(Debug)]
pub(crate) struct Round {
    pub vms: Arc<Vec<Arc<Metered>>>,
    pub samples: Vec<Option<Record>>,
}

/// The set of metered VMs, with a snapshot the collector reuses between
/// changes.
#[derive(Default)]
pub struct MeterSet {
    inner: Mutex<MeterSetInner>,
    /// Rounds collected since the spool writer last took them.
    rounds: Mutex<Vec<Round>>,
    /// Sample vectors the writer is done with, for the next rounds (at
    /// 10,000 VMs a round is ~700 KB: reusing it saves the page faults).
    spare: Mutex<Vec<Vec<Option<Record>>>>,
}

/// Sample vectors kept for reuse (a commit's worth of rounds and some).
const SPARE_ROUNDS: usize = 16;

#[derive(Default)]
pub(super) struct MeterSetInner {
    pub(super) vms: HashMap<VmId, Arc<Metered>>,
    pub(super) snapshot: Option<Arc<Vec<Arc<Metered>>>>,
}

impl MeterSet {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, MeterSetInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every metered VM (rebuilt only after a change).
    pub fn snapshot(&self) -> Arc<Vec<Arc<Metered>>> {
        let mut g = self.lock();
        if let Some(s) = &g.snapshot {
            return s.clone();
        }
        let s = Arc::new(g.vms.values().cloned().collect::<Vec<_>>());
        g.snapshot = Some(s.clone());
        s
    }

    pub fn len(&self) -> usize {
        self.lock().vms.len()
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, Vec<Round>> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push_round(&self, r: Round) {
        self.rounds().push(r);
    }

    pub(crate) fn take_rounds(&self) -> Vec<Round> {
        std::mem::take(&mut *self.rounds())
    }

    /// An empty sample vector, reused when one is spare.
    pub(crate) fn sample_vec(&self) -> Vec<Option<Record>> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default()
    }

    /// Gives the sample vectors of processed rounds back for reuse.
    pub(crate) fn recycle(&self, rounds: Vec<Round>) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        for mut r in rounds {
            if spare.len() >= SPARE_ROUNDS {
                break;
            }
            r.samples.clear();
            spare.push(r.samples);
        }
    }

    /// Takes the queued samples of run `generation` of `key` out of the
    /// rounds (a stop hands them over ahead of its notice), in order.
    pub(crate) fn take_samples(&self, key: &Arc<str>, generation: u64) -> Vec<Record> {
        let mut out = Vec::new();
        for r in self.rounds().iter_mut() {
            // A run's key is one shared `Arc` from start to stop.
            let at = r.vms.iter().position(|m| Arc::ptr_eq(&m.key, key));
            if let Some(k) = at
                && r.vms[k].generation == generation
                && let Some(s) = r.samples[k].take()
            {
                out.push(s);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().vms.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }
}
