//! The `vmprovisioner.v1.VmService` ConnectRPC front end.
//!
//! Each method authenticates the caller, converts the wire request into
//! domain types, calls the [`Manager`] and converts the answer back. Errors
//! leave through [`to_connect`], the one mapping from core codes to RPC codes.

pub mod auth;
mod console;
pub mod convert;
mod snapshots;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use connectrpc::{ConnectError, ErrorCode, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream};
use tracing::{Instrument, error, info_span};

use crate::core::{DEFAULT_SHUTDOWN_TIMEOUT, ListQuery, MAX_SHUTDOWN_TIMEOUT, Manager};
use crate::error::Error;
use crate::model::Code;
use crate::model::{CustomerId, Operation, StopMode, VmId};
use crate::pb::vmprovisioner::v1 as pb;

use crate::telemetry::rpc::RpcTelemetry;
use auth::Authenticator;
use convert::{info_out, spec_in, state_in, state_out, summary_out};

/// A mutating call answers this long before its deadline, so the answer is
/// metald's own (saying the operation runs on), not the transport's.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
const PAGE_TOKEN_PREFIX: &str = "v1:";

/// Maps a core code to the Connect/gRPC code.
pub fn connect_code(code: Code) -> ErrorCode {
    match code {
        Code::InvalidArgument => ErrorCode::InvalidArgument,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::Unauthenticated => ErrorCode::Unauthenticated,
        Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        Code::Unavailable => ErrorCode::Unavailable,
        Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        Code::Internal => ErrorCode::Internal,
    }
}

/// The edge where an error chain is printed, once.
pub fn to_connect(e: Error) -> ConnectError {
    let code = e.code();
    let msg = e.chain();
    if code == Code::Internal {
        error!(error = %msg, "internal error");
    }
    ConnectError::new(connect_code(code), msg)
}

/// Runs a mutating call. A change never stops half-done (the manager runs
/// it in its own task), so when the request's deadline is about to pass the
/// caller is told the truth: `DEADLINE_EXCEEDED`, the operation continues,
/// and `GetVmInfo` shows it until it ends.
async fn before_deadline<T>(
    ctx: &RequestContext,
    op: Operation,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, ConnectError> {
    let Some(deadline) = ctx.deadline() else {
        return call.await.map_err(to_connect);
    };
    let at = deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline);
    tokio::select! {
        r = call => r.map_err(to_connect),
        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => Err(ConnectError::new(
            ErrorCode::DeadlineExceeded,
            format!(
                "the request's deadline passed while {} was in progress; the operation continues to completion \
                 (a started change is never abandoned): GetVmInfo shows it in operation_in_progress until it ends",
                op.rpc_method()
            ),
        )),
    }
}

pub struct VmApi {
    manager: Manager,
    auth: Arc<Authenticator>,
    telemetry: Option<RpcTelemetry>,
}

impl VmApi {
    pub fn new(manager: Manager, auth: Arc<Authenticator>) -> Self {
        VmApi { manager, auth, telemetry: None }
    }

    /// Traces and measures every RPC (see [`RpcTelemetry`]).
    pub fn with_telemetry(mut self, telemetry: Option<RpcTelemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Runs one RPC's handler, traced and measured when telemetry is on.
    /// `vm_id` is the VM the request names ("" for none), for the span.
    /// The handler's future is pinned where it was made and polled there
    /// (it is large; moving it through each layer costs copies per call).
    async fn observed<T>(
        &self,
        ctx: &RequestContext,
        op: Operation,
        vm_id: &str,
        call: Pin<&mut impl Future<Output = Result<T, ConnectError>>>,
    ) -> Result<T, ConnectError> {
        match &self.telemetry {
            Some(t) => t.observe(ctx, op, vm_id, call).await,
            None => call.await,
        }
    }

    fn caller(&self, ctx: &RequestContext) -> Result<CustomerId, ConnectError> {
        self.auth.authenticate(ctx.headers()).map_err(to_connect)
    }
}

fn vm_id(s: &str) -> Result<VmId, ConnectError> {
    if s.is_empty() {
        return Err(to_connect(Error::invalid("vm_id", "is required")));
    }
    VmId::parse(s).map_err(|e| to_connect(e.into()))
}

pub fn encode_page_token(after: &VmId) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{after}"))
}

