//! Embedded SQLite store of VM records, with versioned migrations.
//!
//! One row per VM holds everything needed to find its process and files again
//! after a restart: state, validated spec, runtime (pid, sockets, paths) and
//! timestamps. WAL mode with `synchronous=FULL`: a state change is on disk
//! before the RPC that made it returns.
//!
//! Beside the VMs, the `intents` table holds one row per operation in
//! progress, written before the operation touches anything outside the
//! store and removed in the same transaction that commits its outcome. A row
//! found at start names an operation a crash interrupted; the core finishes
//! or rolls it back (see `core::reconcile`).
//!
//! The `net_*` tables hold what metald-managed NICs leased (see
//! `store/net.rs`): addresses, TAP names, host ports, customer tags.
//!
//! Every write is counted: [`Store::write_health`] says whether the last
//! write failed (disk full, I/O error) and how many have failed, for
//! `/_/health` and the metrics.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use crate::model::{CustomerId, Runtime, StopInfo, ValidSpec, VmId, VmState};

mod net;
mod snapshots;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migrating the schema")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
    /// A pool (addresses, host ports) has nothing left.
    #[error("{0}")]
    Exhausted(String),
    /// An address or host port asked for by name is leased to another VM.
    #[error("{0}")]
    Taken(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    /// Whether this is a failure to write (full disk, I/O error, read-only
    /// file system), which may pass once the operator frees space, rather
    /// than a bug or a corrupt record.
    pub fn is_unwritable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.code, DiskFull | SystemIoFailure | ReadOnly | CannotOpen | DatabaseBusy | DatabaseLocked)
            }
            _ => false,
        }
    }
}

/// An operation in progress on a VM, as written before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub vm_id: VmId,
    pub customer: CustomerId,
    /// `create`, or the name of the operation ([`crate::model::Op::name`]).
    pub op: String,
    pub started_at: i64,
}

/// Whether writes to the store succeed (see [`Store::write_health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHealth {
    /// Unix seconds of the first failure of the current run of failures;
    /// `None` when the last write succeeded.
    pub failing_since: Option<i64>,
    /// Writes that failed since start.
    pub errors: u64,
}

