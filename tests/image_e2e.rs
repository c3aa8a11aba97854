//! Container images end to end: metald in-process with the QEMU backend
//! (TCG), host networking and its image cache, inside a network namespace
//! this test makes, pulling from a real `docker-registry` on 127.0.0.1 in
//! that namespace. The image is built offline with `umoci` from
//! busybox-static files and a small workload (`/app/run.sh`) that prints
//! what it was given, serves HTTP with busybox `httpd`, and exits 7 when
//! asked (a CGI touches `/tmp/stop`). No packet leaves this machine.
//!
//! One test fn, one namespace: the workload runs with the image's env,
//! workdir, user and args plus the request's env; its HTTP server answers
//! through a port mapping; its exit code shows in GetVmInfo once the VM is
//! SHUTDOWN; the power button gives a waiting workload SIGTERM first (exit
//! 3); ten VMs created at once from an uncached image cause one pull and
//! share one base, all ten boot; a delete removes the VM's writable disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::ip;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::Config;
use metald::pb::vmprovisioner::v1 as pb;
use support::registry::{ImageBuilder, Registry};
use support::{console_text, guest_image, metald_env, wait_until};

const BOOT: Duration = Duration::from_secs(180);

const RUN_SH: &str = r#"#!/bin/sh
for a in "$@"; do echo "WL_ARG [$a]"; done
echo "WL_ID $(id -u):$(id -g)"
echo "WL_CWD $(pwd)"
echo "WL_GREETING $GREETING"
echo "WL_VMENV $VM_ONLY"
if [ "$1" = wait ]; then
  trap 'echo WL_GOT_TERM; exit 3' TERM
  echo WL_WAITING
  while :; do sleep 1 & wait $!; done
fi
httpd -p 8080 -h /www
echo WL_SERVING
while [ ! -e /tmp/stop ]; do sleep 1; done
echo WL_STOPPING
exit 7
"#;

const STOP_CGI: &str = "#!/bin/sh\ntouch /tmp/stop\nprintf 'Content-Type: text/plain\\r\\n\\r\\nstopping\\n'\n";

/// The workload image: busybox-static with its applets in /bin, a passwd
/// with `app` (1000:1000), the workload and its web root.
fn build_image(dir: &Path, tag: &str) -> ImageBuilder {
    let img = ImageBuilder::new(dir, tag);
    img.layer(|root| {
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n")
            .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::create_dir_all(root.join("www/cgi-bin")).unwrap();
        std::fs::write(root.join("www/index.html"), "hello from the image\n").unwrap();
        write_exec(&root.join("app/run.sh"), RUN_SH);
        write_exec(&root.join("www/cgi-bin/stop"), STOP_CGI);
    });
    img.config(&[
        "--config.entrypoint=/app/run.sh",
        "--config.cmd=serve",
        "--config.env=GREETING=hello",
        "--config.workingdir=/app",
        "--config.user=app",
    ]);
    img
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut lines = BufReader::new(s).lines().map_while(Result::ok);
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            break;
        }
    }
    lines.next()
}

