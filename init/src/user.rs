//! The image's `User` resolved against the image's own `/etc/passwd` and `/etc/group` text,
//! with runc's rules (what Docker does): a name is looked up by name, a number by uid (and used
//! as is when no entry has it); the group is the explicit `:group` (name or number) or else the
//! passwd entry's; supplementary groups are the `/etc/group` entries that list the user by name,
//! and only when no group was given explicitly. The guest's libc is never asked: the static init
//! has no NSS, and the files that count are the image's, not the initramfs's.

/// Who the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups for `setgroups` (may be empty).
    pub groups: Vec<u32>,
    /// The passwd entry's home, `/` without one (for `HOME`).
    pub home: String,
}

/// Why a user spec cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    UnknownUser(String),
    UnknownGroup(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserError::UnknownUser(u) => write!(f, "user {u:?}: no such user in the image's /etc/passwd"),
            UserError::UnknownGroup(g) => write!(f, "group {g:?}: no such group in the image's /etc/group"),
        }
    }
}

impl std::error::Error for UserError {}

/// One `/etc/passwd` line.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One `/etc/group` line.
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    records(text).filter_map(|f| {
        Some(PasswdEntry {
            name: f.first()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    records(text).filter_map(|f| {
        Some(GroupEntry {
            name: f.first()?,
            gid: f.get(2)?.parse().ok()?,
            members: f
                .get(3)
                .map(|m| m.split(',').map(str::trim).filter(|m| !m.is_empty()).collect())
                .unwrap_or_default(),
        })
    })
}

/// The colon-separated fields of each line that is not blank or a comment.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(|l| l.split(':').collect())
}

/// Resolves `spec` (`""`, `user`, `uid`, `user:group`, `uid:gid`, ...) with the image's passwd
/// and group file contents (empty text when a file is missing).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_arg = if user_arg.is_empty() { "0" } else { user_arg };
    let numeric_uid = user_arg.parse::<u32>().ok();
    let entry = passwd_entries(passwd).find(|e| match numeric_uid {
        Some(uid) => e.uid == uid,
        None => e.name == user_arg,
    });
    let (uid, mut gid, name, home) = match (&entry, numeric_uid) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home),
        (None, Some(uid)) => (uid, 0, None, ""),
        (None, None) => return Err(UserError::UnknownUser(user_arg.to_owned())),
    };
    let mut groups = Vec::new();
    match group_arg.filter(|g| !g.is_empty()) {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => group_entries(group)
                    .find(|e| e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
            };
        }
        None => {
            if let Some(name) = name {
                for e in group_entries(group).filter(|e| e.members.contains(&name)) {
                    if !groups.contains(&e.gid) {
                        groups.push(e.gid);
                    }
                }
            }
        }
    }
    let home = if home.is_empty() { "/".to_owned() } else { home.to_owned() };
    Ok(Identity { uid, gid, groups, home })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        \n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        svc:x:1001:1001::/srv:/sbin/nologin\n\
        nohome:x:1002:100:::\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\n\
        app:x:1000:\n\
        staff:x:50:app,svc\n\
        wheel:x:10:root,app\n\
        svc:x:1001:\n\
        users:x:100:\n\
        dup:x:10:app\n";

    fn id(uid: u32, gid: u32, groups: &[u32], home: &str) -> Identity {
        Identity { uid, gid, groups: groups.to_vec(), home: home.into() }
    }

    #[test]
    fn names_numbers_and_groups_resolve_like_runc() {
        let cases: &[(&str, Identity)] = &[
            ("", id(0, 0, &[10], "/root")),
            ("root", id(0, 0, &[10], "/root")),
            ("0", id(0, 0, &[10], "/root")),
            ("app", id(1000, 1000, &[50, 10], "/home/app")),
            ("1000", id(1000, 1000, &[50, 10], "/home/app")),
            ("svc", id(1001, 1001, &[50], "/srv")),
            ("nohome", id(1002, 100, &[], "/")),
            // An explicit group replaces the primary group and drops the supplementary ones.
            ("app:staff", id(1000, 50, &[], "/home/app")),
            ("app:4242", id(1000, 4242, &[], "/home/app")),
            ("1000:1000", id(1000, 1000, &[], "/home/app")),
            // A uid or gid without an entry is used as is (gid 0 when the user has no entry).
            ("4000", id(4000, 0, &[], "/")),
            ("4000:4000", id(4000, 4000, &[], "/")),
            ("4000:wheel", id(4000, 10, &[], "/")),
            ("app:", id(1000, 1000, &[50, 10], "/home/app")),
        ];
        for (spec, want) in cases {
            assert_eq!(resolve(spec, PASSWD, GROUP).unwrap(), *want, "{spec:?}");
        }
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(resolve("nobody", PASSWD, GROUP), Err(UserError::UnknownUser("nobody".into())));
        assert_eq!(resolve("app:nogroup", PASSWD, GROUP), Err(UserError::UnknownGroup("nogroup".into())));
        assert_eq!(resolve("app", "", ""), Err(UserError::UnknownUser("app".into())), "no passwd file");
        assert_eq!(resolve("", "", "").unwrap(), id(0, 0, &[], "/"), "root works without files");
    }
}
