//! Shared machinery of metald's fake hypervisor binaries (TEST DOUBLES,
//! used by `tests/firecracker.rs` and `tests/cloudhypervisor.rs`): an
//! HTTP/1.1 server on a Unix socket, request recording, and error injection.
//!
//! Every request is appended as one JSON line `{"method", "path", "body",
//! "status"}` to `fake-requests.jsonl` next to the API socket, so tests can
//! assert request sequences field by field.
//!
//! Error injection, read again before every request so a test can change it
//! while a VMM runs: the JSON file named by `METALD_FAKE_CONTROL`, else the
//! first `fake-control.json` found in the socket's directory or one of its
//! six parents (tests put it in their private temp dir, so parallel tests do
//! not see each other's), else the variables `METALD_FAKE_FAIL`,
//! `METALD_FAKE_HANG`, `METALD_FAKE_EXIT`. Each names an endpoint (a path
//! like `/drives/rootfs` or `vm.boot`, or `/actions:<action_type>`):
//! `fail` answers with the hypervisor's error shape, `hang` never answers,
//! `exit` ends the process mid-call.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixListener;

/// One request as the fake sees it.
pub struct Req {
    pub method: String,
    pub path: String,
    /// The parsed JSON body (`None` for an empty body); invalid JSON is
    /// kept as `Err(text)` so handlers can reject it.
    pub body: Result<Option<Value>, String>,
}

/// What a handler answers.
pub enum Reply {
    /// Status, content type, body.
    Answer(u16, &'static str, String),
    /// Answer, then end the process after a short delay (guest power-off,
    /// guest reboot under Firecracker, `vmm.shutdown`).
    AnswerThenExit(u16, &'static str, String),
}

/// A fake hypervisor's API.
pub trait Api: Send + 'static {
    /// Endpoint names this request matches for error injection.
    fn endpoints(&self, req: &Req) -> Vec<String>;
    /// The hypervisor's answer to an injected failure.
    fn injected_failure(&self, endpoint: &str) -> Reply;
    fn handle(&mut self, req: &Req) -> Reply;
}

/// Error injection settings.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Control {
    #[serde(default)]
    pub fail: Option<String>,
    #[serde(default)]
    pub hang: Option<String>,
    #[serde(default)]
    pub exit: Option<String>,
}

impl Control {
    fn load(socket: &Path) -> Control {
        let file = std::env::var_os("METALD_FAKE_CONTROL")
            .map(PathBuf::from)
            .or_else(|| socket.ancestors().skip(1).take(7).map(|d| d.join("fake-control.json")).find(|p| p.is_file()));
        if let Some(f) = file {
            return std::fs::read(&f).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        }
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Control { fail: var("METALD_FAKE_FAIL"), hang: var("METALD_FAKE_HANG"), exit: var("METALD_FAKE_EXIT") }
    }
}

/// Resolves an absolute path given to a jailed VMM (the fake jailer sets
/// `METALD_FAKE_CHROOT` instead of really chrooting).
pub fn host_path(p: &str) -> PathBuf {
    match std::env::var_os("METALD_FAKE_CHROOT") {
        Some(root) => Path::new(&root).join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    }
}

fn record(log: &Path, req: &Req, status: Option<u16>) {
    let body = match &req.body {
        Ok(b) => b.clone().unwrap_or(Value::Null),
        Err(raw) => Value::String(raw.clone()),
    };
    let line = serde_json::json!({"pid": std::process::id(), "method": req.method, "path": req.path, "body": body, "status": status});
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{line}");
    }
}

/// Serves `api` on `socket` until the process exits.
pub async fn serve<A: Api>(socket: PathBuf, api: A) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let log = socket.with_file_name("fake-requests.jsonl");
    let api = Arc::new(Mutex::new(api));
    loop {
        let (stream, _) = listener.accept().await?;
        let (api, socket, log) = (api.clone(), socket.clone(), log.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |r: Request<Incoming>| {
                let (api, socket, log) = (api.clone(), socket.clone(), log.clone());
                async move { Ok::<_, Infallible>(respond(r, &api, &socket, &log).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn respond<A: Api>(r: Request<Incoming>, api: &Mutex<A>, socket: &Path, log: &Path) -> Response<Full<Bytes>> {
    let method = r.method().to_string();
    let path = r.uri().path().to_owned();
    let bytes = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        serde_json::from_slice(&bytes).map(Some).map_err(|_| String::from_utf8_lossy(&bytes).into_owned())
    };
    let req = Req { method, path, body };
    let control = Control::load(socket);
    let (reply, hang) = {
        let mut api = api.lock().unwrap_or_else(|p| p.into_inner());
        let endpoints = api.endpoints(&req);
        let hit = |c: &Option<String>| c.as_ref().is_some_and(|c| endpoints.iter().any(|e| e == c));
        if hit(&control.exit) {
            record(log, &req, None);
            eprintln!("fake: exiting during {} {} (injected)", req.method, req.path);
            std::process::exit(3);
        }
        if hit(&control.hang) {
            (None, true)
        } else if hit(&control.fail) {
            let name = endpoints.first().cloned().unwrap_or_default();
            (Some(api.injected_failure(&name)), false)
        } else {
            (Some(api.handle(&req)), false)
        }
    };
    let Some(reply) = reply.filter(|_| !hang) else {
        record(log, &req, None);
        std::future::pending::<()>().await;
        unreachable!("pending never completes");
    };
    let (status, ctype, text, exit) = match reply {
        Reply::Answer(s, c, t) => (s, c, t, false),
        Reply::AnswerThenExit(s, c, t) => (s, c, t, true),
    };
    record(log, &req, Some(status));
    if exit {
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::process::exit(0);
        });
    }
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if !ctype.is_empty()
        && let Ok(v) = hyper::header::HeaderValue::from_str(ctype)
    {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Checks a JSON object's fields against a definition: every `required`
/// field present, nothing outside `required` + `optional`.
pub fn check_fields(body: &Value, required: &[&str], optional: &[&str]) -> Result<(), String> {
    let obj = body.as_object().ok_or_else(|| "expected a JSON object".to_owned())?;
    for r in required {
        if !obj.contains_key(*r) {
            return Err(format!("missing field `{r}`"));
        }
    }
    for k in obj.keys() {
        if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            return Err(format!("unknown field `{k}`, expected one of {:?}", [required, optional].concat()));
        }
    }
    Ok(())
}

/// Nanoseconds since the epoch (a fake guest's boot id).
pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Writes a fake guest memory file: `header`, then a hole up to `size`
/// bytes (a real file of the guest's size that takes almost no disk).
pub fn write_memory_file(path: &Path, size: u64, header: &str) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(header.as_bytes())?;
    f.set_len(size.max(u64::try_from(header.len()).unwrap_or(0)))?;
    f.sync_all()
}

/// Writes a line to a file (the guest's serial console).
pub fn append_line(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// Value of `--flag value` or `--flag=value` at `args[i]`; advances `i`.
pub fn flag_value(args: &[String], i: &mut usize, flag: &str) -> Option<Result<String, String>> {
    let a = &args[*i];
    if a == flag {
        *i += 1;
        return Some(args.get(*i).cloned().ok_or_else(|| format!("{flag} needs a value")));
    }
    a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')).map(|v| Ok(v.to_owned()))
}
