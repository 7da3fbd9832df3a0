//! Flattening a stack of overlayfs-format layers into one tree, and that tree
//! into an ext4 image (for the `vm` backend, whose guest kernel cannot mount
//! the host's overlay).
//!
//! The flattening applies the layers bottom to top the way overlayfs shows
//! them: a 0:0 character device deletes the name below it, a directory with
//! [`OPAQUE_XATTR`] hides the content of lower directories of that name, a
//! directory above a non-directory replaces it. Hard links inside a layer stay
//! hard links. Owners may be moved back out of the sandbox id range
//! ([`Ext4Options::unshift`]) since a VM has its own kernel and no user
//! namespace mapping. `trusted.overlay.*` xattrs are not copied. Layers must
//! not use overlayfs' `redirect_dir` or `metacopy` features (Arca mounts
//! without them).
//!
//! Like the unpacker, everything is resolved with `O_NOFOLLOW` relative to
//! directory fds: symlinks in the layers are copied, never followed.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};

use crate::shift::MAPPED_IDS;
use crate::unpack::{OPAQUE_XATTR, unshift_capability};
use crate::{ImageError, fsx, walk};

/// One MiB.
const MIB: u64 = 1 << 20;
/// Head room added to the tree's size when the image size is automatic.
const AUTO_SLACK_MIB: u64 = 64;

/// How to make an ext4 image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ext4Options {
    /// Image size in MiB; 0 picks the tree's size plus a quarter plus 64 MiB.
    pub size_mb: u64,
    /// Ids in `unshift..unshift + 65536` become `id - unshift` (0: ids kept).
    pub unshift: u32,
}

impl Ext4Options {
    /// Options for an image of `size_mb` MiB (0: automatic), ids kept.
    pub fn new(size_mb: u64) -> Self {
        Self {
            size_mb,
            unshift: 0,
        }
    }
}

/// Flattens `rootfs_layers` (top first, as overlay `lowerdir` lists them)
/// into an ext4 image at `out` of `size_mb` MiB (0: automatic), owners kept
/// as stored. See [`export_ext4_with`].
pub fn export_ext4(rootfs_layers: &[PathBuf], out: &Path, size_mb: u64) -> Result<(), ImageError> {
    export_ext4_with(rootfs_layers, out, &Ext4Options::new(size_mb))
}

/// Flattens `rootfs_layers` (top first) into a temporary tree next to `out`
/// and makes the ext4 image with `mkfs.ext4 -d`; `out` appears atomically
/// (written under a temporary name, then renamed). Needs root (to create
/// device nodes and keep owners) and `mkfs.ext4` (e2fsprogs).
pub fn export_ext4_with(
    rootfs_layers: &[PathBuf],
    out: &Path,
    opts: &Ext4Options,
) -> Result<(), ImageError> {
    let mkfs = find_tool("mkfs.ext4").ok_or(ImageError::ToolMissing {
        tool: "mkfs.ext4",
        package: "e2fsprogs",
    })?;
    let (parent, name) = fsx::split(out).map_err(|e| ImageError::io("export to", out, e))?;
    let suffix: u64 = rand::random();
    // The tree holds setuid files and maybe secrets: build it inside a
    // directory only root can enter, and keep the image 0600.
    let private = parent.join(format!(".{}.tree-{suffix:016x}", name.to_string_lossy()));
    let image = parent.join(format!(".{}.tmp-{suffix:016x}", name.to_string_lossy()));
    let _cleanup = Cleanup(vec![private.clone(), image.clone()]);
    fs::create_dir(&private).map_err(|e| ImageError::io("create", &private, e))?;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700))
        .map_err(|e| ImageError::io("chmod", &private, e))?;
    let tree = private.join("root");
    fs::create_dir(&tree).map_err(|e| ImageError::io("create", &tree, e))?;
    flatten(rootfs_layers, &tree, opts.unshift)?;

    let size_mb = if opts.size_mb == 0 {
        let used = walk::disk_usage(&tree)?;
        (used + used / 4).div_ceil(MIB) + AUTO_SLACK_MIB
    } else {
        opts.size_mb
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&image)
        .map_err(|e| ImageError::io("create", &image, e))?;
    file.set_len(size_mb.saturating_mul(MIB))
        .map_err(|e| ImageError::io("size", &image, e))?;
    drop(file);
    let root = fs::symlink_metadata(&tree).map_err(|e| ImageError::io("stat", &tree, e))?;
    let output = Command::new(&mkfs)
        .args(["-q", "-F", "-t", "ext4", "-E"])
        .arg(format!("root_owner={}:{}", root.uid(), root.gid()))
        .arg("-d")
        .arg(&tree)
        .arg(&image)
        .output()
        .map_err(|e| ImageError::io("run", &mkfs, e))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !stdout.trim().is_empty() {
            text.push('\n');
            text.push_str(stdout.trim());
        }
        return Err(ImageError::ToolFailed {
            tool: "mkfs.ext4",
            status: output.status.to_string(),
            output: text,
        });
    }
    fs::rename(&image, out).map_err(|e| ImageError::io("rename into place", out, e))?;
    tracing::debug!(out = %out.display(), size_mb, layers = rootfs_layers.len(), "exported an ext4 image");
    Ok(())
}