/// A VM as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    /// Unique on this host: the VM's directory, processes and metering.
    pub id: VmId,
    /// The id its customer gave or got (unique per customer; usually `id`,
    /// see `core`'s per-customer ids).
    pub name: VmId,
    pub customer: CustomerId,
    pub state: VmState,
    pub spec: ValidSpec,
    pub runtime: Option<Runtime>,
    pub created_at: i64,
    pub modified_at: i64,
    /// Why it last stopped (kept while `SHUTDOWN`, see [`Store::update_state`]).
    pub stopped: Option<StopInfo>,
}

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE vms (
            id          TEXT PRIMARY KEY NOT NULL,
            customer_id TEXT NOT NULL,
            state       TEXT NOT NULL,
            spec        TEXT NOT NULL,
            runtime     TEXT,
            created_at  INTEGER NOT NULL,
            modified_at INTEGER NOT NULL
        ) STRICT;
        CREATE INDEX vms_by_customer ON vms (customer_id, id);",
        ),
        M::up(
            "CREATE TABLE intents (
                vm_id       TEXT PRIMARY KEY NOT NULL,
                customer_id TEXT NOT NULL,
                op          TEXT NOT NULL,
                started_at  INTEGER NOT NULL
            ) STRICT;",
        ),
        // Ids are per customer: `name` is the customer's id of the VM,
        // `id` the host's.
        M::up(
            "ALTER TABLE vms ADD COLUMN name TEXT;
            UPDATE vms SET name = id;
            CREATE UNIQUE INDEX vms_by_customer_name ON vms (customer_id, name);",
        ),
        // Host networking leases (issue 14): unique constraints make a
        // double lease impossible whatever the code above does.
        M::up(
            "CREATE TABLE net_tags (
                customer_id TEXT PRIMARY KEY NOT NULL,
                tag         INTEGER NOT NULL UNIQUE
            ) STRICT;
            CREATE TABLE net_nics (
                vm_id  TEXT NOT NULL,
                nic_id TEXT NOT NULL,
                tag    INTEGER NOT NULL,
                tap    TEXT NOT NULL UNIQUE,
                mac    TEXT NOT NULL,
                ipv4   TEXT UNIQUE,
                ipv6   TEXT UNIQUE,
                PRIMARY KEY (vm_id, nic_id)
            ) STRICT;
            CREATE TABLE net_ports (
                proto      TEXT NOT NULL,
                host_port  INTEGER NOT NULL,
                vm_id      TEXT NOT NULL,
                nic_id     TEXT NOT NULL,
                guest_port INTEGER NOT NULL,
                PRIMARY KEY (proto, host_port)
            ) STRICT;
            CREATE INDEX net_ports_by_vm ON net_ports (vm_id);",
        ),
        // A managed NIC's rate limits (JSON `NicRates`; NULL: none), so
        // that the host can enforce them again at start.
        M::up("ALTER TABLE net_nics ADD COLUMN rates TEXT;"),
        // A clone's in-guest addresses (JSON `InGuest`; NULL: not a clone).
        M::up("ALTER TABLE net_nics ADD COLUMN inner TEXT;"),
        // Named snapshots (issue 16): a row is written (`ready = 0`) before
        // anything is saved and made ready once the files are complete.
        M::up(
            "CREATE TABLE snapshots (
                id          TEXT PRIMARY KEY NOT NULL,
                customer_id TEXT NOT NULL,
                name        TEXT NOT NULL,
                source      TEXT NOT NULL,
                spec        TEXT NOT NULL,
                backend     TEXT NOT NULL,
                size_bytes  INTEGER NOT NULL,
                created_at  INTEGER NOT NULL,
                ready       INTEGER NOT NULL,
                UNIQUE (customer_id, name)
            ) STRICT;",
        ),
        // Why a VM stopped (JSON `StopInfo`; NULL unless SHUTDOWN), issue 18.
        M::up("ALTER TABLE vms ADD COLUMN stopped TEXT;"),
    ])
}

/// Handle to the store; cheap to clone. Calls block: run them off the async
/// executor (the manager uses `spawn_blocking`).
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    writes: Arc<Writes>,
}

