//! Shifting a root file system's owners into the sandboxes' id range.
//!
//! Sandboxes run in a user namespace where sandbox id `N` is host id
//! `offset + N` for `N < MAPPED_IDS` (one mapping shared by all sandboxes,
//! see the ADR on user namespaces). Template trees are therefore stored with
//! every owner shifted by `offset`, so that inside a sandbox `root` owns
//! `/usr` and `user` (1000) owns `/home/user`.
//!
//! # Idempotency without a marker
//!
//! The offset must be at least [`MAPPED_IDS`]. Then unshifted ids
//! (`0..MAPPED_IDS`) and shifted ids (`offset..offset + MAPPED_IDS`) cannot
//! overlap, and each id tells by itself whether it was already shifted.
//! [`shift_ownership`] maps every uid and gid on its own:
//!
//! | id on disk | becomes |
//! |---|---|
//! | `0..MAPPED_IDS` | `id + offset` |
//! | `offset..offset + MAPPED_IDS` | unchanged (already shifted) |
//! | anything else | unchanged, counted in [`ShiftStats::unmappable`] (shows as the overflow id inside) |
//!
//! So running it twice is a no-op, and running it again after a crash in the
//! middle finishes the job: no marker file is needed (one inside the tree would
//! be visible to users, one beside it could disagree with the tree after a
//! crash). The price: a tree that already holds ids in the shifted range before
//! its first shift cannot be told apart from a shifted one; Debian and OCI
//! images do not use ids that high.
//!
//! # What is kept
//!
//! - Symlinks are chowned themselves (`lchown`), never followed.
//! - Other file systems and bind mounts below the root are skipped.
//! - A hard-linked inode is changed once, through its first name.
//! - `chown` clears setuid/setgid on non-directories and drops the
//!   `security.capability` xattr; both are put back (mode via `chmod`, the
//!   capability bytes as they were). Other xattrs are untouched.
//! - POSIX ACL entries that name a user or group are **not** shifted (they keep
//!   host ids); [`ShiftStats::acl_entries_untouched`] counts files with ACLs so
//!   a caller can warn. A minbase Debian tree has none.
//!
//! The tree must be quiescent (nothing running in it, nobody else changing it).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::XattrFlags;

use crate::ImageError;
use crate::walk::{self, Entry};

/// Number of ids each sandbox's user namespace maps (uid and gid alike).
pub const MAPPED_IDS: u32 = 65536;

/// xattr holding file capabilities; the kernel removes it on chown.
const CAPABILITY_XATTR: &str = "security.capability";
/// xattrs holding POSIX ACLs.
const ACL_XATTRS: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];
/// setuid and setgid bits.
const SETID_BITS: u32 = 0o6000;

/// What [`shift_ownership`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShiftStats {
    /// Names visited, the root included (hard links each count here).
    pub entries: u64,
    /// Inodes whose owner or group was changed.
    pub changed: u64,
    /// Inodes whose owner and group were already in the shifted range.
    pub already_shifted: u64,
    /// Second and later names of hard-linked inodes (not changed again).
    pub hardlinks_skipped: u64,
    /// Files whose setuid/setgid bits were put back after chown.
    pub setid_restored: u64,
    /// Files whose `security.capability` was put back after chown.
    pub capabilities_restored: u64,
    /// Mount points below the root that were left alone.
    pub mount_points_skipped: u64,
    /// Inodes with a uid or gid outside both ranges (left as they were).
    pub unmappable: u64,
    /// Inodes carrying POSIX ACLs, whose named entries were not shifted.
    pub acl_entries_untouched: u64,
}

/// Where one id goes; see the module docs for the table.
fn map_id(id: u32, offset: u32) -> Option<u32> {
    if id < MAPPED_IDS {
        Some(id + offset)
    } else if id >= offset && id - offset < MAPPED_IDS {
        Some(id)
    } else {
        None
    }
}

/// Adds `offset` to the owner and group of every file below (and including)
/// `root`, as the module docs describe. Idempotent and safe to re-run after an
/// interruption.
///
/// Needs root (CAP_CHOWN, CAP_FOWNER, CAP_SETFCAP). `offset` must be at least
/// [`MAPPED_IDS`] and leave room for the whole range in a `u32`.
pub fn shift_ownership(root: &Path, offset: u32) -> Result<ShiftStats, ImageError> {
    if offset < MAPPED_IDS || offset.checked_add(MAPPED_IDS).is_none() {
        return Err(ImageError::InvalidOffset {
            offset,
            min: MAPPED_IDS,
        });
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot {
            action: "shifting file owners",
        });
    }
    let mut stats = ShiftStats::default();
    let counts = walk::walk(root, |entry| shift_entry(&entry, offset, &mut stats))?;
    stats.mount_points_skipped = counts.mount_points_skipped;
    tracing::debug!(root = %root.display(), offset, ?stats, "shifted file owners");
    Ok(stats)
}