/// Removes its paths on drop.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fsx::remove_tree(p);
        }
    }
}

/// `name` in PATH, or in the sbin directories a non-root PATH lacks.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Flattens `rootfs_layers` (top first) into the existing, empty directory
/// `dest`, as the module docs describe. `unshift` as in [`Ext4Options`].
pub fn flatten(rootfs_layers: &[PathBuf], dest: &Path, unshift: u32) -> Result<(), ImageError> {
    let dst_root = fsx::open_dir(dest).map_err(|e| ImageError::io("open", dest, e))?;
    let chown = nix::unistd::geteuid().is_root();
    let mut dir_times: Vec<(Vec<OsString>, Timespec)> = Vec::new();
    for layer in rootfs_layers.iter().rev() {
        let mut f = Flattener {
            layer,
            src_root: fsx::open_dir(layer).map_err(|e| ImageError::io("open", layer, e))?,
            dst_root: dst_root.as_fd(),
            unshift,
            chown,
            links: HashMap::new(),
            dir_times: &mut dir_times,
        };
        f.run()?;
    }
    // Directory mtimes last: creating children changes them.
    for (comps, mtime) in dir_times {
        if let Ok(dir) = walk_down(dst_root.as_fd(), &comps) {
            let ts = Timestamps {
                last_access: mtime,
                last_modification: mtime,
            };
            let _ = rfs::futimens(&dir, &ts);
        }
    }
    Ok(())
}

/// Opens the directory `comps` below `root`, one component at a time.
fn walk_down(root: BorrowedFd<'_>, comps: &[OsString]) -> io::Result<OwnedFd> {
    let mut cur = rfs::openat(
        root,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for c in comps {
        cur = fsx::open_child_dir(cur.as_fd(), c)?;
    }
    Ok(cur)
}

/// Applies one layer onto the tree.
struct Flattener<'a> {
    layer: &'a Path,
    src_root: OwnedFd,
    dst_root: BorrowedFd<'a>,
    unshift: u32,
    chown: bool,
    /// (dev, ino) of multiply-linked source files -> where the first copy went.
    links: HashMap<(u64, u64), Vec<OsString>>,
    dir_times: &'a mut Vec<(Vec<OsString>, Timespec)>,
}

