//! Path rules of envd (CONTRACT 3.4): relative paths live under the user's
//! home, `~` expands to it, and the empty path is the default workdir.

use std::path::{Component, Path, PathBuf};

use arca_proto::connect::{Code, ConnectError};

use crate::users::User;

/// Lexically cleans an absolute path: no `.`, no `..`, no repeated or
/// trailing slashes (symlinks are left alone, as the contract asks).
pub(crate) fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Resolves a path given by a client acting as `user`.
pub(crate) fn resolve(
    path: &str,
    user: &User,
    default_workdir: Option<&Path>,
) -> Result<PathBuf, ConnectError> {
    if path.contains('\0') {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "path contains a NUL byte",
        ));
    }
    let resolved = if path.is_empty() {
        default_workdir.map_or_else(|| user.home.clone(), Path::to_path_buf)
    } else if path == "~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix("~/") {
        user.home.join(rest)
    } else if path.starts_with('~') {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!(
                "path '{path}': only '~' and '~/' are expanded (to the home of user '{}'); use an absolute path",
                user.name
            ),
        ));
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        user.home.join(path)
    };
    Ok(clean(&resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn relative_paths_land_in_home_and_tilde_expands() {
        let u = user();
        let r = |p| resolve(p, &u, Some(Path::new("/work"))).unwrap();
        assert_eq!(r("a.txt"), PathBuf::from("/home/user/a.txt"));
        assert_eq!(r("~"), PathBuf::from("/home/user"));
        assert_eq!(r("~/x/../y/"), PathBuf::from("/home/user/y"));
        assert_eq!(r(""), PathBuf::from("/work"));
        assert_eq!(r("/etc//passwd"), PathBuf::from("/etc/passwd"));
        assert_eq!(r("/../.."), PathBuf::from("/"));
        assert_eq!(resolve("", &u, None).unwrap(), PathBuf::from("/home/user"));
    }

    #[test]
    fn other_users_homes_and_nul_bytes_are_refused() {
        let u = user();
        let e = resolve("~root/x", &u, None).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("absolute path"));
        assert_eq!(
            resolve("a\0b", &u, None).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
