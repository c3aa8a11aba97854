//! `metald-fake-cloud-hypervisor`: a TEST DOUBLE of Cloud Hypervisor's API
//! server for metald's tests (no VM runs). It takes `--api-socket
//! path=<socket>` (or a bare path), serves the `/api/v1` endpoints metald
//! uses with the status codes of Cloud Hypervisor's OpenAPI description
//! (204/200; 404 when no VM is created, 405 when the VM is in the wrong
//! state, 500 with a text body for other errors), enforces the ordering
//! (`vm.boot` needs `vm.create`, ...) and simulates the guest minimally:
//! `vm.boot`/`vm.reboot` write `METALD_GUEST_READY` to the serial file,
//! `vm.power-button` makes the process exit shortly after (a guest
//! power-off ends Cloud Hypervisor), `vm.shutdown` returns the VM to
//! `Created`, `vmm.shutdown` exits. Request recording and error injection:
//! see `fake_vmm`.

mod fake_vmm;

use std::path::PathBuf;

use fake_vmm::{Api, Reply, Req, append_line, check_fields, flag_value};
use serde_json::{Value, json};

const VERSION: &str = "v40.0.0";
const API: &str = "/api/v1/";
const JSON: &str = "application/json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Paused,
}

struct CloudHypervisor {
    vm: Option<(State, Value)>,
}

fn text(status: u16, msg: impl Into<String>) -> Reply {
    Reply::Answer(status, "text/plain", msg.into())
}

fn no_content() -> Reply {
    Reply::Answer(204, "", String::new())
}

fn validate_config(c: &Value) -> Result<(), String> {
    check_fields(
        c,
        &["payload"],
        &[
            "cpus",
            "memory",
            "payload",
            "rate_limit_groups",
            "disks",
            "net",
            "rng",
            "balloon",
            "fs",
            "pmem",
            "serial",
            "console",
            "debug_console",
            "devices",
            "vdpa",
            "vsock",
            "numa",
            "iommu",
            "watchdog",
            "pvpanic",
            "pci_segments",
            "platform",
            "tpm",
            "landlock_enable",
            "landlock_rules",
        ],
    )?;
    let payload = &c["payload"];
    check_fields(payload, &[], &["firmware", "kernel", "cmdline", "initramfs", "igvm", "host_data"])?;
    for f in ["kernel", "initramfs"] {
        if let Some(p) = payload.get(f).and_then(Value::as_str)
            && !std::path::Path::new(p).is_file()
        {
            return Err(format!("Error parsing config: payload {f} {p}: No such file or directory"));
        }
    }
    if let Some(cpus) = c.get("cpus") {
        check_fields(
            cpus,
            &["boot_vcpus", "max_vcpus"],
            &["topology", "kvm_hyperv", "max_phys_bits", "affinity", "features", "nested"],
        )?;
        if cpus["boot_vcpus"].as_u64() > cpus["max_vcpus"].as_u64() || cpus["boot_vcpus"].as_u64() == Some(0) {
            return Err("Error validating configuration: max CPUs lower than boot CPUs".into());
        }
    }
    if let Some(m) = c.get("memory") {
        check_fields(
            m,
            &["size"],
            &[
                "hotplug_size",
                "hotplugged_size",
                "mergeable",
                "hotplug_method",
                "shared",
                "hugepages",
                "hugepage_size",
                "prefault",
                "thp",
                "zones",
            ],
        )?;
    }
    for d in c.get("disks").and_then(Value::as_array).into_iter().flatten() {
        check_fields(
            d,
            &[],
            &[
                "path",
                "readonly",
                "direct",
                "iommu",
                "num_queues",
                "queue_size",
                "vhost_user",
                "vhost_socket",
                "rate_limiter_config",
                "pci_segment",
                "id",
                "serial",
                "rate_limit_group",
                "queue_affinity",
            ],
        )?;
        let p = d.get("path").and_then(Value::as_str).unwrap_or_default();
        if !std::path::Path::new(p).is_file() {
            return Err(format!("Error parsing config: disk {p}: No such file or directory"));
        }
    }
    for n in c.get("net").and_then(Value::as_array).into_iter().flatten() {
        check_fields(
            n,
            &[],
            &[
                "tap",
                "ip",
                "mask",
                "mac",
                "host_mac",
                "mtu",
                "iommu",
                "num_queues",
                "queue_size",
                "vhost_user",
                "vhost_socket",
                "vhost_mode",
                "id",
                "pci_segment",
                "rate_limiter_config",
                "offload_tso",
                "offload_ufo",
                "offload_csum",
            ],
        )?;
    }
    for s in ["serial", "console"] {
        if let Some(v) = c.get(s) {
            check_fields(v, &["mode"], &["file", "socket", "iommu"])?;
            if v["mode"] == "File" && v.get("file").is_none() {
                return Err(format!("Error parsing config: {s}: mode File needs a file"));
            }
        }
    }
    Ok(())
}

impl CloudHypervisor {
    fn serial_file(&self) -> Option<PathBuf> {
        let (_, c) = self.vm.as_ref()?;
        (c["serial"]["mode"] == "File").then(|| PathBuf::from(c["serial"]["file"].as_str().unwrap_or_default()))
    }

    fn guest_ready(&self) {
        if let Some(f) = self.serial_file() {
            append_line(&f, "fake cloud-hypervisor: guest booting");
            append_line(&f, "METALD_GUEST_READY");
        }
    }

    /// The VM state, or 404 when no VM is created.
    fn state(&self) -> Result<State, Reply> {
        self.vm.as_ref().map(|(s, _)| *s).ok_or_else(|| text(404, "VM is not created"))
    }

