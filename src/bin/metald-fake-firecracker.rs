//! `metald-fake-firecracker`: a TEST DOUBLE of Firecracker's API server for
//! metald's tests (no VM runs). It takes Firecracker's command line
//! (`--api-sock`, `--id`, the logger and metrics options `--log-path`,
//! `--level`, `--show-level`, `--show-log-origin`, `--module`,
//! `--metrics-path`, and the jailer's `--start-time-*`), serves the
//! documented endpoints metald uses with Firecracker's status codes (204,
//! 200 with JSON, 400 `{"fault_message": ...}`) and ordering rules (pre-boot
//! configuration only before `InstanceStart`, `PATCH /vm` only after it),
//! checks bodies against the OpenAPI definitions (unknown fields rejected,
//! like Firecracker), and simulates the guest minimally:
//! `InstanceStart` prints `METALD_GUEST_READY` to stdout (Firecracker's
//! stdout carries the serial console), `SendCtrlAltDel` makes the process
//! exit shortly after (a `reboot=k` guest rebooting ends Firecracker), and
//! `FlushMetrics` writes a metrics line with fixed increments. The guest
//! acting by itself: `SIGUSR1` makes the process exit 0 as a guest reboot
//! does, `SIGUSR2` prints metald's guest power-off marker first. Like
//! Firecracker, it creates its log and metrics files when missing and
//! opens the metrics path once, read-write and non-blocking (a FIFO then
//! never blocks it; a line that does not fit is dropped).
//!
//! Snapshots, with Firecracker's rules: `PUT /snapshot/create` only when
//! `Paused` (a real state file — the configuration and the guest's boot id
//! as JSON — and a sparse memory file of the guest's size), `PUT
//! /snapshot/load` only in a fresh process before any configuration but
//! the logger and metrics (refused otherwise with Firecracker's error; a
//! load that fails ends the process, as in Firecracker), applying
//! `network_overrides` and reopening the saved drive paths; the restored
//! microVM is `Paused` and reports the saved configuration. Its first
//! resume prints `METALD_GUEST_RESUMED boot=<id>` with the saved boot id
//! (`InstanceStart` prints `METALD_GUEST_BOOT boot=<id>` with a new one), so
//! a test sees which guest runs. `PATCH /drives/{id}` swaps a drive's file
//! after start or load. Request recording and error injection: see
//! `fake_vmm`.

mod fake_vmm;

use std::path::PathBuf;

use fake_vmm::{Api, Reply, Req, check_fields, flag_value, host_path};
use serde_json::{Value, json};

const VERSION: &str = "1.16.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    Running,
    Paused,
}

struct Firecracker {
    id: String,
    state: State,
    machine: Value,
    boot: Option<Value>,
    drives: Vec<Value>,
    nics: Vec<Value>,
    logger: Option<Value>,
    metrics: Option<PathBuf>,
    /// The metrics path, opened as Firecracker opens it.
    metrics_out: Option<std::fs::File>,
    /// A boot-specific resource was configured (a load is refused then).
    configured: bool,
    /// The running guest's identity: set at `InstanceStart`, saved in and
    /// restored from snapshots.
    boot_id: Option<String>,
    /// Loaded from a snapshot and not resumed yet.
    loaded: bool,
}

/// What the fake writes as a snapshot's microVM state.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedState {
    fake_firecracker_snapshot: u32,
    machine: Value,
    boot: Option<Value>,
    drives: Vec<Value>,
    nics: Vec<Value>,
    boot_id: Option<String>,
}

const JSON: &str = "application/json";

fn fault(msg: impl Into<String>) -> Reply {
    Reply::Answer(400, JSON, json!({"fault_message": msg.into()}).to_string())
}

fn no_content() -> Reply {
    Reply::Answer(204, "", String::new())
}

fn ok(v: Value) -> Reply {
    Reply::Answer(200, JSON, v.to_string())
}

const TOKEN_BUCKET: (&[&str], &[&str]) = (&["size", "refill_time"], &["one_time_burst"]);

