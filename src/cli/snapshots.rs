//! `metaldctl snapshot`, `snapshots` and `snapshot-delete` (`suspend`,
//! `resume` and `create --from-snapshot` are beside the other VM verbs).

use serde_json::json;

use super::out::{CliError, print_json, table, ts, usage};
use crate::client::VmClient;
use crate::pb::vmprovisioner::v1 as pb;

fn row(s: &pb::Snapshot) -> Vec<String> {
    vec![
        s.name.clone(),
        s.source_vm_id.clone(),
        s.hypervisor.clone(),
        format!("{} MiB", s.size_bytes >> 20),
        ts(s.created_timestamp),
    ]
}

fn to_json(s: &pb::Snapshot) -> Result<serde_json::Value, CliError> {
    serde_json::to_value(s).map_err(|e| usage(format!("encoding JSON: {e}")))
}

pub async fn snapshot(client: &VmClient, id: String, name: String, json: bool) -> Result<(), CliError> {
    let r = client.snapshot_vm(pb::SnapshotVmRequest { vm_id: id, name, ..Default::default() }).await?.into_owned();
    let s = r.snapshot.as_option().cloned().unwrap_or_default();
    if json {
        print_json(to_json(&s)?);
    } else {
        println!("{}\t{}\t{} bytes", s.name, s.source_vm_id, s.size_bytes);
    }
    Ok(())
}

pub async fn list(client: &VmClient, json: bool) -> Result<(), CliError> {
    let r = client.list_snapshots(pb::ListSnapshotsRequest::default()).await?.into_owned();
    if json {
        let all = r.snapshots.iter().map(to_json).collect::<Result<Vec<_>, _>>()?;
        print_json(json!({ "snapshots": all }));
        return Ok(());
    }
    let mut t = table(&["name", "source vm", "hypervisor", "size", "created"]);
    for s in &r.snapshots {
        t.add_row(row(s));
    }
    println!("{t}");
    Ok(())
}

pub async fn delete(client: &VmClient, name: String, json: bool) -> Result<(), CliError> {
    client.delete_snapshot(pb::DeleteSnapshotRequest { name: name.clone(), ..Default::default() }).await?;
    if json {
        print_json(json!({ "snapshot": name, "deleted": true }));
    } else {
        println!("{name}\tDELETED");
    }
    Ok(())
}
