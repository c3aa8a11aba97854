//! The workload configuration metald writes to `<writable disk>/metald/config.json`: its wire
//! schema ([`Config`], strict: unknown fields are refused so a typo on the host side fails loudly
//! instead of being ignored) and the validated [`Workload`] it becomes — argv after Docker's
//! entrypoint/cmd combination, the merged environment, working directory, user spec, hostname
//! and grace period. The schema is documented in docs/IMAGES.md, "Guest init".

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The only schema version this init understands.
pub const VERSION: u32 = 1;
/// Docker's default `PATH` when neither the image nor the VM sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Grace period between SIGTERM and SIGKILL when the config names none.
pub const DEFAULT_GRACE_SECONDS: u64 = 10;
/// Longest grace period accepted (an hour): a stop must end.
pub const MAX_GRACE_SECONDS: u64 = 3600;
/// Hostname when the config names none.
pub const DEFAULT_HOSTNAME: &str = "localhost";

/// `config.json` as metald writes it (every field but `version` may be left out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version, [`VERSION`].
    pub version: u32,
    /// The image's `Entrypoint` (or the request's override).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The image's `Cmd` (or the request's override).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// The image's `Env`, `KEY=value` each.
    #[serde(default)]
    pub env: Vec<String>,
    /// The VM's own environment from the request, `KEY=value` each; a key here replaces the
    /// image's.
    #[serde(default)]
    pub vm_env: Vec<String>,
    /// The image's `WorkingDir` (absolute; empty means `/`); created when missing, like Docker.
    #[serde(default)]
    pub working_dir: String,
    /// The image's `User`: `user`, `uid`, `user:group`, `uid:gid` (and mixes); empty is root.
    #[serde(default)]
    pub user: String,
    /// The guest's hostname; empty means [`DEFAULT_HOSTNAME`].
    #[serde(default)]
    pub hostname: String,
    /// Seconds between SIGTERM and SIGKILL on a stop request; absent means
    /// [`DEFAULT_GRACE_SECONDS`].
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

/// What the init runs: a [`Config`] that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The program and its arguments (never empty).
    pub argv: Vec<String>,
    /// The environment before the user's `HOME` and the defaults are added (see [`finish_env`]).
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub user: String,
    pub hostname: String,
    pub grace: Duration,
}

/// Why a config is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Json(String),
    Version(u32),
    NoCommand,
    Env(String),
    WorkingDir(String),
    Hostname(String),
    Grace(u64),
    Nul(&'static str),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Json(e) => write!(f, "config.json: {e}"),
            ConfigError::Version(v) => {
                write!(f, "config.json: version {v} is not supported (this init reads {VERSION})")
            }
            ConfigError::NoCommand => write!(f, "config.json: entrypoint and cmd are both empty: nothing to run"),
            ConfigError::Env(e) => write!(f, "config.json: environment entry {e:?} is not KEY=value"),
            ConfigError::WorkingDir(d) => write!(f, "config.json: working_dir {d:?} is not an absolute path"),
            ConfigError::Hostname(h) => write!(f, "config.json: hostname {h:?} is not 1-64 letters, digits, '-', '.'"),
            ConfigError::Grace(s) => write!(f, "config.json: grace_seconds {s} is above {MAX_GRACE_SECONDS}"),
            ConfigError::Nul(field) => write!(f, "config.json: {field} contains a NUL byte"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses and validates `config.json`.
pub fn parse(json: &[u8]) -> Result<Workload, ConfigError> {
    let c: Config = serde_json::from_slice(json).map_err(|e| ConfigError::Json(e.to_string()))?;
    c.validate()
}

impl Config {
    /// The [`Workload`] this config describes, or the first thing wrong with it.
    pub fn validate(self) -> Result<Workload, ConfigError> {
        if self.version != VERSION {
            return Err(ConfigError::Version(self.version));
        }
        let argv = combine(&self.entrypoint, &self.cmd).ok_or(ConfigError::NoCommand)?;
        no_nul("entrypoint/cmd", argv.iter())?;
        no_nul("env", self.env.iter().chain(&self.vm_env))?;
        no_nul("user", [&self.user].into_iter())?;
        no_nul("working_dir", [&self.working_dir].into_iter())?;
        let env = merge_env(&self.env, &self.vm_env)?;
        let working_dir = match self.working_dir.as_str() {
            "" => PathBuf::from("/"),
            d if d.starts_with('/') => PathBuf::from(d),
            d => return Err(ConfigError::WorkingDir(d.to_owned())),
        };
        let hostname = match self.hostname.as_str() {
            "" => DEFAULT_HOSTNAME.to_owned(),
            h if valid_hostname(h) => h.to_owned(),
            h => return Err(ConfigError::Hostname(h.to_owned())),
        };
        let grace = self.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
        if grace > MAX_GRACE_SECONDS {
            return Err(ConfigError::Grace(grace));
        }
        Ok(Workload { argv, env, working_dir, user: self.user, hostname, grace: Duration::from_secs(grace) })
    }
}

/// Docker's rule: with an entrypoint, argv is entrypoint followed by cmd (cmd are its default
/// arguments); without one, cmd alone. `None` when both are empty.
pub fn combine(entrypoint: &[String], cmd: &[String]) -> Option<Vec<String>> {
    let argv: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if argv.is_empty() { None } else { Some(argv) }
}

/// The image's environment with the VM's on top: a key set twice keeps its first position and
/// its last value.
pub fn merge_env(image: &[String], vm: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in image.iter().chain(vm) {
        let (k, v) = match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => (k, v),
            _ => return Err(ConfigError::Env(entry.clone())),
        };
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_owned(),
            None => out.push((k.to_owned(), v.to_owned())),
        }
    }
    Ok(out)
}

