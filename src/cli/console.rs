//! `metaldctl console ID [--follow] [--tail BYTES]`: a VM's serial
//! console (`StreamConsole`), raw bytes to stdout as they arrive. With
//! `--follow` it runs until the VM is deleted or Ctrl-C, which ends it
//! cleanly (exit 0).

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::out::{CliError, usage};
use crate::client::{WireProtocol, vm_client, vm_stream_client};
use crate::pb::vmprovisioner::v1 as pb;

/// Where and how `console` calls.
pub struct Target<'a> {
    pub endpoint: &'a str,
    pub token: &'a str,
    pub protocol: WireProtocol,
    /// The per-call timeout, for the history alone (a followed stream has none).
    pub timeout: Duration,
}

pub async fn console(t: Target<'_>, id: String, follow: bool, tail: u64) -> Result<(), CliError> {
    let client = match follow {
        true => vm_stream_client(t.endpoint, t.token, t.protocol)?,
        false => vm_client(t.endpoint, t.token, t.protocol, t.timeout)?,
    };
    let tail_bytes = i64::try_from(tail).map_err(|_| usage(format!("--tail {tail} is too large")))?;
    let req = pb::StreamConsoleRequest { vm_id: id, follow, tail_bytes, ..Default::default() };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut stream = tokio::select! {
        s = client.stream_console(req) => s?,
        _ = &mut ctrl_c => return Ok(()),
    };
    let mut out = tokio::io::stdout();
    let write_error = |e: std::io::Error| CliError { message: format!("writing to stdout: {e}"), exit_code: 1 };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = &mut ctrl_c => break,
        };
        let Some(msg) = msg else { break };
        out.write_all(msg.data()).await.map_err(write_error)?;
        out.flush().await.map_err(write_error)?;
    }
    out.flush().await.map_err(write_error)
}
