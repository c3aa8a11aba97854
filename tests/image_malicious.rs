//! Malicious layers through a real registry: images whose layer tars are
//! crafted byte by byte (names the `tar` crate's builder would refuse to
//! write), added verbatim with `umoci raw add-layer`, pushed with `skopeo`
//! to Debian's `docker-registry` on 127.0.0.1 and pulled with
//! `metald::image::Images::prepare`. Each one — a `../` path, an absolute
//! path, a symbolic link then a write through it (in one layer and across
//! layers), hard links out of the root, a decompression bomb — must be
//! refused with `InvalidArgument`/`ResourceExhausted` naming the entry,
//! create nothing outside the cache directory (the targets it aims at are
//! checked), and leave nothing in the cache (no work directory, base,
//! `tops/` or `refs/` record). Skipped (with a message) when the tools are
//! missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::image::{ImageError, ImageSettings, Images};
use metald::model::Code;
use support::registry::{ImageBuilder, Registry, files_under};
use tar::EntryType;

macro_rules! require_tools {
    () => {
        support::registry::require_image_tools(&[])
    };
}

/// One crafted tar entry: name and link name written verbatim into the
/// header (no path checks), `size` bytes of zeros (or `data`) as content.
struct Raw<'a> {
    name: &'a str,
    kind: EntryType,
    link: &'a str,
    data: &'a [u8],
    size: u64,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw { name, kind: EntryType::Regular, link: "", data, size: data.len() as u64 }
}

fn symlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw { name, kind: EntryType::Symlink, link: target, data: b"", size: 0 }
}

fn hardlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw { name, kind: EntryType::Link, link: target, data: b"", size: 0 }
}