pub fn decode_page_token(token: &str) -> Result<Option<VmId>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "is not a token returned by ListVms");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let id = text.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(bad)?;
    VmId::parse(id).map(Some).map_err(|_| bad())
}

fn stop_mode(force: bool, timeout_seconds: i32) -> Result<StopMode, Error> {
    if force {
        return Ok(StopMode::Force);
    }
    let max = MAX_SHUTDOWN_TIMEOUT.as_secs();
    let timeout = match timeout_seconds {
        0 => DEFAULT_SHUTDOWN_TIMEOUT,
        t if t < 0 => return Err(Error::invalid("timeout_seconds", format!("is {t}, must not be negative"))),
        t => {
            let t = u64::try_from(t).unwrap_or(u64::MAX);
            if t > max {
                return Err(Error::invalid("timeout_seconds", format!("is {t}, at most {max} is allowed")));
            }
            Duration::from_secs(t)
        }
    };
    Ok(StopMode::Graceful { timeout })
}

/// The span an API call runs in, for log lines (`rpc.method`, `vm_id`).
/// It is not exported: with telemetry on, the RPC's server span (`RpcTelemetry`)
/// is the call's span.
fn call_span(op: Operation, id: Option<&VmId>) -> tracing::Span {
    let method = op.rpc_method();
    match id {
        Some(id) => info_span!(target: crate::telemetry::LOG_ONLY, "rpc", rpc.method = method, vm_id = %id),
        None => info_span!(target: crate::telemetry::LOG_ONLY, "rpc", rpc.method = method),
    }
}

/// The VM a request names, as sent ("" for none): recorded on the RPC's
/// server span when it is a valid id.
trait NamedVm {
    fn named_vm(&self) -> &str;
}

macro_rules! named_vm {
    ($($view:ident),*) => {
        $(impl NamedVm for pb::$view<'_> {
            fn named_vm(&self) -> &str {
                self.vm_id
            }
        })*
    };
}

named_vm!(
    CreateVmRequestView,
    DeleteVmRequestView,
    BootVmRequestView,
    ShutdownVmRequestView,
    PauseVmRequestView,
    ResumeVmRequestView,
    RebootVmRequestView,
    GetVmInfoRequestView,
    SuspendVmRequestView,
    SnapshotVmRequestView,
    StreamConsoleRequestView
);

macro_rules! no_named_vm {
    ($($view:ident),*) => {
        $(impl NamedVm for pb::$view<'_> {
            fn named_vm(&self) -> &str {
                ""
            }
        })*
    };
}

no_named_vm!(ListVmsRequestView, ListSnapshotsRequestView, DeleteSnapshotRequestView);

macro_rules! rpc_span {
    ($op:ident, $id:expr) => {
        call_span(Operation::$op, Some(&$id))
    };
}

/// The `VmService` methods: each runs its handler in [`Handlers`],
/// observed as its [`Operation`].
macro_rules! observed_methods {
    ($($method:ident($req:ident) -> $resp:ident as $op:ident;)*) => {
        $(
            async fn $method(
                &self,
                ctx: RequestContext,
                request: ServiceRequest<'_, pb::$req>,
            ) -> ServiceResult<pb::$resp> {
                let vm_id = request.view().named_vm();
                let handlers = Handlers(self);
                let call = std::pin::pin!(handlers.$method(&ctx, request));
                self.observed(&ctx, Operation::$op, vm_id, call).await
            }
        )*
    };
}

// Returning the concrete message type is more precise than the trait's
// `impl Encodable`, which is what the generated trait intends.
#[allow(refining_impl_trait)]
impl pb::VmService for VmApi {
    observed_methods! {
        create_vm(CreateVmRequest) -> CreateVmResponse as Create;
        delete_vm(DeleteVmRequest) -> DeleteVmResponse as Delete;
        boot_vm(BootVmRequest) -> BootVmResponse as Boot;
        shutdown_vm(ShutdownVmRequest) -> ShutdownVmResponse as Shutdown;
        pause_vm(PauseVmRequest) -> PauseVmResponse as Pause;
        resume_vm(ResumeVmRequest) -> ResumeVmResponse as Resume;
        reboot_vm(RebootVmRequest) -> RebootVmResponse as Reboot;
        get_vm_info(GetVmInfoRequest) -> GetVmInfoResponse as Info;
        list_vms(ListVmsRequest) -> ListVmsResponse as List;
        suspend_vm(SuspendVmRequest) -> SuspendVmResponse as Suspend;
        snapshot_vm(SnapshotVmRequest) -> SnapshotVmResponse as Snapshot;
        list_snapshots(ListSnapshotsRequest) -> ListSnapshotsResponse as Snapshots;
        delete_snapshot(DeleteSnapshotRequest) -> DeleteSnapshotResponse as DeleteSnapshot;
    }