#[derive(Default)]
struct Writes {
    /// Unix seconds of the first failure of the current run; 0 when fine.
    failing_since: AtomicI64,
    errors: AtomicU64,
    /// Test hook: every write fails as on a full disk.
    #[cfg(test)]
    fail: std::sync::atomic::AtomicBool,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations().to_latest(&mut conn)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)), writes: Arc::default() })
    }

    /// Whether the last write succeeded, and how many failed.
    pub fn write_health(&self) -> WriteHealth {
        let since = self.writes.failing_since.load(Ordering::Relaxed);
        WriteHealth { failing_since: (since != 0).then_some(since), errors: self.writes.errors.load(Ordering::Relaxed) }
    }

    /// Runs a write, keeping count of failures.
    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        #[cfg(test)]
        if self.writes.fail.load(Ordering::Relaxed) {
            let full = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL);
            let e = StoreError::Sqlite(rusqlite::Error::SqliteFailure(full, Some("injected: disk full".into())));
            return Err(self.note_failure(e));
        }
        let r = f(&mut self.conn());
        match r {
            Ok(v) => {
                self.writes.failing_since.store(0, Ordering::Relaxed);
                Ok(v)
            }
            // A refusal, not a failure to write.
            Err(e @ (StoreError::Exhausted(_) | StoreError::Taken(_))) => Err(e),
            Err(e) => Err(self.note_failure(e)),
        }
    }

    fn note_failure(&self, e: StoreError) -> StoreError {
        self.writes.errors.fetch_add(1, Ordering::Relaxed);
        let _ = self.writes.failing_since.compare_exchange(
            0,
            crate::util::unix_now().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        e
    }

    /// Test hook: make every write fail as on a full disk (or stop that).
    #[cfg(test)]
    pub fn inject_write_failure(&self, on: bool) {
        self.writes.fail.store(on, Ordering::Relaxed);
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the connection cannot leave SQLite itself in
        // a bad state (each statement is atomic), so keep using it.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a VM and, in the same transaction, ends its `create` intent.
    pub fn insert(&self, row: &VmRow) -> Result<()> {
        let spec = to_json(&row.spec)?;
        let rt = row.runtime.as_ref().map(to_json).transpose()?;
        self.write(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO vms (id, customer_id, state, spec, runtime, created_at, modified_at, name)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    row.id.as_str(),
                    row.customer.0,
                    row.state.as_str(),
                    spec,
                    rt,
                    row.created_at,
                    row.modified_at,
                    row.name.as_str()
                ],
            )?;
            tx.execute("DELETE FROM intents WHERE vm_id = ?1", params![row.id.as_str()])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records an operation about to start on `intent.vm_id` (replacing a
    /// previous one of the same VM).
    pub fn begin(&self, intent: &Intent) -> Result<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO intents (vm_id, customer_id, op, started_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![intent.vm_id.as_str(), intent.customer.0, intent.op, intent.started_at])?;
            Ok(())
        })
    }

    /// Ends a VM's intent without changing the VM (an operation that
    /// failed before it changed anything).
    pub fn finish(&self, id: &VmId) -> Result<()> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM intents WHERE vm_id = ?1")?.execute(params![id.as_str()])?;
            Ok(())
        })
    }

    /// Every intent, oldest first: operations a crash interrupted.
    pub fn intents(&self) -> Result<Vec<Intent>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT vm_id, customer_id, op, started_at FROM intents ORDER BY started_at, vm_id")?;
        let raws = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        raws.into_iter()
            .map(|(id, customer, op, started_at)| {
                let vm_id = VmId::parse(&id).map_err(|e| StoreError::Corrupt(format!("intent: {e}")))?;
                Ok(Intent { vm_id, customer: CustomerId(customer), op, started_at })
            })
            .collect()
    }

    /// Inserts many rows in one transaction (bulk import, benchmarks).
    pub fn insert_batch(&self, rows: &[VmRow]) -> Result<()> {
        self.write(|conn| Self::insert_batch_tx(conn, rows))
    }

    fn insert_batch_tx(conn: &mut Connection, rows: &[VmRow]) -> Result<()> {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO vms (id, customer_id, state, spec, runtime, created_at, modified_at, name)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for row in rows {
                let spec = to_json(&row.spec)?;
                let rt = row.runtime.as_ref().map(to_json).transpose()?;
                stmt.execute(params![
                    row.id.as_str(),
                    row.customer.0,
                    row.state.as_str(),
                    spec,
                    rt,
                    row.created_at,
                    row.modified_at,
                    row.name.as_str()
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Persists a state change with the runtime and the stop reason that go
    /// with it, and ends the VM's intent, in one transaction.
    pub fn update_state(
        &self,
        id: &VmId,
        state: VmState,
        runtime: Option<&Runtime>,
        stopped: Option<&StopInfo>,
        modified_at: i64,
    ) -> Result<()> {
        let rt = runtime.map(to_json).transpose()?;
        let stopped = stopped.map(to_json).transpose()?;
        self.write(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE vms SET state = ?2, runtime = ?3, modified_at = ?4, stopped = ?5 WHERE id = ?1",
                params![id.as_str(), state.as_str(), rt, modified_at, stopped],
            )?;
            if n != 1 {
                return Err(StoreError::Corrupt(format!("no row for VM {id} to update")));
            }
            tx.execute("DELETE FROM intents WHERE vm_id = ?1", params![id.as_str()])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Removes a VM, its intent and its network leases; removing what is
    /// not there succeeds.
    pub fn delete(&self, id: &VmId) -> Result<()> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM vms WHERE id = ?1", params![id.as_str()])?;
            tx.execute("DELETE FROM intents WHERE vm_id = ?1", params![id.as_str()])?;
            release_net(&tx, id)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn get(&self, id: &VmId) -> Result<Option<VmRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, customer_id, state, spec, runtime, created_at, modified_at, name, stopped FROM vms WHERE id = ?1",
        )?;
        let raw = stmt.query_row(params![id.as_str()], RawRow::read).optional()?;
        raw.map(RawRow::parse).transpose()
    }

    pub fn load_all(&self) -> Result<Vec<VmRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, customer_id, state, spec, runtime, created_at, modified_at, name, stopped FROM vms ORDER BY id",
        )?;
        let raws = stmt.query_map([], RawRow::read)?.collect::<std::result::Result<Vec<_>, _>>()?;
        raws.into_iter().map(RawRow::parse).collect()
    }

    /// Cheap liveness probe for `/_/health`.
    pub fn ping(&self) -> Result<()> {
        self.conn().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}

struct RawRow {
    id: String,
    customer: String,
    state: String,
    spec: String,
    runtime: Option<String>,
    created_at: i64,
    modified_at: i64,
    name: Option<String>,
    stopped: Option<String>,
}

impl RawRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            id: r.get(0)?,
            customer: r.get(1)?,
            state: r.get(2)?,
            spec: r.get(3)?,
            runtime: r.get(4)?,
            created_at: r.get(5)?,
            modified_at: r.get(6)?,
            name: r.get(7)?,
            stopped: r.get(8)?,
        })
    }

    fn parse(self) -> Result<VmRow> {
        let id = VmId::parse(&self.id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let name = match &self.name {
            Some(n) => VmId::parse(n).map_err(|e| StoreError::Corrupt(format!("VM {id}: name: {e}")))?,
            None => id.clone(),
        };
        let state = VmState::parse(&self.state)
            .ok_or_else(|| StoreError::Corrupt(format!("VM {id}: unknown state {:?}", self.state)))?;
        let spec = serde_json::from_str(&self.spec).map_err(|e| StoreError::Corrupt(format!("VM {id}: spec: {e}")))?;
        let runtime = self
            .runtime
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("VM {id}: runtime: {e}")))?;
        // A reason that does not parse (a later metald's) is dropped, not fatal.
        let stopped = self.stopped.and_then(|s| serde_json::from_str(&s).ok());
        Ok(VmRow {
            id,
            name,
            customer: CustomerId(self.customer),
            state,
            spec,
            runtime,
            created_at: self.created_at,
            modified_at: self.modified_at,
            stopped,
        })
    }
}

