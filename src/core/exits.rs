//! VMM exits the core did not ask for ([`crate::backend::ExitEvent`]): the
//! VM becomes `SHUTDOWN` with the exit's reason, or — when the guest
//! rebooted and its VMM ends on that (Firecracker) — the VMM is started
//! again and the VM stays `RUNNING`.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Cause, Manager};
use crate::backend::ExitEvent;
use crate::model::{Op, Status, StopInfo, VmState, transition};
use crate::util::unix_now;

impl Manager {
    pub(super) async fn watch_exits(self, mut exits: mpsc::UnboundedReceiver<ExitEvent>, stop: CancellationToken) {
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = exits.recv() => match ev { Some(ev) => ev, None => return },
            };
            let this = self.clone();
            // One task per exit so a slow VM lock does not delay the others.
            tokio::spawn(async move { this.handle_exit(ev).await });
        }
    }

    pub(super) async fn handle_exit(&self, ev: ExitEvent) {
        let Some(slot) = self.index().by_id.get(&ev.vm_id).cloned() else {
            return;
        };
        let _op = slot.op.lock().await;
        let status = {
            let c = slot.cell();
            if c.deleted {
                return;
            }
            c.status.clone()
        };
        let Some(rt) = status.runtime() else { return };
        if ev.pid.is_some() && rt.pid != ev.pid {
            debug!(vm_id = %slot.id, "ignoring exit of a previous VMM process");
            return;
        }
        let from = status.state();
        if transition(from, Op::GuestExited).is_err() {
            return;
        }
        let ctx = self.ctx(&slot);
        if ev.rebooted && from == VmState::Running {
            // The guest rebooted and its VMM ends on that (Firecracker): start it
            // again, as RebootVm does; the VM stays RUNNING.
            info!(vm_id = %slot.id, detail = %ev.detail, "the guest rebooted; starting its VMM again");
            let mut next = rt.clone();
            match self.inner.backend.reboot(&ctx, &mut next, true).await {
                Ok(()) => {
                    let cause = Cause::Op(Op::Reboot { force: true });
                    if let Err(e) = self.commit(&slot, cause, from, Status::Running(next)).await {
                        warn!(vm_id = %slot.id, error = %e.chain(), "could not persist the restarted VMM");
                    }
                    return;
                }
                Err(e) => {
                    warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "could not restart the VMM after a guest reboot");
                    let _ = self.inner.backend.reap(&ctx, rt).await;
                    let detail = format!(
                        "the guest rebooted and its VMM could not be started again: {}",
                        crate::util::chain(&e)
                    );
                    let stop = StopInfo::new(crate::model::StopReason::Crashed, detail, unix_now());
                    if let Err(e) =
                        self.commit_stop(&slot, Cause::Op(Op::GuestExited), from, Status::Shutdown, Some(stop)).await
                    {
                        warn!(vm_id = %slot.id, error = %e.chain(), "could not persist guest exit");
                    }
                    return;
                }
            }
        }
        info!(vm_id = %slot.id, reason = %ev.reason, detail = %ev.detail, "VMM exited on its own");
        if let Err(e) = self.inner.backend.reap(&ctx, rt).await {
            warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "cleanup after VMM exit failed");
        }
        let stop = StopInfo::new(ev.reason, ev.detail, unix_now());
        if let Err(e) = self.commit_stop(&slot, Cause::Op(Op::GuestExited), from, Status::Shutdown, Some(stop)).await {
            warn!(vm_id = %slot.id, error = %e.chain(), "could not persist guest exit");
        }
    }
}