    fn set(&mut self, s: State) {
        if let Some((st, _)) = &mut self.vm {
            *st = s;
        }
    }

    fn action(&mut self, name: &str, body: &Result<Option<Value>, String>) -> Result<Reply, Reply> {
        match name {
            "vm.create" => {
                let c = match body {
                    Ok(Some(c)) => c.clone(),
                    Ok(None) => return Err(text(400, "Error creating the virtual machine: empty body")),
                    Err(raw) => return Err(text(400, format!("Error parsing the request body: {raw}"))),
                };
                if self.vm.is_some() {
                    return Err(text(500, "Error creating the virtual machine: VM is already created"));
                }
                validate_config(&c).map_err(|e| text(400, e))?;
                self.vm = Some((State::Created, c));
            }
            "vm.delete" => self.vm = None,
            "vm.boot" => match self.state()? {
                State::Created => {
                    self.set(State::Running);
                    self.guest_ready();
                }
                _ => return Err(text(500, "Error booting the VM: VM is already booted")),
            },
            "vm.pause" => match self.state()? {
                State::Running => self.set(State::Paused),
                _ => return Err(text(405, "Error pausing the VM: VM is not running")),
            },
            "vm.resume" => match self.state()? {
                State::Paused => self.set(State::Running),
                _ => return Err(text(405, "Error resuming the VM: VM is not paused")),
            },
            "vm.reboot" => match self.state()? {
                State::Running => self.guest_ready(),
                _ => return Err(text(405, "Error rebooting the VM: VM is not booted")),
            },
            "vm.power-button" => match self.state()? {
                State::Running => return Ok(Reply::AnswerThenExit(204, "", String::new())),
                _ => return Err(text(405, "Error triggering the power button: VM is not booted")),
            },
            "vm.shutdown" => match self.state()? {
                State::Running | State::Paused => self.set(State::Created),
                State::Created => return Err(text(405, "Error shutting down the VM: VM is not started")),
            },
            "vmm.shutdown" => return Ok(Reply::AnswerThenExit(204, "", String::new())),
            other => return Err(text(404, format!("unknown endpoint {other}"))),
        }
        Ok(no_content())
    }
}

impl Api for CloudHypervisor {
    fn endpoints(&self, req: &Req) -> Vec<String> {
        let short = req.path.strip_prefix(API).unwrap_or(&req.path).to_owned();
        vec![req.path.clone(), short]
    }

    fn injected_failure(&self, endpoint: &str) -> Reply {
        text(500, format!("injected failure at {endpoint}"))
    }

    fn handle(&mut self, req: &Req) -> Reply {
        let Some(name) = req.path.strip_prefix(API) else {
            return text(404, format!("unknown path {}", req.path));
        };
        let r = match (req.method.as_str(), name) {
            ("GET", "vmm.ping") => Ok(Reply::Answer(
                200,
                JSON,
                json!({"build_version": "metald-fake", "version": VERSION, "pid": std::process::id(), "features": []})
                    .to_string(),
            )),
            ("GET", "vm.info") => self.state().map(|s| {
                let (_, c) = self.vm.as_ref().map(|(s, c)| (s, c.clone())).unwrap_or((&State::Created, Value::Null));
                let state = match s {
                    State::Created => "Created",
                    State::Running => "Running",
                    State::Paused => "Paused",
                };
                let mem = c["memory"]["size"].clone();
                Reply::Answer(200, JSON, json!({"config": c, "state": state, "memory_actual_size": mem}).to_string())
            }),
            ("GET", "vm.counters") => self.state().and_then(|s| {
                if s == State::Created {
                    return Err(text(500, "Error getting counters: VM is not booted"));
                }
                let (_, c) = self.vm.as_ref().map(|(s, c)| (s, c.clone())).unwrap_or((&State::Created, Value::Null));
                let mut out = serde_json::Map::new();
                for (i, d) in c["disks"].as_array().into_iter().flatten().enumerate() {
                    let id = d["id"].as_str().map(str::to_owned).unwrap_or(format!("_disk{i}"));
                    out.insert(id, json!({"read_bytes": 8192, "write_bytes": 4096, "read_ops": 2, "write_ops": 1}));
                }
                for (i, n) in c["net"].as_array().into_iter().flatten().enumerate() {
                    let id = n["id"].as_str().map(str::to_owned).unwrap_or(format!("_net{i}"));
                    out.insert(id, json!({"rx_bytes": 1000, "tx_bytes": 500, "rx_frames": 10, "tx_frames": 5}));
                }
                Ok(Reply::Answer(200, JSON, Value::Object(out).to_string()))
            }),
            ("PUT", n) => self.action(n, &req.body),
            (_, n) => Err(text(405, format!("method {} not allowed for {n}", req.method))),
        };
        r.unwrap_or_else(|e| e)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket: Option<PathBuf> = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--version" || args[i] == "-V" {
            println!("cloud-hypervisor {VERSION} (metald fake)");
            return;
        }
        let parsed = match flag_value(&args, &mut i, "--api-socket") {
            Some(v) => v.map(|v| {
                let p = v.split(',').find_map(|kv| kv.strip_prefix("path=")).unwrap_or(&v).to_owned();
                socket = Some(PathBuf::from(p));
            }),
            None => Err(format!("unexpected argument '{}' found", args[i])),
        };
        if let Err(e) = parsed {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        i += 1;
    }
    let Some(socket) = socket else {
        eprintln!("fake cloud-hypervisor: --api-socket is required here");
        std::process::exit(1);
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake cloud-hypervisor: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(fake_vmm::serve(socket.clone(), CloudHypervisor { vm: None })) {
        eprintln!("fake cloud-hypervisor: serving {}: {e}", socket.display());
        std::process::exit(1);
    }
}
