//! A typed async client for QEMU's QMP (JSON over a Unix socket).
//!
//! [`Qmp::connect`] reads the greeting, negotiates capabilities and then
//! splits the connection: requests carry numeric ids and are matched to
//! replies by a reader task; asynchronous events (`SHUTDOWN`, `RESET`,
//! `STOP`, ...) go to a separate channel so they never get mixed up with a
//! reply. Every request has a timeout. Commands are types implementing
//! [`QmpCommand`], each naming its wire name and its typed reply.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP {0} timed out")]
    Timeout(String),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered with `{"error": {"class", "desc"}}`.
    #[error("QMP {command} failed: {desc} ({class})")]
    Command { command: String, class: String, desc: String },
    #[error("QMP connection closed")]
    Disconnected,
}

impl QmpError {
    /// Short outcome label for the client span.
    fn outcome(&self) -> &'static str {
        match self {
            QmpError::Connect { .. } => "connect_error",
            QmpError::Io(_) | QmpError::Disconnected => "transport_error",
            QmpError::Timeout(_) => "timeout",
            QmpError::Protocol(_) => "protocol_error",
            QmpError::Command { .. } => "command_error",
        }
    }
}

/// A QMP command with its typed reply.
pub trait QmpCommand: Serialize {
    const NAME: &'static str;
    type Reply: DeserializeOwned;
}

/// The reply of commands that return `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

macro_rules! simple_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty;
        impl QmpCommand for $ty {
            const NAME: &'static str = $name;
            type Reply = Empty;
        }
    };
}

simple_command!(
    /// Leaves capabilities negotiation mode.
    QmpCapabilities,
    "qmp_capabilities"
);
simple_command!(
    /// Starts or resumes guest execution.
    Cont,
    "cont"
);
simple_command!(
    /// Pauses guest execution.
    Stop,
    "stop"
);
simple_command!(
    /// Hard-resets the guest (QEMU stays up; without `-no-reboot`).
    SystemReset,
    "system_reset"
);
simple_command!(
    /// Presses the ACPI power button.
    SystemPowerdown,
    "system_powerdown"
);
simple_command!(
    /// Makes QEMU exit at once.
    Quit,
    "quit"
);

/// `query-status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// QEMU's RunState: `prelaunch`, `running`, `paused`, `shutdown`, ...
    pub status: String,
}

impl QmpCommand for QueryStatus {
    const NAME: &'static str = "query-status";
    type Reply = StatusInfo;
}

/// `query-blockstats`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockstats;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockStats {
    #[serde(default)]
    pub device: String,
    pub stats: BlockDeviceStats,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct BlockDeviceStats {
    #[serde(default)]
    pub rd_bytes: u64,
    #[serde(default)]
    pub wr_bytes: u64,
    #[serde(default)]
    pub rd_operations: u64,
    #[serde(default)]
    pub wr_operations: u64,
}

impl QmpCommand for QueryBlockstats {
    const NAME: &'static str = "query-blockstats";
    type Reply = Vec<BlockStats>;
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    /// The guest or QEMU is shutting down; `guest` is true for a guest
    /// power-off.
    Shutdown {
        guest: bool,
        reason: String,
    },
    Reset {
        guest: bool,
        reason: String,
    },
    Stop,
    Resume,
    Powerdown,
    Other {
        name: String,
        data: Value,
    },
}

impl QmpEvent {
    fn parse(name: &str, data: Value) -> QmpEvent {
        let guest = data.get("guest").and_then(Value::as_bool).unwrap_or(false);
        let reason = data.get("reason").and_then(Value::as_str).unwrap_or("").to_owned();
        match name {
            "SHUTDOWN" => QmpEvent::Shutdown { guest, reason },
            "RESET" => QmpEvent::Reset { guest, reason },
            "STOP" => QmpEvent::Stop,
            "RESUME" => QmpEvent::Resume,
            "POWERDOWN" => QmpEvent::Powerdown,
            _ => QmpEvent::Other { name: name.to_owned(), data },
        }
    }
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

#[derive(Debug, Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Debug, Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Debug, Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
}

/// One message from QEMU after negotiation.
#[derive(Debug, Deserialize)]
struct Incoming {
    #[serde(default)]
    id: Option<Value>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
    event: Option<String>,
    #[serde(default)]
    data: Value,
}

#[derive(Debug, Clone, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

