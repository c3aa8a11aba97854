//! Named snapshots: one row per snapshot, written before its files are
//! (`ready = 0`, the snapshot's intent) and made ready in one update once
//! they are complete; start-up removes the rows (and files) of snapshots
//! that never became ready.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store, StoreError, to_json};
use crate::model::{CustomerId, SnapshotRecord, ValidSpec, VmId};

const COLUMNS: &str = "id, customer_id, name, source, spec, backend, size_bytes, created_at, ready";

type Raw = (String, String, String, String, String, String, i64, i64, bool);

fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
}

fn parse(raw: Raw) -> Result<(SnapshotRecord, bool)> {
    let (id, customer, name, source, spec, backend, size, created_at, ready) = raw;
    let bad = |what: &str| StoreError::Corrupt(format!("snapshot {id}: {what}"));
    let spec: ValidSpec = serde_json::from_str(&spec).map_err(|e| bad(&format!("spec: {e}")))?;
    let rec = SnapshotRecord {
        name: VmId::parse(&name).map_err(|_| bad("name"))?,
        source: VmId::parse(&source).map_err(|_| bad("source"))?,
        id,
        customer: CustomerId(customer),
        spec,
        backend,
        size_bytes: u64::try_from(size).unwrap_or(0),
        created_at,
    };
    Ok((rec, ready))
}

impl Store {
    /// Writes a snapshot's row, not ready yet. `false` (nothing written)
    /// when the customer already has a snapshot of that name.
    pub fn begin_snapshot(&self, rec: &SnapshotRecord) -> Result<bool> {
        let spec = to_json(&rec.spec)?;
        self.write(|conn| {
            let n = conn.execute(
                "INSERT OR IGNORE INTO snapshots (id, customer_id, name, source, spec, backend, size_bytes, created_at, ready)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0)",
                params![
                    rec.id,
                    rec.customer.0,
                    rec.name.as_str(),
                    rec.source.as_str(),
                    spec,
                    rec.backend,
                    i64::try_from(rec.size_bytes).unwrap_or(i64::MAX),
                    rec.created_at
                ],
            )?;
            Ok(n == 1)
        })
    }

    /// Marks a snapshot complete, with its size on disk.
    pub fn finish_snapshot(&self, id: &str, size_bytes: u64) -> Result<()> {
        self.write(|conn| {
            let n = conn.execute(
                "UPDATE snapshots SET ready = 1, size_bytes = ?2 WHERE id = ?1",
                params![id, i64::try_from(size_bytes).unwrap_or(i64::MAX)],
            )?;
            if n != 1 {
                return Err(StoreError::Corrupt(format!("no row for snapshot {id} to finish")));
            }
            Ok(())
        })
    }

    /// Removes a snapshot's row; removing what is not there succeeds.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.write(|conn| {
            conn.execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    /// A customer's ready snapshot by name.
    pub fn snapshot(&self, customer: &CustomerId, name: &VmId) -> Result<Option<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE customer_id = ?1 AND name = ?2 AND ready = 1"
        ))?;
        let raw = stmt.query_row(params![customer.0, name.as_str()], read).optional()?;
        raw.map(|r| parse(r).map(|(rec, _)| rec)).transpose()
    }

    /// A customer's ready snapshots by name.
    pub fn snapshots(&self, customer: &CustomerId) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE customer_id = ?1 AND ready = 1 ORDER BY name"
        ))?;
        let raws = stmt.query_map(params![customer.0], read)?.collect::<std::result::Result<Vec<_>, _>>()?;
        raws.into_iter().map(|r| parse(r).map(|(rec, _)| rec)).collect()
    }

    /// Every snapshot row with whether it is ready (start-up, limits).
    pub fn all_snapshots(&self) -> Result<Vec<(SnapshotRecord, bool)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM snapshots ORDER BY id"))?;
        let raws = stmt.query_map([], read)?.collect::<std::result::Result<Vec<_>, _>>()?;
        raws.into_iter().map(parse).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::VmSpec;

    fn rec(id: &str, customer: &str, name: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            customer: CustomerId(customer.into()),
            name: VmId::parse(name).unwrap(),
            source: VmId::parse("vm-1").unwrap(),
            spec: ValidSpec::unchecked(VmSpec::default()),
            backend: "fake".into(),
            size_bytes: 0,
            created_at: 7,
        }
    }

    #[test]
    fn a_snapshot_is_listed_once_ready_and_names_are_per_customer() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.begin_snapshot(&rec("s1", "acme", "base")).unwrap());
        // Same name, same customer: refused; another customer: fine.
        assert!(!s.begin_snapshot(&rec("s2", "acme", "base")).unwrap());
        assert!(s.begin_snapshot(&rec("s3", "other", "base")).unwrap());
        let acme = CustomerId("acme".into());
        assert!(s.snapshots(&acme).unwrap().is_empty());
        assert_eq!(s.snapshot(&acme, &VmId::parse("base").unwrap()).unwrap(), None);
        s.finish_snapshot("s1", 1234).unwrap();
        let listed = s.snapshots(&acme).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].id.as_str(), listed[0].size_bytes), ("s1", 1234));
        assert_eq!(s.all_snapshots().unwrap().iter().filter(|(_, ready)| !ready).count(), 1);
        s.delete_snapshot("s1").unwrap();
        s.delete_snapshot("s1").unwrap();
        assert!(s.snapshots(&acme).unwrap().is_empty());
        assert!(s.finish_snapshot("s1", 1).is_err());
    }
}