fn image_config(reference: &str, cmd: &[&str], ports: &[(i32, i32)]) -> pb::VmConfig {
    let nic = pb::NetworkInterface {
        port_mappings: ports
            .iter()
            .map(|&(h, g)| pb::PortMapping { host_port: h, guest_port: g, ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let mut env = buffa::__private::HashMap::default();
    env.insert("VM_ONLY".to_owned(), "from-the-request".to_owned());
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig { kernel_args: "quiet".into(), ..Default::default() }.into(),
        network: vec![nic],
        image: pb::ContainerImage {
            reference: reference.into(),
            env,
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

async fn info(c: &VmClient, id: &str) -> pb::GetVmInfoResponse {
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned()
}

async fn boot(c: &VmClient, id: &str) -> PathBuf {
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    PathBuf::from(&info(c, id).await.backend_info["console_log"])
}

async fn wait_console(path: &Path, what: &str, pred: impl Fn(&str) -> bool) {
    wait_until(&format!("{what} (console {})", path.display()), BOOT, || {
        let ok = pred(&console_text(path));
        async move { ok }
    })
    .await;
}

async fn wait_shutdown(c: &VmClient, id: &str) -> pb::GetVmInfoResponse {
    wait_until(&format!("{id} to be SHUTDOWN"), BOOT, || async {
        info(c, id).await.state.as_known() == Some(pb::VmState::VM_STATE_SHUTDOWN)
    })
    .await;
    info(c, id).await
}

#[test]
fn an_image_runs_as_the_vms_workload_serves_through_a_port_and_reports_its_exit() {
    // Built (or checked) before the namespace: building may need the network.
    guest_image();
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run());
    })
    .join()
    .unwrap();
}

async fn run() {
    ip(&["link", "set", "lo", "up"]);
    let tmp = tempfile::Builder::new().prefix("metald-image-e2e-").tempdir().unwrap();
    let registry = Registry::start(None);
    let img = build_image(tmp.path(), "v1");
    registry.push(&img.layout, "v1", "app");
    registry.push(&img.layout, "v1", "many");
    let env = metald_env([
        ("BACKEND", "qemu".to_owned()),
        ("QEMU_ACCEL", "tcg".to_owned()),
        ("AUTH_DEV_TOKENS", "true".to_owned()),
        ("ADDRESS", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", guest_image().display().to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ("NETWORK_ENABLED", "true".to_owned()),
        ("GUEST_KERNEL", guest_image().join("vmlinux").display().to_string()),
        ("GUEST_INITRD", guest_image().join("initramfs.cpio.gz").display().to_string()),
        ("IMAGE_INSECURE_REGISTRIES", registry.host.clone()),
        ("IMAGE_WRITABLE_MB", "64".to_owned()),
    ]);
    let _kill = support::KillOnDrop(tmp.path().to_path_buf());
    let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
    let c = vm_client(
        &format!("http://{}", daemon.addr),
        "dev_customer_acme",
        WireProtocol::ConnectProto,
        Duration::from_secs(300),
    )
    .unwrap();
    let reference = format!("{}/app:v1", registry.host);

    // The workload, as the image and the request say.
    let config = image_config(&reference, &[], &[(0, 8080)]);
    c.create_vm(pb::CreateVmRequest { vm_id: "web".into(), config: config.into(), ..Default::default() })
        .await
        .unwrap();
    let web = info(&c, "web").await;
    let digest = web.config.image.digest.clone();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest:?}");
    let host_port = u16::try_from(web.network_info.port_mappings[0].host_port).unwrap();
    let console = boot(&c, "web").await;
    wait_console(&console, "the workload to serve", |t| t.contains("WL_SERVING")).await;
    let text = console_text(&console);
    for line in [
        "WL_ARG [serve]",
        "WL_ID 1000:1000",
        "WL_CWD /app",
        "WL_GREETING hello",
        "WL_VMENV from-the-request",
        "METALD_WORKLOAD_START",
    ] {
        assert!(text.contains(line), "{line:?} not on the console:\n{text}");
    }
    // Its HTTP server, through the port mapping.
    let addr: SocketAddr = format!("127.0.0.1:{host_port}").parse().unwrap();
    wait_until("the workload's HTTP server through the port mapping", BOOT, || async move {
        http_get(addr, "/").as_deref() == Some("hello from the image")
    })
    .await;
    assert_eq!(info(&c, "web").await.workload_exit.as_option(), None, "running: no exit yet");
    // Asked to stop, it exits 7: the VM powers off and says so.
    assert_eq!(http_get(addr, "/cgi-bin/stop").as_deref(), Some("stopping"));
    let done = wait_shutdown(&c, "web").await;
    let exit = done.workload_exit.as_option().expect("workload_exit once SHUTDOWN");
    assert_eq!((exit.code, exit.signal), (7, 0), "{}", console_text(&console));

    // The power button: SIGTERM to the workload first (it exits 3).
    let config = image_config(&reference, &["wait"], &[]);
    c.create_vm(pb::CreateVmRequest { vm_id: "waiter".into(), config: config.into(), ..Default::default() })
        .await
        .unwrap();
    let waiter = info(&c, "waiter").await;
    assert_eq!(waiter.config.storage[0].path, web.config.storage[0].path, "one base per digest");
    let console = boot(&c, "waiter").await;
    wait_console(&console, "the workload to wait", |t| t.contains("WL_WAITING")).await;
    c.shutdown_vm(pb::ShutdownVmRequest { vm_id: "waiter".into(), timeout_seconds: 60, ..Default::default() })
        .await
        .unwrap();
    let done = wait_shutdown(&c, "waiter").await;
    let text = console_text(&console);
    let term = text.find("WL_GOT_TERM").unwrap_or_else(|| panic!("no SIGTERM seen:\n{text}"));
    assert!(term < text.find("METALD_GUEST_POWEROFF").unwrap(), "{text}");
    let exit = done.workload_exit.as_option().expect("workload_exit");
    assert_eq!((exit.code, exit.signal), (3, 0));

    // Ten VMs at once from an image not cached yet: one pull, one base.
    let many = format!("{}/many:v1", registry.host);
    let before = registry.metald_requests().len();
    let creates = (0..10).map(|i| {
        let (c, config) = (c.clone(), image_config(&many, &["wait"], &[]));
        async move {
            c.create_vm(pb::CreateVmRequest { vm_id: format!("m{i}"), config: config.into(), ..Default::default() })
                .await
                .unwrap();
        }
    });
    futures::future::join_all(creates).await;
    let pulls: Vec<_> = registry.metald_requests()[before..]
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.contains("/blobs/"))
        .cloned()
        .collect();
    let mut unique = pulls.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(pulls, unique, "each blob fetched once: {pulls:?}");
    let mut bases = Vec::new();
    for i in 0..10 {
        bases.push(info(&c, &format!("m{i}")).await.config.storage[0].path.clone());
    }
    assert!(bases.iter().all(|b| *b == bases[0]), "{bases:?}");
    for i in 0..10 {
        boot(&c, &format!("m{i}")).await;
    }
    for i in 0..10 {
        let console = PathBuf::from(&info(&c, &format!("m{i}")).await.backend_info["console_log"]);
        wait_console(&console, &format!("m{i}'s workload"), |t| t.contains("WL_WAITING")).await;
    }

    // Delete: the VM's writable disk goes; the shared base stays.
    let dir = tmp.path().join("data/vms/web");
    assert!(dir.join("writable.ext4").exists());
    c.delete_vm(pb::DeleteVmRequest { vm_id: "web".into(), force: true, ..Default::default() }).await.unwrap();
    assert!(!dir.exists());
    assert!(Path::new(&web.config.storage[0].path).exists());
    for id in (0..10).map(|i| format!("m{i}")).chain(["waiter".into()]) {
        c.delete_vm(pb::DeleteVmRequest { vm_id: id, force: true, ..Default::default() }).await.unwrap();
    }
    daemon.shutdown();
    daemon.wait().await.unwrap();
}