fn check_rate_limiter(v: Option<&Value>) -> Result<(), String> {
    let Some(v) = v else { return Ok(()) };
    check_fields(v, &[], &["bandwidth", "ops"])?;
    for b in ["bandwidth", "ops"] {
        if let Some(tb) = v.get(b) {
            check_fields(tb, TOKEN_BUCKET.0, TOKEN_BUCKET.1)?;
            for f in ["size", "refill_time", "one_time_burst"] {
                if tb.get(f).is_some_and(|x| !x.is_u64()) {
                    return Err(format!("{b}.{f} must be a non-negative integer"));
                }
            }
        }
    }
    Ok(())
}

fn deserialize_error(e: impl std::fmt::Display) -> Reply {
    fault(format!("An error occurred when deserializing the json body of a request: {e}."))
}

const RUNTIME_ONLY: &str = "The requested operation is not supported before starting the microVM.";

/// Opens (creating) a log or metrics path as Firecracker does: read-write,
/// non-blocking, so a FIFO without a reader neither blocks nor fails.
fn open_nonblock(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_NONBLOCK).open(path)
}

fn file_exists(p: &str) -> Result<(), String> {
    let h = host_path(p);
    if h.is_file() { Ok(()) } else { Err(format!("No such file or directory (os error 2): {}", h.display())) }
}

impl Firecracker {
    fn pre_boot(&self) -> Result<(), Reply> {
        if self.state == State::NotStarted {
            Ok(())
        } else {
            Err(fault("The requested operation is not supported after starting the microVM."))
        }
    }

    fn put(&mut self, path: &str, body: &Value) -> Result<Reply, Reply> {
        match path {
            "/machine-config" => {
                self.pre_boot()?;
                check_fields(
                    body,
                    &["vcpu_count", "mem_size_mib"],
                    &["smt", "cpu_template", "track_dirty_pages", "huge_pages"],
                )
                .map_err(fault)?;
                let vcpus = body["vcpu_count"].as_u64().unwrap_or(0);
                if !(1..=32).contains(&vcpus) {
                    return Err(fault(
                        "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
                    ));
                }
                if body["mem_size_mib"].as_u64().unwrap_or(0) == 0 {
                    return Err(fault("The memory size (MiB) is invalid."));
                }
                self.machine = body.clone();
                self.configured = true;
            }
            "/boot-source" => {
                self.pre_boot()?;
                check_fields(body, &["kernel_image_path"], &["initrd_path", "boot_args"]).map_err(fault)?;
                for f in ["kernel_image_path", "initrd_path"] {
                    if let Some(p) = body.get(f).and_then(Value::as_str) {
                        file_exists(p).map_err(|e| fault(format!("Invalid {f}: {e}")))?;
                    }
                }
                self.boot = Some(body.clone());
                self.configured = true;
            }
            "/logger" => {
                check_fields(body, &[], &["log_path", "level", "show_level", "show_log_origin", "module"])
                    .map_err(fault)?;
                if let Some(p) = body.get("log_path").and_then(Value::as_str) {
                    file_exists(p).map_err(|e| fault(format!("Failed to open target file: {e}")))?;
                }
                self.logger = Some(body.clone());
            }
            "/metrics" => {
                check_fields(body, &["metrics_path"], &[]).map_err(fault)?;
                if self.metrics.is_some() {
                    return Err(fault("Reinitialization of metrics not allowed."));
                }
                let p = body["metrics_path"].as_str().unwrap_or_default();
                file_exists(p).map_err(|e| fault(format!("Failed to open target file: {e}")))?;
                self.metrics_out = Some(open_nonblock(&host_path(p)).map_err(|e| fault(e.to_string()))?);
                self.metrics = Some(host_path(p));
            }
            "/actions" => return self.action(body),
            "/snapshot/create" => return self.snapshot_create(body),
            "/snapshot/load" => return self.snapshot_load(body),
            p if p.starts_with("/drives/") => {
                self.pre_boot()?;
                check_fields(
                    body,
                    &["drive_id", "is_root_device"],
                    &["partuuid", "cache_type", "is_read_only", "path_on_host", "rate_limiter", "io_engine", "socket"],
                )
                .map_err(fault)?;
                if body["drive_id"].as_str() != Some(&p["/drives/".len()..]) {
                    return Err(fault("The id from the path does not match the id from the body!"));
                }
                let path = body.get("path_on_host").and_then(Value::as_str).unwrap_or_default();
                file_exists(path).map_err(|e| fault(format!("Unable to create the block device: {e}")))?;
                check_rate_limiter(body.get("rate_limiter")).map_err(fault)?;
                self.drives.retain(|d| d["drive_id"] != body["drive_id"]);
                self.drives.push(body.clone());
                self.configured = true;
            }
            p if p.starts_with("/network-interfaces/") => {
                self.pre_boot()?;
                check_fields(
                    body,
                    &["iface_id", "host_dev_name"],
                    &["guest_mac", "rx_rate_limiter", "tx_rate_limiter", "mtu"],
                )
                .map_err(fault)?;
                if body["iface_id"].as_str() != Some(&p["/network-interfaces/".len()..]) {
                    return Err(fault("The id from the path does not match the id from the body!"));
                }
                check_rate_limiter(body.get("rx_rate_limiter")).map_err(fault)?;
                check_rate_limiter(body.get("tx_rate_limiter")).map_err(fault)?;
                self.nics.retain(|n| n["iface_id"] != body["iface_id"]);
                self.nics.push(body.clone());
                self.configured = true;
            }
            _ => return Err(fault(format!("Invalid request method and/or path: PUT {path}."))),
        }
        Ok(no_content())
    }