    /// A server stream: observed until it ends (see
    /// [`RpcTelemetry::observe_stream`]).
    async fn stream_console(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::StreamConsoleRequest>,
    ) -> ServiceResult<ServiceStream<pb::StreamConsoleResponse>> {
        let vm_id = request.view().named_vm().to_owned();
        let handlers = Handlers(self);
        let call = std::pin::pin!(handlers.stream_console(&ctx, request));
        let stream = match &self.telemetry {
            Some(t) => t.observe_stream(&ctx, Operation::Console, &vm_id, call).await?,
            None => call.await?,
        };
        Ok(Response::new(stream))
    }
}

/// The RPC handlers proper; [`VmApi`]'s `VmService` methods run them
/// observed (see [`VmApi::observed`]).
struct Handlers<'a>(&'a VmApi);

impl std::ops::Deref for Handlers<'_> {
    type Target = VmApi;

    fn deref(&self) -> &VmApi {
        self.0
    }
}

impl Handlers<'_> {
    async fn create_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::CreateVmRequest>,
    ) -> ServiceResult<pb::CreateVmResponse> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        if !req.customer_id.is_empty() && req.customer_id != caller.0 {
            return Err(to_connect(Error::PermissionDenied(
                "customer_id differs from the authenticated caller; omit it or send your own".into(),
            )));
        }
        let id = if req.vm_id.is_empty() { None } else { Some(vm_id(&req.vm_id)?) };
        if !req.from_snapshot.is_empty() {
            return self.clone_vm(ctx, caller, id, &req).await;
        }
        if !req.port_mappings.is_empty() {
            return Err(to_connect(Error::invalid(
                "port_mappings",
                "is for clones (from_snapshot); put a new VM's mappings in config.network[].port_mappings",
            )));
        }
        let config = req.config.as_option().ok_or_else(|| to_connect(Error::invalid("config", "is required")))?;
        let spec = spec_in(config);
        let span = call_span(Operation::Create, id.as_ref());
        let view =
            before_deadline(ctx, Operation::Create, self.manager.create(&caller, id, spec).instrument(span)).await?;
        Response::ok(pb::CreateVmResponse {
            vm_id: view.id.to_string(),
            state: state_out(view.state()).into(),
            ..Default::default()
        })
    }

    async fn delete_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::DeleteVmRequest>,
    ) -> ServiceResult<pb::DeleteVmResponse> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        let id = vm_id(&req.vm_id)?;
        before_deadline(
            ctx,
            Operation::Delete,
            self.manager.delete(&caller, &id, req.force).instrument(rpc_span!(Delete, id)),
        )
        .await?;
        Response::ok(pb::DeleteVmResponse { success: true, ..Default::default() })
    }

    async fn boot_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::BootVmRequest>,
    ) -> ServiceResult<pb::BootVmResponse> {
        let caller = self.caller(ctx)?;
        let id = vm_id(&request.to_owned_message().vm_id)?;
        let state =
            before_deadline(ctx, Operation::Boot, self.manager.boot(&caller, &id).instrument(rpc_span!(Boot, id)))
                .await?;
        Response::ok(pb::BootVmResponse { success: true, state: state_out(state).into(), ..Default::default() })
    }

    async fn shutdown_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::ShutdownVmRequest>,
    ) -> ServiceResult<pb::ShutdownVmResponse> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        let id = vm_id(&req.vm_id)?;
        let mode = stop_mode(req.force, req.timeout_seconds).map_err(to_connect)?;
        let call = self.manager.shutdown(&caller, &id, mode).instrument(rpc_span!(Shutdown, id));
        let state = before_deadline(ctx, Operation::Shutdown, call).await?;
        Response::ok(pb::ShutdownVmResponse { success: true, state: state_out(state).into(), ..Default::default() })
    }

    async fn pause_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::PauseVmRequest>,
    ) -> ServiceResult<pb::PauseVmResponse> {
        let caller = self.caller(ctx)?;
        let id = vm_id(&request.to_owned_message().vm_id)?;
        let state =
            before_deadline(ctx, Operation::Pause, self.manager.pause(&caller, &id).instrument(rpc_span!(Pause, id)))
                .await?;
        Response::ok(pb::PauseVmResponse { success: true, state: state_out(state).into(), ..Default::default() })
    }

    async fn resume_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::ResumeVmRequest>,
    ) -> ServiceResult<pb::ResumeVmResponse> {
        let caller = self.caller(ctx)?;
        let id = vm_id(&request.to_owned_message().vm_id)?;
        let call = self.manager.resume(&caller, &id).instrument(rpc_span!(Resume, id));
        let state = before_deadline(ctx, Operation::Resume, call).await?;
        Response::ok(pb::ResumeVmResponse { success: true, state: state_out(state).into(), ..Default::default() })
    }

    async fn reboot_vm(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::RebootVmRequest>,
    ) -> ServiceResult<pb::RebootVmResponse> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        let id = vm_id(&req.vm_id)?;
        let call = self.manager.reboot(&caller, &id, req.force).instrument(rpc_span!(Reboot, id));
        let state = before_deadline(ctx, Operation::Reboot, call).await?;
        Response::ok(pb::RebootVmResponse { success: true, state: state_out(state).into(), ..Default::default() })
    }

    async fn get_vm_info(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::GetVmInfoRequest>,
    ) -> ServiceResult<pb::GetVmInfoResponse> {
        let caller = self.caller(ctx)?;
        let id = vm_id(&request.to_owned_message().vm_id)?;
        let details = self.manager.info(&caller, &id).instrument(rpc_span!(Info, id)).await.map_err(to_connect)?;
        Response::ok(info_out(&details))
    }

    async fn list_vms(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::ListVmsRequest>,
    ) -> ServiceResult<pb::ListVmsResponse> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        let states = req.state_filter.iter().map(state_in).collect::<Result<Vec<_>, _>>().map_err(to_connect)?;
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                return Err(to_connect(Error::invalid("page_size", format!("is {n}, must not be negative"))));
            }
            n => usize::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
        };
        let after = decode_page_token(&req.page_token).map_err(to_connect)?;
        let page = self.manager.list(&caller, &ListQuery { states, page_size, after });
        Response::ok(pb::ListVmsResponse {
            vms: page.vms.iter().map(summary_out).collect(),
            next_page_token: page.next_after.as_ref().map(encode_page_token).unwrap_or_default(),
            total_count: i32::try_from(page.total).unwrap_or(i32::MAX),
            ..Default::default()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_core_code_has_its_connect_code() {
        let table = [
            (Code::InvalidArgument, ErrorCode::InvalidArgument),
            (Code::NotFound, ErrorCode::NotFound),
            (Code::AlreadyExists, ErrorCode::AlreadyExists),
            (Code::FailedPrecondition, ErrorCode::FailedPrecondition),
            (Code::PermissionDenied, ErrorCode::PermissionDenied),
            (Code::Unauthenticated, ErrorCode::Unauthenticated),
            (Code::ResourceExhausted, ErrorCode::ResourceExhausted),
            (Code::Unavailable, ErrorCode::Unavailable),
            (Code::DeadlineExceeded, ErrorCode::DeadlineExceeded),
            (Code::Internal, ErrorCode::Internal),
        ];
        for (core, wire) in table {
            assert_eq!(connect_code(core), wire);
        }
        let e = to_connect(Error::NotFound("a".into()));
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message.as_deref(), Some("VM a not found"));
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let id = VmId::parse("vm-1").unwrap();
        assert_eq!(decode_page_token(&encode_page_token(&id)).unwrap(), Some(id));
        assert_eq!(decode_page_token("").unwrap(), None);
        for bad in ["!!!", "dm0xOg", "Zm9v"] {
            assert_eq!(decode_page_token(bad).unwrap_err().code(), Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn shutdown_timeouts() {
        assert_eq!(stop_mode(true, 5).unwrap(), StopMode::Force);
        assert_eq!(stop_mode(false, 0).unwrap(), StopMode::Graceful { timeout: DEFAULT_SHUTDOWN_TIMEOUT });
        assert_eq!(stop_mode(false, 3).unwrap(), StopMode::Graceful { timeout: Duration::from_secs(3) });
        assert!(stop_mode(false, -1).is_err());
        assert!(stop_mode(false, 601).is_err());
    }
}
