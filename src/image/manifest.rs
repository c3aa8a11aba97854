//! Reading an image's JSON documents with `oci-spec`: manifests and indexes
//! (OCI and Docker schema 2), picking the host's platform (linux/amd64) from
//! an index, the layer list with its compressions and sizes, and
//! [`ImageConfig`], the runtime part of the image config (entrypoint, cmd,
//! env, working directory, user).

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::layer::Compression;

/// Manifest media types asked for from registries.
pub const ACCEPTED: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_TYPES: &[&str] =
    &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// How the image's process runs: the parts of the image config metald-init
/// needs (`docs/IMAGES.md`, "metald/config.json"). Absent fields are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `KEY=value` each.
    pub env: Vec<String>,
    /// `WorkingDir` (empty: `/`).
    pub working_dir: String,
    /// `User` (empty: root).
    pub user: String,
}

/// A manifest or index document.
#[derive(Debug)]
pub enum Document {
    /// A multi-platform index (or Docker manifest list).
    Index(Box<ImageIndex>),
    /// One platform's image manifest.
    Manifest(Box<ImageManifest>),
}

/// A blob to fetch: digest, size, and for layers the compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:…`.
    pub digest: String,
    /// Bytes, from the descriptor.
    pub size: u64,
    /// How a layer is compressed (unused for the config).
    pub compression: Compression,
}

/// Parses a manifest or an index (told apart by `mediaType`, or by which
/// list it has when the type is absent).
pub fn parse(bytes: &[u8]) -> Result<Document, ImageError> {
    let bad = |e: &dyn std::fmt::Display| ImageError::Unsupported(format!("malformed manifest: {e}"));
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(&e))?;
    let media_type = value.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
    let is_index = match media_type {
        OCI_INDEX | "application/vnd.docker.distribution.manifest.list.v2+json" => true,
        OCI_MANIFEST | "application/vnd.docker.distribution.manifest.v2+json" => false,
        "" => value.get("manifests").is_some(),
        other => return Err(ImageError::UnsupportedMediaType(other.to_owned())),
    };
    if value.get("schemaVersion").and_then(|v| v.as_i64()) != Some(2) {
        return Err(ImageError::Unsupported("only schema version 2 manifests are supported".into()));
    }
    if is_index {
        Ok(Document::Index(serde_json::from_value(value).map_err(|e| bad(&e))?))
    } else {
        Ok(Document::Manifest(serde_json::from_value(value).map_err(|e| bad(&e))?))
    }
}

/// The index entry for linux/amd64 (the first one, as Docker does).
pub fn pick_platform(index: &ImageIndex) -> Result<Blob, ImageError> {
    let found = index
        .manifests()
        .iter()
        .find(|d| d.platform().as_ref().is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64));
    let Some(d) = found else {
        let have: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(|d| d.platform().as_ref().map(|p| format!("{}/{}", p.os(), p.architecture())))
            .collect();
        return Err(ImageError::UnsupportedPlatform(format!("the index has {}", have.join(", "))));
    };
    Ok(Blob { digest: d.digest().to_string(), size: d.size(), compression: Compression::None })
}

fn blob(d: &Descriptor, compression: Compression) -> Blob {
    Blob { digest: d.digest().to_string(), size: d.size(), compression }
}

/// The config blob and the layers (lowest first) of a manifest; refuses
/// unknown config and layer media types and layers over `max_bytes` in sum.
pub fn contents(m: &ImageManifest, max_bytes: u64) -> Result<(Blob, Vec<Blob>), ImageError> {
    let config_type = m.config().media_type().to_string();
    if !CONFIG_TYPES.contains(&config_type.as_str()) {
        return Err(ImageError::UnsupportedMediaType(config_type));
    }
    let mut layers = Vec::with_capacity(m.layers().len());
    let mut total = m.config().size();
    for d in m.layers() {
        let compression = Compression::from_media_type(d.media_type().as_ref())?;
        total = total.saturating_add(d.size());
        layers.push(blob(d, compression));
    }
    if total > max_bytes {
        return Err(ImageError::TooBig { size: total, limit: max_bytes });
    }
    Ok((blob(m.config(), Compression::None), layers))
}

