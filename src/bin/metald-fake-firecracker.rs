//! `metald-fake-firecracker`: a TEST DOUBLE of Firecracker's API server for
//! metald's tests (no VM runs). It takes Firecracker's command line
//! (`--api-sock`, `--id`, and the jailer's `--start-time-*`), serves the
//! documented endpoints metald uses with Firecracker's status codes (204,
//! 200 with JSON, 400 `{"fault_message": ...}`) and ordering rules (pre-boot
//! configuration only before `InstanceStart`, `PATCH /vm` only after it),
//! checks bodies against the OpenAPI definitions (unknown fields rejected,
//! like Firecracker), and simulates the guest minimally:
//! `InstanceStart` prints `METALD_GUEST_READY` to stdout (Firecracker's
//! stdout carries the serial console), `SendCtrlAltDel` makes the process
//! exit shortly after (a `reboot=k` guest rebooting ends Firecracker), and
//! `FlushMetrics` appends a metrics line with fixed increments. Request
//! recording and error injection: see `fake_vmm`.

mod fake_vmm;

use std::path::PathBuf;

use fake_vmm::{Api, Reply, Req, append_line, check_fields, flag_value, host_path};
use serde_json::{Value, json};

const VERSION: &str = "1.10.1";

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
                self.metrics = Some(host_path(p));
            }
            "/actions" => return self.action(body),
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
                println!("fake firecracker {VERSION}: guest booting");
                println!("METALD_GUEST_READY");
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
                let Some(p) = &self.metrics else {
                    return Err(fault("Metrics system not initialized."));
                };
                let line = json!({
                    "utc_timestamp_ms": 0,
                    "block": {"read_bytes": 4096, "write_bytes": 512, "read_count": 2, "write_count": 1},
                    "net": {"rx_bytes_count": 100, "tx_bytes_count": 60, "rx_packets_count": 3, "tx_packets_count": 2},
                    "vcpu": {"exit_io_in": 0}
                });
                append_line(p, &line.to_string());
                Ok(no_content())
            }
            other => Err(fault(format!(
                "unknown variant `{other}`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`"
            ))),
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
            ("PATCH", "/vm") => need(body).and_then(|b| {
                if self.state == State::NotStarted {
                    return Err(fault("The requested operation is not supported before starting the microVM."));
                }
                check_fields(&b, &["state"], &[]).map_err(fault)?;
                self.state = match b["state"].as_str() {
                    Some("Paused") => State::Paused,
                    Some("Resumed") => State::Running,
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
    let api = Firecracker {
        id,
        state: State::NotStarted,
        machine: json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false}),
        boot: None,
        drives: Vec::new(),
        nics: Vec::new(),
        logger: None,
        metrics: None,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake firecracker: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(fake_vmm::serve(socket.clone(), api)) {
        eprintln!("fake firecracker: serving {}: {e}", socket.display());
        std::process::exit(1);
    }
}