    fn action(&mut self, body: &Value) -> Result<Reply, Reply> {
        check_fields(body, &["action_type"], &[]).map_err(fault)?;
        match body["action_type"].as_str().unwrap_or_default() {
            "InstanceStart" => {
                self.pre_boot()?;
                let Some(boot) = &self.boot else {
                    return Err(fault("Cannot start microvm without kernel configuration."));
                };
                let kernel = host_path(boot["kernel_image_path"].as_str().unwrap_or_default());
                let head = std::fs::read(&kernel).unwrap_or_default();
                if !head.starts_with(b"\x7fELF") {
                    return Err(fault(
                        "Cannot load kernel due to invalid memory configuration or invalid kernel image: Failed to read ELF header",
                    ));
                }
                self.state = State::Running;
                let boot_id = format!("{}-{}", std::process::id(), fake_vmm::unix_nanos());
                println!("fake firecracker {VERSION}: guest booting");
                println!("METALD_GUEST_BOOT boot={boot_id}");
                println!("METALD_GUEST_READY");
                self.boot_id = Some(boot_id);
                Ok(no_content())
            }
            "SendCtrlAltDel" => {
                if self.state == State::NotStarted {
                    return Err(fault("The requested operation is not supported before starting the microVM."));
                }
                println!("METALD_GUEST_REBOOTING");
                Ok(Reply::AnswerThenExit(204, "", String::new()))
            }
            "FlushMetrics" => {
                if self.state == State::NotStarted {
                    return Err(fault("The requested operation is not supported before starting the microVM."));
                }
                let Some(out) = &mut self.metrics_out else {
                    return Err(fault("Metrics system not initialized."));
                };
                let line = json!({
                    "utc_timestamp_ms": 0,
                    "block": {"read_bytes": 4096, "write_bytes": 512, "read_count": 2, "write_count": 1},
                    "net": {"rx_bytes_count": 100, "tx_bytes_count": 60, "rx_packets_count": 3, "tx_packets_count": 2},
                    "vcpu": {"exit_io_in": 0}
                });
                // One write, as Firecracker does; a full FIFO drops the line.
                let _ = std::io::Write::write_all(out, format!("{line}\n").as_bytes());
                Ok(no_content())
            }
            other => Err(fault(format!(
                "unknown variant `{other}`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`"
            ))),
        }
    }

