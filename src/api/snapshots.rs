//! The handlers of suspend, snapshots and clones (`SuspendVm`,
//! `SnapshotVm`, `ListSnapshots`, `DeleteSnapshot`, `CreateVm` with
//! `from_snapshot`).

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use tracing::Instrument;

use super::convert::{ports_in, snapshot_out, state_out};
use super::{Handlers, before_deadline, call_span, to_connect, vm_id};
use crate::error::Error;
use crate::model::{CustomerId, Operation, VmId, VmState};
use crate::pb::vmprovisioner::v1 as pb;

/// A snapshot name from the wire (same rules as a VM id).
fn snapshot_name(field: &str, s: &str) -> Result<VmId, ConnectError> {
    if s.is_empty() {
        return Err(to_connect(Error::invalid(field, "is required")));
    }
    VmId::parse(s).map_err(|e| to_connect(Error::invalid(field, e.reason)))
}

impl Handlers<'_> {
    pub(super) async fn clone_vm(
        &self,
        ctx: &RequestContext,
        caller: CustomerId,
        id: Option<VmId>,
        req: &pb::CreateVmRequest,
    ) -> ServiceResult<pb::CreateVmResponse> {
        if req.config.as_option().is_some() {
            return Err(to_connect(Error::invalid(
                "config",
                "must be left out with from_snapshot: a clone runs with its snapshot's configuration",
            )));
        }
        let snapshot = snapshot_name("from_snapshot", &req.from_snapshot)?;
        let ports = ports_in(&req.port_mappings);
        let span = call_span(Operation::Create, id.as_ref());
        let call = self.manager.clone_vm(&caller, id, snapshot, ports).instrument(span);
        let view = before_deadline(ctx, Operation::Create, call).await?;
        Response::ok(pb::CreateVmResponse {
            vm_id: view.id.to_string(),
            state: state_out(view.state()).into(),
            ..Default::default()
        })
    }

    pub(super) async fn suspend_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::SuspendVmRequest>,
    ) -> ServiceResult<pb::SuspendVmResponse> {
        let caller = self.caller(ctx)?;
        let id = vm_id(&request.to_owned_message().vm_id)?;
        let call = self.manager.suspend(&caller, &id).instrument(call_span(Operation::Suspend, Some(&id)));
        let state = before_deadline(ctx, Operation::Suspend, call).await?;
        let size = match (state, self.manager.get(&caller, &id)) {
            (VmState::Suspended, Ok(v)) => self.manager.saved_size(&v.host_id),
            _ => 0,
        };
        Response::ok(pb::SuspendVmResponse {
            success: true,
            state: state_out(state).into(),
            snapshot_size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            ..Default::default()
        })
    }

    pub(super) async fn snapshot_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::SnapshotVmRequest>,
    ) -> ServiceResult<pb::SnapshotVmResponse> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        let id = vm_id(&req.vm_id)?;
        let name = snapshot_name("name", &req.name)?;
        let call = self.manager.snapshot(&caller, &id, name).instrument(call_span(Operation::Snapshot, Some(&id)));
        let rec = before_deadline(ctx, Operation::Snapshot, call).await?;
        Response::ok(pb::SnapshotVmResponse { snapshot: snapshot_out(&rec).into(), ..Default::default() })
    }

    pub(super) async fn list_snapshots(
        &self,
        ctx: &RequestContext,
        _request: ServiceRequest<'_, pb::ListSnapshotsRequest>,
    ) -> ServiceResult<pb::ListSnapshotsResponse> {
        let caller = self.caller(ctx)?;
        let list = self.manager.snapshots(&caller).await.map_err(to_connect)?;
        Response::ok(pb::ListSnapshotsResponse {
            snapshots: list.iter().map(snapshot_out).collect(),
            ..Default::default()
        })
    }

    pub(super) async fn delete_snapshot(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::DeleteSnapshotRequest>,
    ) -> ServiceResult<pb::DeleteSnapshotResponse> {
        let caller = self.caller(ctx)?;
        let name = snapshot_name("name", &request.to_owned_message().name)?;
        let call = self.manager.delete_snapshot(&caller, &name);
        before_deadline(ctx, Operation::DeleteSnapshot, call).await?;
        Response::ok(pb::DeleteSnapshotResponse { success: true, ..Default::default() })
    }
}
