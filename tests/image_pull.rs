//! Image pull and cache (`metald::image::Images`) against a real registry:
//! Debian's `docker-registry` on 127.0.0.1 (one with htpasswd auth), images
//! built offline with `umoci` and pushed with `skopeo`, bases checked with
//! `debugfs`. Requests are counted from the registry's access log; a small
//! TCP proxy slows or cuts transfers where a test needs a pull to be under
//! way or broken. Skipped (with a message) when the tools are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use metald::image::{Credentials, ImageError, ImageSettings, Images};
use metald::model::Code;
use support::registry::{ImageBuilder, Registry, ext4_cat, files_under, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

macro_rules! require_tools {
    () => {
        support::registry::require_image_tools(&[])
    };
}

fn settings(cache: &Path, insecure: &[&str]) -> ImageSettings {
    let mut s = ImageSettings::new(cache);
    s.insecure_registries = insecure.iter().map(|h| h.to_string()).collect();
    s.retries = 2;
    s.gc_age = Duration::from_secs(60);
    s
}

/// Two layers and a hand-made third: files, a whiteout and an opaque directory.
fn app_image(dir: &Path, tag: &str) -> ImageBuilder {
    let img = ImageBuilder::new(dir, tag);
    img.layer(|root| {
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("opaque/sub")).unwrap();
        std::fs::write(root.join("app/hello"), "hello\n").unwrap();
        std::fs::write(root.join("data/old.txt"), "old\n").unwrap();
        std::fs::write(root.join("data/keep.txt"), "keep\n").unwrap();
        std::fs::write(root.join("opaque/lower.txt"), "lower\n").unwrap();
        std::fs::write(root.join("opaque/sub/deep.txt"), "deep\n").unwrap();
        std::fs::copy("/bin/busybox", root.join("app/busybox")).unwrap();
    });
    img.layer(|root| std::fs::remove_file(root.join("data/old.txt")).unwrap());
    let tar_path = dir.join(format!("opaque-{tag}.tar"));
    let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    for (name, body) in [("opaque/.wh..wh..opq", ""), ("opaque/new.txt", "new\n")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, body.as_bytes()).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    img.raw_layer(&tar_path);
    img.config(&[
        "--config.entrypoint=/app/busybox",
        "--config.cmd=echo",
        "--config.cmd=hi",
        "--config.env=GREETING=hello",
        "--config.workingdir=/app",
        "--config.user=1000:1000",
    ]);
    img
}

/// The cache holds no pull's leftovers: an empty `work/`, and only
/// complete bases.
fn assert_clean(cache: &Path) {
    let work: Vec<_> = files_under(&cache.join("work"));
    assert!(work.is_empty(), "work/ is not empty: {work:?}");
    for e in std::fs::read_dir(cache.join("bases")).unwrap().flatten() {
        assert!(e.path().join("image.json").exists() && e.path().join("base.ext4").exists(), "{:?}", e.path());
    }
}