/// The runtime config of an image config blob; refuses other platforms
/// than linux/amd64. Also returns the layers' `diff_ids`.
pub fn image_config(bytes: &[u8]) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let c: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| ImageError::Unsupported(format!("malformed image config: {e}")))?;
    if *c.os() != Os::Linux || *c.architecture() != Arch::Amd64 {
        return Err(ImageError::UnsupportedPlatform(format!("the image is {}/{}", c.os(), c.architecture())));
    }
    let mut out = ImageConfig::default();
    if let Some(cfg) = c.config() {
        out.entrypoint = cfg.entrypoint().clone().unwrap_or_default();
        out.cmd = cfg.cmd().clone().unwrap_or_default();
        out.env = cfg.env().clone().unwrap_or_default();
        out.working_dir = cfg.working_dir().clone().unwrap_or_default();
        out.user = cfg.user().clone().unwrap_or_default();
    }
    Ok((out, c.rootfs().diff_ids().clone()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(layer_type: &str, size: u64) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":10}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":{size}}}]}}"#
        )
    }

    #[test]
    fn manifests_give_config_and_layers_within_the_limit() {
        let Document::Manifest(m) =
            parse(manifest("application/vnd.oci.image.layer.v1.tar+gzip", 90).as_bytes()).unwrap()
        else {
            panic!("not a manifest")
        };
        let (config, layers) = contents(&m, 100).unwrap();
        assert_eq!((config.digest.as_str(), config.size), (D1, 10));
        assert_eq!(layers, vec![Blob { digest: D2.into(), size: 90, compression: Compression::Gzip }]);
        assert!(matches!(contents(&m, 99), Err(ImageError::TooBig { size: 100, limit: 99 })));
        let Document::Manifest(m) =
            parse(manifest("application/vnd.oci.image.layer.v1.tar+lz4", 1).as_bytes()).unwrap()
        else {
            panic!("not a manifest")
        };
        assert!(matches!(contents(&m, 100), Err(ImageError::UnsupportedMediaType(_))));
    }

    #[test]
    fn an_index_resolves_to_linux_amd64() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":5,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":7,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Document::Index(i) = parse(index.as_bytes()).unwrap() else { panic!("not an index") };
        assert_eq!(pick_platform(&i).unwrap().digest, D2);
        let arm_only = index.replace("\"amd64\"", "\"riscv64\"");
        let Document::Index(i) = parse(arm_only.as_bytes()).unwrap() else { panic!("not an index") };
        let e = pick_platform(&i).unwrap_err();
        assert!(e.to_string().contains("linux/arm64"), "{e}");
    }

    #[test]
    fn bad_documents_are_refused() {
        assert!(parse(b"{").is_err());
        assert!(matches!(
            parse(br#"{"schemaVersion":2,"mediaType":"text/html"}"#),
            Err(ImageError::UnsupportedMediaType(_))
        ));
        assert!(parse(br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
    }

    #[test]
    fn the_config_gives_the_runtime_fields_and_checks_the_platform() {
        let c = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/app"],"Cmd":["-v"],
            "Env":["A=1"],"WorkingDir":"/srv","User":"app:staff"},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let (cfg, diff_ids) = image_config(c).unwrap();
        assert_eq!(cfg.entrypoint, vec!["/bin/app"]);
        assert_eq!(
            (cfg.cmd, cfg.env, cfg.working_dir.as_str(), cfg.user.as_str()),
            (vec!["-v".to_owned()], vec!["A=1".to_owned()], "/srv", "app:staff")
        );
        assert!(diff_ids.is_empty());
        let arm = br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(matches!(image_config(arm), Err(ImageError::UnsupportedPlatform(_))));
    }
}
