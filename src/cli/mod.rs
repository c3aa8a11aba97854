//! `metaldctl`: a command-line client for the VM API.
//!
//! Human-readable tables by default, `--json` for scripts. On failure it
//! prints the server's error code and message and exits non-zero (2 for
//! usage errors, 1 otherwise).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

mod console;
mod out;
mod snapshots;

pub use out::CliError;
use out::{clip, print_json, table, ts, usage};

use crate::client::{VmClient, WireProtocol, vm_client};
use crate::model::Operation;
use crate::pb::vmprovisioner::v1 as pb;

#[derive(Parser, Debug)]
#[command(name = "metaldctl", version, about = "Control a metald host")]
pub struct Cli {
    /// metald API endpoint.
    #[arg(long, global = true, env = "METALD_ENDPOINT", default_value = "http://127.0.0.1:8080")]
    pub endpoint: String,
    /// Bearer token identifying the customer.
    #[arg(long, global = true, env = "METALD_TOKEN", default_value = "", hide_env_values = true)]
    pub token: String,
    /// Wire protocol.
    #[arg(long, global = true, value_enum, default_value_t = ProtocolArg::Connect)]
    pub protocol: ProtocolArg,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Per-call timeout in seconds (a graceful shutdown may take up to its own --timeout).
    #[arg(long = "call-timeout", global = true, default_value_t = 700)]
    pub call_timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum ProtocolArg {
    Connect,
    ConnectJson,
    Grpc,
    GrpcWeb,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a VM (prepared, not started).
    Create(Box<CreateArgs>),
    /// Start a created or shut-down VM.
    Boot { id: String },
    /// Pause a running VM.
    Pause { id: String },
    /// Resume a paused or suspended VM.
    Resume { id: String },
    /// Suspend a running or paused VM to disk (no process, no memory; resume continues it).
    Suspend { id: String },
    /// Save a named snapshot of a running or paused VM (it goes on).
    Snapshot {
        id: String,
        /// The snapshot's name (unique among yours).
        #[arg(long)]
        name: String,
    },
    /// List your snapshots.
    Snapshots,
    /// Delete one of your snapshots (its clones are not affected).
    SnapshotDelete { name: String },
    /// Restart a running VM's guest.
    Reboot {
        id: String,
        /// Hard reset instead of a guest reboot.
        #[arg(long)]
        force: bool,
    },
    /// Stop a VM (graceful unless --force).
    Shutdown {
        id: String,
        #[arg(long)]
        force: bool,
        /// Seconds to wait for a graceful power-off before forcing (0 = server default, 30).
        #[arg(long, default_value_t = 0)]
        timeout: i32,
    },
    /// Delete a VM and everything it holds.
    Delete {
        id: String,
        /// Delete even when running or paused.
        #[arg(long)]
        force: bool,
    },
    /// Show one VM.
    Info { id: String },
    /// Print a VM's serial console (what metald keeps of it), raw.
    Console {
        id: String,
        /// Keep printing new output until the VM is deleted (Ctrl-C ends it).
        #[arg(long, short)]
        follow: bool,
        /// Only the last BYTES of the history (0 = all).
        #[arg(long, default_value_t = 0, value_name = "BYTES")]
        tail: u64,
    },
    /// List your VMs.
    List {
        /// Only VMs in these states (repeatable).
        #[arg(long, value_enum)]
        state: Vec<StateArg>,
        /// Page size (server default 100, max 1000).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
    /// Run a development billing service that stores what it receives (SQLite).
    BillingServer(crate::billing::devserver::ServerArgs),
    /// Print per-VM usage totals from a development billing service's database.
    BillingReport(crate::billing::devserver::ReportArgs),
}

impl Command {
    /// The API operation a subcommand calls (`None` for the local tools).
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Command::Create(_) => Some(Operation::Create),
            Command::Boot { .. } => Some(Operation::Boot),
            Command::Pause { .. } => Some(Operation::Pause),
            Command::Resume { .. } => Some(Operation::Resume),
            Command::Suspend { .. } => Some(Operation::Suspend),
            Command::Snapshot { .. } => Some(Operation::Snapshot),
            Command::Snapshots => Some(Operation::Snapshots),
            Command::SnapshotDelete { .. } => Some(Operation::DeleteSnapshot),
            Command::Reboot { .. } => Some(Operation::Reboot),
            Command::Shutdown { .. } => Some(Operation::Shutdown),
            Command::Delete { .. } => Some(Operation::Delete),
            Command::Info { .. } => Some(Operation::Info),
            Command::Console { .. } => Some(Operation::Console),
            Command::List { .. } => Some(Operation::List),
            Command::BillingServer(_) | Command::BillingReport(_) => None,
        }
    }
}

