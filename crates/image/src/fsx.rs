//! File-system primitives over directory file descriptors that never follow
//! a symlink: the unpacker, the layer store and the ext4 export build on
//! these so that a hostile layer (or a hostile build step's upper dir) cannot
//! make us touch anything outside the tree we were given.
//!
//! Everything here resolves one component at a time with `O_NOFOLLOW`, and
//! creates or removes entries with the `*at` calls relative to a directory fd
//! that was itself reached that way.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Flags of every directory open: read-only, no symlink, must be a directory.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory at `path`; its last component must not be a symlink.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(path, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `name` inside `dir`. A symlink there fails with
/// `ELOOP` or `ENOTDIR`, another non-directory with `ENOTDIR`.
pub(crate) fn open_child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match rfs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        // Not root, and the directory is not readable to us: make it so
        // (it is ours to remove or fill), then retry once.
        Err(Errno::ACCESS) => {
            let path_fd = rfs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            make_owner_rwx(path_fd.as_fd())?;
            Ok(rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Adds `u+rwx` to a directory we may only hold an `O_PATH` fd to.
fn make_owner_rwx(fd: BorrowedFd<'_>) -> io::Result<()> {
    let st = rfs::fstat(fd)?;
    let mode = Mode::from_raw_mode(st.st_mode & 0o7777) | Mode::RWXU;
    // fchmod does not work on O_PATH fds; the magic link names exactly this
    // inode (never a symlink: it was opened with O_NOFOLLOW | O_DIRECTORY).
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    Ok(rfs::chmod(proc_path.as_str(), mode)?)
}

/// `lstat` of `name` in `dir`; `None` if it does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<rfs::Stat>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a `stat` describes a directory.
pub(crate) fn is_dir(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// One directory on the way down in [`remove_at`].
struct Level {
    /// Its name in the parent.
    name: OsString,
    /// `(st_dev, st_ino)`, checked when climbing back up through `..`.
    id: (u64, u64),
    /// Subdirectories still to remove.
    pending: Vec<OsString>,
}

/// Removes `name` in `dir`, whatever it is; a directory with everything
/// below it. Missing is fine. Never follows symlinks and never leaves `dir`.
///
/// Holds only two directory fds at a time however deep the tree (a build step
/// can nest directories far deeper than `PATH_MAX` or the fd limit), and gives
/// itself `u+rwx` on directories it cannot read (read-only trees when not
/// root). Entries on other mounts below are not special-cased: the tree must
/// not be in use.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if !is_dir(&st) {
        return match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let top = open_child_dir(dir, name)?;
    let top_st = rfs::fstat(&top)?;
    let mut stack = vec![Level {
        name: name.to_os_string(),
        id: (top_st.st_dev, top_st.st_ino),
        pending: clear_files(top.as_fd())?,
    }];
    let mut cur = top;
    while let Some(level) = stack.last_mut() {
        if let Some(sub) = level.pending.pop() {
            match open_child_dir(cur.as_fd(), &sub) {
                Ok(fd) => {
                    let st = rfs::fstat(&fd)?;
                    let pending = clear_files(fd.as_fd())?;
                    stack.push(Level {
                        name: sub,
                        id: (st.st_dev, st.st_ino),
                        pending,
                    });
                    cur = fd;
                }
                Err(e) => match Errno::from_io_error(&e) {
                    Some(Errno::NOENT) => {}
                    // Turned into a non-directory since we listed it.
                    Some(Errno::LOOP | Errno::NOTDIR) => {
                        rfs::unlinkat(cur.as_fd(), &sub, AtFlags::empty())?;
                    }
                    _ => return Err(e),
                },
            }
            continue;
        }
        // `cur` is empty now.
        let done = stack
            .pop()
            .expect("the loop only runs with a non-empty stack");
        let Some(parent_level) = stack.last() else {
            drop(cur);
            rfs::unlinkat(dir, &done.name, AtFlags::REMOVEDIR)?;
            break;
        };
        let parent = rfs::openat(&cur, "..", DIR_FLAGS, Mode::empty())?;
        let pst = rfs::fstat(&parent)?;
        if (pst.st_dev, pst.st_ino) != parent_level.id {
            return Err(io::Error::other(
                "the tree was moved while it was being removed",
            ));
        }
        rfs::unlinkat(&parent, &done.name, AtFlags::REMOVEDIR)?;
        cur = parent;
    }
    Ok(())
}

/// Unlinks every non-directory in `dir`; returns the subdirectories' names.
fn clear_files(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut subdirs = Vec::new();
    for name in list(dir)? {
        let is_directory = match lstat_at(dir, &name)? {
            Some(st) => is_dir(&st),
            None => continue,
        };
        if is_directory {
            subdirs.push(name);
        } else {
            match rfs::unlinkat(dir, &name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ACCESS | Errno::PERM) => {
                    // Not root and the directory is read-only: open it up.
                    let st = rfs::fstat(dir)?;
                    rfs::fchmod(dir, Mode::from_raw_mode(st.st_mode & 0o7777) | Mode::RWXU)?;
                    rfs::unlinkat(dir, &name, AtFlags::empty())?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(subdirs)
}

/// Names in `dir`, without `.` and `..`.
pub(crate) fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    // read_from opens its own fd for the listing (openat(dir, ".")).
    let d = rfs::Dir::read_from(dir)?;
    for entry in d {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Removes everything inside `dir` but `dir` itself.
pub(crate) fn empty_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    for name in list(dir)? {
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// Removes the tree at `path` (its last component is not followed if it is a
/// symlink: the symlink itself is removed). Missing is fine.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let parent = match open_dir(parent) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_at(parent.as_fd(), name)
}

/// `(parent, file name)` of a path that has both.
pub(crate) fn split(path: &Path) -> io::Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => Ok((
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no parent directory or no file name",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    #[test]
    fn removes_read_only_trees_and_not_symlink_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();

        let root = tmp.path().join("tree");
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::write(root.join("a/b/c/f"), b"x").unwrap();
        fs::write(root.join("a/f"), b"x").unwrap();
        symlink(&outside, root.join("a/link")).unwrap();
        symlink(&outside, root.join("a/b/link")).unwrap();
        for d in ["a/b/c", "a/b", "a"] {
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o500)).unwrap();
        }
        fs::set_permissions(root.join("a/b/c"), fs::Permissions::from_mode(0o000)).unwrap();

        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.join("keep").exists());
        // Missing is fine.
        remove_tree(&root).unwrap();
    }

    #[test]
    fn removes_a_symlink_given_as_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        let link = tmp.path().join("link");
        symlink(&outside, &link).unwrap();
        remove_tree(&link).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn removes_trees_deeper_than_the_fd_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("deep");
        fs::create_dir(&root).unwrap();
        // 3000 levels: more than PATH_MAX allows by path, and more fds than
        // a recursive removal holding one per level could open.
        let mut fd = open_dir(&root).unwrap();
        for _ in 0..3000 {
            rfs::mkdirat(&fd, "d", Mode::RWXU).unwrap();
            rfs::openat(&fd, "x", OFlags::CREATE | OFlags::WRONLY, Mode::RUSR).unwrap();
            fd = open_child_dir(fd.as_fd(), OsStr::new("d")).unwrap();
        }
        drop(fd);
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn empty_dir_keeps_the_dir() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        let fd = open_dir(tmp.path()).unwrap();
        empty_dir(fd.as_fd()).unwrap();
        assert!(tmp.path().is_dir());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn open_child_dir_refuses_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("real")).unwrap();
        symlink("real", tmp.path().join("link")).unwrap();
        fs::write(tmp.path().join("file"), b"x").unwrap();
        let fd = open_dir(tmp.path()).unwrap();
        assert!(open_child_dir(fd.as_fd(), OsStr::new("real")).is_ok());
        assert!(open_child_dir(fd.as_fd(), OsStr::new("link")).is_err());
        assert!(open_child_dir(fd.as_fd(), OsStr::new("file")).is_err());
    }
}
