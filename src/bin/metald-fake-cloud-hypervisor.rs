//! `metald-fake-cloud-hypervisor`: a TEST DOUBLE of Cloud Hypervisor's API
//! server for metald's tests (no VM runs). It takes `--api-socket
//! path=<socket>` (or a bare path), serves the `/api/v1` endpoints metald
//! uses with the status codes and bodies the real v53 answers (204/200,
//! `vmm.shutdown` 200; 404 with the error chain as a JSON array when no VM
//! is created, 500 with such an array when the VM is in the wrong state or
//! its files cannot be opened; `vm.create` does not look at the files, the
//! boot does), enforces the ordering
//! (`vm.boot` needs `vm.create`, ...) and simulates the guest minimally:
//! `vm.boot`/`vm.reboot` write `METALD_GUEST_READY` to the serial file,
//! `vm.power-button` makes the process exit shortly after (a guest
//! power-off ends Cloud Hypervisor), `vm.shutdown` returns the VM to
//! `Created`, `vmm.shutdown` exits.
//!
//! Snapshots, with Cloud Hypervisor's rules and v53's error bodies (500,
//! a JSON array of the error chain): `vm.snapshot` only of a paused VM,
//! into the existing directory of a `file://` URL: `config.json` (the VM's
//! configuration as created), `state.json` (the guest's boot id) and a
//! sparse `memory-ranges` of the guest's size; `vm.restore` only in a VMM
//! without a VM: it reads `config.json` (validated like `vm.create`: its
//! disks and kernel must exist), `state.json` and `memory-ranges`,
//! recreates the serial file (`File` mode; `Tty` writes to stdout) and
//! leaves the VM paused. `vm.boot` writes
//! `METALD_GUEST_BOOT boot=<id>` (a new id) to the serial file; the first
//! resume of a restored VM writes `METALD_GUEST_RESUMED boot=<id>` with the
//! saved one, so a test sees which guest runs. A `Pty` virtio console gets a
//! real pty at `vm.boot`/`vm.restore` (its path in `vm.info`, as Cloud
//! Hypervisor reports it) whose guest end answers a `METALD_GENERATION`
//! line as metald-init does: `METALD_RESEED fake` on the serial file and
//! `ok` back. Request recording and error injection: see `fake_vmm`.

mod fake_vmm;

use std::os::fd::AsRawFd;
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
    /// The guest's identity: set at `vm.boot`, saved and restored.
    boot_id: Option<String>,
    /// Restored and not resumed yet.
    restored: bool,
    /// The `Pty` virtio console's other end, held open (see `open_console`).
    pty: Option<std::os::fd::OwnedFd>,
}

/// The guest end of a `Pty` console: answers each generation line as
/// metald-init's watcher does, until the pty goes.
fn guest_console(master: std::fs::File, serial: Option<PathBuf>) {
    use std::io::{BufRead, Write};
    let Ok(mut answer) = master.try_clone() else { return };
    for line in std::io::BufReader::new(master).lines() {
        let Ok(line) = line else { return };
        if line.trim_end().strip_prefix("METALD_GENERATION ").is_some_and(|h| h.len() == 64) {
            if let Some(f) = &serial {
                append_line(f, "METALD_RESEED fake");
            }
            let _ = answer.write_all(b"ok\n");
        }
    }
}

/// A v53 error answer: 500 with the error chain as a JSON array.
fn api_error(chain: &[&str]) -> Reply {
    let mut all = vec!["Error from API"];
    all.extend_from_slice(chain);
    Reply::Answer(500, JSON, json!(all).to_string())
}

/// What the fake writes as a snapshot's `state.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedState {
    fake_cloud_hypervisor_snapshot: u32,
    boot_id: Option<String>,
}

fn text(status: u16, msg: impl Into<String>) -> Reply {
    Reply::Answer(status, "text/plain", msg.into())
}

fn no_content() -> Reply {
    Reply::Answer(204, "", String::new())
}

/// A request's JSON body (400 when missing or not JSON).
fn body_of(body: &Result<Option<Value>, String>) -> Result<Value, Reply> {
    match body {
        Ok(Some(b)) => Ok(b.clone()),
        Ok(None) => Err(text(400, "Error parsing the request body: empty body")),
        Err(raw) => Err(text(400, format!("Error parsing the request body: {raw}"))),
    }
}