/// The subcommand that calls each API operation. Exhaustive: a new
/// [`Operation`] does not compile until the CLI says how it is reached (and
/// the test below checks the subcommand exists and calls it).
pub fn verb(op: Operation) -> &'static str {
    match op {
        Operation::Create => "create",
        Operation::Boot => "boot",
        Operation::Pause => "pause",
        Operation::Resume => "resume",
        Operation::Reboot => "reboot",
        Operation::Shutdown => "shutdown",
        Operation::Delete => "delete",
        Operation::Info => "info",
        Operation::List => "list",
        Operation::Suspend => "suspend",
        Operation::Snapshot => "snapshot",
        Operation::Snapshots => "snapshots",
        Operation::DeleteSnapshot => "snapshot-delete",
        Operation::Console => "console",
    }
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum StateArg {
    Created,
    Running,
    Paused,
    Shutdown,
    Suspended,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// VM id (lowercase letters, digits, '-'); generated when omitted.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: i32,
    #[arg(long = "memory-mb", default_value_t = 256)]
    pub memory_mb: i64,
    /// Kernel image (inside the host's asset directories); with `--image`
    /// the host's guest kernel when omitted.
    #[arg(long, required_unless_present_any = ["image", "from_snapshot"])]
    pub kernel: Option<PathBuf>,
    /// Clone your snapshot of this name: a new running VM from its memory
    /// and disks (no other configuration; `--port` maps its ports).
    #[arg(long = "from-snapshot", conflicts_with_all = ["kernel", "image", "rootfs", "disks", "initrd"])]
    pub from_snapshot: Option<String>,
    /// Run a container image: `registry[:port]/repo[:tag][@sha256:…]`,
    /// `oci-layout:DIR[:tag]` or `docker-archive:FILE`.
    #[arg(long)]
    pub image: Option<String>,
    /// The workload's environment `KEY=value`, over the image's (repeatable;
    /// with `--image`).
    #[arg(long = "env", requires = "image")]
    pub env: Vec<String>,
    /// Registry user for the image's pull; the password (or token) is read
    /// from the environment variable METALDCTL_REGISTRY_PASSWORD.
    #[arg(long = "registry-user", requires = "image")]
    pub registry_user: Option<String>,
    /// Arguments replacing the image's Cmd (after `--`).
    #[arg(last = true, requires = "image")]
    pub cmd: Vec<String>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Root filesystem image, attached as the root virtio-blk device.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Extra disks, `PATH` or `PATH:ro` (repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    #[arg(long = "kernel-args", default_value = "")]
    pub kernel_args: String,
    /// Metadata `key=value` (repeatable).
    #[arg(long = "meta")]
    pub metadata: Vec<String>,
    /// Add one network interface metald manages (TAP, addresses, NAT).
    #[arg(long)]
    pub net: bool,
    /// Map a host port to a guest port, `HOST:GUEST[/udp]`; `0:GUEST`
    /// allocates the host port (repeatable; implies `--net`).
    #[arg(long = "port")]
    pub ports: Vec<String>,
}

/// `HOST:GUEST[/udp|/tcp]` → a port mapping.
fn port_arg(s: &str) -> Result<pb::PortMapping, CliError> {
    let bad = || usage(format!("--port {s:?} must be HOST:GUEST[/udp] (HOST 0 allocates one)"));
    let (ports, protocol) = match s.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some(_) => return Err(bad()),
        None => (s, "tcp"),
    };
    let (host, guest) = ports.split_once(':').ok_or_else(bad)?;
    let host_port: u16 = host.parse().map_err(|_| bad())?;
    let guest_port: u16 = guest.parse().map_err(|_| bad())?;
    if guest_port == 0 {
        return Err(bad());
    }
    Ok(pb::PortMapping {
        protocol: protocol.into(),
        host_port: i32::from(host_port),
        guest_port: i32::from(guest_port),
        ..Default::default()
    })
}

fn state_of(a: StateArg) -> pb::VmState {
    match a {
        StateArg::Created => pb::VmState::VM_STATE_CREATED,
        StateArg::Running => pb::VmState::VM_STATE_RUNNING,
        StateArg::Paused => pb::VmState::VM_STATE_PAUSED,
        StateArg::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        StateArg::Suspended => pb::VmState::VM_STATE_SUSPENDED,
    }
}

