//! HTTPS registries trusted through the operator's CA bundle
//! (`UNKEY_METALD_IMAGE_CA_FILE`): Debian's `docker-registry` on 127.0.0.1
//! serving TLS with a certificate from a throw-away CA made with `openssl`,
//! pulled with `metald::image::Images` (the registry is NOT in the insecure
//! list). With the CA file the pull works, also behind htpasswd basic auth;
//! without it, or with another CA, it fails with `FailedPrecondition` and a
//! message naming the variable to set (a certificate for another name:
//! the same code, saying so); a plain-HTTP registry not marked
//! insecure is `FailedPrecondition` naming the insecure list; a CA file
//! without certificates is refused when the cache is opened. Skipped (with
//! a message) when the tools are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use metald::image::{Credentials, ImageSettings, Images};
use metald::model::Code;
use support::registry::{ImageBuilder, Registry, TestCa, ext4_cat, files_under};

macro_rules! require_tools {
    () => {
        support::registry::require_image_tools(&["openssl"])
    };
}

fn settings(cache: &Path, ca: Option<&Path>, insecure: &[&str]) -> ImageSettings {
    let mut s = ImageSettings::new(cache);
    s.ca_file = ca.map(Path::to_path_buf);
    s.insecure_registries = insecure.iter().map(|h| h.to_string()).collect();
    s.retries = 0;
    s.gc_age = Duration::from_secs(60);
    s
}

fn push_image(dir: &Path, reg: &Registry, repo: &str) {
    let img = ImageBuilder::new(dir, "v1");
    img.layer(|root| std::fs::write(root.join("hello"), "over tls\n").unwrap());
    img.config(&["--config.cmd=/hello"]);
    reg.push(&img.layout, "v1", repo);
}

/// Nothing left in the cache after a failure.
fn assert_clean(cache: &Path) {
    for sub in ["work", "bases", "tops", "refs"] {
        let left = files_under(&cache.join(sub));
        assert!(left.is_empty(), "{sub}/ is not empty: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_registry_is_trusted_through_the_ca_file_and_only_through_it() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"));
    let reg = Registry::start_with(None, Some((&ca.cert, &ca.key)));
    push_image(dir.path(), &reg, "t/app");
    let reference = format!("{}/t/app:v1", reg.host);

    // No CA file: the certificate is not trusted; the message says what to set.
    let cache = dir.path().join("cache-none");
    let images = Images::open(settings(&cache, None, &[])).unwrap();
    let err = images.prepare("c", &reference, None).await.expect_err("an untrusted certificate");
    let msg = metald::util::chain(&err);
    assert_eq!(err.code(), Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("UNKEY_METALD_IMAGE_CA_FILE"), "{msg}");
    eprintln!("untrusted: {msg}");
    assert!(!msg.contains("https://"), "no URL in messages: {msg}");
    assert_clean(&cache);

    // Another CA: not trusted either.
    let other = TestCa::new(&dir.path().join("pki-other"));
    let cache = dir.path().join("cache-other");
    let images = Images::open(settings(&cache, Some(&other.ca), &[])).unwrap();
    let err = images.prepare("c", &reference, None).await.expect_err("a certificate of another CA");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", metald::util::chain(&err));
    assert_clean(&cache);

    // The right CA (in a bundle after another one): pulled over HTTPS.
    let bundle = dir.path().join("bundle.pem");
    let mut pem = std::fs::read(&other.ca).unwrap();
    pem.extend(std::fs::read(&ca.ca).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, Some(&bundle), &[])).unwrap();
    let p = images.prepare("c", &reference, None).await.unwrap();
    assert_eq!(ext4_cat(&p.base, "/hello").as_deref(), Some("over tls\n"));
    let reqs = reg.metald_requests();
    assert!(reqs.iter().any(|(m, p, s)| m == "GET" && p.contains("/blobs/") && *s < 300), "{reqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_with_its_reason() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::for_name(&dir.path().join("pki"), "DNS:registry.example.internal");
    let reg = Registry::start_with(None, Some((&ca.cert, &ca.key)));
    push_image(dir.path(), &reg, "t/app");
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, Some(&ca.ca), &[])).unwrap();
    let err = images.prepare("c", &format!("{}/t/app:v1", reg.host), None).await.expect_err("wrong name");
    let msg = metald::util::chain(&err);
    assert_eq!(err.code(), Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("not valid for its host name"), "{msg}");
    assert_clean(&cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_over_https() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"));
    let reg = Registry::start_with(Some(("tls-user", "tls-pw-8812")), Some((&ca.cert, &ca.key)));
    push_image(dir.path(), &reg, "private/app");
    let reference = format!("{}/private/app:v1", reg.host);
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, Some(&ca.ca), &[])).unwrap();

    let err = images.prepare("c", &reference, None).await.expect_err("no credentials");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", metald::util::chain(&err));
    let err = images.prepare("c", &reference, Some(Credentials::new("tls-user", "nope"))).await.expect_err("bad pw");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", metald::util::chain(&err));
    assert!(!metald::util::chain(&err).contains("nope"));
    assert_clean(&cache);
    let p = images.prepare("c", &reference, Some(Credentials::new("tls-user", "tls-pw-8812"))).await.unwrap();
    assert_eq!(ext4_cat(&p.base, "/hello").as_deref(), Some("over tls\n"));
    // Another customer without credentials: refused although cached.
    let err = images.prepare("d", &reference, None).await.expect_err("another customer, no credentials");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_registry_not_marked_insecure_and_a_bad_ca_file_are_configuration_errors() {
    require_tools!();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    push_image(dir.path(), &reg, "t/app");
    let cache = dir.path().join("cache");
    let images = Images::open(settings(&cache, None, &[])).unwrap();
    let err = images.prepare("c", &format!("{}/t/app:v1", reg.host), None).await.expect_err("HTTPS to plain HTTP");
    let msg = metald::util::chain(&err);
    assert_eq!(err.code(), Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("UNKEY_METALD_IMAGE_INSECURE_REGISTRIES"), "{msg}");
    eprintln!("plain HTTP: {msg}");
    assert_clean(&cache);

    for (name, content) in [("empty.pem", &b""[..]), ("garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64!\n")] {
        let f = dir.path().join(name);
        std::fs::write(&f, content).unwrap();
        let err = Images::open(settings(&dir.path().join("cache2"), Some(&f), &[])).expect_err(name);
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {}", metald::util::chain(&err));
        assert!(metald::util::chain(&err).contains(name), "names the file: {}", metald::util::chain(&err));
    }
    let err = Images::open(settings(&dir.path().join("cache3"), Some(&dir.path().join("missing.pem")), &[]))
        .expect_err("a missing CA file");
    assert_eq!(err.code(), Code::FailedPrecondition);
}
