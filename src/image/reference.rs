//! What `Images::prepare` is asked for: a registry reference
//! (`[registry/]repo[:tag][@sha256:…]`, normalized as Docker does:
//! `alpine` is `docker.io/library/alpine:latest`), a local OCI layout
//! (`oci-layout:<dir>[:<tag>]`) or a `docker save` archive
//! (`docker-archive:<file.tar>`). Local paths must be absolute; confining
//! them to the asset directories is the caller's job.

use std::path::PathBuf;

use oci_client::Reference;

use super::digest::hex_of;
use super::error::ImageError;

/// A parsed image source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image in a registry.
    Registry(Reference),
    /// An OCI image layout directory, and the tag to pick from its index
    /// (`org.opencontainers.image.ref.name`); without one the index must
    /// name a single manifest.
    OciLayout {
        /// The layout's directory.
        dir: PathBuf,
        /// The tag.
        tag: Option<String>,
    },
    /// A `docker save` archive.
    DockerArchive(PathBuf),
}

fn tag_ok(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn local_path(kind: &str, path: &str) -> Result<PathBuf, ImageError> {
    let p = PathBuf::from(path);
    if path.is_empty() || !p.is_absolute() {
        return Err(ImageError::BadReference(format!("{kind}: needs an absolute path")));
    }
    Ok(p)
}

impl Source {
    /// Parses a reference; the message of an error says what is wrong.
    pub fn parse(reference: &str) -> Result<Source, ImageError> {
        let reference = reference.trim();
        if let Some(rest) = reference.strip_prefix("oci-layout:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') => (dir, Some(tag)),
                _ => (rest, None),
            };
            if let Some(tag) = tag.filter(|t| !tag_ok(t)) {
                return Err(ImageError::BadReference(format!("oci-layout: {tag:?} is not a valid tag")));
            }
            return Ok(Source::OciLayout { dir: local_path("oci-layout", dir)?, tag: tag.map(str::to_owned) });
        }
        if let Some(path) = reference.strip_prefix("docker-archive:") {
            return Ok(Source::DockerArchive(local_path("docker-archive", path)?));
        }
        if reference.is_empty()
            || reference.len() > 1024
            || reference.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ImageError::BadReference("expected [registry/]repository[:tag][@sha256:digest]".into()));
        }
        let parsed: Reference = reference.parse().map_err(|e| {
            ImageError::BadReference(format!("expected [registry/]repository[:tag][@sha256:digest] ({e})"))
        })?;
        if !parsed
            .repository()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        {
            return Err(ImageError::BadReference("a repository name is lower case letters, digits and . _ - /".into()));
        }
        if let Some(d) = parsed.digest() {
            hex_of(d).map_err(|e| ImageError::BadReference(e.to_string()))?;
        }
        Ok(Source::Registry(parsed))
    }

    /// The normalized form (what [`Prepared::reference`](super::Prepared)
    /// says and the tenancy records are keyed by).
    pub fn normalized(&self) -> String {
        match self {
            Source::Registry(r) => r.whole(),
            Source::OciLayout { dir, tag: Some(tag) } => format!("oci-layout:{}:{tag}", dir.display()),
            Source::OciLayout { dir, tag: None } => format!("oci-layout:{}", dir.display()),
            Source::DockerArchive(path) => format!("docker-archive:{}", path.display()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn registry_references_are_normalized() {
        let n = |s: &str| Source::parse(s).unwrap().normalized();
        assert_eq!(n("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(n("127.0.0.1:5000/app/web:v1"), "127.0.0.1:5000/app/web:v1");
        assert_eq!(n(&format!("127.0.0.1:5000/web@{D}")), format!("127.0.0.1:5000/web@{D}"));
        let Source::Registry(r) = Source::parse(&format!("localhost:5000/web:v2@{D}")).unwrap() else { panic!() };
        assert_eq!((r.registry(), r.repository(), r.tag(), r.digest()), ("localhost:5000", "web", Some("v2"), Some(D)));
    }

    #[test]
    fn bad_references_are_invalid_arguments() {
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "repo@sha256:abc",
            "repo@md5:00",
            "repo:",
            "oci-layout:rel/dir",
            "oci-layout:/d:bad tag",
            "docker-archive:x.tar",
        ] {
            let e = Source::parse(bad).unwrap_err();
            assert_eq!(e.code(), crate::model::Code::InvalidArgument, "{bad}: {e}");
        }
    }

    #[test]
    fn local_sources() {
        assert_eq!(
            Source::parse("oci-layout:/srv/assets/app:v1").unwrap(),
            Source::OciLayout { dir: "/srv/assets/app".into(), tag: Some("v1".into()) }
        );
        assert_eq!(Source::parse("oci-layout:/srv/a").unwrap(), Source::OciLayout { dir: "/srv/a".into(), tag: None });
        assert_eq!(Source::parse("docker-archive:/srv/a.tar").unwrap(), Source::DockerArchive("/srv/a.tar".into()));
        assert_eq!(Source::parse("oci-layout:/srv/a:v1").unwrap().normalized(), "oci-layout:/srv/a:v1");
    }
}
