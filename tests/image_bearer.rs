//! Image pulls from a registry with **token (bearer) auth**: Debian's
//! `docker-registry` (distribution 2.8) with `auth: token:` pointing at a
//! token server run by this test on 127.0.0.1 ([`TokenServer`], a std
//! `TcpListener` thread). The token server checks HTTP basic credentials
//! and issues a registry JWT (RS256, signed with `openssl dgst` by the key
//! of a self-signed certificate made with `openssl req -x509`; the header's
//! `x5c` carries that certificate, which is the registry's
//! `rootcertbundle`) granting what the `scope` parameter asks for; anonymous
//! requests get a token granting nothing. The image is pushed with `skopeo`
//! (which does the token dance itself), then pulled with
//! `metald::image::Images`: right credentials pull (and the token server saw
//! metald ask for `repository:<repo>:pull`); none or wrong ones are
//! PermissionDenied, also for a second customer once the base is cached.
//! Every process is killed on drop; nothing leaves 127.0.0.1. Skipped (with
//! a message) when the tools are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use metald::image::{Credentials, ImageError, ImageSettings, Images};
use metald::model::Code;
use support::registry::{ImageBuilder, Registry, run};

const SERVICE: &str = "metald-test";
const ISSUER: &str = "metald-test-issuer";
const USER: &str = "alice";
const PASS: &str = "t0ken-pw";

macro_rules! require_tools {
    () => {
        support::registry::require_image_tools(&["openssl"])
    };
}

/// One request the token server answered.
#[derive(Debug, Clone)]
struct TokenRequest {
    /// The `User-Agent` header.
    user_agent: String,
    /// The basic-auth user, when it came with the right password.
    user: Option<String>,
    /// Whether basic credentials came but were wrong (answered 401).
    refused: bool,
    /// The decoded `scope` parameters.
    scopes: Vec<String>,
    /// The decoded `service` parameter.
    service: String,
}

/// A token server on 127.0.0.1: basic auth in, RS256 registry JWT out.
struct TokenServer {
    port: u16,
    /// Every request so far.
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The signing key and its self-signed certificate.
struct Signer {
    key: PathBuf,
    /// The certificate's DER, standard base64 (the `x5c` entry).
    cert_b64: String,
}

impl TokenServer {
    fn start(signer: Signer) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, st) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &signer, &reqs);
                }
            }
        });
        TokenServer { port, requests, stop, thread: Some(thread) }
    }

    fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one HTTP/1.1 request (`Connection: close`).
fn serve(mut conn: TcpStream, signer: &Signer, log: &Mutex<Vec<TokenRequest>>) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines.next().unwrap_or_default().split(' ').nth(1).unwrap_or_default().to_owned();
    let header = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let scopes: Vec<String> = params.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
    let service = params.iter().find(|(k, _)| k == "service").map(|(_, v)| v.clone()).unwrap_or_default();
    let basic = header("authorization").and_then(|a| {
        let b64 = a.strip_prefix("Basic ").or_else(|| a.strip_prefix("basic "))?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
        let s = String::from_utf8(raw).ok()?;
        s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned()))
    });
    let (user, refused) = match &basic {
        Some((u, p)) if u == USER && p == PASS => (Some(u.clone()), false),
        Some(_) => (None, true),
        None => (None, false),
    };
    log.lock().unwrap().push(TokenRequest {
        user_agent: header("user-agent").unwrap_or_default(),
        user: user.clone(),
        refused,
        scopes: scopes.clone(),
        service: service.clone(),
    });

    let response = if !target.starts_with("/token") {
        http_response("404 Not Found", "{}")
    } else if refused {
        http_response("401 Unauthorized", r#"{"details":"wrong user name or password"}"#)
    } else {
        // Only an authenticated user is granted what it asks for.
        let access: Vec<serde_json::Value> = match &user {
            Some(_) => scopes.iter().filter_map(|s| scope_access(s)).collect(),
            None => Vec::new(),
        };
        let token = jwt(signer, user.as_deref().unwrap_or(""), &service, access);
        let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
        http_response("200 OK", &body.to_string())
    };
    let _ = conn.write_all(response.as_bytes());
}

fn http_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// `repository:<name>:<a>,<b>` as a JWT `access` entry.
fn scope_access(scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
    Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A registry JWT for `sub` granting `access`, signed RS256 with `openssl`.
fn jwt(signer: &Signer, sub: &str, service: &str, access: Vec<serde_json::Value>) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [signer.cert_b64]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": sub,
        "aud": service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", rand::random::<u64>()),
        "access": access,
    });
    let input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&signer.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst: {}", String::from_utf8_lossy(&out.stderr));
    format!("{input}.{}", b64url(&out.stdout))
}