impl Flattener<'_> {
    fn err(&self, action: &'static str, comps: &[OsString], e: impl Into<io::Error>) -> ImageError {
        let mut p = self.layer.to_path_buf();
        p.extend(comps);
        ImageError::io(action, &p, e.into())
    }

    fn id(&self, id: u32) -> u32 {
        if self.unshift > 0 && id >= self.unshift && id - self.unshift < MAPPED_IDS {
            id - self.unshift
        } else {
            id
        }
    }

    fn run(&mut self) -> Result<(), ImageError> {
        // The top layer's root decides the root's owner and mode.
        let st = rfs::fstat(&self.src_root).map_err(|e| self.err("stat", &[], e))?;
        let src_root = rfs::openat(
            &self.src_root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.err("open", &[], e))?;
        self.copy_attrs(src_root.as_fd(), self.dst_root, &st, &[])?;
        self.dir_times.push((Vec::new(), mtime_of(&st)));
        let mut stack: Vec<Vec<OsString>> = vec![Vec::new()];
        while let Some(comps) = stack.pop() {
            let src = walk_down(self.src_root.as_fd(), &comps)
                .map_err(|e| self.err("open", &comps, e))?;
            let dst = walk_down(self.dst_root, &comps)
                .map_err(|e| self.err("open the copy of", &comps, e))?;
            for name in fsx::list(src.as_fd()).map_err(|e| self.err("list", &comps, e))? {
                let mut child = comps.clone();
                child.push(name.clone());
                if self.entry(src.as_fd(), dst.as_fd(), &name, &child)? {
                    stack.push(child);
                }
            }
        }
        Ok(())
    }

    /// Copies one entry; returns whether it is a directory to descend into.
    fn entry(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &OsStr,
        comps: &[OsString],
    ) -> Result<bool, ImageError> {
        let st = rfs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("stat", comps, e))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        let existing =
            fsx::lstat_at(dst, name).map_err(|e| self.err("stat the copy of", comps, e))?;
        let replace = |this: &Self| -> Result<(), ImageError> {
            if existing.is_some() {
                fsx::remove_at(dst, name).map_err(|e| this.err("replace the copy of", comps, e))?;
            }
            Ok(())
        };
        match ft {
            FileType::CharacterDevice if st.st_rdev == 0 => {
                // A whiteout: the name is gone from here down.
                replace(self)?;
                Ok(false)
            }
            FileType::Directory => {
                let src_dir =
                    fsx::open_child_dir(src, name).map_err(|e| self.err("open", comps, e))?;
                let mut opaque = [0u8; 1];
                let is_opaque = matches!(
                    rfs::fgetxattr(&src_dir, OPAQUE_XATTR, &mut opaque[..]),
                    Ok(1) if opaque[0] == b'y'
                );
                match existing {
                    Some(e) if fsx::is_dir(&e) => {}
                    _ => {
                        replace(self)?;
                        rfs::mkdirat(dst, name, Mode::RWXU)
                            .map_err(|e| self.err("create the copy of", comps, e))?;
                    }
                }
                let dst_dir = fsx::open_child_dir(dst, name)
                    .map_err(|e| self.err("open the copy of", comps, e))?;
                if is_opaque {
                    fsx::empty_dir(dst_dir.as_fd())
                        .map_err(|e| self.err("empty the copy of", comps, e))?;
                }
                self.copy_attrs(src_dir.as_fd(), dst_dir.as_fd(), &st, comps)?;
                self.dir_times.push((comps.to_vec(), mtime_of(&st)));
                Ok(true)
            }
            FileType::RegularFile => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.links.get(&key).cloned() {
                        if let Some((first_name, first_parents)) = first.split_last() {
                            if let Ok(first_dir) = walk_down(self.dst_root, first_parents) {
                                replace(self)?;
                                if rfs::linkat(
                                    &first_dir,
                                    first_name.as_os_str(),
                                    dst,
                                    name,
                                    AtFlags::empty(),
                                )
                                .is_ok()
                                {
                                    return Ok(false);
                                }
                            }
                        }
                    }
                }
                replace(self)?;
                let src_file = rfs::openat(
                    src,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.err("open", comps, e))?;
                let dst_file = rfs::openat(
                    dst,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::RUSR | Mode::WUSR,
                )
                .map_err(|e| self.err("create the copy of", comps, e))?;
                let mut from = File::from(src_file);
                let mut to = File::from(dst_file);
                io::copy(&mut from, &mut to).map_err(|e| self.err("copy", comps, e))?;
                self.copy_attrs(from.as_fd(), to.as_fd(), &st, comps)?;
                let ts = times_of(&st);
                rfs::futimens(&to, &ts)
                    .map_err(|e| self.err("set the mtime of the copy of", comps, e))?;
                if st.st_nlink > 1 {
                    self.links.insert(key, comps.to_vec());
                }
                Ok(false)
            }
            FileType::Symlink => {
                let target = rfs::readlinkat(src, name, Vec::new())
                    .map_err(|e| self.err("read", comps, e))?;
                replace(self)?;
                rfs::symlinkat(target.as_c_str(), dst, name)
                    .map_err(|e| self.err("create the copy of", comps, e))?;
                self.owner_and_times_at(dst, name, &st, false, comps)?;
                Ok(false)
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                replace(self)?;
                rfs::mknodat(dst, name, ft, Mode::RUSR | Mode::WUSR, st.st_rdev)
                    .map_err(|e| self.err("create the copy of", comps, e))?;
                self.owner_and_times_at(dst, name, &st, true, comps)?;
                Ok(false)
            }
            _ => Ok(false), // sockets: nothing to keep
        }
    }

    /// Owner, mode and xattrs (not `trusted.overlay.*`) from `src` to `dst`.
    fn copy_attrs(
        &self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        st: &rfs::Stat,
        comps: &[OsString],
    ) -> Result<(), ImageError> {
        if self.chown {
            rfs::fchown(
                dst,
                Some(rustix::fs::Uid::from_raw(self.id(st.st_uid))),
                Some(rustix::fs::Gid::from_raw(self.id(st.st_gid))),
            )
            .map_err(|e| self.err("chown the copy of", comps, e))?;
        }
        rfs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777))
            .map_err(|e| self.err("chmod the copy of", comps, e))?;
        let names = match list_xattrs(src) {
            Ok(n) => n,
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(()),
            Err(e) => return Err(self.err("list xattrs of", comps, e)),
        };
        for raw in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let Ok(xname) = std::str::from_utf8(raw) else {
                continue;
            };
            if xname.starts_with("trusted.overlay.") {
                continue;
            }
            let value = match get_xattr(src, xname) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let value = if xname == "security.capability" && self.unshift > 0 {
                unshift_capability(&value, self.unshift)
            } else {
                value
            };
            match rfs::fsetxattr(dst, xname, &value, XattrFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
                Err(e) => return Err(self.err("set an xattr on the copy of", comps, e)),
            }
        }
        Ok(())
    }

    fn owner_and_times_at(
        &self,
        dst: BorrowedFd<'_>,
        name: &OsStr,
        st: &rfs::Stat,
        chmod: bool,
        comps: &[OsString],
    ) -> Result<(), ImageError> {
        if self.chown {
            rfs::chownat(
                dst,
                name,
                Some(rustix::fs::Uid::from_raw(self.id(st.st_uid))),
                Some(rustix::fs::Gid::from_raw(self.id(st.st_gid))),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.err("chown the copy of", comps, e))?;
        }
        if chmod {
            // A device or fifo we just made (not a symlink): chmodat cannot be redirected.
            rfs::chmodat(
                dst,
                name,
                Mode::from_raw_mode(st.st_mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(|e| self.err("chmod the copy of", comps, e))?;
        }
        rfs::utimensat(dst, name, &times_of(st), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("set the mtime of the copy of", comps, e))?;
        Ok(())
    }
}

/// All xattr names of `fd`, NUL-separated.
fn list_xattrs(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<u8>> {
    loop {
        let size = rfs::flistxattr_query(fd)?;
        let mut buf = vec![0u8; size];
        match rfs::flistxattr(fd, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Grew between the two calls.
            Err(rustix::io::Errno::RANGE) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The value of xattr `name` of `fd`.
fn get_xattr(fd: BorrowedFd<'_>, name: &str) -> rustix::io::Result<Vec<u8>> {
    loop {
        let size = rfs::fgetxattr_query(fd, name)?;
        let mut buf = vec![0u8; size];
        match rfs::fgetxattr(fd, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {}
            Err(e) => return Err(e),
        }
    }
}

fn mtime_of(st: &rfs::Stat) -> Timespec {
    Timespec {
        tv_sec: st.st_mtime,
        tv_nsec: i64::try_from(st.st_mtime_nsec).unwrap_or(0),
    }
}

fn times_of(st: &rfs::Stat) -> Timestamps {
    Timestamps {
        last_access: mtime_of(st),
        last_modification: mtime_of(st),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn names(p: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn flattens_like_overlayfs_without_following_symlinks() {
        if !crate::test_root::require_root("flattening whiteouts and opaque dirs") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (low, up, out) = (
            tmp.path().join("low"),
            tmp.path().join("up"),
            tmp.path().join("out"),
        );
        let outside = tmp.path().join("outside");
        for d in [&low, &up, &out, &outside] {
            fs::create_dir(d).unwrap();
        }
        // Lower layer.
        fs::create_dir_all(low.join("etc")).unwrap();
        fs::write(low.join("etc/gone"), b"x").unwrap();
        fs::write(low.join("etc/kept"), b"k").unwrap();
        fs::create_dir_all(low.join("cache/sub")).unwrap();
        fs::write(low.join("cache/old"), b"o").unwrap();
        fs::write(low.join("was-file"), b"f").unwrap();
        fs::create_dir(low.join("was-dir")).unwrap();
        fs::write(low.join("was-dir/x"), b"x").unwrap();
        symlink(&outside, low.join("link")).unwrap();
        fs::write(low.join("a"), b"linked").unwrap();
        fs::hard_link(low.join("a"), low.join("b")).unwrap();
        std::os::unix::fs::lchown(low.join("etc/kept"), Some(101_000), Some(101_000)).unwrap();
        // Upper layer: whiteout, opaque dir, type changes, a dir where a symlink was.
        fs::create_dir(up.join("etc")).unwrap();
        rfs::mknodat(
            rfs::CWD,
            up.join("etc/gone"),
            FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .unwrap();
        fs::create_dir(up.join("cache")).unwrap();
        rfs::setxattr(up.join("cache"), OPAQUE_XATTR, b"y", XattrFlags::empty()).unwrap();
        fs::write(up.join("cache/new"), b"n").unwrap();
        fs::create_dir(up.join("was-file")).unwrap();
        fs::write(up.join("was-dir"), b"now a file").unwrap();
        fs::create_dir(up.join("link")).unwrap();
        fs::write(up.join("link/inside"), b"i").unwrap();

        flatten(&[up.clone(), low.clone()], &out, 100_000).unwrap();

        assert_eq!(names(&out.join("etc")), ["kept"]);
        assert_eq!(names(&out.join("cache")), ["new"]);
        assert!(out.join("was-file").is_dir());
        assert_eq!(fs::read(out.join("was-dir")).unwrap(), b"now a file");
        assert!(fs::symlink_metadata(out.join("link")).unwrap().is_dir());
        assert!(out.join("link/inside").is_file());
        assert!(
            names(&outside).is_empty(),
            "nothing was written through the lower symlink"
        );
        assert_eq!(
            fs::metadata(out.join("a")).unwrap().ino(),
            fs::metadata(out.join("b")).unwrap().ino()
        );
        assert_eq!(
            fs::metadata(out.join("etc/kept")).unwrap().uid(),
            1000,
            "ids unshifted"
        );
        let mut buf = [0u8; 4];
        assert!(rfs::getxattr(out.join("cache"), OPAQUE_XATTR, &mut buf[..]).is_err());
    }

    #[test]
    fn exports_a_private_ext4_image() {
        if !crate::test_root::require_root("flattening whiteouts and opaque dirs") {
            return;
        }
        if find_tool("mkfs.ext4").is_none() {
            eprintln!("skipped: mkfs.ext4 missing (e2fsprogs)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        fs::create_dir(&layer).unwrap();
        fs::write(layer.join("hello"), b"world").unwrap();
        let out = tmp.path().join("rootfs.ext4");
        export_ext4(std::slice::from_ref(&layer), &out, 0).unwrap();
        let m = fs::metadata(&out).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(m.len() >= AUTO_SLACK_MIB * MIB);
        assert_eq!(
            names(tmp.path()),
            ["layer", "rootfs.ext4"],
            "no temporary files left"
        );
        // Too small an image fails with mkfs' own message, and leaves nothing.
        let big = tmp.path().join("layer/big");
        fs::write(&big, vec![1u8; 3 << 20]).unwrap();
        let small = tmp.path().join("small.ext4");
        let err = export_ext4(&[layer], &small, 2).unwrap_err();
        assert!(matches!(err, ImageError::ToolFailed { .. }), "{err:?}");
        assert_eq!(names(tmp.path()), ["layer", "rootfs.ext4"]);
    }
}
