//! Embedded SQLite store of VM records, with versioned migrations.
//!
//! One row per VM holds everything needed to find its process and files again
//! after a restart: state, validated spec, runtime (pid, sockets, paths) and
//! timestamps. WAL mode with `synchronous=FULL`: a state change is on disk
//! before the RPC that made it returns.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use crate::model::{CustomerId, Runtime, ValidSpec, VmId, VmState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migrating the schema")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A VM as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub id: VmId,
    pub customer: CustomerId,
    pub state: VmState,
    pub spec: ValidSpec,
    pub runtime: Option<Runtime>,
    pub created_at: i64,
    pub modified_at: i64,
}

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(
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
    )])
}

/// Handle to the store; cheap to clone. Calls block: run them off the async
/// executor (the manager uses `spawn_blocking`).
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
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
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the connection cannot leave SQLite itself in
        // a bad state (each statement is atomic), so keep using it.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, row: &VmRow) -> Result<()> {
        let spec = to_json(&row.spec)?;
        let rt = row.runtime.as_ref().map(to_json).transpose()?;
        self.conn().execute(
            "INSERT INTO vms (id, customer_id, state, spec, runtime, created_at, modified_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![row.id.as_str(), row.customer.0, row.state.as_str(), spec, rt, row.created_at, row.modified_at],
        )?;
        Ok(())
    }

    /// Inserts many rows in one transaction (bulk import, benchmarks).
    pub fn insert_batch(&self, rows: &[VmRow]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO vms (id, customer_id, state, spec, runtime, created_at, modified_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
                    row.modified_at
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Persists a state change and the runtime that goes with it.
    pub fn update_state(&self, id: &VmId, state: VmState, runtime: Option<&Runtime>, modified_at: i64) -> Result<()> {
        let rt = runtime.map(to_json).transpose()?;
        let n = self.conn().execute(
            "UPDATE vms SET state = ?2, runtime = ?3, modified_at = ?4 WHERE id = ?1",
            params![id.as_str(), state.as_str(), rt, modified_at],
        )?;
        if n != 1 {
            return Err(StoreError::Corrupt(format!("no row for VM {id} to update")));
        }
        Ok(())
    }

    pub fn delete(&self, id: &VmId) -> Result<()> {
        self.conn().execute("DELETE FROM vms WHERE id = ?1", params![id.as_str()])?;
        Ok(())
    }

    pub fn get(&self, id: &VmId) -> Result<Option<VmRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, customer_id, state, spec, runtime, created_at, modified_at FROM vms WHERE id = ?1",
        )?;
        let raw = stmt.query_row(params![id.as_str()], RawRow::read).optional()?;
        raw.map(RawRow::parse).transpose()
    }

    pub fn load_all(&self) -> Result<Vec<VmRow>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, customer_id, state, spec, runtime, created_at, modified_at FROM vms ORDER BY id")?;
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
        })
    }

    fn parse(self) -> Result<VmRow> {
        let id = VmId::parse(&self.id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let state = VmState::parse(&self.state)
            .ok_or_else(|| StoreError::Corrupt(format!("VM {id}: unknown state {:?}", self.state)))?;
        let spec = serde_json::from_str(&self.spec).map_err(|e| StoreError::Corrupt(format!("VM {id}: spec: {e}")))?;
        let runtime = self
            .runtime
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("VM {id}: runtime: {e}")))?;
        Ok(VmRow {
            id,
            customer: CustomerId(self.customer),
            state,
            spec,
            runtime,
            created_at: self.created_at,
            modified_at: self.modified_at,
        })
    }
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
            customer: CustomerId("c1".into()),
            state: VmState::Created,
            spec: ValidSpec::unchecked(crate::model::VmSpec::default()),
            runtime: Some(Runtime { pid: Some(42), ..Default::default() }),
            created_at: 1,
            modified_at: 1,
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
        {
            let s = Store::open(&path).unwrap();
            s.insert(&row("a")).unwrap();
            s.insert(&row("b")).unwrap();
            s.update_state(&VmId::parse("a").unwrap(), VmState::Shutdown, None, 5).unwrap();
            s.delete(&VmId::parse("b").unwrap()).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, VmState::Shutdown);
        assert_eq!(all[0].runtime, None);
        assert_eq!(all[0].modified_at, 5);
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
        assert!(s.update_state(&VmId::parse("x").unwrap(), VmState::Running, None, 1).is_err());
    }
}
