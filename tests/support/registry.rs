//! A real OCI registry for image tests: Debian's `docker-registry`
//! (distribution 2.8) on 127.0.0.1 with its storage in a temporary
//! directory, optionally behind htpasswd basic auth, killed on drop; and
//! small images built offline with `umoci` (from plain files or
//! busybox-static) and pushed with `skopeo`; optionally over HTTPS with a
//! test CA made by `openssl` ([`TestCa`]) or with any other `auth:` section
//! (token auth: `tests/image_bearer.rs`). Nothing contacts the internet.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::net::free_port;

/// Whether the image tools are installed (`scripts/install-deps.sh`).
pub fn image_tools_present() -> bool {
    ["docker-registry", "skopeo", "umoci", "htpasswd", "mkfs.ext4", "debugfs"].iter().all(|t| on_path(t))
}

/// Whether `tool` is a file in one of `PATH`'s directories.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Fails the test (never skips it) when an image tool is missing: `make
/// test` installs them (`scripts/install-deps.sh`), so a missing one is a
/// broken set-up, not a reason to pass.
pub fn require_image_tools(extra: &[&str]) {
    let missing: Vec<&str> = ["docker-registry", "skopeo", "umoci", "htpasswd", "mkfs.ext4", "debugfs"]
        .iter()
        .chain(extra)
        .copied()
        .filter(|t| !on_path(t))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?}: install them with scripts/install-deps.sh (make deps)");
}

/// A running `docker-registry`.
pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// `user:password` when it requires basic auth.
    pub creds: Option<(String, String)>,
    dir: tempfile::TempDir,
}

/// Runs a command; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Registry {
    /// Starts a registry; with `auth` it requires that user and password.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        Registry::start_with(auth, None)
    }

    /// Starts a registry serving HTTPS with `tls` (certificate chain and
    /// key, PEM files); with `auth` it requires that user and password.
    pub fn start_with(auth: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> Registry {
        Registry::start_config(auth, tls, None)
    }

    /// Starts a plain-HTTP registry whose `auth:` section is `auth_yaml`
    /// (e.g. `token:` auth, indented by two spaces under `auth:`); `creds`
    /// are what [`Registry::push`] hands skopeo.
    pub fn start_with_auth_config(auth_yaml: &str, creds: Option<(&str, &str)>) -> Registry {
        let mut reg = Registry::start_config(None, None, Some(auth_yaml));
        reg.creds = creds.map(|(u, p)| (u.into(), p.into()));
        reg
    }

    fn start_config(auth: Option<(&str, &str)>, tls: Option<(&Path, &Path)>, auth_yaml: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((cert, key)) = tls {
            config.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
        }
        if let Some((user, pass)) = auth {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            std::fs::write(dir.path().join("htpasswd"), line.trim()).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: metald-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        if let Some(yaml) = auth_yaml {
            config.push_str("auth:\n");
            config.push_str(yaml);
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry");
        let host = format!("127.0.0.1:{port}");
        let reg = Registry { child: Some(child), host, creds: auth.map(|(u, p)| (u.into(), p.into())), dir };
        let addr: std::net::SocketAddr = reg.host.parse().unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        reg
    }

    /// The registry's access log lines from metald's client (user agent
    /// `metald/…`): `(method, path, status)` each.
    pub fn metald_requests(&self) -> Vec<(String, String, u16)> {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"metald/") && !l.starts_with("time="))
            .filter_map(|l| {
                let mut quoted = l.split('"');
                let req = quoted.nth(1)?;
                let status = quoted.next()?.split_whitespace().next()?.parse().ok()?;
                let mut parts = req.split(' ');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned(), status))
            })
            .collect()
    }

    /// The registry's storage directory (`rootdirectory`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Kills the registry now (port closed from here on).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pushes the OCI layout image `layout:tag` as `repo:tag` (all
    /// platforms of an index).
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--insecure-policy", "--all", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repo}:{tag}", self.host));
        run(&mut cmd);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An OCI layout being built with `umoci`, one layer per [`layer`] call.
///
/// [`layer`]: ImageBuilder::layer
pub struct ImageBuilder {
    /// The layout directory.
    pub layout: PathBuf,
    /// The tag in it.
    pub tag: String,
    bundle: PathBuf,
}

impl ImageBuilder {
    /// A new empty image `tag` in a new layout under `dir`.
    pub fn new(dir: &Path, tag: &str) -> ImageBuilder {
        let layout = dir.join("layout");
        if !layout.exists() {
            run(Command::new("umoci").arg("init").arg("--layout").arg(&layout));
        }
        run(Command::new("umoci").arg("new").arg("--image").arg(format!("{}:{tag}", layout.display())));
        ImageBuilder { layout, tag: tag.into(), bundle: dir.join(format!("bundle-{tag}")) }
    }

    fn image(&self) -> String {
        format!("{}:{}", self.layout.display(), self.tag)
    }

    /// Unpacks the image, lets `change` edit its root directory, and
    /// repacks the difference as a new layer (deletions become whiteouts).
    pub fn layer(&self, change: impl FnOnce(&Path)) -> &ImageBuilder {
        let _ = std::fs::remove_dir_all(&self.bundle);
        run(Command::new("umoci").args(["unpack", "--image"]).arg(self.image()).arg(&self.bundle));
        change(&self.bundle.join("rootfs"));
        run(Command::new("umoci").args(["repack", "--image"]).arg(self.image()).arg(&self.bundle));
        std::fs::remove_dir_all(&self.bundle).unwrap();
        self
    }

    /// Adds a layer tar verbatim (e.g. one with an opaque-directory marker).
    pub fn raw_layer(&self, tar: &Path) -> &ImageBuilder {
        run(Command::new("umoci").args(["raw", "add-layer", "--image"]).arg(self.image()).arg(tar));
        self
    }

    /// Sets config fields: `umoci config` options such as
    /// `--config.entrypoint=/bin/app`.
    pub fn config(&self, args: &[&str]) -> &ImageBuilder {
        run(Command::new("umoci").args(["config", "--image"]).arg(self.image()).args(args));
        self
    }
}

/// A throw-away CA (`ca.pem`) and a server certificate for 127.0.0.1
/// signed by it (`server.pem`, `server.key`), made with `openssl` in `dir`.
pub struct TestCa {
    /// The CA certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl TestCa {
    /// Makes the CA and the server certificate for 127.0.0.1 (P-256
    /// keys, two days).
    pub fn new(dir: &Path) -> TestCa {
        TestCa::for_name(dir, "IP:127.0.0.1")
    }

    /// Same, with the server certificate's `subjectAltName` = `san`
    /// (`IP:…` or `DNS:…`).
    pub fn for_name(dir: &Path, san: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let p = |n: &str| dir.join(n);
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(Command::new("openssl")
            .args(["req", "-x509", "-days", "2", "-subj", "/CN=metald test CA"])
            .args(ec)
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")));
        run(Command::new("openssl")
            .args(["req", "-subj", "/CN=127.0.0.1"])
            .args(ec)
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")));
        std::fs::write(
            p("ext.cnf"),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
            .arg("-in")
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext.cnf"))
            .arg("-out")
            .arg(p("server.pem")));
        TestCa { ca: p("ca.pem"), cert: p("server.pem"), key: p("server.key") }
    }
}

/// `debugfs -R 'cat <path>'` of an ext4 file: the file's content, or `None`
/// when it does not exist there.
pub fn ext4_cat(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs").arg("-R").arg(format!("stat {path}")).arg(image).output().unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("File not found") {
        return None;
    }
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(image).output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every file under `dir` (recursively), relative.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}
