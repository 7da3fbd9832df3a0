//! Test helpers for this crate and others (feature `test-util`): a sample
//! overlay layer holding every kind of entry a layer can have, and a
//! snapshot of every property of a tree, to compare copies with.
//!
//! Both need root (owners, whiteouts, `trusted.*` xattrs).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest, Sha256};

/// Owner of most of the sample: the shifted root.
pub const SAMPLE_ROOT_ID: u32 = 100_000;

/// A v3 (namespaced) `security.capability` with root id
/// [`SAMPLE_ROOT_ID`] granting `cap_dac_override` and `cap_fowner`: its
/// first mask byte is `0x0a`, a newline.
pub fn sample_capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0300_0001u32.to_le_bytes()); // v3, effective
    v.extend_from_slice(&0x0000_000au32.to_le_bytes()); // permitted low
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable low
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted high
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable high
    v.extend_from_slice(&SAMPLE_ROOT_ID.to_le_bytes());
    v
}

fn file(dir: &Path, rel: &[u8], data: &[u8], mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let p = dir.join(OsStr::from_bytes(rel));
    fs::write(&p, data)?;
    lchown(&p, Some(uid), Some(gid))?;
    // After chown, which clears setuid bits.
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))
}

fn dir_at(dir: &Path, rel: &[u8], mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let p = dir.join(OsStr::from_bytes(rel));
    fs::create_dir(&p)?;
    lchown(&p, Some(uid), Some(gid))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))
}