/// The environment the workload gets: `env` plus, when missing, `PATH` (Docker's default),
/// `HOSTNAME` and `HOME` (the user's home from the image's passwd, else `/`) — what Docker adds.
pub fn finish_env(mut env: Vec<(String, String)>, hostname: &str, home: &str) -> Vec<(String, String)> {
    for (k, v) in [("PATH", DEFAULT_PATH), ("HOSTNAME", hostname), ("HOME", home)] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    env
}

fn no_nul<'a>(field: &'static str, mut items: impl Iterator<Item = &'a String>) -> Result<(), ConfigError> {
    if items.any(|s| s.contains('\0')) { Err(ConfigError::Nul(field)) } else { Ok(()) }
}

fn valid_hostname(h: &str) -> bool {
    h.len() <= 64 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn a_full_config_parses() {
        let w = parse(
            br#"{"version":1,"entrypoint":["/app/run","-v"],"cmd":["serve"],"env":["PATH=/bin","A=1"],
                "vm_env":["A=2","B=x=y"],"working_dir":"/app","user":"app:staff","hostname":"vm-1",
                "grace_seconds":3}"#,
        )
        .unwrap();
        assert_eq!(w.argv, s(&["/app/run", "-v", "serve"]));
        let env: Vec<(&str, &str)> = w.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env, [("PATH", "/bin"), ("A", "2"), ("B", "x=y")]);
        assert_eq!(w.working_dir, PathBuf::from("/app"));
        assert_eq!((w.user.as_str(), w.hostname.as_str()), ("app:staff", "vm-1"));
        assert_eq!(w.grace, Duration::from_secs(3));
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let w = parse(br#"{"version":1,"cmd":["sh"]}"#).unwrap();
        assert_eq!(w.working_dir, PathBuf::from("/"));
        assert_eq!((w.user.as_str(), w.hostname.as_str()), ("", DEFAULT_HOSTNAME));
        assert_eq!(w.grace, Duration::from_secs(DEFAULT_GRACE_SECONDS));
        assert!(w.env.is_empty());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases: &[(&[u8], ConfigError)] = &[
            (br#"{"version":2,"cmd":["sh"]}"#, ConfigError::Version(2)),
            (br#"{"version":1}"#, ConfigError::NoCommand),
            (br#"{"version":1,"entrypoint":[],"cmd":[]}"#, ConfigError::NoCommand),
            (br#"{"version":1,"cmd":["sh"],"env":["NOVALUE"]}"#, ConfigError::Env("NOVALUE".into())),
            (br#"{"version":1,"cmd":["sh"],"vm_env":["=x"]}"#, ConfigError::Env("=x".into())),
            (br#"{"version":1,"cmd":["sh"],"working_dir":"app"}"#, ConfigError::WorkingDir("app".into())),
            (br#"{"version":1,"cmd":["sh"],"hostname":"a b"}"#, ConfigError::Hostname("a b".into())),
            (br#"{"version":1,"cmd":["sh"],"grace_seconds":3601}"#, ConfigError::Grace(3601)),
            (br#"{"version":1,"cmd":["s\u0000h"]}"#, ConfigError::Nul("entrypoint/cmd")),
        ];
        for (json, want) in cases {
            assert_eq!(parse(json).unwrap_err(), *want, "{}", String::from_utf8_lossy(json));
        }
        // Unknown fields (a typo on the host side) and wrong types are refused, not ignored.
        for json in [&br#"{"version":1,"cmd":["sh"],"workdir":"/x"}"#[..], br#"{"version":1,"cmd":"sh"}"#, b"{"] {
            assert!(matches!(parse(json), Err(ConfigError::Json(_))), "{}", String::from_utf8_lossy(json));
        }
        assert!(matches!(parse(br#"{"cmd":["sh"]}"#), Err(ConfigError::Json(_))), "version is required");
    }

    #[test]
    fn entrypoint_and_cmd_combine_like_docker() {
        assert_eq!(combine(&s(&["/ep", "a"]), &s(&["b", "c"])).unwrap(), s(&["/ep", "a", "b", "c"]));
        assert_eq!(combine(&s(&["/ep"]), &[]).unwrap(), s(&["/ep"]));
        assert_eq!(combine(&[], &s(&["/bin/sh", "-c", "echo hi"])).unwrap(), s(&["/bin/sh", "-c", "echo hi"]));
        assert_eq!(combine(&[], &[]), None);
    }

    #[test]
    fn the_vm_env_wins_and_keeps_the_image_order() {
        let env = merge_env(&s(&["A=1", "B=2", "A=3"]), &s(&["B=", "C=4"])).unwrap();
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(env, s(&["A=3", "B=", "C=4"]));
    }

    #[test]
    fn finish_env_adds_only_what_is_missing() {
        let env = finish_env(vec![("PATH".into(), "/x".into())], "h", "/home/u");
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(env, s(&["PATH=/x", "HOSTNAME=h", "HOME=/home/u"]));
        let env = finish_env(vec![("HOME".into(), "/data".into())], "h", "/root");
        assert_eq!(env[0], ("HOME".to_owned(), "/data".to_owned()));
        assert_eq!(env[1], ("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
}