type Reply = Result<Value, ErrorBody>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Reply>>> {
    // Entries are inserted and removed whole; a poisoned map is still valid.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A negotiated QMP connection.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    timeout: Duration,
    pub version: QemuVersion,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to the socket at `path` and negotiates; every step and
    /// every later request is bounded by `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>), QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))?
            .map_err(|source| QmpError::Connect { path: path.display().to_string(), source })?;
        Self::handshake(stream, timeout).await
    }

    /// Negotiates on an already connected stream.
    pub async fn handshake(
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>), QmpError> {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let line = next_line(&mut lines, timeout, "greeting").await?;
        let greeting: Greeting =
            serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("bad greeting {line:?}: {e}")))?;
        let req = request_line(QmpCapabilities::NAME, &QmpCapabilities, 0)?;
        tokio::time::timeout(timeout, write.write_all(req.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout(QmpCapabilities::NAME.into()))??;
        loop {
            let line = next_line(&mut lines, timeout, QmpCapabilities::NAME).await?;
            let msg: Incoming =
                serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("bad message {line:?}: {e}")))?;
            if msg.event.is_some() {
                continue;
            }
            if let Some(err) = msg.error {
                return Err(QmpError::Command {
                    command: QmpCapabilities::NAME.into(),
                    class: err.class,
                    desc: err.desc,
                });
            }
            break;
        }
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events_tx));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            reader,
            timeout,
            version: greeting.qmp.version.qemu,
        };
        Ok((qmp, events_rx))
    }

    /// Whether the connection has ended (QEMU exited or closed it).
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }

    /// Runs `cmd` and returns its typed reply.
    pub async fn execute<C: QmpCommand>(&self, cmd: &C) -> Result<C::Reply, QmpError> {
        let span = tracing::info_span!(
            "hypervisor.api",
            otel.kind = "client",
            rpc.system = "qmp",
            rpc.method = C::NAME,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = self.execute_inner(cmd).instrument(span.clone()).await;
        match &result {
            Ok(_) => span.record("outcome", "ok"),
            Err(e) => {
                span.record("outcome", e.outcome());
                // Error status keeps the span at any sampling rate.
                span.record("otel.status_code", "ERROR")
            }
        };
        result
    }

    async fn execute_inner<C: QmpCommand>(&self, cmd: &C) -> Result<C::Reply, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = request_line(C::NAME, cmd, id)?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let result = tokio::time::timeout(self.timeout, async {
            self.writer.lock().await.write_all(line.as_bytes()).await?;
            rx.await.map_err(|_| QmpError::Disconnected)
        })
        .await;
        lock(&self.pending).remove(&id);
        let reply = match result {
            Err(_) => return Err(QmpError::Timeout(C::NAME.into())),
            Ok(r) => r?,
        };
        let value = reply.map_err(|e| QmpError::Command { command: C::NAME.into(), class: e.class, desc: e.desc })?;
        serde_json::from_value(value).map_err(|e| QmpError::Protocol(format!("reply to {}: {e}", C::NAME)))
    }
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    timeout: Duration,
    what: &str,
) -> Result<String, QmpError> {
    match tokio::time::timeout(timeout, lines.next_line()).await {
        Err(_) => Err(QmpError::Timeout(what.into())),
        Ok(Err(e)) => Err(QmpError::Io(e)),
        Ok(Ok(None)) => Err(QmpError::Disconnected),
        Ok(Ok(Some(l))) => Ok(l),
    }
}

