//! Registry credentials: [`Credentials`] (per request, or from the host's
//! Docker `config.json`, [`CredentialsFile`]). Secrets never appear in
//! `Debug` output, logs or errors.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use super::error::ImageError;

/// A user name and password (or token) for a registry's basic auth; the
/// registry's bearer-token exchange is done with them by `oci-client`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl Credentials {
    /// A user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials { username: username.into(), password: password.into() }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &"<redacted>").field("password", &"<redacted>").finish()
    }
}

/// The host's credentials, by registry host (`host[:port]`, lower case).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CredentialsFile {
    by_host: HashMap<String, Credentials>,
}

impl fmt::Debug for CredentialsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsFile").field("registries", &self.by_host.len()).finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// `https://host:port/v1/` → `host:port`; Docker Hub's names are one.
fn host_key(key: &str) -> String {
    let key = key.trim();
    let key = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = key.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => host,
    }
}

impl CredentialsFile {
    /// Parses a Docker `config.json`: `{"auths": {"host:port": {"auth":
    /// "base64(user:pass)"}}}` or `username`/`password` fields. Entries with
    /// neither are skipped (they name a credential helper, which metald does
    /// not run). Errors never quote the file's content.
    pub fn parse(path: &Path, text: &str) -> Result<CredentialsFile, ImageError> {
        let bad = |reason: String| ImageError::CredentialsFile { path: path.display().to_string(), reason };
        let config: DockerConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("not a Docker config.json (line {})", e.line())))?;
        let mut by_host = HashMap::new();
        for (key, entry) in config.auths {
            let host = host_key(&key);
            let creds = match (entry.auth.filter(|a| !a.is_empty()), entry.username, entry.password) {
                (Some(auth), _, _) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .ok_or_else(|| bad(format!("the auth of {host:?} is not base64 of user:password")))?;
                    let (user, pass) = decoded
                        .split_once(':')
                        .ok_or_else(|| bad(format!("the auth of {host:?} is not base64 of user:password")))?;
                    Credentials::new(user, pass)
                }
                (None, Some(user), Some(pass)) => Credentials::new(user, pass),
                _ => continue,
            };
            by_host.insert(host, creds);
        }
        Ok(CredentialsFile { by_host })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<CredentialsFile, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|e| ImageError::CredentialsFile {
            path: path.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })?;
        CredentialsFile::parse(path, &text)
    }

    /// The credentials for a registry (`host[:port]` as in the reference).
    pub fn get(&self, registry: &str) -> Option<&Credentials> {
        self.by_host.get(&host_key(registry))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_auth_and_username_password_entries() {
        let text = r#"{"auths": {
            "127.0.0.1:5000": {"auth": "YWxpY2U6czNjcjN0Onh5"},
            "https://Registry.Example.com/v2/": {"username": "bob", "password": "pw"},
            "https://index.docker.io/v1/": {"auth": "ZG9jazpodWI="},
            "helper.example": {}
        }, "credsStore": "desktop"}"#;
        let f = CredentialsFile::parse(Path::new("/c.json"), text).unwrap();
        assert_eq!(f.get("127.0.0.1:5000"), Some(&Credentials::new("alice", "s3cr3t:xy")));
        assert_eq!(f.get("registry.example.com"), Some(&Credentials::new("bob", "pw")));
        assert_eq!(f.get("docker.io"), Some(&Credentials::new("dock", "hub")));
        assert_eq!(f.get("index.docker.io"), Some(&Credentials::new("dock", "hub")));
        assert_eq!(f.get("helper.example"), None);
        assert_eq!(f.get("127.0.0.1:5001"), None);
    }

    #[test]
    fn errors_and_debug_never_show_secrets() {
        let f = CredentialsFile::parse(Path::new("/c.json"), r#"{"auths":{"h":{"auth":"!!notbase64-secret"}}}"#);
        let msg = f.unwrap_err().to_string();
        assert!(!msg.contains("secret"), "{msg}");
        let msg =
            CredentialsFile::parse(Path::new("/c.json"), "{\"auths\": {\"h\": \"hunter2\"").unwrap_err().to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        let c = Credentials::new("alice", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2") && !format!("{c:?}").contains("alice"));
        let f =
            CredentialsFile::parse(Path::new("/c.json"), r#"{"auths":{"h":{"username":"u","password":"hunter2"}}}"#);
        assert!(!format!("{:?}", f.unwrap()).contains("hunter2"));
    }
}