pub fn state_name(v: &buffa::EnumValue<pb::VmState>) -> &'static str {
    match v.as_known() {
        Some(pb::VmState::VM_STATE_CREATED) => "CREATED",
        Some(pb::VmState::VM_STATE_RUNNING) => "RUNNING",
        Some(pb::VmState::VM_STATE_PAUSED) => "PAUSED",
        Some(pb::VmState::VM_STATE_SHUTDOWN) => "SHUTDOWN",
        Some(pb::VmState::VM_STATE_SUSPENDED) => "SUSPENDED",
        _ => "UNSPECIFIED",
    }
}

fn abs(p: &std::path::Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

fn create_request(a: &CreateArgs) -> Result<pb::CreateVmRequest, CliError> {
    if let Some(snapshot) = &a.from_snapshot {
        return Ok(pb::CreateVmRequest {
            vm_id: a.id.clone().unwrap_or_default(),
            from_snapshot: snapshot.clone(),
            port_mappings: a.ports.iter().map(|p| port_arg(p)).collect::<Result<Vec<_>, _>>()?,
            ..Default::default()
        });
    }
    let mut storage = Vec::new();
    if let Some(r) = &a.rootfs {
        storage.push(pb::StorageDevice {
            id: "rootfs".into(),
            path: abs(r),
            is_root_device: true,
            ..Default::default()
        });
    }
    for (i, d) in a.disks.iter().enumerate() {
        let (path, ro) = match d.strip_suffix(":ro") {
            Some(p) => (p, true),
            None => (d.as_str(), false),
        };
        storage.push(pb::StorageDevice {
            id: format!("disk{i}"),
            path: abs(std::path::Path::new(path)),
            read_only: ro,
            ..Default::default()
        });
    }
    let port_mappings = a.ports.iter().map(|p| port_arg(p)).collect::<Result<Vec<_>, _>>()?;
    let network = if a.net || !port_mappings.is_empty() {
        vec![pb::NetworkInterface { id: "eth0".into(), port_mappings, ..Default::default() }]
    } else {
        Vec::new()
    };
    let image = match &a.image {
        None => None,
        Some(reference) => {
            let mut env = buffa::__private::HashMap::default();
            for e in &a.env {
                let (k, v) = e.split_once('=').ok_or_else(|| usage(format!("--env {e:?} must be KEY=value")))?;
                env.insert(k.to_owned(), v.to_owned());
            }
            let credentials = a.registry_user.as_ref().map(|u| pb::RegistryCredentials {
                username: u.clone(),
                password: std::env::var("METALDCTL_REGISTRY_PASSWORD").unwrap_or_default(),
                ..Default::default()
            });
            Some(pb::ContainerImage {
                reference: reference.clone(),
                env,
                cmd: a.cmd.clone(),
                credentials: credentials.into(),
                ..Default::default()
            })
        }
    };
    let mut metadata = buffa::__private::HashMap::default();
    for m in &a.metadata {
        let (k, v) = m.split_once('=').ok_or_else(|| usage(format!("--meta {m:?} must be key=value")))?;
        metadata.insert(k.to_owned(), v.to_owned());
    }
    Ok(pb::CreateVmRequest {
        vm_id: a.id.clone().unwrap_or_default(),
        config: pb::VmConfig {
            cpu: pb::CpuConfig { vcpu_count: a.vcpus, ..Default::default() }.into(),
            memory: pb::MemoryConfig { size_bytes: a.memory_mb.saturating_mul(1024 * 1024), ..Default::default() }
                .into(),
            boot: pb::BootConfig {
                kernel_path: a.kernel.as_deref().map(abs).unwrap_or_default(),
                initrd_path: a.initrd.as_deref().map(abs).unwrap_or_default(),
                kernel_args: a.kernel_args.clone(),
                ..Default::default()
            }
            .into(),
            storage,
            network,
            metadata,
            image: image.into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    })
}

/// Runs one command and prints its result.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let protocol = match cli.protocol {
        ProtocolArg::Connect => WireProtocol::ConnectProto,
        ProtocolArg::ConnectJson => WireProtocol::ConnectJson,
        ProtocolArg::Grpc => WireProtocol::Grpc,
        ProtocolArg::GrpcWeb => WireProtocol::GrpcWeb,
    };
    let billing = |r: Result<(), String>| r.map_err(|message| CliError { message, exit_code: 1 });
    match &cli.command {
        Command::BillingServer(a) => return billing(crate::billing::devserver::run_server(a, cli.json).await),
        Command::BillingReport(a) => return billing(crate::billing::devserver::run_report(a, cli.json)),
        _ => {}
    }
    if cli.token.is_empty() {
        return Err(usage("no token: pass --token or set METALD_TOKEN"));
    }
    let timeout = Duration::from_secs(cli.call_timeout);
    if let Command::Console { id, follow, tail } = cli.command {
        let target = console::Target { endpoint: &cli.endpoint, token: &cli.token, protocol, timeout };
        return console::console(target, id, follow, tail).await;
    }
    let client = vm_client(&cli.endpoint, &cli.token, protocol, timeout)?;
    let json = cli.json;
    match cli.command {
        Command::Create(a) => {
            let r = client.create_vm(create_request(&a)?).await?.into_owned();
            if json {
                print_json(json!({"vm_id": r.vm_id, "state": state_name(&r.state)}));
            } else {
                println!("{}\t{}", r.vm_id, state_name(&r.state));
            }
        }
        Command::Boot { id } => {
            let r = client.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await?.into_owned();
            done(json, &id, state_name(&r.state));
        }
        Command::Pause { id } => {
            let r = client.pause_vm(pb::PauseVmRequest { vm_id: id.clone(), ..Default::default() }).await?.into_owned();
            done(json, &id, state_name(&r.state));
        }
        Command::Resume { id } => {
            let r =
                client.resume_vm(pb::ResumeVmRequest { vm_id: id.clone(), ..Default::default() }).await?.into_owned();
            done(json, &id, state_name(&r.state));
        }
        Command::Reboot { id, force } => {
            let r = client
                .reboot_vm(pb::RebootVmRequest { vm_id: id.clone(), force, ..Default::default() })
                .await?
                .into_owned();
            done(json, &id, state_name(&r.state));
        }
        Command::Shutdown { id, force, timeout } => {
            let r = client
                .shutdown_vm(pb::ShutdownVmRequest {
                    vm_id: id.clone(),
                    force,
                    timeout_seconds: timeout,
                    ..Default::default()
                })
                .await?
                .into_owned();
            done(json, &id, state_name(&r.state));
        }
        Command::Delete { id, force } => {
            client.delete_vm(pb::DeleteVmRequest { vm_id: id.clone(), force, ..Default::default() }).await?;
            done(json, &id, "DELETED");
        }
        Command::Suspend { id } => {
            let r =
                client.suspend_vm(pb::SuspendVmRequest { vm_id: id.clone(), ..Default::default() }).await?.into_owned();
            done(json, &id, state_name(&r.state));
        }
        Command::Snapshot { id, name } => snapshots::snapshot(&client, id, name, json).await?,
        Command::Snapshots => snapshots::list(&client, json).await?,
        Command::SnapshotDelete { name } => snapshots::delete(&client, name, json).await?,
        Command::Info { id } => info(&client, &id, json).await?,
        Command::List { state, page_size, all } => list(&client, state, page_size, all, json).await?,
        Command::BillingServer(_) | Command::BillingReport(_) | Command::Console { .. } => {}
    }
    Ok(())
}

