//! Unix users and groups, read from the sandbox's own `/etc/passwd` and
//! `/etc/group`. envd parses the files itself instead of asking libc: it is a
//! static binary, where NSS lookups are unavailable or differ between libcs.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// A Unix account that processes and files can belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
    pub(crate) shell: String,
    /// Supplementary groups, including the primary one.
    pub(crate) groups: Vec<u32>,
}

/// While alive, file system access of the calling thread is checked as
/// `user` (the thread's fsuid and fsgid), so envd, which runs as root,
/// cannot be used to reach files the user could not. New files belong to
/// the user. Only for a blocking thread, for the duration of one request;
/// dropping it restores root. A no-op for root itself.
pub(crate) struct ActAs {
    active: bool,
}

impl ActAs {
    pub(crate) fn user(user: &User) -> ActAs {
        if user.uid == 0 {
            return ActAs { active: false };
        }
        // Group first: after fsuid changes, root's file capabilities are gone.
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(user.gid));
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(user.uid));
        ActAs { active: true }
    }

    /// Whether checks run as a non-root user.
    pub(crate) fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for ActAs {
    fn drop(&mut self) {
        if self.active {
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
        }
    }
}

/// Where accounts are read from; tests point it at fixture files.
#[derive(Debug, Clone)]
pub(crate) struct UserDb {
    passwd: PathBuf,
    group: PathBuf,
}

/// Names of uids and gids, loaded once for a request that needs many.
#[derive(Debug, Default)]
pub(crate) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub(crate) fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    pub(crate) fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Fields of the non-comment lines of a colon-separated database.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
}

impl UserDb {
    pub(crate) fn at(passwd: &Path, group: &Path) -> Self {
        UserDb {
            passwd: passwd.to_path_buf(),
            group: group.to_path_buf(),
        }
    }

    /// Looks a user up by name.
    pub(crate) fn lookup(&self, name: &str) -> Option<User> {
        let passwd = read(&self.passwd);
        let by_name = records(&passwd).find(|r| r.len() >= 7 && r[0] == name);
        // A number is a uid, as Docker's `USER 1234` means: the account
        // with that uid, or a nameless one with the same gid.
        let rec = match (by_name, name.parse::<u32>()) {
            (Some(rec), _) => rec,
            (None, Ok(uid)) => match records(&passwd).find(|r| r.len() >= 7 && r[2] == name) {
                Some(rec) => rec,
                None => {
                    return Some(User {
                        name: name.to_string(),
                        uid,
                        gid: uid,
                        home: PathBuf::from("/"),
                        shell: "/bin/sh".to_string(),
                        groups: vec![uid],
                    });
                }
            },
            (None, Err(_)) => return None,
        };
        let name = rec[0];
        let uid: u32 = rec[2].parse().ok()?;
        let gid: u32 = rec[3].parse().ok()?;
        let groups_text = read(&self.group);
        let mut groups = vec![gid];
        for g in records(&groups_text).filter(|r| r.len() >= 4) {
            if g[3].split(',').any(|m| m.trim() == name) {
                if let Ok(id) = g[2].parse::<u32>() {
                    if !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
        }
        Some(User {
            name: name.to_string(),
            uid,
            gid,
            home: PathBuf::from(if rec[5].is_empty() { "/" } else { rec[5] }),
            shell: rec[6].to_string(),
            groups,
        })
    }

    /// All uid and gid names.
    pub(crate) fn names(&self) -> Names {
        let mut names = Names::default();
        for r in records(&read(&self.passwd)).filter(|r| r.len() >= 3) {
            if let Ok(uid) = r[2].parse() {
                names.users.entry(uid).or_insert_with(|| r[0].to_string());
            }
        }
        for r in records(&read(&self.group)).filter(|r| r.len() >= 3) {
            if let Ok(gid) = r[2].parse() {
                names.groups.entry(gid).or_insert_with(|| r[0].to_string());
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, UserDb) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        let g = dir.path().join("group");
        fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/bash\n# comment\nuser:x:1000:1000::/home/user:/bin/bash\nnohome:x:1001:1001:::/bin/sh\n",
        )
        .unwrap();
        fs::write(
            &g,
            "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\ndocker:x:999: user \n",
        )
        .unwrap();
        let db = UserDb::at(&p, &g);
        (dir, db)
    }

    #[test]
    fn lookup_finds_uid_gid_home_and_supplementary_groups() {
        let (_d, db) = db();
        let u = db.lookup("user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert_eq!(u.groups, vec![1000, 27, 999]);
        assert_eq!(db.lookup("nohome").unwrap().home, PathBuf::from("/"));
        assert!(db.lookup("nobody-here").is_none());
    }

    #[test]
    fn numeric_users_are_uids() {
        let (_d, db) = db();
        assert_eq!(db.lookup("1000").unwrap().name, "user");
        let anon = db.lookup("4321").unwrap();
        assert_eq!(
            (anon.uid, anon.gid, anon.name.as_str()),
            (4321, 4321, "4321")
        );
        assert_eq!(anon.home, PathBuf::from("/"));
    }

    #[test]
    fn names_fall_back_to_numbers() {
        let (_d, db) = db();
        let n = db.names();
        assert_eq!(n.user(1000), "user");
        assert_eq!(n.group(27), "sudo");
        assert_eq!(n.user(4242), "4242");
    }
}