fn code(r: Result<metald::image::Prepared, ImageError>) -> (Code, String) {
    let e = r.expect_err("expected an error");
    (e.code(), metald::util::chain(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_an_image_into_a_base_with_its_config_whiteouts_and_opaque_dirs_then_gc() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let img = app_image(dir.path(), "v1");
    reg.push(&img.layout, "v1", "t/app");
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, &[&reg.host])).unwrap();

    let reference = format!("{}/t/app:v1", reg.host);
    let p = images.prepare("cust-a", &reference, None).await.unwrap();
    assert!(p.digest.starts_with("sha256:"), "{p:?}");
    assert_eq!(p.reference, reference);
    assert_eq!(ext4_cat(&p.base, "/app/hello").as_deref(), Some("hello\n"));
    assert_eq!(ext4_cat(&p.base, "/data/keep.txt").as_deref(), Some("keep\n"));
    assert_eq!(ext4_cat(&p.base, "/data/old.txt"), None, "the whiteout hides it");
    assert_eq!(ext4_cat(&p.base, "/opaque/lower.txt"), None, "the opaque directory hides it");
    assert_eq!(ext4_cat(&p.base, "/opaque/sub/deep.txt"), None, "the opaque directory hides it");
    assert_eq!(ext4_cat(&p.base, "/opaque/new.txt").as_deref(), Some("new\n"));
    assert_eq!(ext4_cat(&p.base, "/opaque/.wh..wh..opq"), None);
    assert_eq!(p.config.entrypoint, vec!["/app/busybox"]);
    assert_eq!(p.config.cmd, vec!["echo", "hi"]);
    assert!(p.config.env.contains(&"GREETING=hello".to_owned()), "{:?}", p.config.env);
    assert_eq!((p.config.working_dir.as_str(), p.config.user.as_str()), ("/app", "1000:1000"));
    assert_clean(&cache);

    // Cached: the same base, no blob downloaded again (one HEAD to resolve).
    let blob_gets =
        |r: &Registry| r.metald_requests().iter().filter(|(m, p, _)| m == "GET" && p.contains("/blobs/")).count();
    let before = blob_gets(&reg);
    let again = images.prepare("cust-a", &reference, None).await.unwrap();
    assert_eq!(again, p);
    assert_eq!(blob_gets(&reg), before);
    assert_eq!(images.builds_started(), 1);
    // By digest too (and from a fresh cache object: the disk is the cache).
    let images = Images::open(settings(&cache, &[&reg.host])).unwrap();
    let by_digest = images.prepare("cust-a", &format!("{}/t/app@{}", reg.host, p.digest), None).await.unwrap();
    assert_eq!(by_digest.base, p.base);
    assert_eq!(images.builds_started(), 0);

    // GC: in use or recent bases stay; unused old ones go.
    let in_use: HashSet<String> = [p.digest.clone()].into();
    let later = SystemTime::now() + Duration::from_secs(3600);
    let r = images.gc(&in_use, later);
    assert_eq!((r.removed.len(), r.kept), (0, 1));
    let r = images.gc(&HashSet::new(), SystemTime::now());
    assert_eq!((r.removed.len(), r.kept), (0, 1), "used a moment ago");
    let r = images.gc(&HashSet::new(), later);
    assert_eq!(r.removed, vec![p.digest.clone()]);
    assert!(r.freed_bytes > 0 && !p.base.exists());
    assert_clean(&cache);
    // Gone from the cache: pulled again.
    let p2 = images.prepare("cust-a", &reference, None).await.unwrap();
    assert_eq!((p2.digest, p2.base.exists()), (p.digest, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_images_need_credentials_and_are_never_handed_to_a_customer_without_them() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(Some(("alice", "s3cret-pw")));
    let img = app_image(dir.path(), "v1");
    reg.push(&img.layout, "v1", "private/app");
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, &[&reg.host])).unwrap();
    let reference = format!("{}/private/app:v1", reg.host);

    let (c, msg) = code(images.prepare("cust-a", &reference, None).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    let (c, msg) = code(images.prepare("cust-a", &reference, Some(Credentials::new("alice", "bad-pw-123"))).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    assert!(!msg.contains("bad-pw-123") && !msg.contains("alice"), "{msg}");
    let p = images.prepare("cust-a", &reference, Some(Credentials::new("alice", "s3cret-pw"))).await.unwrap();
    assert!(p.base.exists());

    // Another customer, no credentials: the registry says no, cached or not.
    let (c, msg) = code(images.prepare("cust-b", &reference, None).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    let (c, msg) = code(images.prepare("cust-b", &format!("{}/private/app@{}", reg.host, p.digest), None).await);
    assert_eq!(c, Code::PermissionDenied, "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");
    // No record file names a customer or a reference.
    for f in files_under(&cache.join("refs")) {
        let f = f.to_string_lossy().into_owned();
        assert!(!f.contains("cust") && !f.contains("private"), "{f}");
    }

    // The host's credentials file (Docker config.json) works as well.
    let auth = base64_encode(b"alice:s3cret-pw");
    let creds_file = dir.path().join("config.json");
    std::fs::write(&creds_file, format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host)).unwrap();
    let mut s = settings(&cache, &[&reg.host]);
    s.credentials_file = Some(creds_file);
    let images = Images::open(s).unwrap();
    let p3 = images.prepare("cust-c", &reference, None).await.unwrap();
    assert_eq!(p3.base, p.base);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_prepares_of_an_uncached_image_pull_it_once() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let img = app_image(dir.path(), "v1");
    reg.push(&img.layout, "v1", "t/app");
    let cache = dir.path().join("cache");
    let images = Arc::new(Images::open(settings(&cache, &[&reg.host])).unwrap());
    let reference = format!("{}/t/app:v1", reg.host);
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (images, reference) = (Arc::clone(&images), reference.clone());
            tokio::spawn(async move { images.prepare(&format!("cust-{}", i % 3), &reference, None).await })
        })
        .collect();
    let mut bases = HashSet::new();
    for t in tasks {
        bases.insert(t.await.unwrap().unwrap().base);
    }
    assert_eq!(bases.len(), 1);
    assert_eq!(images.builds_started(), 1);
    assert_eq!(std::fs::read_dir(cache.join("bases")).unwrap().count(), 1);
    let reqs = reg.metald_requests();
    let manifest_gets = reqs.iter().filter(|(m, p, _)| m == "GET" && p.contains("/manifests/")).count();
    assert_eq!(manifest_gets, 1, "{reqs:?}");
    let mut blob_gets: Vec<&String> =
        reqs.iter().filter(|(m, p, _)| m == "GET" && p.contains("/blobs/")).map(|r| &r.1).collect();
    let n = blob_gets.len();
    blob_gets.dedup();
    assert_eq!(n, blob_gets.len(), "a blob was downloaded twice: {reqs:?}");
    assert_eq!(n, 4, "config + 3 layers: {reqs:?}");
    assert_clean(&cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tags_wrong_digests_and_a_closed_port_fail_with_their_codes_and_leave_nothing() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(None);
    let img = app_image(dir.path(), "v1");
    reg.push(&img.layout, "v1", "t/app");
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, &[&reg.host])).unwrap();

    let (c, msg) = code(images.prepare("c", &format!("{}/t/app:nope", reg.host), None).await);
    assert_eq!(c, Code::NotFound, "{msg}");
    let (c, msg) = code(images.prepare("c", &format!("{}/t/missing:v1", reg.host), None).await);
    assert_eq!(c, Code::NotFound, "{msg}");
    let bogus = format!("{}/t/app@sha256:{}", reg.host, "ab".repeat(32));
    let (c, msg) = code(images.prepare("c", &bogus, None).await);
    assert!(matches!(c, Code::NotFound | Code::InvalidArgument), "{c:?} {msg}");
    let (c, msg) = code(images.prepare("c", "Not A Reference", None).await);
    assert_eq!(c, Code::InvalidArgument, "{msg}");
    reg.kill();
    let (c, msg) = code(images.prepare("c", &format!("{}/t/app:v1", reg.host), None).await);
    assert_eq!(c, Code::Unavailable, "{msg}");
    assert_clean(&cache);
    assert_eq!(files_under(&cache.join("bases")).len(), 0);
    assert_eq!(files_under(&cache.join("refs")).len(), 0);
}