/// Deletes `id`'s NIC and port leases (its customer keeps its tag).
fn release_net(tx: &rusqlite::Transaction<'_>, id: &VmId) -> Result<()> {
    tx.execute("DELETE FROM net_nics WHERE vm_id = ?1", params![id.as_str()])?;
    tx.execute("DELETE FROM net_ports WHERE vm_id = ?1", params![id.as_str()])?;
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("encoding: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(id: &str) -> VmRow {
        VmRow {
            id: VmId::parse(id).unwrap(),
            name: VmId::parse(id).unwrap(),
            customer: CustomerId("c1".into()),
            state: VmState::Created,
            spec: ValidSpec::unchecked(crate::model::VmSpec::default()),
            runtime: Some(Runtime { pid: Some(42), ..Default::default() }),
            created_at: 1,
            modified_at: 1,
            stopped: None,
        }
    }

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn round_trip_and_update_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metald.db");
        let stop = StopInfo::new(crate::model::StopReason::Crashed, "VCPU generated error", 5);
        {
            let s = Store::open(&path).unwrap();
            s.insert(&row("a")).unwrap();
            s.insert(&row("b")).unwrap();
            s.update_state(&VmId::parse("a").unwrap(), VmState::Shutdown, None, Some(&stop), 5).unwrap();
            s.delete(&VmId::parse("b").unwrap()).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, VmState::Shutdown);
        assert_eq!(all[0].runtime, None);
        assert_eq!(all[0].modified_at, 5);
        assert_eq!(all[0].stopped, Some(stop), "the stop reason is kept with the state");
        assert_eq!(s.get(&VmId::parse("a").unwrap()).unwrap().unwrap(), all[0]);
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let s = Store::open_in_memory().unwrap();
        s.insert(&row("a")).unwrap();
        assert!(s.insert(&row("a")).is_err());
    }

    #[test]
    fn updating_a_missing_row_is_an_error() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.update_state(&VmId::parse("x").unwrap(), VmState::Running, None, None, 1).is_err());
    }

    fn intent(id: &str, op: &str) -> Intent {
        Intent { vm_id: VmId::parse(id).unwrap(), customer: CustomerId("c1".into()), op: op.into(), started_at: 7 }
    }

    #[test]
    fn an_intent_survives_reopen_until_its_outcome_is_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metald.db");
        {
            let s = Store::open(&path).unwrap();
            s.begin(&intent("a", "create")).unwrap();
            s.insert(&row("b")).unwrap();
            s.begin(&intent("b", "boot")).unwrap();
            s.insert(&row("c")).unwrap();
            s.begin(&intent("c", "delete")).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let ops: Vec<_> = s.intents().unwrap().into_iter().map(|i| (i.vm_id.to_string(), i.op)).collect();
        assert_eq!(ops, [("a".into(), "create".into()), ("b".into(), "boot".into()), ("c".into(), "delete".into())]);
        // Each outcome ends its intent in the same transaction.
        s.insert(&row("a")).unwrap();
        s.update_state(&VmId::parse("b").unwrap(), VmState::Running, None, None, 9).unwrap();
        s.delete(&VmId::parse("c").unwrap()).unwrap();
        assert!(s.intents().unwrap().is_empty());
        // finish ends an intent without touching the VM.
        s.begin(&intent("a", "pause")).unwrap();
        s.finish(&VmId::parse("a").unwrap()).unwrap();
        assert!(s.intents().unwrap().is_empty());
        assert_eq!(s.get(&VmId::parse("a").unwrap()).unwrap().unwrap().state, VmState::Created);
    }

    #[test]
    fn a_failed_update_keeps_the_intent_and_the_old_state() {
        let s = Store::open_in_memory().unwrap();
        s.insert(&row("a")).unwrap();
        s.begin(&intent("a", "boot")).unwrap();
        s.inject_write_failure(true);
        let e = s.update_state(&VmId::parse("a").unwrap(), VmState::Running, None, None, 9).unwrap_err();
        assert!(e.is_unwritable(), "{e:?}");
        s.inject_write_failure(false);
        assert_eq!(s.intents().unwrap().len(), 1);
        assert_eq!(s.get(&VmId::parse("a").unwrap()).unwrap().unwrap().state, VmState::Created);
    }

    #[test]
    fn write_health_reports_a_run_of_failures_until_a_write_succeeds() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.write_health(), WriteHealth { failing_since: None, errors: 0 });
        s.inject_write_failure(true);
        assert!(s.insert(&row("a")).is_err());
        assert!(s.begin(&intent("a", "create")).is_err());
        let h = s.write_health();
        assert!(h.failing_since.is_some());
        assert_eq!(h.errors, 2);
        s.inject_write_failure(false);
        s.insert(&row("a")).unwrap();
        assert_eq!(s.write_health(), WriteHealth { failing_since: None, errors: 2 });
        // Reads do not count as writes.
        assert!(s.get(&VmId::parse("a").unwrap()).unwrap().is_some());
        assert!(!StoreError::Corrupt("x".into()).is_unwritable());
    }
}