fn request_line<C: Serialize>(name: &str, cmd: &C, id: u64) -> Result<String, QmpError> {
    let args = serde_json::to_value(cmd).map_err(|e| QmpError::Protocol(format!("encoding {name}: {e}")))?;
    let mut req = serde_json::json!({ "execute": name, "id": id });
    let has_args = match &args {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        _ => true,
    };
    if has_args {
        req["arguments"] = args;
    }
    Ok(format!("{req}\n"))
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let msg: Incoming = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(line = %line, error = %e, "ignoring unparsable QMP message");
                continue;
            }
        };
        if let Some(name) = msg.event {
            let _ = events.send(QmpEvent::parse(&name, msg.data));
            continue;
        }
        let reply: Reply = match (msg.ret, msg.error) {
            (_, Some(err)) => Err(err),
            (Some(v), None) => Ok(v),
            (None, None) => continue,
        };
        match msg.id.as_ref().and_then(Value::as_u64) {
            Some(id) => {
                if let Some(tx) = lock(&pending).remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            None => tracing::debug!(line = %line, "QMP reply without a request id"),
        }
    }
    // Dropping the senders fails every waiting request with Disconnected.
    lock(&pending).clear();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    /// A scripted QMP server: answers each request with `respond(execute,
    /// id)`, a list of raw lines to send (events, replies, in any order).
    async fn fake_server(stream: UnixStream, respond: impl Fn(&str, &Value) -> Vec<String> + Send + 'static) {
        let (read, mut write) = stream.into_split();
        write.write_all(format!("{GREETING}\r\n").as_bytes()).await.unwrap();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let req: Value = serde_json::from_str(&line).unwrap();
            let exec = req["execute"].as_str().unwrap().to_owned();
            for out in respond(&exec, &req["id"]) {
                if write.write_all(format!("{out}\r\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn client(
        respond: impl Fn(&str, &Value) -> Vec<String> + Send + 'static,
    ) -> (Qmp, mpsc::UnboundedReceiver<QmpEvent>) {
        let (a, b) = UnixStream::pair().unwrap();
        tokio::spawn(fake_server(b, respond));
        Qmp::handshake(a, Duration::from_secs(2)).await.unwrap()
    }

    #[tokio::test]
    async fn negotiates_and_runs_typed_commands() {
        let (qmp, _events) = client(|exec, id| {
            let ret = match exec {
                "query-status" => r#"{"status": "prelaunch", "singlestep": false, "running": false}"#.to_owned(),
                "query-blockstats" => r#"[{"device": "root", "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1, "wr_operations": 2, "flush_operations": 0}}, {"device": "", "node-name": "x", "stats": {"rd_bytes": 5}}]"#.to_owned(),
                _ => "{}".to_owned(),
            };
            vec![format!(r#"{{"return": {ret}, "id": {id}}}"#)]
        })
        .await;
        assert_eq!(qmp.version, QemuVersion { major: 7, minor: 2, micro: 22 });
        let st = qmp.execute(&QueryStatus).await.unwrap();
        assert_eq!(st, StatusInfo { running: false, status: "prelaunch".into() });
        qmp.execute(&Cont).await.unwrap();
        let bs = qmp.execute(&QueryBlockstats).await.unwrap();
        assert_eq!(bs.len(), 2);
        assert_eq!(bs[0].stats.wr_operations, 2);
        assert_eq!(bs[1].stats.rd_bytes, 5);
    }

    #[tokio::test]
    async fn errors_are_typed() {
        let (qmp, _events) = client(|exec, id| match exec {
            "qmp_capabilities" => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
            _ => {
                vec![format!(r#"{{"error": {{"class": "GenericError", "desc": "guest is not running"}}, "id": {id}}}"#)]
            }
        })
        .await;
        match qmp.execute(&Stop).await.unwrap_err() {
            QmpError::Command { command, class, desc } => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("stop", "GenericError", "guest is not running")
                );
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    #[tokio::test]
    async fn events_interleave_with_replies() {
        let (qmp, mut events) = client(|exec, id| match exec {
            "qmp_capabilities" => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
            "system_powerdown" => vec![
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "POWERDOWN"}"#.into(),
                format!(r#"{{"return": {{}}, "id": {id}}}"#),
                r#"{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#.into(),
            ],
            _ => vec![
                // A reply to an unknown id first: must not confuse the client.
                r#"{"return": {}, "id": 9999}"#.into(),
                r#"{"event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}}"#.into(),
                format!(r#"{{"return": {{}}, "id": {id}}}"#),
            ],
        })
        .await;
        qmp.execute(&SystemPowerdown).await.unwrap();
        qmp.execute(&SystemReset).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(tokio::time::timeout(Duration::from_secs(2), events.recv()).await.unwrap().unwrap());
        }
        assert_eq!(
            got,
            vec![
                QmpEvent::Powerdown,
                QmpEvent::Shutdown { guest: true, reason: "guest-shutdown".into() },
                QmpEvent::Reset { guest: false, reason: "host-qmp-system-reset".into() },
            ]
        );
    }

    #[tokio::test]
    async fn concurrent_requests_are_matched_by_id() {
        // Replies come back in reverse order of requests within a pair.
        let (qmp, _events) = client(|exec, id| match exec {
            "query-status" => vec![format!(r#"{{"return": {{"status": "running", "running": true}}, "id": {id}}}"#)],
            _ => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
        })
        .await;
        let (a, b) = tokio::join!(qmp.execute(&QueryStatus), qmp.execute(&Cont));
        assert!(a.unwrap().running);
        b.unwrap();
    }

    #[tokio::test]
    async fn timeouts_and_disconnects() {
        let (qmp, _events) = client(|exec, id| match exec {
            "stop" => vec![], // never answered
            _ => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
        })
        .await;
        assert!(matches!(qmp.execute(&Stop).await, Err(QmpError::Timeout(_))));
        // Still usable after a timeout.
        qmp.execute(&Cont).await.unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (read, mut write) = b.into_split();
            write.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
            let mut lines = BufReader::new(read).lines();
            let l = lines.next_line().await.unwrap().unwrap();
            let id = serde_json::from_str::<Value>(&l).unwrap()["id"].clone();
            write.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes()).await.unwrap();
            // Read the next request, then hang up like `quit` does.
            let _ = lines.next_line().await;
        });
        let (qmp, _events) = Qmp::handshake(a, Duration::from_secs(2)).await.unwrap();
        assert!(matches!(qmp.execute(&Quit).await, Err(QmpError::Disconnected)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(qmp.is_closed());
    }

    #[tokio::test]
    async fn bad_greeting_is_a_protocol_error() {
        let (a, b) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut b = b;
            b.write_all(b"hello\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert!(matches!(Qmp::handshake(a, Duration::from_secs(2)).await, Err(QmpError::Protocol(_))));
    }
}