    /// `PUT /snapshot/create`: a full snapshot of the paused microVM.
    fn snapshot_create(&mut self, body: &Value) -> Result<Reply, Reply> {
        check_fields(body, &["mem_file_path", "snapshot_path"], &["snapshot_type"]).map_err(deserialize_error)?;
        match body.get("snapshot_type").map(|t| t.as_str()) {
            None | Some(Some("Full" | "Diff")) => {}
            Some(other) => {
                return Err(deserialize_error(format!(
                    "unknown variant `{}`, expected `Full` or `Diff`",
                    other.unwrap_or_default()
                )));
            }
        }
        match self.state {
            State::NotStarted => return Err(fault(RUNTIME_ONLY)),
            State::Running => {
                return Err(fault(
                    "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore \
                     unavailable while running",
                ));
            }
            State::Paused => {}
        }
        let saved = SavedState {
            fake_firecracker_snapshot: 1,
            machine: self.machine.clone(),
            boot: self.boot.clone(),
            drives: self.drives.clone(),
            nics: self.nics.clone(),
            boot_id: self.boot_id.clone(),
        };
        let state_path = host_path(body["snapshot_path"].as_str().unwrap_or_default());
        std::fs::write(&state_path, serde_json::to_vec(&saved).unwrap_or_default()).map_err(|e| {
            fault(format!("Create snapshot error: Cannot perform open on the snapshot backing file: {e}"))
        })?;
        let mem_path = host_path(body["mem_file_path"].as_str().unwrap_or_default());
        let size = self.machine["mem_size_mib"].as_u64().unwrap_or(128) << 20;
        fake_vmm::write_memory_file(&mem_path, size, &format!("fake guest memory of boot {:?}", self.boot_id))
            .map_err(|e| {
                fault(format!("Create snapshot error: Cannot perform open on the memory backing file: {e}"))
            })?;
        Ok(no_content())
    }

    /// `PUT /snapshot/load`: only in a fresh process; a failure ends it.
    fn snapshot_load(&mut self, body: &Value) -> Result<Reply, Reply> {
        if self.state != State::NotStarted {
            return Err(fault("The requested operation is not supported after starting the microVM."));
        }
        check_fields(
            body,
            &["snapshot_path"],
            &[
                "mem_file_path",
                "mem_backend",
                "enable_diff_snapshots",
                "track_dirty_pages",
                "resume_vm",
                "network_overrides",
                "vsock_override",
                "clock_realtime",
            ],
        )
        .map_err(deserialize_error)?;
        let memory = match (body.get("mem_backend"), body.get("mem_file_path")) {
            (Some(_), Some(_)) => {
                return Err(deserialize_error(
                    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
                ));
            }
            (None, None) => {
                return Err(deserialize_error("missing field: either `mem_backend` or `mem_file_path` is required"));
            }
            (Some(b), None) => {
                check_fields(b, &["backend_type", "backend_path"], &[]).map_err(deserialize_error)?;
                if b["backend_type"] != "File" {
                    return Err(deserialize_error("the fake serves only the File memory backend"));
                }
                b["backend_path"].as_str().unwrap_or_default().to_owned()
            }
            (None, Some(p)) => p.as_str().unwrap_or_default().to_owned(),
        };
        let overrides = body.get("network_overrides").and_then(Value::as_array).cloned().unwrap_or_default();
        for o in &overrides {
            check_fields(o, &["iface_id", "host_dev_name"], &[]).map_err(deserialize_error)?;
        }
        if self.configured {
            return Err(fault(
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific \
                 resources.",
            ));
        }
        // From here on a failure leaves the process unusable: it ends.
        let failed = |why: String| {
            Reply::AnswerThenExit(
                400,
                JSON,
                json!({"fault_message": format!("Load snapshot error: {why}")}).to_string(),
            )
        };
        let from_file = "Failed to restore from snapshot: Failed to get snapshot state from file";
        let raw = std::fs::read(host_path(body["snapshot_path"].as_str().unwrap_or_default()))
            .map_err(|e| failed(format!("{from_file}: Failed to open snapshot file: {e}")))?;
        let mut saved: SavedState = serde_json::from_slice(&raw)
            .map_err(|e| failed(format!("{from_file}: Failed to load snapshot state from file: {e}")))?;
        for o in &overrides {
            let nic = saved.nics.iter_mut().find(|n| n["iface_id"] == o["iface_id"]);
            let Some(nic) = nic else { return Err(failed(format!("{from_file}: Unknown Network Device."))) };
            nic["host_dev_name"] = o["host_dev_name"].clone();
        }
        let size = saved.machine["mem_size_mib"].as_u64().unwrap_or(0) << 20;
        let mem_len = std::fs::metadata(host_path(&memory)).map(|m| m.len());
        if !mem_len.as_ref().is_ok_and(|l| *l >= size) {
            return Err(failed(format!(
                "Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from \
                 file: {memory}: {mem_len:?} bytes, {size} needed"
            )));
        }
        for d in &saved.drives {
            let p = d["path_on_host"].as_str().unwrap_or_default();
            file_exists(p).map_err(|e| {
                failed(format!("Failed to restore from snapshot: Failed to build microVM from snapshot: {e}"))
            })?;
        }
        self.machine = saved.machine;
        self.boot = saved.boot;
        self.drives = saved.drives;
        self.nics = saved.nics;
        self.boot_id = saved.boot_id;
        self.loaded = true;
        self.state = State::Paused;
        if body["resume_vm"] == true {
            self.resume();
        }
        Ok(no_content())
    }