/// Fills the empty directory `dir` with a layer holding: nested and
/// read-only directories, setuid, setgid and sticky modes, owners in the
/// shifted range, a capability whose bytes hold a newline, `user.*` and
/// `trusted.overlay.*` xattrs (also on a symlink) with binary values, a
/// whiteout, an opaque directory, a file with three hard links across
/// directories, symlinks (absolute, dangling, with `//` and `.` kept
/// verbatim), a fifo, a sparse file, names longer than 100 bytes and with a
/// newline or non-UTF-8 bytes, and nanosecond and pre-1970 mtimes.
/// `variant` goes into file contents and names, so that layers differ.
pub fn fill_sample_layer(dir: &Path, variant: &str) -> io::Result<()> {
    let r = SAMPLE_ROOT_ID;
    let v = variant.as_bytes();
    lchown(dir, Some(r), Some(r))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for (d, mode) in [
        (&b"etc"[..], 0o755),
        (b"usr", 0o755),
        (b"usr/bin", 0o755),
        (b"usr/lib", 0o755),
        (b"sbin", 0o750),
        (b"tmp", 0o1777),
        (b"home", 0o755),
        (b"var", 0o755),
        (b"var/cache", 0o755),
        (b"run", 0o755),
        (b"weird", 0o755),
        (b"ro", 0o755),
    ] {
        dir_at(dir, d, mode, r, r)?;
    }
    dir_at(dir, b"home/user", 0o700, r + 1000, r + 1000)?;
    file(
        dir,
        b"home/user/.bashrc",
        b"export PS1='$ '\n",
        0o644,
        r + 1000,
        r + 1000,
    )?;
    file(
        dir,
        b"etc/passwd",
        &[b"root:x:0:0:", v, b"\n"].concat(),
        0o644,
        r,
        r,
    )?;
    file(dir, b"etc/shadow", b"root:*:1::::::\n", 0o640, r, r + 42)?;
    file(dir, b"usr/bin/su", b"\x7fELF su", 0o4755, r, r)?;
    file(dir, b"usr/bin/wall", b"\x7fELF wall", 0o2755, r, r + 5)?;
    file(dir, b"usr/bin/ping", b"\x7fELF ping", 0o755, r, r)?;
    rfs::setxattr(
        dir.join("usr/bin/ping"),
        "security.capability",
        &sample_capability(),
        XattrFlags::empty(),
    )?;
    rfs::setxattr(
        dir.join("etc/passwd"),
        "user.note",
        b"bin\nary\0value",
        XattrFlags::empty(),
    )?;
    // Three names of one inode, in three directories.
    file(
        dir,
        b"usr/bin/busybox",
        &[b"busybox ", v].concat(),
        0o755,
        r,
        r,
    )?;
    fs::hard_link(dir.join("usr/bin/busybox"), dir.join("usr/lib/busybox.so"))?;
    fs::hard_link(dir.join("usr/bin/busybox"), dir.join("sbin/ls"))?;
    // Whiteout and opaque dir, as overlayfs and the unpacker make them.
    rfs::mknodat(
        rfs::CWD,
        dir.join(OsStr::from_bytes(&[b"removed-", v].concat())),
        FileType::CharacterDevice,
        Mode::empty(),
        rfs::makedev(0, 0),
    )?;
    lchown(
        dir.join(OsStr::from_bytes(&[b"removed-", v].concat())),
        Some(r),
        Some(r),
    )?;
    rfs::setxattr(
        dir.join("var/cache"),
        "trusted.overlay.opaque",
        b"y",
        XattrFlags::empty(),
    )?;
    file(dir, b"var/cache/new", v, 0o600, r + 7, r + 7)?;
    rfs::mknodat(
        rfs::CWD,
        dir.join("run/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )?;
    lchown(dir.join("run/fifo"), Some(r), Some(r + 3))?;
    // Devices as debootstrap leaves them in /dev (harmless: sandboxes
    // mount their root nodev).
    fs::create_dir_all(dir.join("dev"))?;
    lchown(dir.join("dev"), Some(r), Some(r))?;
    for (name, kind, (major, minor)) in [
        ("dev/console", FileType::CharacterDevice, (5, 1)),
        ("dev/loop9", FileType::BlockDevice, (7, 9)),
    ] {
        rfs::mknodat(
            rfs::CWD,
            dir.join(name),
            kind,
            Mode::from_raw_mode(0o600),
            rfs::makedev(major, minor),
        )?;
        lchown(dir.join(name), Some(r), Some(r))?;
    }
    // Symlinks, never followed and kept verbatim.
    for (name, target) in [
        (&b"usr/bin/sh"[..], &b"dash"[..]),
        (b"abs", b"/etc/passwd"),
        (b"odd", b"a//b/./c/"),
        (b"dangling", b"../../nowhere/x"),
    ] {
        let p = dir.join(OsStr::from_bytes(name));
        symlink(OsStr::from_bytes(target), &p)?;
        lchown(&p, Some(r), Some(r + 1))?;
    }
    rfs::lsetxattr(
        dir.join("usr/bin/sh"),
        "trusted.overlay.origin",
        b"\x00\xfb\n\x01",
        XattrFlags::empty(),
    )?;
    // Read-only directory with content: a reader must fill it before its mode.
    file(dir, b"ro/f", b"read only", 0o444, r, r)?;
    fs::set_permissions(dir.join("ro"), fs::Permissions::from_mode(0o555))?;
    // Names: long, newline, not UTF-8.
    let long_dir = [&b"deep/"[..], &[b'd'; 120][..]].concat();
    fs::create_dir_all(dir.join(OsStr::from_bytes(&long_dir)))?;
    lchown(dir.join("deep"), Some(r), Some(r))?;
    lchown(dir.join(OsStr::from_bytes(&long_dir)), Some(r), Some(r))?;
    let long_file = [&long_dir[..], b"/", &[b'f'; 90][..]].concat();
    file(dir, &long_file, b"long", 0o644, r, r)?;
    file(dir, b"weird/new\nline", b"nl", 0o644, r, r)?;
    file(dir, b"weird/\xff\xfe", b"latin", 0o644, r, r)?;
    file(dir, b"weird/sp ace", b"", 0o600, r, r)?;
    // Sparse (written dense by the archive), and large enough to span buffers.
    {
        let p = dir.join("usr/lib/sparse");
        let f = fs::File::create(&p)?;
        f.set_len(3 << 20)?;
        use std::os::unix::fs::FileExt as _;
        f.write_all_at(b"tail", (3 << 20) - 4)?;
        lchown(&p, Some(r), Some(r))?;
    }
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i % 251).to_le_bytes()[0])
        .collect();
    file(dir, b"usr/lib/big", &big, 0o644, r, r)?;
    // Times last: nanoseconds everywhere, one before 1970.
    let mut n = 0i64;
    set_times(dir, Path::new(""), &mut n)?;
    let old = Timespec {
        tv_sec: -86_400,
        tv_nsec: 250_000_000,
    };
    rfs::utimensat(
        rfs::CWD,
        dir.join("etc/shadow"),
        &Timestamps {
            last_access: old,
            last_modification: old,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Gives every entry below `dir/rel` (and itself) a distinct mtime.
fn set_times(dir: &Path, rel: &Path, n: &mut i64) -> io::Result<()> {
    let p = dir.join(rel);
    let meta = fs::symlink_metadata(&p)?;
    if meta.is_dir() {
        for e in fs::read_dir(&p)? {
            set_times(dir, &rel.join(e?.file_name()), n)?;
        }
    }
    *n += 1;
    let t = Timespec {
        tv_sec: 1_600_000_000 + *n * 1000,
        tv_nsec: (*n * 123_456_789) % 1_000_000_000,
    };
    rfs::utimensat(
        rfs::CWD,
        &p,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Every property of one entry of a tree that a layer copy must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySnapshot {
    /// Path below the root (empty for the root).
    pub path: Vec<u8>,
    /// `d`, `f`, `l`, `c`, `b`, `p` or `s`.
    pub kind: char,
    /// Permission bits with setuid, setgid, sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime, seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Device numbers of a device.
    pub rdev: (u32, u32),
    /// SHA-256 and size of a regular file's content.
    pub content: Option<(String, u64)>,
    /// A symlink's target.
    pub target: Option<Vec<u8>>,
    /// For the second and later names of an inode: the first one.
    pub link_of: Option<Vec<u8>>,
    /// xattrs, sorted.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Every entry below `root` (and itself), sorted by path.
pub fn snapshot(root: &Path) -> io::Result<Vec<EntrySnapshot>> {
    let mut paths = Vec::new();
    collect(root, Vec::new(), &mut paths)?;
    paths.sort();
    let mut first_names = std::collections::HashMap::new();
    let mut out = Vec::new();
    for rel in paths {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(&rel))
        };
        let m = fs::symlink_metadata(&p)?;
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt as _;
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let link_of = if kind != 'd' && m.nlink() > 1 {
            match first_names.get(&(m.dev(), m.ino())) {
                Some(first) => Some(Vec::clone(first)),
                None => {
                    first_names.insert((m.dev(), m.ino()), rel.clone());
                    None
                }
            }
        } else {
            None
        };
        let content = if kind == 'f' {
            let data = fs::read(&p)?;
            Some((format!("{:x}", Sha256::digest(&data)), data.len() as u64))
        } else {
            None
        };
        let target = if kind == 'l' {
            Some(fs::read_link(&p)?.as_os_str().as_bytes().to_vec())
        } else {
            None
        };
        let mut xattrs = Vec::new();
        let mut names = vec![0u8; 64 * 1024];
        let n = rfs::llistxattr(&p, &mut names[..])?;
        for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
            let mut value = vec![0u8; 64 * 1024];
            let len = rfs::lgetxattr(&p, name, &mut value[..])?;
            value.truncate(len);
            xattrs.push((name.to_vec(), value));
        }
        xattrs.sort();
        let rdev = m.rdev();
        out.push(EntrySnapshot {
            path: rel,
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: (m.mtime(), m.mtime_nsec()),
            rdev: if matches!(kind, 'c' | 'b') {
                (rfs::major(rdev), rfs::minor(rdev))
            } else {
                (0, 0)
            },
            content,
            target,
            link_of,
            xattrs,
        });
    }
    Ok(out)
}

fn collect(root: &Path, rel: Vec<u8>, out: &mut Vec<Vec<u8>>) -> io::Result<()> {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(&rel))
    };
    let is_dir = fs::symlink_metadata(&p)?.is_dir();
    out.push(rel.clone());
    if is_dir {
        for e in fs::read_dir(&p)? {
            let name = e?.file_name();
            let child = if rel.is_empty() {
                name.as_bytes().to_vec()
            } else {
                [&rel[..], b"/", name.as_bytes()].concat()
            };
            collect(root, child, out)?;
        }
    }
    Ok(())
}
