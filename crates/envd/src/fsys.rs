//! The unary methods of `filesystem.Filesystem` (CONTRACT 3.4) and the
//! `EntryInfo` every one of them returns.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arca_proto::Timestamp;
use arca_proto::connect::{Code, ConnectError};
use arca_proto::filesystem::{
    EntryInfo, FileType, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, StatRequest, StatResponse,
};

use crate::error::io_error;
use crate::rpc::CallCtx;
use crate::users::{ActAs, Names, User};
use crate::{State, paths, sys};

/// Prefix of the extended attributes that hold user metadata of a file.
pub(crate) const METADATA_XATTR_PREFIX: &str = "user.e2b.";

/// Go's `FileMode.String()` for a mode, which the SDKs show as `permissions`.
pub(crate) fn permissions_string(meta: &fs::Metadata) -> String {
    let mode = meta.mode();
    let ft = meta.file_type();
    let mut s = String::new();
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        s.push('d');
    }
    if ft.is_symlink() {
        s.push('L');
    }
    if ft.is_block_device() || ft.is_char_device() {
        s.push('D');
    }
    if ft.is_fifo() {
        s.push('p');
    }
    if ft.is_socket() {
        s.push('S');
    }
    if mode & 0o4000 != 0 {
        s.push('u');
    }
    if mode & 0o2000 != 0 {
        s.push('g');
    }
    if ft.is_char_device() {
        s.push('c');
    }
    if mode & 0o1000 != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, c) in RWX.iter().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 {
            char::from(*c)
        } else {
            '-'
        });
    }
    s
}

fn timestamp(meta: &fs::Metadata) -> Timestamp {
    Timestamp {
        seconds: meta.mtime(),
        nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
    }
}

/// User metadata stored in `user.e2b.*` xattrs.
pub(crate) fn read_metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Ok(names) = sys::list_xattrs(path) else {
        return out;
    };
    for name in names {
        if let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX) {
            if let Ok(v) = sys::get_xattr(path, &name) {
                out.insert(key.to_string(), String::from_utf8_lossy(&v).into_owned());
            }
        }
    }
    out
}

/// Describes `path` (as requested, not resolved) for a client.
pub(crate) fn entry_info(path: &Path, names: &Names) -> Result<EntryInfo, ConnectError> {
    let lmeta = fs::symlink_metadata(path).map_err(|e| io_error(&e, "stat", path))?;
    let is_symlink = lmeta.file_type().is_symlink();
    let target_meta = if is_symlink {
        fs::metadata(path).ok()
    } else {
        None
    };
    let shown = target_meta.as_ref().unwrap_or(&lmeta);
    let r#type = if is_symlink && target_meta.is_none() {
        FileType::Unspecified
    } else if shown.is_dir() {
        FileType::Directory
    } else if shown.is_file() {
        FileType::File
    } else {
        FileType::Unspecified
    };
    let symlink_target = if is_symlink {
        Some(
            fs::canonicalize(path)
                .or_else(|_| {
                    fs::read_link(path).map(|t| {
                        let parent = path.parent().unwrap_or(Path::new("/"));
                        paths::clean(&parent.join(t))
                    })
                })
                .map_err(|e| io_error(&e, "read link", path))?
                .display()
                .to_string(),
        )
    } else {
        None
    };
    Ok(EntryInfo {
        name: path
            .file_name()
            .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned()),
        r#type: r#type.into(),
        path: path.display().to_string(),
        size: i64::try_from(lmeta.size()).unwrap_or(i64::MAX),
        mode: shown.permissions().mode() & 0o777,
        permissions: permissions_string(&lmeta),
        owner: names.user(lmeta.uid()),
        group: names.group(lmeta.gid()),
        modified_time: Some(timestamp(&lmeta)),
        symlink_target,
        metadata: if target_meta.is_some() || !is_symlink {
            read_metadata(path)
        } else {
            Default::default()
        },
        is_symlink,
    })
}

fn resolve(state: &State, ctx: &CallCtx, path: &str) -> Result<PathBuf, ConnectError> {
    paths::resolve(path, &ctx.user, state.default_workdir().as_deref())
}

/// Creates `dir` and its missing parents, each 0755 and owned by `user`.
pub(crate) fn make_dirs(dir: &Path, user: &User) -> Result<(), ConnectError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        match fs::symlink_metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(m) if m.file_type().is_symlink() && d.is_dir() => break,
            Ok(_) => {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!("{} exists and is not a directory", d.display()),
                ));
            }
            Err(_) => missing.push(d.to_path_buf()),
        }
        cur = d.parent();
    }
    for d in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {
                std::os::unix::fs::chown(d, Some(user.uid), Some(user.gid))
                    .map_err(|e| io_error(&e, "chown", d))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(io_error(&e, "create directory", d)),
        }
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ConnectError::new(Code::Internal, format!("filesystem task failed: {e}")))?
}

/// `Stat`.
pub(crate) async fn stat(
    state: Arc<State>,
    ctx: CallCtx,
    req: StatRequest,
) -> Result<StatResponse, ConnectError> {
    let path = resolve(&state, &ctx, &req.path)?;
    blocking(move || {
        Ok(StatResponse {
            entry: Some(entry_info(&path, &state.users.names())?),
        })
    })
    .await
}