fn shift_entry(entry: &Entry<'_>, offset: u32, stats: &mut ShiftStats) -> Result<(), ImageError> {
    stats.entries += 1;
    if !entry.first_link {
        stats.hardlinks_skipped += 1;
        return Ok(());
    }
    let (path, meta) = (entry.path, entry.meta);
    let (uid, gid) = (meta.uid(), meta.gid());
    let new_uid = map_id(uid, offset);
    let new_gid = map_id(gid, offset);
    if new_uid.is_none() || new_gid.is_none() {
        stats.unmappable += 1;
    }
    let new_uid = new_uid.unwrap_or(uid);
    let new_gid = new_gid.unwrap_or(gid);
    let is_symlink = meta.file_type().is_symlink();
    if !is_symlink && has_acl(path)? {
        stats.acl_entries_untouched += 1;
    }
    if (new_uid, new_gid) == (uid, gid) {
        stats.already_shifted += u64::from(map_id(uid, offset).is_some());
        return Ok(());
    }

    let capability = if meta.is_file() {
        read_capability(path)?
    } else {
        None
    };
    std::os::unix::fs::lchown(path, Some(new_uid), Some(new_gid))
        .map_err(|e| ImageError::io("chown", path, e))?;
    stats.changed += 1;

    let mode = meta.mode();
    if !is_symlink && mode & SETID_BITS != 0 {
        // Not a symlink (checked above), so set_permissions' chmod cannot be
        // redirected, given the quiescent tree the module docs require.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| ImageError::io("chmod", path, e))?;
        stats.setid_restored += 1;
    }
    if let Some(value) = capability {
        rustix::fs::lsetxattr(path, CAPABILITY_XATTR, &value, XattrFlags::empty())
            .map_err(|e| ImageError::io("restore security.capability of", path, e.into()))?;
        stats.capabilities_restored += 1;
    }
    Ok(())
}

/// The raw `security.capability` value of a regular file, if it has one.
fn read_capability(path: &Path) -> Result<Option<Vec<u8>>, ImageError> {
    // v3 capabilities are 24 bytes; leave room for a future revision.
    let mut buf = [0u8; 64];
    match rustix::fs::lgetxattr(path, CAPABILITY_XATTR, &mut buf[..]) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => Ok(None),
        Err(e) => Err(ImageError::io(
            "read security.capability of",
            path,
            io::Error::from(e),
        )),
    }
}