fn done(json: bool, id: &str, state: &str) {
    if json {
        print_json(json!({"vm_id": id, "state": state}));
    } else {
        println!("{id}\t{state}");
    }
}

async fn info(client: &VmClient, id: &str, json: bool) -> Result<(), CliError> {
    let r = client.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await?.into_owned();
    if json {
        // The generated types serialise to the canonical protobuf JSON.
        let v = serde_json::to_value(&r).map_err(|e| usage(format!("encoding JSON: {e}")))?;
        print_json(v);
        return Ok(());
    }
    let cfg = r.config.as_option();
    let mut t = table(&["field", "value"]);
    t.add_row(vec!["vm_id".to_string(), r.vm_id.clone()]);
    t.add_row(vec!["state".to_string(), state_name(&r.state).to_string()]);
    if r.snapshot_size_bytes > 0 {
        t.add_row(vec!["saved state".to_string(), format!("{} MiB on disk", r.snapshot_size_bytes >> 20)]);
    }
    if let Some(c) = cfg {
        t.add_row(vec!["vcpus".to_string(), c.cpu.vcpu_count.to_string()]);
        t.add_row(vec!["memory".to_string(), format!("{} MiB", c.memory.size_bytes >> 20)]);
        if let Some(i) = c.image.as_option() {
            t.add_row(vec!["image".to_string(), i.reference.clone()]);
            t.add_row(vec!["image digest".to_string(), i.digest.clone()]);
        }
        t.add_row(vec!["kernel".to_string(), c.boot.kernel_path.clone()]);
        if !c.boot.initrd_path.is_empty() {
            t.add_row(vec!["initrd".to_string(), c.boot.initrd_path.clone()]);
        }
        for d in &c.storage {
            t.add_row(vec![
                format!("disk {}", d.id),
                format!(
                    "{}{}{}",
                    d.path,
                    if d.is_root_device { " (root)" } else { "" },
                    if d.read_only { " (ro)" } else { "" }
                ),
            ]);
        }
    }
    for n in &r.network_interfaces {
        let mut v = vec![format!("mac {}", n.mac_address)];
        if !n.tap_device.is_empty() {
            v.push(format!("tap {}", n.tap_device));
        }
        if !n.ip_address.is_empty() {
            v.push(format!("{}/{} gw {}", n.ip_address, n.ipv4_prefix_length, n.gateway));
        }
        if !n.ipv6_address.is_empty() {
            v.push(format!("{}/{} gw {}", n.ipv6_address, n.ipv6_prefix_length, n.ipv6_gateway));
        }
        t.add_row(vec![format!("net {}", n.interface_id), v.join(", ")]);
        for p in &n.port_mappings {
            let proto = if p.protocol.is_empty() { "tcp" } else { p.protocol.as_str() };
            t.add_row(vec![
                format!("port {}/{proto}", p.host_port),
                format!("→ {}:{}", if n.ip_address.is_empty() { &n.ipv6_address } else { &n.ip_address }, p.guest_port),
            ]);
        }
    }
    if let Some(e) = r.workload_exit.as_option() {
        let how =
            if e.signal != 0 { format!("killed by signal {}", e.signal) } else { format!("exit code {}", e.code) };
        t.add_row(vec!["workload".to_string(), how]);
    }
    if let Some(s) = r.stop.as_option() {
        let reason = s
            .reason
            .as_known()
            .map_or("unspecified", |r| buffa::Enumeration::proto_name(&r).trim_start_matches("STOP_REASON_"));
        t.add_row(vec!["stopped".to_string(), format!("{}: {}", reason.to_lowercase(), s.detail)]);
    }
    if let Some(m) = r.metrics.as_option() {
        t.add_row(vec!["cpu".to_string(), format!("{:.1} %", m.cpu_usage_percent)]);
        t.add_row(vec!["memory used".to_string(), format!("{} MiB", m.memory_usage_bytes >> 20)]);
        t.add_row(vec!["uptime".to_string(), format!("{} s", m.uptime_seconds)]);
        let s = &m.storage_stats;
        t.add_row(vec!["disk".to_string(), format!("read {} B / written {} B", s.bytes_read, s.bytes_written)]);
        let n = &m.network_stats;
        t.add_row(vec!["network".to_string(), format!("rx {} B / tx {} B", n.bytes_received, n.bytes_transmitted)]);
    }
    let mut keys: Vec<_> = r.backend_info.keys().cloned().collect();
    keys.sort();
    for k in keys {
        t.add_row(vec![k.clone(), clip(&r.backend_info[&k], 100)]);
    }
    println!("{t}");
    Ok(())
}

