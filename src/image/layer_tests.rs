//! Unit tests of [`super::Unpacker`]: archives built here with
//! `tar::Builder` (raw header bytes for names the builder refuses); every
//! malicious case is refused and leaves a sentinel directory beside the
//! destination unchanged.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Owned(&'a str, &'a [u8], u32, u64, u64),
    Dir(&'a str, u32),
    Symlink(&'a str, &'a str),
    Link(&'a str, &'a str),
    /// Raw name and link name bytes, for what the builder refuses.
    Raw(&'a [u8], EntryType, &'a [u8]),
}

fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match *e {
            E::File(p, data, mode) => {
                let mut h = header(EntryType::Regular, data.len() as u64, mode);
                b.append_data(&mut h, p, data).unwrap();
            }
            E::Owned(p, data, mode, uid, gid) => {
                let mut h = header(EntryType::Regular, data.len() as u64, mode);
                h.set_uid(uid);
                h.set_gid(gid);
                b.append_data(&mut h, p, data).unwrap();
            }
            E::Dir(p, mode) => {
                let mut h = header(EntryType::Directory, 0, mode);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            E::Symlink(p, target) => {
                let mut h = header(EntryType::Symlink, 0, 0o777);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Link(p, target) => {
                let mut h = header(EntryType::Link, 0, 0o644);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Raw(name, kind, link) => {
                let data: &[u8] = if kind == EntryType::Regular { b"evil" } else { b"" };
                let mut h = header(kind, data.len() as u64, 0o644);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
                h.set_cksum();
                b.append(&h, data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// `base/root` (the destination) and `base/sentinel/keep`.
struct Fixture {
    _base: tempfile::TempDir,
    root: PathBuf,
    sentinel: PathBuf,
}

fn fixture() -> Fixture {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let sentinel = base.path().join("sentinel");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&sentinel).unwrap();
    fs::write(sentinel.join("keep"), b"keep").unwrap();
    fs::set_permissions(sentinel.join("keep"), fs::Permissions::from_mode(0o644)).unwrap();
    Fixture { _base: base, root, sentinel }
}

impl Fixture {
    fn unpacker(&self) -> Unpacker {
        Unpacker::new(&self.root, Limits::default()).unwrap().preserve_owners(is_root())
    }

    fn abs_sentinel(&self) -> String {
        self.sentinel.to_str().unwrap().to_string()
    }

    /// The sentinel holds exactly `keep` ("keep", 0644), as created.
    fn assert_sentinel_unchanged(&self) {
        let names: Vec<_> = fs::read_dir(&self.sentinel).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keep")]);
        let keep = self.sentinel.join("keep");
        assert_eq!(fs::read(&keep).unwrap(), b"keep");
        let md = fs::symlink_metadata(&keep).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o644);
        assert_eq!(md.nlink(), 1, "no hard link to the sentinel was made");
        let parent = self.sentinel.parent().unwrap();
        let mut around: Vec<_> = fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name()).collect();
        around.sort();
        assert_eq!(around, vec![std::ffi::OsString::from("root"), "sentinel".into()], "nothing new beside the root");
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn apply(u: &mut Unpacker, entries: &[E<'_>]) -> Result<LayerStats, ImageError> {
    u.apply(&tar_of(entries)[..], Compression::None)
}

/// Applies the layers; the last one must be refused naming `entry`.
fn assert_refused(f: &Fixture, layers: &[Vec<E<'_>>], entry: &str) {
    let mut u = f.unpacker();
    let (last, lower) = layers.split_last().unwrap();
    for l in lower {
        apply(&mut u, l).unwrap();
    }
    match apply(&mut u, last) {
        Err(ImageError::Unsafe { entry: e, .. }) => assert_eq!(e, entry),
        other => panic!("expected {entry} refused, got {other:?}"),
    }
    f.assert_sentinel_unchanged();
}

#[test]
fn media_types() {
    assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(), Compression::Zstd);
    assert_eq!(
        Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
        Compression::Gzip
    );
    assert!(matches!(
        Compression::from_media_type("application/vnd.oci.image.config.v1+json"),
        Err(ImageError::UnsupportedMediaType(_))
    ));
}

#[test]
fn files_dirs_links_modes_owners_and_times() {
    let f = fixture();
    let mut u = f.unpacker();
    apply(
        &mut u,
        &[
            E::Dir("usr/", 0o755),
            E::Dir("usr/bin/", 0o711),
            E::File("usr/bin/tool", b"#!/bin/sh\n", 0o4755),
            E::Owned("home/app/data", b"x", 0o640, 1000, 1001),
            E::Symlink("bin", "usr/bin"),
            E::Symlink("etc/abs", "/etc/passwd"),
            E::Link("usr/bin/tool2", "usr/bin/tool"),
            E::Dir("tmp/", 0o1777),
        ],
    )
    .unwrap();
    let r = &f.root;
    let tool = fs::symlink_metadata(r.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(tool.mtime(), 1_600_000_000);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(fs::symlink_metadata(r.join("usr/bin/tool2")).unwrap().ino(), tool.ino());
    let usr_bin = fs::symlink_metadata(r.join("usr/bin")).unwrap();
    assert_eq!(usr_bin.mode() & 0o7777, 0o711);
    assert_eq!(usr_bin.mtime(), 1_600_000_000, "directory times set after their contents");
    assert_eq!(fs::symlink_metadata(r.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(fs::read_link(r.join("bin")).unwrap(), Path::new("usr/bin"));
    assert_eq!(fs::read_link(r.join("etc/abs")).unwrap(), Path::new("/etc/passwd"));
    assert_eq!(fs::symlink_metadata(r.join("etc")).unwrap().mode() & 0o7777, 0o755, "implicit parent");
    let data = fs::symlink_metadata(r.join("home/app/data")).unwrap();
    assert_eq!(data.mode() & 0o7777, 0o640);
    if is_root() {
        assert_eq!((data.uid(), data.gid()), (1000, 1001));
    }
    f.assert_sentinel_unchanged();
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_files() {
    let f = fixture();
    let mut u = f.unpacker();
    apply(
        &mut u,
        &[
            E::File("a/gone", b"1", 0o644),
            E::File("a/stays", b"1", 0o644),
            E::File("d/sub/lower", b"1", 0o644),
            E::File("d/lower", b"1", 0o644),
            E::File("o/lower", b"1", 0o644),
            E::File("o/sub/lower", b"1", 0o644),
            E::Symlink("s", "../sentinel"),
        ],
    )
    .unwrap();
    apply(
        &mut u,
        &[
            E::File("a/.wh.gone", b"", 0o644),
            E::File(".wh.d", b"", 0o644),
            E::File(".wh.s", b"", 0o644),
            E::File(".wh.never-existed", b"", 0o644),
            // Written before the opaque marker in the same layer: kept.
            E::File("o/new", b"2", 0o644),
            E::File("o/.wh..wh..opq", b"", 0o644),
            // Written after it, in a lower directory kept for it.
            E::File("o/sub/new", b"3", 0o644),
        ],
    )
    .unwrap();
    let r = &f.root;
    assert!(!r.join("a/gone").exists());
    assert!(r.join("a/stays").exists());
    assert!(fs::symlink_metadata(r.join("d")).is_err(), "a whited-out directory goes with its contents");
    assert!(fs::symlink_metadata(r.join("s")).is_err(), "the link, not its target");
    assert!(!r.join("o/lower").exists(), "opaque hides lower entries");
    assert_eq!(fs::read(r.join("o/new")).unwrap(), b"2");
    assert!(!r.join("o/sub/lower").exists(), "a lower subdirectory's entries are gone too");
    assert_eq!(fs::read(r.join("o/sub/new")).unwrap(), b"3");
    assert!(!r.join("a/.wh.gone").exists() && !r.join("o/.wh..wh..opq").exists(), "markers are not files");
    f.assert_sentinel_unchanged();
}

#[test]
fn a_later_entry_replaces_a_link_instead_of_writing_through_it() {
    let f = fixture();
    let mut u = f.unpacker();
    let keep = format!("{}/keep", f.abs_sentinel());
    apply(&mut u, &[E::Symlink("f", &keep), E::Symlink("d", &f.abs_sentinel())]).unwrap();
    apply(&mut u, &[E::File("f", b"new", 0o644), E::Dir("d/", 0o755)]).unwrap();
    assert_eq!(fs::read(f.root.join("f")).unwrap(), b"new");
    assert!(fs::symlink_metadata(f.root.join("d")).unwrap().is_dir());
    f.assert_sentinel_unchanged();
}

#[test]
fn zstd_and_gzip_layers() {
    let f = fixture();
    let mut u = f.unpacker();
    let plain = tar_of(&[E::File("z", b"zstd", 0o644)]);
    u.apply(&zstd::encode_all(&plain[..], 3).unwrap()[..], Compression::Zstd).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_of(&[E::File("g", b"gzip", 0o644)])).unwrap();
    u.apply(&gz.finish().unwrap()[..], Compression::Gzip).unwrap();
    assert_eq!(fs::read(f.root.join("z")).unwrap(), b"zstd");
    assert_eq!(fs::read(f.root.join("g")).unwrap(), b"gzip");
    assert!(matches!(u.apply(&b"not gzip"[..], Compression::Gzip), Err(ImageError::Malformed { layer: 2, .. })));
}

#[test]
fn parent_and_absolute_paths_are_refused() {
    let f = fixture();
    assert_refused(&f, &[vec![E::Raw(b"../sentinel/evil", EntryType::Regular, b"")]], "../sentinel/evil");
    assert_refused(&f, &[vec![E::Raw(b"a/../../sentinel/evil", EntryType::Regular, b"")]], "a/../../sentinel/evil");
    let abs = format!("{}/evil", f.abs_sentinel());
    assert_refused(&f, &[vec![E::Raw(abs.as_bytes(), EntryType::Regular, b"")]], &abs);
    assert_refused(&f, &[vec![E::Raw(b"../sentinel", EntryType::Directory, b"")]], "../sentinel");
    assert_refused(&f, &[vec![E::Raw(b"../sentinel/.wh.keep", EntryType::Regular, b"")]], "../sentinel/.wh.keep");
}

#[test]
fn writes_through_a_link_of_the_same_layer_are_refused() {
    let f = fixture();
    assert_refused(&f, &[vec![E::Symlink("a", "../sentinel"), E::File("a/evil", b"x", 0o644)]], "a/evil");
    assert_refused(&f, &[vec![E::Symlink("b", "../sentinel"), E::File("b/keep", b"x", 0o644)]], "b/keep");
    assert_refused(&f, &[vec![E::Symlink("c", "../sentinel"), E::File("c/.wh.keep", b"", 0o644)]], "c/.wh.keep");
    assert_refused(
        &f,
        &[vec![E::Symlink("o", "../sentinel"), E::File("o/.wh..wh..opq", b"", 0o644)]],
        "o/.wh..wh..opq",
    );
}

#[test]
fn writes_through_a_link_of_a_lower_layer_are_refused() {
    let f = fixture();
    let abs = f.abs_sentinel();
    assert_refused(&f, &[vec![E::Symlink("a", &abs)], vec![E::File("a/evil", b"x", 0o644)]], "a/evil");
    assert_refused(&f, &[vec![E::Symlink("up", "../..")], vec![E::File("up/evil", b"x", 0o644)]], "up/evil");
    let escape = "etc2/../../sentinel";
    assert_refused(
        &f,
        &[vec![E::Dir("etc2/", 0o755), E::Symlink("rel", escape)], vec![E::Dir("rel/x/", 0o755)]],
        "rel/x/",
    );
    assert_refused(&f, &[vec![E::Symlink("s", &abs)], vec![E::Link("h", "s/keep")]], "h");
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    let f = fixture();
    assert_refused(&f, &[vec![E::Raw(b"h1", EntryType::Link, b"../sentinel/keep")]], "h1");
    let abs = format!("{}/keep", f.abs_sentinel());
    assert_refused(&f, &[vec![E::Raw(b"h2", EntryType::Link, abs.as_bytes())]], "h2");
}

#[test]
fn a_hard_link_to_a_symbolic_link_names_the_link_not_its_target() {
    let f = fixture();
    let mut u = f.unpacker();
    let keep = format!("{}/keep", f.abs_sentinel());
    apply(&mut u, &[E::Symlink("s", &keep)]).unwrap();
    apply(&mut u, &[E::Link("h", "s")]).unwrap();
    assert_eq!(fs::read_link(f.root.join("h")).unwrap(), Path::new(&keep));
    f.assert_sentinel_unchanged();
}

#[test]
fn a_decompression_bomb_hits_the_byte_limit() {
    let f = fixture();
    const SIZE: u64 = 256 << 20;
    // 256 MiB of zeros in one tar entry, gzipped as a header member plus the
    // same compressed MiB of zeros 256 times (a multi-member gzip stream,
    // cheap to build in a debug test; `MultiGzDecoder` reads it as one).
    let gzip = |data: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    let mut h = header(EntryType::Regular, SIZE, 0o644);
    h.set_path("zeros").unwrap();
    h.set_cksum();
    let mut blob = gzip(h.as_bytes());
    let mib = gzip(&vec![0; 1 << 20]);
    for _ in 0..SIZE >> 20 {
        blob.extend_from_slice(&mib);
    }
    blob.extend_from_slice(&gzip(&[0; 1024]));
    assert!(blob.len() < 1 << 20, "a small blob: {}", blob.len());
    let limits = Limits { max_bytes: 16 << 20, max_entries: 100 };
    let mut u = Unpacker::new(&f.root, limits).unwrap().preserve_owners(false);
    match u.apply(&blob[..], Compression::Gzip) {
        Err(ImageError::TooLarge { what: "bytes", limit, entry, .. }) => {
            assert_eq!((limit, entry.as_str()), (16 << 20, "zeros"))
        }
        other => panic!("expected the byte limit, got {other:?}"),
    }
    let written = fs::metadata(f.root.join("zeros")).map(|m| m.len()).unwrap_or(0);
    assert!(written <= 16 << 20, "stopped at the limit: {written}");
    f.assert_sentinel_unchanged();
}

#[test]
fn the_entry_limit_counts_over_all_layers() {
    let f = fixture();
    let limits = Limits { max_bytes: 1 << 20, max_entries: 3 };
    let mut u = Unpacker::new(&f.root, limits).unwrap().preserve_owners(false);
    apply(&mut u, &[E::File("1", b"", 0o644), E::File("2", b"", 0o644)]).unwrap();
    let err = apply(&mut u, &[E::File("3", b"", 0o644), E::File("4", b"", 0o644)]).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { layer: 1, what: "entries", limit: 3, .. }), "{err:?}");
}