/// Writes the entries as an uncompressed tar at `path`.
fn write_tar(path: &Path, entries: &[Raw<'_>]) {
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path).unwrap()));
    for e in entries {
        let mut h = tar::Header::new_old();
        h.set_entry_type(e.kind);
        h.set_size(e.size);
        h.set_mode(match e.kind {
            EntryType::Symlink => 0o777,
            EntryType::Directory => 0o755,
            _ => 0o644,
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        assert!(e.name.len() < 100 && e.link.len() < 100, "fits an old header: {} {}", e.name, e.link);
        h.as_old_mut().name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        h.set_cksum();
        if e.size == e.data.len() as u64 {
            b.append(&h, e.data).unwrap();
        } else {
            b.append(&h, std::io::Read::take(std::io::repeat(0), e.size)).unwrap();
        }
    }
    b.into_inner().unwrap();
}

/// A test's world: a registry, a cache, and `outside/` (beside the cache,
/// inside the test's temporary directory) holding `secret`, the targets the
/// layers aim at.
struct World {
    dir: tempfile::TempDir,
    reg: Registry,
    cache: PathBuf,
    images: Images,
}

impl World {
    fn new(max_unpacked: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "secret\n").unwrap();
        let reg = Registry::start(None);
        let cache = dir.path().join("cache");
        let mut s = ImageSettings::new(&cache);
        s.insecure_registries = vec![reg.host.clone()];
        s.retries = 0;
        s.gc_age = Duration::from_secs(60);
        s.limits.max_bytes = max_unpacked;
        let images = Images::open(s).unwrap();
        World { dir, reg, cache, images }
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    /// `outside/` as an absolute path string.
    fn abs_outside(&self) -> String {
        self.outside().to_str().unwrap().to_owned()
    }

    /// Builds `tag` with one harmless layer and then one crafted layer per
    /// element of `layers`, pushes it as `evil/<tag>:<tag>`; the reference.
    fn push(&self, tag: &str, layers: &[Vec<Raw<'_>>]) -> String {
        let build = self.dir.path().join(format!("build-{tag}"));
        std::fs::create_dir(&build).unwrap();
        let img = ImageBuilder::new(&build, tag);
        img.layer(|root| std::fs::write(root.join("harmless"), "ok\n").unwrap());
        for (i, entries) in layers.iter().enumerate() {
            let tar = build.join(format!("layer-{i}.tar"));
            write_tar(&tar, entries);
            img.raw_layer(&tar);
            std::fs::remove_file(&tar).unwrap();
        }
        img.config(&["--config.cmd=/harmless"]);
        self.reg.push(&img.layout, tag, &format!("evil/{tag}"));
        std::fs::remove_dir_all(&build).unwrap();
        format!("{}/evil/{tag}:{tag}", self.reg.host)
    }

    /// `prepare` must fail with `code`, naming `entry`; then nothing is left
    /// in the cache and `outside/` holds only its untouched `secret`.
    async fn assert_refused(&self, reference: &str, code: Code, entry: &str) -> String {
        let err = self.images.prepare("cust-evil", reference, None).await.expect_err("a malicious image was accepted");
        let msg = metald::util::chain(&err);
        assert_eq!(err.code(), code, "{msg}");
        let named = match unshared(&err) {
            ImageError::Unsafe { entry, .. } | ImageError::TooLarge { entry, .. } => entry.clone(),
            other => panic!("expected a refused entry, got {other:?}"),
        };
        assert_eq!(named, entry, "{msg}");
        assert!(msg.contains(&format!("{entry:?}")), "the message names the entry: {msg}");
        self.assert_nothing_left();
        msg
    }

    fn assert_nothing_left(&self) {
        for sub in ["work", "bases", "tops", "refs"] {
            let left = files_under(&self.cache.join(sub));
            assert!(left.is_empty(), "{sub}/ is not empty: {left:?}");
        }
        let mut around: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        around.sort();
        assert_eq!(around, ["cache", "outside"], "nothing new beside the cache");
        assert_eq!(files_under(&self.outside()), [PathBuf::from("secret")], "nothing new in outside/");
        let secret = self.outside().join("secret");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret\n");
        assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1, "no hard link to the secret");
    }
}

fn unshared(e: &ImageError) -> &ImageError {
    match e {
        ImageError::Shared(inner) => unshared(inner),
        other => other,
    }
}

/// From the staging tree (`cache/work/pull-*/rootfs`) up to the test's
/// temporary directory.
const UP: &str = "../../../..";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_paths_are_refused_and_write_nothing_outside() {
    require_tools!();
    let w = World::new(1 << 30);
    let evil = format!("{UP}/outside/dotdot");
    let r = w.push("dotdot", &[vec![file("ok-first", b"fine\n"), file(&evil, b"pwned\n")]]);
    w.assert_refused(&r, Code::InvalidArgument, &evil).await;
    // Hidden behind a directory that exists.
    let evil = format!("etc/{UP}/../outside/deep");
    let r = w.push("dotdot-deep", &[vec![Raw { kind: EntryType::Directory, ..file("etc/", b"") }, file(&evil, b"x")]]);
    w.assert_refused(&r, Code::InvalidArgument, &evil).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_paths_are_refused_and_write_nothing_outside() {
    require_tools!();
    let w = World::new(1 << 30);
    let evil = format!("{}/absolute", w.abs_outside());
    let r = w.push("absolute", &[vec![file(&evil, b"pwned\n")]]);
    w.assert_refused(&r, Code::InvalidArgument, &evil).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_symbolic_link_are_refused_in_one_layer_and_across_layers() {
    require_tools!();
    let w = World::new(1 << 30);
    let target = w.abs_outside();
    // The link and the write in one layer.
    let r = w.push("symlink-one", &[vec![symlink("x", &target), file("x/pwned", b"pwned\n")]]);
    w.assert_refused(&r, Code::InvalidArgument, "x/pwned").await;
    // The link in one layer, the write in the next (a relative link this time).
    let rel = format!("{UP}/outside");
    let r = w.push("symlink-two", &[vec![symlink("y", &rel)], vec![file("y/pwned", b"pwned\n")]]);
    w.assert_refused(&r, Code::InvalidArgument, "y/pwned").await;
    // Replacing the target's existing file through the link.
    let r = w.push("symlink-over", &[vec![symlink("z", &target)], vec![file("z/secret", b"pwned\n")]]);
    w.assert_refused(&r, Code::InvalidArgument, "z/secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_links_out_of_the_root_are_refused() {
    require_tools!();
    let w = World::new(1 << 30);
    let abs = format!("{}/secret", w.abs_outside());
    let r = w.push("hardlink-abs", &[vec![hardlink("h", &abs)]]);
    w.assert_refused(&r, Code::InvalidArgument, "h").await;
    let rel = format!("{UP}/outside/secret");
    let r = w.push("hardlink-rel", &[vec![hardlink("h", &rel)]]);
    w.assert_refused(&r, Code::InvalidArgument, "h").await;
    // Through a symbolic link of a lower layer.
    let r = w.push("hardlink-via", &[vec![symlink("s", &w.abs_outside())], vec![hardlink("h", "s/secret")]]);
    w.assert_refused(&r, Code::InvalidArgument, "h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_hits_the_unpacked_limit() {
    require_tools!();
    const LIMIT: u64 = 4 << 20;
    let w = World::new(LIMIT);
    // 64 MiB of zeros: umoci gzips the layer to a few dozen KiB.
    let bomb = Raw { size: 64 << 20, ..file("zeros", b"") };
    let r = w.push("bomb", &[vec![bomb]]);
    let msg = w.assert_refused(&r, Code::ResourceExhausted, "zeros").await;
    assert!(msg.contains(&LIMIT.to_string()), "the message names the limit: {msg}");
    // The layer really was small: it is what the registry sent.
    let blob_bytes: u64 = files_under(&w.reg_blobs()).iter().map(|f| file_len(&w.reg_blobs().join(f))).sum();
    assert!(blob_bytes < LIMIT, "the pushed image is small: {blob_bytes} bytes");
}

impl World {
    /// The registry's blob storage.
    fn reg_blobs(&self) -> PathBuf {
        self.reg.data_dir().join("docker/registry/v2/blobs")
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0)
}
