//! Walking a root file system: never following symlinks, never leaving the
//! file system (or bind mount) the root is on, and seeing each inode once.
//! Shared by [`crate::shift`] and [`disk_usage`].

use std::collections::HashSet;
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// What the walker tells the visitor about one entry.
pub(crate) struct Entry<'a> {
    /// Path of the entry (under the root, or the root itself).
    pub(crate) path: &'a Path,
    /// `lstat` of the entry.
    pub(crate) meta: &'a Metadata,
    /// False for the second and later names of a hard-linked inode.
    pub(crate) first_link: bool,
}

/// Counts the walker keeps on its own.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WalkCounts {
    /// Mount points below the root that were neither visited nor entered.
    pub(crate) mount_points_skipped: u64,
}

/// Visits `root` and everything below it, parents before children.
///
/// Symlinks are visited but never followed; directories that are mount points
/// (another device, or listed in `/proc/self/mountinfo`, which catches bind
/// mounts of the same file system) are skipped entirely. The tree must not be
/// changed by anyone else during the walk: paths are re-resolved per entry.
pub(crate) fn walk(
    root: &Path,
    mut visit: impl FnMut(Entry<'_>) -> Result<(), ImageError>,
) -> Result<WalkCounts, ImageError> {
    let meta = fs::symlink_metadata(root).map_err(|e| ImageError::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(ImageError::io(
            "walk",
            root,
            std::io::Error::from(std::io::ErrorKind::NotADirectory),
        ));
    }
    let canonical = fs::canonicalize(root).map_err(|e| ImageError::io("resolve", root, e))?;
    let mounts = mount_points_below(&canonical);
    let dev = meta.dev();
    let mut counts = WalkCounts::default();
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();

    visit(Entry {
        path: root,
        meta: &meta,
        first_link: true,
    })?;
    // (path as given, canonical path) pairs still to list.
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(root.to_path_buf(), canonical)];
    while let Some((dir, canonical_dir)) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| ImageError::io("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("list", &dir, e))?;
            let path = entry.path();
            // DirEntry::metadata is an lstat (fstatat with AT_SYMLINK_NOFOLLOW).
            let meta = entry
                .metadata()
                .map_err(|e| ImageError::io("stat", &path, e))?;
            let canonical_path = canonical_dir.join(entry.file_name());
            if meta.dev() != dev || (meta.is_dir() && mounts.contains(&canonical_path)) {
                counts.mount_points_skipped += 1;
                continue;
            }
            let first_link =
                meta.is_dir() || meta.nlink() < 2 || seen_links.insert((meta.dev(), meta.ino()));
            visit(Entry {
                path: &path,
                meta: &meta,
                first_link,
            })?;
            if meta.is_dir() {
                stack.push((path, canonical_path));
            }
        }
    }
    Ok(counts)
}

/// Bytes of disk the tree at `root` occupies: allocated blocks (like
/// `du -sx --block-size=1`), each hard-linked inode counted once, symlinks not
/// followed, other file systems mounted below `root` left out.
///
/// Meant for figures (template sizes in logs and `arca doctor`), so it takes
/// no locks: the tree should not change meanwhile.
pub fn disk_usage(root: &Path) -> Result<u64, ImageError> {
    let mut bytes = 0u64;
    walk(root, |entry| {
        if entry.first_link {
            // st_blocks is in 512-byte units whatever the file system's block size.
            bytes = bytes.saturating_add(entry.meta.blocks().saturating_mul(512));
        }
        Ok(())
    })?;
    Ok(bytes)
}

/// Mount points strictly below `root` (canonical), from `/proc/self/mountinfo`.
/// Unreadable mountinfo yields an empty set: the device check still applies.
pub(crate) fn mount_points_below(root: &Path) -> HashSet<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(root) && p != root)
        .collect()
}

/// Mount points (field 5) of a mountinfo text, octal escapes decoded.
pub(crate) fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// Decodes the `\ooo` escapes the kernel writes for space, tab, newline and
/// backslash in mountinfo paths.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            parse_mount_points(text),
            vec![PathBuf::from("/mnt/a b"), PathBuf::from("/proc")]
        );
        assert_eq!(unescape_octal("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn disk_usage_counts_hard_links_once_and_skips_symlink_targets() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 256 * 1024];
        fs::write(dir.path().join("a"), &big).unwrap();
        let one = disk_usage(dir.path()).unwrap();
        assert!(one >= 256 * 1024, "{one}");
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        // A symlink to a large tree outside must not be followed.
        std::os::unix::fs::symlink("/usr", dir.path().join("usr")).unwrap();
        let two = disk_usage(dir.path()).unwrap();
        assert!(two < one + 64 * 1024, "{one} -> {two}");
    }

    #[test]
    fn walk_refuses_a_file_as_root() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(walk(&f, |_| Ok(())).is_err());
    }
}