/// Whether the entry carries a POSIX ACL (access or default).
fn has_acl(path: &Path) -> Result<bool, ImageError> {
    let list_err = |e: rustix::io::Errno| ImageError::io("list xattrs of", path, e.into());
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(0) | Err(rustix::io::Errno::OPNOTSUPP) => return Ok(false),
        Ok(n) => n,
        Err(e) => return Err(list_err(e)),
    };
    let mut names = vec![0u8; size];
    let n = rustix::fs::llistxattr(path, &mut names[..]).map_err(list_err)?;
    Ok(names[..n]
        .split(|b| *b == 0)
        .any(|name| ACL_XATTRS.iter().any(|acl| acl.as_bytes() == name)))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    const OFFSET: u32 = 100_000;

    #[test]
    fn ids_map_into_the_range_once() {
        assert_eq!(map_id(0, OFFSET), Some(100_000));
        assert_eq!(map_id(1000, OFFSET), Some(101_000));
        assert_eq!(map_id(65535, OFFSET), Some(165_535));
        assert_eq!(map_id(101_000, OFFSET), Some(101_000));
        assert_eq!(map_id(100_000, OFFSET), Some(100_000));
        assert_eq!(map_id(65536, OFFSET), None);
        assert_eq!(map_id(165_536, OFFSET), None);
        assert_eq!(map_id(u32::MAX, OFFSET), None);
    }

    #[test]
    fn small_or_overflowing_offsets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for offset in [0, 1000, MAPPED_IDS - 1, u32::MAX - 10] {
            assert!(matches!(
                shift_ownership(dir.path(), offset),
                Err(ImageError::InvalidOffset { .. })
            ));
        }
    }

    fn owner(path: &Path) -> (u32, u32) {
        let m = fs::symlink_metadata(path).unwrap();
        (m.uid(), m.gid())
    }

    /// A v2 `security.capability` value granting cap_net_raw (bit 13),
    /// permitted and effective.
    fn cap_net_raw_v2() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes()); // revision 2, effective
        v.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted, low word
        v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, low word
        v.extend_from_slice(&0u32.to_le_bytes()); // permitted, high word
        v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, high word
        v
    }

    #[test]
    fn shifts_a_tree_keeping_setid_caps_and_outside_targets() {
        if !crate::test_root::require_root("shift_ownership tests") {
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("secret");
        fs::write(&target, b"host file").unwrap();
        std::os::unix::fs::chown(&target, Some(4242), Some(4242)).unwrap();

        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(root.join("home/user")).unwrap();
        std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
        fs::write(root.join("home/user/notes"), b"hi").unwrap();
        std::os::unix::fs::chown(root.join("home/user/notes"), Some(1000), Some(100)).unwrap();
        let sudo = root.join("sudo");
        fs::write(&sudo, b"#!/bin/true\n").unwrap();
        fs::set_permissions(&sudo, fs::Permissions::from_mode(0o4755)).unwrap();
        let wall = root.join("wall");
        fs::write(&wall, b"x").unwrap();
        std::os::unix::fs::chown(&wall, Some(0), Some(5)).unwrap();
        fs::set_permissions(&wall, fs::Permissions::from_mode(0o2755)).unwrap();
        let ping = root.join("ping");
        fs::write(&ping, b"x").unwrap();
        rustix::fs::lsetxattr(
            &ping,
            CAPABILITY_XATTR,
            &cap_net_raw_v2(),
            XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::lsetxattr(&ping, "user.note", b"kept", XattrFlags::empty()).unwrap();
        symlink(&target, root.join("escape")).unwrap();
        symlink(outside.path(), root.join("escape-dir")).unwrap();
        fs::hard_link(root.join("home/user/notes"), root.join("notes-link")).unwrap();
        let odd = root.join("odd");
        fs::write(&odd, b"x").unwrap();
        std::os::unix::fs::chown(&odd, Some(70_000), Some(0)).unwrap();

        let stats = shift_ownership(&root, OFFSET).unwrap();

        assert_eq!(owner(&root), (100_000, 100_000));
        assert_eq!(owner(&root.join("home")), (100_000, 100_000));
        assert_eq!(owner(&root.join("home/user")), (101_000, 101_000));
        assert_eq!(owner(&root.join("home/user/notes")), (101_000, 100_100));
        assert_eq!(owner(&root.join("notes-link")), (101_000, 100_100));
        assert_eq!(owner(&root.join("escape")), (100_000, 100_000));
        assert_eq!(owner(&odd), (70_000, 100_000));
        // Symlink targets outside were not touched.
        assert_eq!(owner(&target), (4242, 4242));
        assert_eq!(owner(outside.path()), (0, 0));
        // setuid/setgid survive chown.
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&sudo), 0o4755);
        assert_eq!(owner(&sudo), (100_000, 100_000));
        assert_eq!(mode(&wall), 0o2755);
        assert_eq!(owner(&wall), (100_000, 100_005));
        // The capability is back, byte for byte, and other xattrs are intact.
        let mut buf = [0u8; 64];
        let n = rustix::fs::lgetxattr(&ping, CAPABILITY_XATTR, &mut buf[..]).unwrap();
        assert_eq!(buf[..n], cap_net_raw_v2()[..]);
        let n = rustix::fs::lgetxattr(&ping, "user.note", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"kept");

        // root, home, home/user, notes, sudo, wall, ping, escape, escape-dir,
        // notes-link, odd
        assert_eq!(stats.entries, 11, "{stats:?}");
        assert_eq!(stats.changed, 10, "{stats:?}");
        assert_eq!(stats.hardlinks_skipped, 1);
        assert_eq!(stats.setid_restored, 2);
        assert_eq!(stats.capabilities_restored, 1);
        assert_eq!(stats.unmappable, 1);
        assert_eq!(stats.already_shifted, 0);

        // A second run changes nothing.
        let again = shift_ownership(&root, OFFSET).unwrap();
        assert_eq!(again.changed, 0, "{again:?}");
        assert_eq!(again.already_shifted, 9, "{again:?}");
        assert_eq!(again.unmappable, 1);
        assert_eq!(owner(&root.join("home/user")), (101_000, 101_000));
        assert_eq!(mode(&sudo), 0o4755);
    }

    #[test]
    fn resumes_a_half_shifted_tree() {
        if !crate::test_root::require_root("shift_ownership tests") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("done"), b"x").unwrap();
        std::os::unix::fs::chown(root.join("done"), Some(101_000), Some(101_000)).unwrap();
        fs::write(root.join("todo"), b"x").unwrap();
        std::os::unix::fs::chown(root.join("todo"), Some(1000), Some(1000)).unwrap();
        let stats = shift_ownership(root, OFFSET).unwrap();
        assert_eq!(owner(&root.join("done")), (101_000, 101_000));
        assert_eq!(owner(&root.join("todo")), (101_000, 101_000));
        assert_eq!((stats.changed, stats.already_shifted), (2, 1), "{stats:?}");
    }

    #[test]
    fn does_not_enter_mount_points() {
        if !crate::test_root::require_root("shift_ownership tests") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let mnt = root.join("mnt");
        fs::create_dir(&mnt).unwrap();
        let inside = mnt.join("f");
        if nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .is_err()
        {
            eprintln!("skipped: cannot mount tmpfs here");
            return;
        }
        let result = (|| {
            fs::write(&inside, b"x")?;
            Ok::<_, io::Error>(())
        })()
        .map(|()| shift_ownership(root, OFFSET));
        let inside_owner = fs::symlink_metadata(&inside).map(|m| (m.uid(), m.gid()));
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        let stats = result.unwrap().unwrap();
        assert_eq!(stats.mount_points_skipped, 1);
        assert_eq!(inside_owner.unwrap(), (0, 0));
        // The directory under the mount was skipped along with the mount.
        assert_eq!(owner(&mnt), (0, 0));
    }
}