/// The files a configuration names must exist when the VM is built (boot,
/// restore); Cloud Hypervisor's `vm.create` does not look.
fn check_paths(c: &Value) -> Result<(), String> {
    for f in ["kernel", "initramfs"] {
        if let Some(p) = c["payload"].get(f).and_then(Value::as_str)
            && !std::path::Path::new(p).is_file()
        {
            return Err(format!("Cannot load the {f} {p}: No such file or directory (os error 2)"));
        }
    }
    for d in c.get("disks").and_then(Value::as_array).into_iter().flatten() {
        let p = d.get("path").and_then(Value::as_str).unwrap_or_default();
        if !std::path::Path::new(p).is_file() {
            return Err(format!(
                "Cannot open disk path: I/O error (path={p} op=open): No such file or directory (os error 2)"
            ));
        }
    }
    Ok(())
}

/// The configuration's shape (unknown fields refused, as `vm.create` does).
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
    /// Where the serial console goes: its file, or for `Tty` stdout (opened
    /// again through `/proc`, appending as the file metald gave is).
    fn serial_file(&self) -> Option<PathBuf> {
        let (_, c) = self.vm.as_ref()?;
        match c["serial"]["mode"].as_str() {
            Some("File") => Some(PathBuf::from(c["serial"]["file"].as_str().unwrap_or_default())),
            Some("Tty") => Some(PathBuf::from("/proc/self/fd/1")),
            _ => None,
        }
    }

    /// A `Pty` virtio console: a new pty whose path `vm.info` reports, and a
    /// "guest" on its other end (see the module doc).
    fn open_console(&mut self) {
        let serial = self.serial_file();
        let Some((_, c)) = &mut self.vm else { return };
        if c["console"]["mode"] != "Pty" || self.pty.is_some() {
            return;
        }
        let Ok(pty) = nix::pty::openpty(None, None) else { return };
        let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())) else { return };
        c["console"]["file"] = json!(path.display().to_string());
        let master = std::fs::File::from(pty.master);
        std::thread::spawn(move || guest_console(master, serial));
        self.pty = Some(pty.slave);
    }

    fn guest_ready(&mut self) {
        let boot_id = format!("{}-{}", std::process::id(), fake_vmm::unix_nanos());
        if let Some(f) = self.serial_file() {
            append_line(&f, "fake cloud-hypervisor: guest booting");
            append_line(&f, &format!("METALD_GUEST_BOOT boot={boot_id}"));
            append_line(&f, "METALD_GUEST_READY");
        }
        self.boot_id = Some(boot_id);
    }

    /// `vm.snapshot {destination_url}` of a paused VM.
    fn snapshot(&self, body: &Value) -> Result<(), Reply> {
        check_fields(body, &[], &["destination_url"]).map_err(|e| text(400, e))?;
        const WHAT: &str = "The VM could not be snapshotted";
        let Some((state, config)) = &self.vm else { return Err(api_error(&[WHAT, "VM is not running"])) };
        if *state != State::Paused {
            return Err(api_error(&[
                WHAT,
                "Cannot snapshot VM",
                "Failed to snapshot migratable component",
                "Trying to snapshot while VM is running",
            ]));
        }
        let url = body["destination_url"].as_str().unwrap_or_default();
        let send_error = |why: String| api_error(&[WHAT, "Cannot send VM snapshot", &why]);
        let Some(dir) = url.strip_prefix("file://").map(PathBuf::from).filter(|d| d.is_dir()) else {
            return Err(send_error(format!("Error sending snapshot: {url} is not an existing file:// directory")));
        };
        let saved = SavedState { fake_cloud_hypervisor_snapshot: 1, boot_id: self.boot_id.clone() };
        let write = |name: &str, bytes: Vec<u8>| {
            std::fs::write(dir.join(name), bytes).map_err(|e| send_error(format!("Error writing {name}: {e}")))
        };
        write("config.json", serde_json::to_vec(config).unwrap_or_default())?;
        write("state.json", serde_json::to_vec(&saved).unwrap_or_default())?;
        let size = config["memory"]["size"].as_u64().unwrap_or(128 << 20);
        let header = format!("fake guest memory of boot {:?}", self.boot_id);
        fake_vmm::write_memory_file(&dir.join("memory-ranges"), size, &header)
            .map_err(|e| send_error(format!("Error writing memory-ranges: {e}")))
    }

    /// `vm.restore {source_url, ...}` in a VMM without a VM.
    fn restore(&mut self, body: &Value) -> Result<(), Reply> {
        check_fields(body, &["source_url"], &["prefault", "memory_restore_mode", "net_fds", "resume"])
            .map_err(|e| text(400, e))?;
        const WHAT: &str = "The VM could not be restored";
        if self.vm.is_some() {
            return Err(api_error(&[WHAT, "VM is already created"]));
        }
        let url = body["source_url"].as_str().unwrap_or_default();
        let restore_error = |why: String| api_error(&[WHAT, "Cannot restore VM", &why]);
        let Some(dir) = url.strip_prefix("file://").map(PathBuf::from) else {
            return Err(restore_error(format!("Unsupported URL {url}")));
        };
        if !dir.is_dir() {
            return Err(api_error(&[
                WHAT,
                "Cannot restore VM",
                "Failed to send migratable component snapshot",
                &format!("Destination is not a directory: {dir:?}"),
            ]));
        }
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| restore_error(format!("Error reading {}: {e}", dir.join(name).display())))
        };
        let config: Value = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| restore_error(format!("Error deserializing config.json: {e}")))?;
        validate_config(&config)
            .and_then(|()| check_paths(&config))
            .map_err(|e| api_error(&[WHAT, "Error validating configuration", &e]))?;
        let saved: SavedState = serde_json::from_slice(&read("state.json")?)
            .map_err(|e| restore_error(format!("Error deserializing state.json: {e}")))?;
        let size = config["memory"]["size"].as_u64().unwrap_or(0);
        let mem = std::fs::metadata(dir.join("memory-ranges")).map(|m| m.len()).unwrap_or(0);
        if mem < size {
            return Err(restore_error(format!("memory-ranges holds {mem} bytes, {size} needed")));
        }
        let resume = body["resume"] == true;
        self.vm = Some((State::Paused, config));
        self.open_console();
        if let Some((_, c)) = &self.vm
            && c["serial"]["mode"] == "File"
            && let Some(f) = self.serial_file()
        {
            // Cloud Hypervisor creates the serial file anew.
            let _ = std::fs::File::create(f);
        }
        self.boot_id = saved.boot_id;
        self.restored = true;
        if resume {
            self.resume();
        }
        Ok(())
    }

    fn resume(&mut self) {
        self.set(State::Running);
        if std::mem::take(&mut self.restored)
            && let Some(f) = self.serial_file()
        {
            append_line(&f, &format!("METALD_GUEST_RESUMED boot={}", self.boot_id.as_deref().unwrap_or("none")));
        }
    }

    /// The VM state, or (as v53 answers) 404 with the error chain when no VM
    /// is created.
    fn state(&self) -> Result<State, Reply> {
        self.vm
            .as_ref()
            .map(|(s, _)| *s)
            .ok_or_else(|| Reply::Answer(404, JSON, json!(["Error from API", "VM config is missing"]).to_string()))
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
                    // Cloud Hypervisor builds the VM (opens its files) only now.
                    let config = self.vm.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
                    check_paths(&config)
                        .map_err(|e| api_error(&["The VM could not boot", "Error from device manager", &e]))?;
                    self.set(State::Running);
                    self.open_console();
                    self.guest_ready();
                }
                _ => return Err(api_error(&["The VM could not boot", "VM is already running"])),
            },
            "vm.pause" => match self.state()? {
                State::Running => self.set(State::Paused),
                _ => return Err(api_error(&["The VM could not be paused", "VM is not running"])),
            },
            "vm.snapshot" => self.snapshot(&body_of(body)?)?,
            "vm.restore" => self.restore(&body_of(body)?)?,
            "vm.resume" => match self.state()? {
                State::Paused => self.resume(),
                _ => return Err(api_error(&["The VM could not resume", "VM is not paused"])),
            },
            "vm.reboot" => match self.state()? {
                State::Running => self.guest_ready(),
                _ => return Err(api_error(&["The VM could not reboot", "VM is not running"])),
            },
            "vm.power-button" => match self.state()? {
                State::Running => return Ok(Reply::AnswerThenExit(204, "", String::new())),
                _ => return Err(api_error(&["The power button could not be triggered", "VM is not running"])),
            },
            "vm.shutdown" => match self.state()? {
                State::Running | State::Paused => self.set(State::Created),
                State::Created => return Err(api_error(&["The VM could not shutdown", "VM is not running"])),
            },
            "vmm.shutdown" => return Ok(Reply::AnswerThenExit(200, "", String::new())),
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
    if let Err(e) = rt.block_on(fake_vmm::serve(
        socket.clone(),
        CloudHypervisor { vm: None, boot_id: None, restored: false, pty: None },
    )) {
        eprintln!("fake cloud-hypervisor: serving {}: {e}", socket.display());
        std::process::exit(1);
    }
}