/// A TCP proxy in front of the registry: the registry → client direction
/// goes at about `rate` bytes per 10 ms, and the first connection that has
/// carried more than `cut_after` bytes is cut (once).
struct Proxy {
    host: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(upstream: String, rate: usize, cut_after: u64) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let cut = Arc::new(AtomicU64::new(cut_after));
    let task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            let (upstream, cut) = (upstream.clone(), Arc::clone(&cut));
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; rate];
                let mut sent = 0u64;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                    let limit = cut.load(Ordering::SeqCst);
                    if sent > limit && cut.compare_exchange(limit, u64::MAX, Ordering::SeqCst, Ordering::SeqCst).is_ok()
                    {
                        break; // cut this connection mid-transfer
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                up.abort();
            });
        }
    });
    Proxy { host, task }
}

/// An image with one incompressible layer of `mib` MiB.
fn big_image(dir: &Path, mib: usize) -> ImageBuilder {
    let img = ImageBuilder::new(dir, "big");
    img.layer(|root| {
        let mut data = vec![0u8; mib << 20];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(root.join("big.bin"), data).unwrap();
    });
    img.config(&["--config.cmd=/big.bin"]);
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_download_resumes_from_its_offset() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let img = big_image(dir.path(), 4);
    reg.push(&img.layout, "big", "t/big");
    let px = proxy(reg.host.clone(), 256 << 10, 1 << 20).await;
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, &[&px.host])).unwrap();
    let p = images.prepare("c", &format!("{}/t/big:big", px.host), None).await.unwrap();
    assert!(p.base.exists());
    let reqs = reg.metald_requests();
    let partial = reqs.iter().filter(|(m, p, s)| m == "GET" && p.contains("/blobs/") && *s == 206).count();
    assert!(partial >= 1, "no range request after the cut: {reqs:?}");
    assert_clean(&cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_killed_mid_pull_is_unavailable_and_leaves_nothing() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(None);
    let img = big_image(dir.path(), 16);
    reg.push(&img.layout, "big", "t/big");
    // Slow enough (about 6 MB/s) to be killed in the middle.
    let px = proxy(reg.host.clone(), 64 << 10, u64::MAX).await;
    let cache = dir.path().join("cache");
    let images = Arc::new(Images::open(settings(&cache, &[&px.host])).unwrap());
    let reference = format!("{}/t/big:big", px.host);
    let pull = {
        let images = Arc::clone(&images);
        tokio::spawn(async move { images.prepare("c", &reference, None).await })
    };
    let work = cache.join("work");
    let started = support::eventually("a blob being downloaded", || {
        files_under(&work)
            .iter()
            .any(|f| std::fs::metadata(work.join(f)).is_ok_and(|m| m.is_file() && m.len() > (1 << 20)))
            .then_some(())
    });
    tokio::time::timeout(Duration::from_secs(60), started).await.expect("the download started");
    reg.kill();
    let (c, msg) = code(pull.await.unwrap());
    assert_eq!(c, Code::Unavailable, "{msg}");
    assert_clean(&cache);
    assert_eq!(files_under(&cache.join("bases")).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_arch_index_resolves_to_linux_amd64() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let amd = ImageBuilder::new(dir.path(), "amd");
    amd.layer(|root| std::fs::write(root.join("arch"), "amd64\n").unwrap());
    let arm = ImageBuilder::new(dir.path(), "arm");
    arm.layer(|root| std::fs::write(root.join("arch"), "arm64\n").unwrap());
    arm.config(&["--architecture=arm64"]);
    // The index, by hand: arm64 first, so picking the first entry is wrong.
    let layout = amd.layout.clone();
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let entry = |tag: &str, arch: &str| {
        let mut d = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()
            .clone();
        d.as_object_mut().unwrap().remove("annotations");
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        d
    };
    let multi = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("arm", "arm64"), entry("amd", "amd64")],
    });
    let bytes = serde_json::to_vec(&multi).unwrap();
    let digest = metald::image::digest::of_bytes(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(&digest[7..]), &bytes).unwrap();
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest,
        "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    reg.push(&layout, "multi", "t/multi");

    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, &[&reg.host])).unwrap();
    let p = images.prepare("c", &format!("{}/t/multi:multi", reg.host), None).await.unwrap();
    assert_eq!(ext4_cat(&p.base, "/arch").as_deref(), Some("amd64\n"));
    assert_ne!(p.digest, digest, "the platform manifest's digest, not the index's");
    // The same index from the local layout.
    let local = images.prepare("c", &format!("oci-layout:{}:multi", layout.display()), None).await.unwrap();
    assert_eq!(local.digest, p.digest);
    assert_clean(&cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_oci_layouts_and_docker_archives_are_imported() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let img = app_image(dir.path(), "v1");
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, &[])).unwrap();
    let p = images.prepare("c", &format!("oci-layout:{}:v1", img.layout.display()), None).await.unwrap();
    assert_eq!(ext4_cat(&p.base, "/app/hello").as_deref(), Some("hello\n"));
    assert_eq!(ext4_cat(&p.base, "/data/old.txt"), None);
    assert_eq!(p.config.working_dir, "/app");

    let archive: PathBuf = dir.path().join("app.tar");
    run(std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--insecure-policy"])
        .arg(format!("oci:{}:v1", img.layout.display()))
        .arg(format!("docker-archive:{}:t/app:v1", archive.display())));
    let a = images.prepare("c", &format!("docker-archive:{}", archive.display()), None).await.unwrap();
    assert_eq!(ext4_cat(&a.base, "/app/hello").as_deref(), Some("hello\n"));
    assert_eq!(ext4_cat(&a.base, "/opaque/lower.txt"), None);
    assert_eq!(ext4_cat(&a.base, "/opaque/new.txt").as_deref(), Some("new\n"));
    assert_eq!(a.config.entrypoint, vec!["/app/busybox"]);
    // Again: same digest, same base.
    let again = images.prepare("c", &format!("docker-archive:{}", archive.display()), None).await.unwrap();
    assert_eq!(again.base, a.base);

    // A tampered blob in a layout is refused (digest mismatch), nothing left.
    let manifest_hex = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(img.layout.join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap()[7..].to_owned()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.layout.join("blobs/sha256").join(&manifest_hex)).unwrap()).unwrap();
    let layer = img.layout.join("blobs/sha256").join(&manifest["layers"][2]["digest"].as_str().unwrap()[7..]);
    let mut bytes = std::fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    let fresh = dir.path().join("cache2");
    let images = Images::open(settings(&fresh, &[])).unwrap();
    let (c, msg) = code(images.prepare("c", &format!("oci-layout:{}:v1", img.layout.display()), None).await);
    assert_eq!(c, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("digest mismatch"), "{msg}");
    assert_clean(&fresh);
    assert_eq!(files_under(&fresh.join("bases")).len(), 0);
}