async fn list(client: &VmClient, states: Vec<StateArg>, page_size: i32, all: bool, json: bool) -> Result<(), CliError> {
    let filter: Vec<buffa::EnumValue<pb::VmState>> = states.into_iter().map(|s| state_of(s).into()).collect();
    let mut token = String::new();
    let mut vms = Vec::new();
    let mut total;
    loop {
        let r = client
            .list_vms(pb::ListVmsRequest {
                state_filter: filter.clone(),
                page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_owned();
        total = r.total_count;
        vms.extend(r.vms);
        token = r.next_page_token;
        if !all || token.is_empty() {
            break;
        }
    }
    if json {
        let items: Vec<serde_json::Value> = vms
            .iter()
            .map(|v| {
                json!({"vm_id": v.vm_id, "state": state_name(&v.state), "vcpus": v.vcpu_count,
                       "memory_bytes": v.memory_size_bytes, "created": v.created_timestamp,
                       "modified": v.modified_timestamp})
            })
            .collect();
        print_json(json!({"vms": items, "total_count": total, "next_page_token": token}));
        return Ok(());
    }
    let mut t = table(&["VM ID", "STATE", "VCPUS", "MEMORY", "CREATED", "MODIFIED"]);
    for v in &vms {
        t.add_row(vec![
            v.vm_id.clone(),
            state_name(&v.state).to_string(),
            v.vcpu_count.to_string(),
            format!("{} MiB", v.memory_size_bytes >> 20),
            ts(v.created_timestamp),
            ts(v.modified_timestamp),
        ]);
    }
    println!("{t}");
    if token.is_empty() {
        println!("{} of {total} VMs", vms.len());
    } else {
        println!("{} of {total} VMs (more: --all)", vms.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_operation_has_its_subcommand() {
        for op in Operation::ALL {
            let verb = verb(op);
            assert!(Cli::command().find_subcommand(verb).is_some(), "no subcommand {verb} for {op:?}");
            let mut args = vec!["metaldctl", verb];
            match op {
                Operation::Create => args.extend(["--kernel", "/k"]),
                Operation::List | Operation::Snapshots => {}
                Operation::Snapshot => args.extend(["vm-1", "--name", "base"]),
                _ => args.push("vm-1"),
            }
            let cli = Cli::try_parse_from(&args).unwrap();
            assert_eq!(cli.command.operation(), Some(op), "{args:?}");
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_clone_names_its_snapshot_and_nothing_else() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let cli = parse(&["metaldctl", "create", "--from-snapshot", "base", "--id", "c1", "--port", "0:80"]).unwrap();
        let Command::Create(a) = cli.command else { panic!("not a create") };
        let r = create_request(&a).unwrap();
        assert_eq!((r.from_snapshot.as_str(), r.vm_id.as_str()), ("base", "c1"));
        assert!(r.config.as_option().is_none());
        assert_eq!(r.port_mappings.len(), 1);
        assert!(parse(&["metaldctl", "create", "--from-snapshot", "base", "--kernel", "/k"]).is_err());
        assert!(parse(&["metaldctl", "create"]).is_err());
    }

    #[test]
    fn command_line_definition_is_consistent() {
        // Catches flag collisions (e.g. a subcommand flag shadowing a global one).
        Cli::command().debug_assert();
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn ports_imply_a_managed_interface() {
        let create = |extra: &[&str]| {
            let mut args = vec!["metaldctl", "create", "--kernel", "/k"];
            args.extend(extra);
            match Cli::try_parse_from(&args).unwrap().command {
                Command::Create(a) => create_request(&a),
                other => panic!("{other:?}"),
            }
        };
        let r = create(&[]).unwrap();
        assert!(r.config.network.is_empty());
        let r = create(&["--net"]).unwrap();
        assert_eq!(r.config.network.len(), 1);
        assert!(r.config.network[0].tap_device.is_empty(), "metald provides the TAP");
        let r = create(&["--port", "8080:80", "--port", "0:53/udp"]).unwrap();
        let p = &r.config.network[0].port_mappings;
        assert_eq!(
            p.iter().map(|p| (p.protocol.as_str(), p.host_port, p.guest_port)).collect::<Vec<_>>(),
            [("tcp", 8080, 80), ("udp", 0, 53)]
        );
        for bad in ["80", "a:80", "80:0", "8080:80/sctp", "70000:80"] {
            let e = create(&["--port", bad]).unwrap_err();
            assert!(e.message.contains("HOST:GUEST"), "{bad}: {}", e.message);
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn an_image_needs_no_kernel_and_carries_env_and_args() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(parse(&["metaldctl", "create"]).is_err(), "a kernel or an image is required");
        assert!(parse(&["metaldctl", "create", "--kernel", "/k", "--env", "A=1"]).is_err(), "--env needs --image");
        let cmd =
            parse(&["metaldctl", "create", "--image", "reg:5000/app:1", "--env", "A=1", "--", "-v", "x"]).unwrap();
        let Command::Create(a) = cmd else { panic!("{cmd:?}") };
        let r = create_request(&a).unwrap();
        let i = r.config.image.as_option().unwrap();
        assert_eq!(i.reference, "reg:5000/app:1");
        assert_eq!(i.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(i.cmd, ["-v", "x"]);
        assert!(i.credentials.as_option().is_none());
        assert_eq!(r.config.boot.kernel_path, "", "the host's guest kernel");
    }

    #[test]
    fn shutdown_takes_its_own_timeout() {
        let cli = Cli::try_parse_from(["metaldctl", "--token", "t", "shutdown", "vm-1", "--timeout", "5"]).unwrap();
        match cli.command {
            Command::Shutdown { timeout, force, .. } => assert_eq!((timeout, force), (5, false)),
            other => panic!("{other:?}"),
        }
    }
}
