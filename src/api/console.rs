//! The `StreamConsole` handler: a VM's serial console to its owner, as a
//! server stream of raw chunks ([`crate::core::ConsoleQuery`]).

use connectrpc::{ConnectError, RequestContext, ServiceRequest, ServiceStream};
use futures::StreamExt;

use super::{Handlers, call_span, to_connect, vm_id};
use crate::core::logs::ConsoleQuery;
use crate::error::Error;
use crate::model::Operation;
use crate::pb::vmprovisioner::v1 as pb;

impl Handlers<'_> {
    /// Checks the request and the caller's VM, then streams. Errors found
    /// before the first chunk (not found, bad request) end the call with
    /// their code; a read error later ends the stream with it.
    pub(super) async fn stream_console(
        &self,
        ctx: &RequestContext,
        request: ServiceRequest<'_, pb::StreamConsoleRequest>,
    ) -> Result<ServiceStream<pb::StreamConsoleResponse>, ConnectError> {
        let caller = self.caller(ctx)?;
        let req = request.to_owned_message();
        let id = vm_id(&req.vm_id)?;
        let tail_bytes = match req.tail_bytes {
            0 => None,
            n if n < 0 => {
                return Err(to_connect(Error::invalid("tail_bytes", format!("is {n}, must not be negative"))));
            }
            n => Some(u64::try_from(n).unwrap_or(u64::MAX)),
        };
        let q = ConsoleQuery { follow: req.follow, tail_bytes };
        let span = call_span(Operation::Console, Some(&id));
        let chunks = span.in_scope(|| self.manager.console(&caller, &id, q)).map_err(to_connect)?;
        let stream = chunks.map(|chunk| {
            chunk.map(|data| pb::StreamConsoleResponse { data, ..Default::default() }).map_err(to_connect)
        });
        Ok(Box::pin(stream))
    }
}