/// `MakeDir`: creates parents; an existing directory is `already_exists`.
pub(crate) async fn make_dir(
    state: Arc<State>,
    ctx: CallCtx,
    req: MakeDirRequest,
) -> Result<MakeDirResponse, ConnectError> {
    let path = resolve(&state, &ctx, &req.path)?;
    blocking(move || {
        let _as = ActAs::user(&ctx.user);
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(ConnectError::new(
                    Code::AlreadyExists,
                    format!("directory {} already exists", path.display()),
                ));
            }
            Ok(_) => {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!("{} exists and is not a directory", path.display()),
                ));
            }
            Err(_) => {}
        }
        make_dirs(&path, &ctx.user)?;
        Ok(MakeDirResponse {
            entry: Some(entry_info(&path, &state.users.names())?),
        })
    })
    .await
}

/// `Move`: renames, creating the destination's parents.
pub(crate) async fn move_entry(
    state: Arc<State>,
    ctx: CallCtx,
    req: MoveRequest,
) -> Result<MoveResponse, ConnectError> {
    let src = resolve(&state, &ctx, &req.source)?;
    let dst = resolve(&state, &ctx, &req.destination)?;
    blocking(move || {
        let _as = ActAs::user(&ctx.user);
        fs::symlink_metadata(&src).map_err(|e| io_error(&e, "move", &src))?;
        if let Some(parent) = dst.parent() {
            make_dirs(parent, &ctx.user)?;
        }
        fs::rename(&src, &dst).map_err(|e| io_error(&e, "move to", &dst))?;
        Ok(MoveResponse {
            entry: Some(entry_info(&dst, &state.users.names())?),
        })
    })
    .await
}

/// `Remove`: recursive; a missing path is not an error.
pub(crate) async fn remove(
    state: Arc<State>,
    ctx: CallCtx,
    req: RemoveRequest,
) -> Result<RemoveResponse, ConnectError> {
    let path = resolve(&state, &ctx, &req.path)?;
    blocking(move || {
        let _as = ActAs::user(&ctx.user);
        let result = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
        };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_error(&e, "remove", &path))
            }
            _ => Ok(RemoveResponse {}),
        }
    })
    .await
}

/// Appends the entries under `dir` (shown as `shown`) in lexical walk
/// order, descending `depth - 1` more levels but never through symlinks.
fn walk(
    dir: &Path,
    shown: &Path,
    depth: u32,
    names: &Names,
    out: &mut Vec<EntryInfo>,
) -> Result<(), ConnectError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(|e| io_error(&e, "list", shown))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    children.sort();
    for name in children {
        let real = dir.join(&name);
        let display = shown.join(&name);
        let mut info = match entry_info(&real, names) {
            Ok(i) => i,
            Err(_) => continue, // vanished while listing
        };
        info.path = display.display().to_string();
        let descend = depth > 1 && fs::symlink_metadata(&real).is_ok_and(|m| m.is_dir());
        out.push(info);
        if descend {
            walk(&real, &display, depth - 1, names, out)?;
        }
    }
    Ok(())
}

/// `ListDir`: `depth` 0 means 1.
pub(crate) async fn list_dir(
    state: Arc<State>,
    ctx: CallCtx,
    req: ListDirRequest,
) -> Result<ListDirResponse, ConnectError> {
    let path = resolve(&state, &ctx, &req.path)?;
    let depth = req.depth.max(1);
    blocking(move || {
        let meta = fs::metadata(&path).map_err(|e| io_error(&e, "list", &path))?;
        if !meta.is_dir() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("{} is not a directory", path.display()),
            ));
        }
        let names = state.users.names();
        let mut entries = Vec::new();
        walk(&path, &path, depth, &names, &mut entries)?;
        Ok(ListDirResponse { entries })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_go_file_mode_strings() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(permissions_string(&fs::metadata(&f).unwrap()), "-rw-r--r--");
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(
            permissions_string(&fs::metadata(&d).unwrap()),
            "dtrwxrwxrwx"
        );
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert_eq!(
            permissions_string(&fs::symlink_metadata(&l).unwrap()),
            "Lrwxrwxrwx"
        );
    }

    #[test]
    fn entry_info_of_a_symlink_reports_target_type_and_resolved_target() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("real");
        fs::create_dir(&d).unwrap();
        let l = dir.path().join("link");
        std::os::unix::fs::symlink("real", &l).unwrap();
        let info = entry_info(&l, &Names::default()).unwrap();
        assert_eq!(info.r#type(), FileType::Directory);
        assert!(info.is_symlink);
        assert_eq!(info.path, l.display().to_string());
        assert_eq!(
            info.symlink_target.as_deref(),
            Some(fs::canonicalize(&d).unwrap().to_str().unwrap())
        );
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("nowhere", &dangling).unwrap();
        let info = entry_info(&dangling, &Names::default()).unwrap();
        assert_eq!(info.r#type(), FileType::Unspecified);
    }

    #[test]
    fn walk_lists_parents_before_children_sorted_and_skips_symlinked_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/inner")).unwrap();
        fs::write(root.join("b/z.txt"), b"").unwrap();
        fs::write(root.join("a.txt"), b"").unwrap();
        std::os::unix::fs::symlink(root.join("b"), root.join("c")).unwrap();
        let mut out = Vec::new();
        walk(root, root, 2, &Names::default(), &mut out).unwrap();
        let rel: Vec<String> = out
            .iter()
            .map(|e| {
                e.path
                    .strip_prefix(&root.display().to_string())
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(rel, ["/a.txt", "/b", "/b/inner", "/b/z.txt", "/c"]);
        let mut out = Vec::new();
        walk(root, root, 1, &Names::default(), &mut out).unwrap();
        assert_eq!(out.len(), 3);
    }
}