/// An RSA key and a self-signed certificate for it (`key.pem`, `cert.pem`).
fn make_signer(dir: &Path) -> (Signer, PathBuf) {
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=metald test token issuer"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let pem = std::fs::read_to_string(&cert).unwrap();
    let cert_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    (Signer { key, cert_b64 }, cert)
}

/// A registry with token auth, its token server, and an image pushed as `repo:v1`.
struct Setup {
    reg: Registry,
    tokens: TokenServer,
    _dir: tempfile::TempDir,
    cache: PathBuf,
}

fn setup(repo: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (signer, cert) = make_signer(dir.path());
    let tokens = TokenServer::start(signer);
    let auth = format!(
        "  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        tokens.realm(),
        cert.display()
    );
    let reg = Registry::start_with_auth_config(&auth, Some((USER, PASS)));
    let img = ImageBuilder::new(dir.path(), "v1");
    img.layer(|root| {
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(root.join("app/hello"), "hello from a token-auth registry\n").unwrap();
    });
    img.config(&["--config.cmd=/app/hello"]);
    reg.push(&img.layout, "v1", repo);
    let cache = dir.path().join("cache");
    Setup { reg, tokens, _dir: dir, cache }
}

fn settings(cache: &Path, insecure: &[&str]) -> ImageSettings {
    let mut s = ImageSettings::new(cache);
    s.insecure_registries = insecure.iter().map(|h| h.to_string()).collect();
    s.retries = 2;
    s
}

fn code(r: Result<metald::image::Prepared, ImageError>) -> (Code, String) {
    let e = r.expect_err("expected an error");
    (e.code(), metald::util::chain(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_pulls_with_the_right_credentials_and_denies_the_rest() {
    require_tools!();
    let repo = "bearer/app";
    let s = setup(repo);
    // skopeo went through the token server to push.
    let pushes = s.tokens.requests();
    assert!(
        pushes.iter().any(|r| r.user.as_deref() == Some(USER) && r.scopes.iter().any(|sc| sc.contains("push"))),
        "{pushes:?}"
    );
    let images = Images::open(settings(&s.cache, &[&s.reg.host])).unwrap();
    let reference = format!("{}/{repo}:v1", s.reg.host);
    let metald_requests =
        |t: &TokenServer| t.requests().into_iter().filter(|r| r.user_agent.starts_with("metald/")).collect::<Vec<_>>();

    // No credentials: an anonymous token granting nothing; the registry says no.
    let (c, msg) = code(images.prepare("cust-a", &reference, None).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    let anon = metald_requests(&s.tokens);
    assert!(anon.iter().all(|r| r.user.is_none() && !r.refused), "{anon:?}");

    // Wrong credentials: the token server refuses them.
    let (c, msg) = code(images.prepare("cust-a", &reference, Some(Credentials::new(USER, "wrong-pw-42"))).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    assert!(!msg.contains("wrong-pw-42"), "{msg}");
    assert!(metald_requests(&s.tokens).iter().any(|r| r.refused), "{:?}", s.tokens.requests());

    // Right credentials: pulled, with a token for exactly this repository's pull.
    let p = images.prepare("cust-a", &reference, Some(Credentials::new(USER, PASS))).await.unwrap();
    assert!(p.base.exists() && p.digest.starts_with("sha256:"), "{p:?}");
    assert_eq!(p.config.cmd, vec!["/app/hello"]);
    let asked = metald_requests(&s.tokens);
    let wanted = format!("repository:{repo}:pull");
    assert!(
        asked.iter().any(|r| r.user.as_deref() == Some(USER) && r.service == SERVICE && r.scopes.contains(&wanted)),
        "no token request for {wanted}: {asked:?}"
    );
    assert!(
        s.reg
            .metald_requests()
            .iter()
            .any(|(m, path, st)| m == "GET" && path.contains("/blobs/") && matches!(*st, 200 | 206)),
        "{:?}",
        s.reg.metald_requests()
    );

    // Another customer without credentials does not get the cached base.
    let (c, msg) = code(images.prepare("cust-b", &reference, None).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    let (c, msg) = code(images.prepare("cust-b", &format!("{}/{repo}@{}", s.reg.host, p.digest), None).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    // Nor with wrong ones.
    let (c, msg) = code(images.prepare("cust-b", &reference, Some(Credentials::new(USER, "nope-nope"))).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    // The first customer still gets it (from the cache).
    let again = images.prepare("cust-a", &reference, Some(Credentials::new(USER, PASS))).await.unwrap();
    assert_eq!(again.base, p.base);
}