    /// `PATCH /drives/{id}` (`PartialDrive`): after start or a load.
    fn patch_drive(&mut self, id: &str, body: &Value) -> Result<Reply, Reply> {
        if self.state == State::NotStarted {
            return Err(fault(RUNTIME_ONLY));
        }
        check_fields(body, &["drive_id"], &["path_on_host", "rate_limiter"]).map_err(deserialize_error)?;
        if body["drive_id"].as_str() != Some(id) {
            return Err(fault("The id from the path does not match the id from the body!"));
        }
        let patch_error = |why: String| {
            fault(format!(
                "Drive config error: Unable to patch the block device: {why} Please verify the request arguments."
            ))
        };
        let Some(drive) = self.drives.iter_mut().find(|d| d["drive_id"] == id) else {
            return Err(patch_error("Failed perform action on device: Device not found".into()));
        };
        if let Some(p) = body.get("path_on_host").and_then(Value::as_str) {
            file_exists(p).map_err(|e| patch_error(format!("Block: Virtio backend error: {e}")))?;
            drive["path_on_host"] = json!(p);
        }
        Ok(no_content())
    }

    /// Runs the guest on; a restored one says which boot it continues.
    fn resume(&mut self) {
        self.state = State::Running;
        if std::mem::take(&mut self.loaded) {
            println!("METALD_GUEST_RESUMED boot={}", self.boot_id.as_deref().unwrap_or("none"));
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::NotStarted => "Not started",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

impl Api for Firecracker {
    fn endpoints(&self, req: &Req) -> Vec<String> {
        let mut e = vec![req.path.clone(), format!("{} {}", req.method, req.path)];
        if let Ok(Some(b)) = &req.body
            && let Some(a) = b.get("action_type").and_then(Value::as_str)
        {
            e.push(format!("{}:{a}", req.path));
        }
        e
    }

    fn injected_failure(&self, endpoint: &str) -> Reply {
        fault(format!("injected fault at {endpoint}"))
    }

    fn handle(&mut self, req: &Req) -> Reply {
        let body = match &req.body {
            Ok(b) => b.clone(),
            Err(raw) => {
                return fault(format!("An error occurred when deserializing the json body of a request: {raw}"));
            }
        };
        let need = |b: Option<Value>| b.ok_or_else(|| fault("Empty PUT request."));
        let r = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") => Ok(ok(json!({
                "app_name": "Firecracker",
                "id": self.id,
                "state": self.state_name(),
                "vmm_version": VERSION
            }))),
            ("GET", "/version") => Ok(ok(json!({"firecracker_version": VERSION}))),
            ("GET", "/machine-config") => Ok(ok(self.machine.clone())),
            ("GET", "/vm/config") => Ok(ok(json!({
                "machine-config": self.machine,
                "boot-source": self.boot,
                "drives": self.drives,
                "network-interfaces": self.nics,
                "logger": self.logger,
                "metrics": self.metrics.as_ref().map(|p| json!({"metrics_path": p})),
            }))),
            ("PUT", p) => need(body).and_then(|b| self.put(p, &b)),
            ("PATCH", p) if p.starts_with("/drives/") => {
                need(body).and_then(|b| self.patch_drive(&p["/drives/".len()..], &b))
            }
            ("PATCH", "/vm") => need(body).and_then(|b| {
                if self.state == State::NotStarted {
                    return Err(fault(RUNTIME_ONLY));
                }
                check_fields(&b, &["state"], &[]).map_err(fault)?;
                match b["state"].as_str() {
                    Some("Paused") => self.state = State::Paused,
                    Some("Resumed") => self.resume(),
                    _ => return Err(fault("unknown variant, expected `Paused` or `Resumed`")),
                };
                Ok(no_content())
            }),
            (m, p) => Err(fault(format!("Invalid request method and/or path: {m} {p}."))),
        };
        r.unwrap_or_else(|e| e)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = PathBuf::from("/run/firecracker.socket");
    let mut id = String::from("anonymous-instance");
    let (mut log_path, mut metrics_path, mut logger) = (None, None, serde_json::Map::new());
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--version" {
            println!("Firecracker v{VERSION} (metald fake)");
            return;
        }
        let parsed = if let Some(v) = flag_value(&args, &mut i, "--api-sock") {
            v.map(|v| socket = host_path(&v))
        } else if let Some(v) = flag_value(&args, &mut i, "--id") {
            v.map(|v| id = v)
        } else if let Some(v) = flag_value(&args, &mut i, "--log-path") {
            v.map(|v| log_path = Some(v))
        } else if let Some(v) = flag_value(&args, &mut i, "--metrics-path") {
            v.map(|v| metrics_path = Some(v))
        } else if let Some(v) = flag_value(&args, &mut i, "--level") {
            v.map(|v| drop(logger.insert("level".into(), json!(v))))
        } else if let Some(v) = flag_value(&args, &mut i, "--module") {
            v.map(|v| drop(logger.insert("module".into(), json!(v))))
        } else if args[i] == "--show-level" || args[i] == "--show-log-origin" {
            logger.insert(args[i][2..].replace('-', "_"), json!(true));
            Ok(())
        } else if let Some(v) =
            flag_value(&args, &mut i, "--start-time-us").or_else(|| flag_value(&args, &mut i, "--start-time-cpu-us"))
        {
            v.map(|_| ())
        } else {
            Err(format!("Found argument '{}' which wasn't expected, or isn't valid in this context", args[i]))
        };
        if let Err(e) = parsed {
            eprintln!("Arguments parsing error: {e}");
            std::process::exit(1);
        }
        i += 1;
    }
    let open = |p: &str| {
        open_nonblock(&host_path(p)).unwrap_or_else(|e| {
            eprintln!("Failed to open target file: {e}");
            std::process::exit(1)
        })
    };
    if let Some(p) = &log_path {
        open(p);
        logger.insert("log_path".into(), json!(p));
    }
    let metrics_out = metrics_path.as_deref().map(open);
    let api = Firecracker {
        id,
        state: State::NotStarted,
        machine: json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false}),
        boot: None,
        drives: Vec::new(),
        nics: Vec::new(),
        logger: log_path.is_some().then_some(Value::Object(logger)),
        metrics: metrics_path.as_deref().map(host_path),
        metrics_out,
        configured: false,
        boot_id: None,
        loaded: false,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake firecracker: {e}");
            std::process::exit(1);
        }
    };
    // The guest acting by itself: SIGUSR1 = it rebooted (Firecracker exits
    // with status 0), SIGUSR2 = metald's guest powered off (its marker on
    // the console, then a reboot: metald.stop=reboot).
    rt.spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut reboot), Ok(mut off)) = (signal(SignalKind::user_defined1()), signal(SignalKind::user_defined2()))
        else {
            return;
        };
        tokio::select! {
            _ = reboot.recv() => println!("METALD_GUEST_REBOOTING"),
            _ = off.recv() => println!("METALD_GUEST_POWEROFF"),
        }
        std::process::exit(0);
    });
    if let Err(e) = rt.block_on(fake_vmm::serve(socket.clone(), api)) {
        eprintln!("fake firecracker: serving {}: {e}", socket.display());
        std::process::exit(1);
    }
}
