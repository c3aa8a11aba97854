//! Removal of NICs off the caller's path, in batches: the set elements of
//! every NIC removed since the last batch in one nftables transaction, then
//! their TAPs in one link-group deletion ([`links::delete_many`]).
//!
//! Why batches: in this kernel both halves of a removal wait for RCU grace
//! periods. An nft transaction that deletes elements frees them after one
//! (~10–20 ms here), and the next transaction's commit waits for that; a
//! TAP's unregistration waits for two or three (~30 ms). One by one, a
//! burst of DeleteVm calls pays that per NIC; in batches, about once per
//! batch, and the caller not at all.
//!
//! What keeps this safe while a removed NIC's elements are still in the
//! table: the core removes a NIC only after its hypervisor is gone (nothing
//! reads or writes the TAP), and [`Datapath::add`](super::Datapath::add)
//! deletes every pending element in the same transaction that adds the
//! new NIC's, so a re-leased address or host port never meets a stale
//! element. A TAP name that comes back (names are random) waits for the
//! old TAP's deletion. A crash forgets the queue; the next start's rebuild
//! derives everything from the store and removes what it does not name.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, watch};

use super::config::NetSettings;
use super::types::NicWiring;
use super::{links, nft};

/// Removed NICs whose set elements are still in the table. Its own lock,
/// held only to push or take: a removal never waits for a transaction.
/// Whoever takes the list deletes its elements under the datapath's lock
/// (which serialises every nft transaction).
pub type Stale = std::sync::Mutex<Vec<NicWiring>>;

/// Takes the whole list.
pub fn take(stale: &Stale) -> Vec<NicWiring> {
    std::mem::take(&mut *stale.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Puts `nics` back in front (their deletion failed with a transaction
/// that is to be retried).
pub fn put_back(stale: &Stale, mut nics: Vec<NicWiring>) {
    let mut s = stale.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    nics.append(&mut s);
    *s = nics;
}

/// The queue of removals and what it still holds.
pub struct Reaper {
    tx: mpsc::UnboundedSender<String>,
    /// TAPs queued for deletion and not deleted yet.
    queued: Arc<watch::Sender<HashSet<String>>>,
}

impl Reaper {
    /// Starts the task that works through the queue.
    pub fn start(settings: NetSettings, handle: rtnetlink::Handle, lock: Arc<Mutex<()>>, stale: Arc<Stale>) -> Reaper {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(watch::Sender::new(HashSet::new()));
        tokio::spawn(run(settings, handle, lock, stale, rx, queued.clone()));
        Reaper { tx, queued }
    }

    /// Queues `nic` (whose elements the caller put on the stale list).
    /// False when the task is gone (the runtime is shutting down).
    pub fn queue(&self, nic: &NicWiring) -> bool {
        self.queued.send_modify(|q| {
            q.insert(nic.tap.clone());
        });
        if self.tx.send(nic.tap.clone()).is_ok() {
            return true;
        }
        self.queued.send_modify(|q| {
            q.remove(&nic.tap);
        });
        false
    }

    /// Whether a TAP named `tap` is queued for deletion.
    pub fn has(&self, tap: &str) -> bool {
        self.queued.borrow().contains(tap)
    }

    /// Waits until everything queued so far is deleted.
    pub async fn idle(&self) {
        let mut rx = self.queued.subscribe();
        let _ = rx.wait_for(HashSet::is_empty).await;
    }
}

/// Puts `nic` on the stale list once (removing twice is fine).
pub fn mark(stale: &Stale, nic: &NicWiring) {
    let mut s = stale.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !s.iter().any(|x| x.tap == nic.tap) {
        s.push(nic.clone());
    }
}

/// The script that deletes `nics`' elements, then (same transaction) does
/// `then`.
pub fn flush_script(settings: &NetSettings, nics: &[NicWiring], then: &str) -> String {
    let all: Vec<&NicWiring> = nics.iter().collect();
    let mut s = nft::remove_script(settings, &all);
    s.push_str(then);
    s
}

async fn run(
    settings: NetSettings,
    handle: rtnetlink::Handle,
    lock: Arc<Mutex<()>>,
    stale: Arc<Stale>,
    mut rx: mpsc::UnboundedReceiver<String>,
    queued: Arc<watch::Sender<HashSet<String>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut taps = vec![first];
        while let Ok(more) = rx.try_recv() {
            taps.push(more);
        }
        {
            let _g = lock.lock().await;
            let batch = take(&stale);
            if !batch.is_empty() {
                // Dropped if refused: kept, a batch nft refuses would make
                // every later add fail with it. The next start's rebuild
                // replaces the table.
                let script = flush_script(&settings, &batch, "");
                if let Err(e) = nft::apply(&settings.nft, &script, nft::Wait::Commit).await {
                    let n = batch.len();
                    tracing::warn!(nics = n, error = %e, "could not delete removed NICs' set elements; the next start does");
                }
            }
        }
        let mut doomed = Vec::with_capacity(taps.len());
        for t in &taps {
            match links::get(&handle, t).await {
                Ok(l) => doomed.extend(l),
                Err(e) => tracing::warn!(tap = %t, error = %e, "could not look up a removed TAP"),
            }
        }
        if let Err(e) = links::delete_many(&handle, &doomed).await {
            tracing::warn!(taps = ?taps, error = %e, "could not delete removed TAPs; the next start does");
        }
        queued.send_modify(|q| {
            for t in &taps {
                q.remove(t);
            }
        });
    }
}
