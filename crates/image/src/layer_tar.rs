//! The layer archive: how one committed layer of a [`LayerStore`] travels
//! from one node to another (cluster mode: a template built on one node is
//! pulled by the others).
//!
//! Unlike [`crate::unpack`], which converts OCI layers *into* overlayfs
//! format, this copies a directory that already is in overlayfs format, as
//! it is: whiteouts stay 0:0 character devices, opaque directories keep
//! their `trusted.overlay.opaque` xattr, owners stay the shifted ids they
//! are on disk.
//!
//! # Format (version [`FORMAT_VERSION`])
//!
//! A POSIX tar stream (ustar headers, PAX extended headers), uncompressed,
//! written by [`write_layer`]; GNU tar lists it, and extracts it with
//! `--xattrs --xattrs-include='*'`, for debugging:
//!
//! - One member per inode name, in a fixed order: the entries of a directory
//!   sorted by name bytes, each subdirectory's members (recursively) before
//!   the subdirectory's own member, the layer root (`.`) last. So a reader
//!   sets a directory's mode, owner, xattrs and mtime once nothing more is
//!   created in it, and the same tree always gives the same bytes.
//! - Regular files (data dense: holes are written as zeros), directories,
//!   symlinks (target verbatim, never followed), hard links (the first name
//!   of an inode carries the data; later names are link members naming it),
//!   character and block devices, fifos. Sockets are left out (tar has no
//!   type for them); [`WriteStats::sockets_skipped`] counts them.
//! - Mode with setuid, setgid and sticky bits; numeric uid and gid as stored
//!   (no user names); mtime, with nanoseconds in PAX `mtime` when they are
//!   not zero. Access times are not kept (a reader sets them to the mtime).
//! - Every xattr as PAX `SCHILY.xattr.<name>` with the raw value bytes.
//! - Names longer than the 100-byte header field go in PAX `path` and
//!   `linkpath`, raw bytes too (any byte but NUL and `/` in a component).
//! - Last, a PAX global header (the trailer) with `ARCA.layer.format`,
//!   `ARCA.layer.entries` (members before it, PAX headers not counted) and
//!   `ARCA.layer.sha256`: the SHA-256 of every byte before the trailer's
//!   header. Then the two zero blocks that end a tar.
//!
//! PAX records are parsed here, not by the tar crate, which splits records
//! at newlines and so cannot read binary xattr values (a capability mask
//! can hold a `0x0a` byte) or names with newlines.
//!
//! # Reading from a peer that may be hostile
//!
//! [`read_layer`] trusts nothing in the stream:
//!
//! - A path is `.` (the layer root) or components that are neither empty,
//!   `.` nor `..`, without NUL, not starting with `/`: anything else is
//!   refused, never rewritten. The same holds for hard-link targets, which
//!   must also name an earlier non-directory of the same archive.
//! - Parents are opened one component at a time with `O_NOFOLLOW |
//!   O_DIRECTORY` from the destination's fd, missing ones made (0700, root);
//!   a symlink or a non-directory on the way refuses the member. Nothing is
//!   ever replaced: a name that exists already refuses the member (except a
//!   directory member for a directory made as a parent before). Files are
//!   created with `O_CREAT | O_EXCL | O_NOFOLLOW`, symlink owners and times
//!   are set without following.
//! - Character and block devices are made with their numbers, as an OCI
//!   layer's are by [`crate::unpack`] (debootstrap's `/dev` has real ones):
//!   sandboxes mount their root `nodev`, so a device in a layer opens
//!   nothing. Member types this writer never produces are refused.
//! - Owners below [`ReadOptions::min_id`] are refused.
//! - Only xattrs overlayfs and sandboxes use are applied: `trusted.overlay.*`,
//!   `user.*`, `security.capability` and POSIX ACLs; others (e.g. a host's
//!   `security.selinux` labels) are skipped and counted.
//! - A PAX header is at most [`MAX_PAX_BYTES`]; an archive without a valid
//!   trailer (cut short, corrupted, or more members than it says) fails.
//!
//! A failed read leaves `dest` partly filled: the caller discards it (a
//! [`LayerWriter`](crate::store::LayerWriter) does when dropped).
//!
//! [`LayerStore`]: crate::store::LayerStore

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::unpack::hex;
use crate::{ImageError, fsx};

/// Version of the archive format, in the trailer; a reader refuses others.
pub const FORMAT_VERSION: u32 = 1;

/// Media type of the archive, e.g. for an HTTP `Content-Type`.
pub const MEDIA_TYPE: &str = "application/vnd.arca.layer.v1.tar";

/// Largest PAX header a reader accepts, in bytes (xattr values are at most
/// 64 KiB, paths at most a few KiB).
pub const MAX_PAX_BYTES: u64 = 1 << 20;

/// tar block size.
const BLOCK: usize = 512;
/// Length of the name and link-name fields of a tar header.
const NAME_FIELD: usize = 100;
/// Buffer between the archive and the caller's reader or writer.
const IO_BUFFER: usize = 256 * 1024;
/// Trailer keys.
const KEY_FORMAT: &str = "ARCA.layer.format";
const KEY_ENTRIES: &str = "ARCA.layer.entries";
const KEY_SHA256: &str = "ARCA.layer.sha256";
/// PAX key prefix of an xattr.
const XATTR_KEY: &[u8] = b"SCHILY.xattr.";
/// Name of the PAX headers' own tar members.
const PAX_NAME: &[u8] = b"././@PaxHeader";
/// xattr names a reader applies: exact names, then prefixes.
const XATTRS_KEPT: &[&str] = &[
    "security.capability",
    "system.posix_acl_access",
    "system.posix_acl_default",
];
const XATTR_PREFIXES_KEPT: &[&str] = &["trusted.overlay.", "user."];

/// Flags of every directory open: no symlink, must be a directory.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// What [`write_layer`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteStats {
    /// Members written (the root included, PAX headers and trailer not).
    pub entries: u64,
    /// Bytes of regular-file data.
    pub bytes: u64,
    /// Hard-link members (second and later names of an inode).
    pub hard_links: u64,
    /// xattrs written.
    pub xattrs: u64,
    /// Sockets left out.
    pub sockets_skipped: u64,
    /// `sha256:<hex>` the trailer carries.
    pub digest: String,
}

/// What [`read_layer`] made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadStats {
    /// Members read (the root included, PAX headers and trailer not).
    pub entries: u64,
    /// Bytes of regular-file data written.
    pub bytes: u64,
    /// Hard links made.
    pub hard_links: u64,
    /// Whiteouts (0:0 character devices) made.
    pub whiteouts: u64,
    /// xattrs applied.
    pub xattrs: u64,
    /// xattrs not applied because their namespace is not one a layer needs.
    pub xattrs_skipped: u64,
    /// `sha256:<hex>` of the archive before its trailer, as checked.
    pub digest: String,
}

/// How to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Smallest uid and gid accepted: with the sandboxes' id offset here, a
    /// peer cannot plant files owned by host users (root above all).
    pub min_id: u32,
}

impl ReadOptions {
    /// Options accepting owners from `min_id` up.
    pub fn with_min_id(min_id: u32) -> Self {
        Self { min_id }
    }
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Writes the layer directory `dir` to `out` in the format the module docs
/// describe. Never follows a symlink and never leaves the file system `dir`
/// is on (a mount point below it is left out). The tree must not change
/// meanwhile: a file that shrinks while it is copied fails the write.
///
/// On error `out` holds a partial archive without a trailer, which every
/// reader refuses.
pub fn write_layer(dir: &Path, out: impl Write) -> Result<WriteStats, ImageError> {
    let root = fsx::open_dir(dir).map_err(|e| ImageError::io("open", dir, e))?;
    let mut walker = Walker {
        out: ArchiveOut::new(BufWriter::with_capacity(IO_BUFFER, out)),
        dev: rfs::fstat(&root)
            .map_err(|e| ImageError::io("stat", dir, e.into()))?
            .st_dev,
        links: HashMap::new(),
        stats: WriteStats::default(),
        base: dir,
    };
    walker.walk(root)?;
    let Walker { out, mut stats, .. } = walker;
    let (mut inner, digest) = out
        .finish()
        .map_err(|e| ImageError::io("write the archive of", dir, e))?;
    inner
        .flush()
        .map_err(|e| ImageError::io("write the archive of", dir, e))?;
    stats.digest = digest;
    Ok(stats)
}

/// One member's metadata, as written.
struct Member<'a> {
    kind: EntryType,
    path: &'a [u8],
    link: &'a [u8],
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    size: u64,
    rdev: (u32, u32),
    xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl Member<'_> {
    /// A member of `kind` at `path` with the metadata of `st`.
    fn from_stat<'a>(
        kind: EntryType,
        path: &'a [u8],
        st: &rfs::Stat,
        xattrs: &'a [(Vec<u8>, Vec<u8>)],
    ) -> Member<'a> {
        Member {
            kind,
            path,
            link: b"",
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: Timespec {
                tv_sec: st.st_mtime,
                tv_nsec: i64::try_from(st.st_mtime_nsec).unwrap_or(0),
            },
            size: 0,
            rdev: (0, 0),
            xattrs,
        }
    }
}

/// The byte level of the archive: headers, padding, the running digest.
struct ArchiveOut<W: Write> {
    out: W,
    hasher: Sha256,
    entries: u64,
}

impl<W: Write> ArchiveOut<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            hasher: Sha256::new(),
            entries: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)
    }

    /// Zeros up to the next block boundary after `len` bytes of data.
    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = usize::try_from(len % BLOCK as u64).unwrap_or(0);
        if rem == 0 {
            return Ok(());
        }
        self.put(&[0u8; BLOCK][..BLOCK - rem])
    }

    /// A PAX header member (`x` local, `g` global) holding `records`.
    fn pax(&mut self, kind: EntryType, records: &[u8]) -> io::Result<()> {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        set_field(&mut h.as_old_mut().name, PAX_NAME);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(records.len() as u64);
        h.set_cksum();
        self.put(h.as_bytes())?;
        self.put(records)?;
        self.pad(records.len() as u64)
    }

    /// One member and exactly `m.size` bytes of `data`.
    fn member(&mut self, m: &Member<'_>, data: &mut dyn Read) -> io::Result<()> {
        let mut records = Vec::new();
        if m.path.len() > NAME_FIELD {
            pax_record(&mut records, b"path", m.path);
        }
        if m.link.len() > NAME_FIELD {
            pax_record(&mut records, b"linkpath", m.link);
        }
        if m.mtime.tv_nsec != 0 || m.mtime.tv_sec < 0 {
            pax_record(&mut records, b"mtime", format_pax_time(m.mtime).as_bytes());
        }
        for (name, value) in m.xattrs {
            pax_record(&mut records, &[XATTR_KEY, name].concat(), value);
        }
        if !records.is_empty() {
            self.pax(EntryType::XHeader, &records)?;
        }
        let mut h = Header::new_ustar();
        h.set_entry_type(m.kind);
        // A longer name is cut here; the PAX record above has it whole.
        set_field(&mut h.as_old_mut().name, m.path);
        set_field(&mut h.as_old_mut().linkname, m.link);
        h.set_mode(m.mode);
        h.set_uid(u64::from(m.uid));
        h.set_gid(u64::from(m.gid));
        h.set_mtime(u64::try_from(m.mtime.tv_sec).unwrap_or(0));
        // Sizes of 8 GiB and more are written base-256, as GNU tar does.
        h.set_size(m.size);
        if matches!(m.kind, EntryType::Char | EntryType::Block) {
            h.set_device_major(m.rdev.0)?;
            h.set_device_minor(m.rdev.1)?;
        }
        h.set_cksum();
        self.put(h.as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = m.size;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = match data.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was archived",
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.put(&buf[..n])?;
            left -= n as u64;
        }
        self.pad(m.size)?;
        self.entries += 1;
        Ok(())
    }

    /// The trailer and the end-of-archive blocks; returns the writer and
    /// the digest the trailer carries.
    fn finish(mut self) -> io::Result<(W, String)> {
        let digest = format!("sha256:{}", hex(&self.hasher.clone().finalize()));
        let mut records = Vec::new();
        pax_record(
            &mut records,
            KEY_FORMAT.as_bytes(),
            FORMAT_VERSION.to_string().as_bytes(),
        );
        pax_record(
            &mut records,
            KEY_ENTRIES.as_bytes(),
            self.entries.to_string().as_bytes(),
        );
        pax_record(&mut records, KEY_SHA256.as_bytes(), digest.as_bytes());
        self.pax(EntryType::XGlobalHeader, &records)?;
        self.put(&[0u8; 2 * BLOCK])?;
        Ok((self.out, digest))
    }
}

/// Copies `value` into a NUL-padded header field, cut to its length.
fn set_field(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Appends one PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts
/// the whole record including its own digits.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 1 + key.len() + 1 + value.len() + 1; // " key=value\n"
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// One PAX record: key and value bytes.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

/// PAX records of a header's data, binary-safe.
fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord<'_>>, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("a PAX record has no length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("a PAX record has an invalid length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("a PAX record's length does not match its content");
        }
        let body = &data[space + 1..len - 1];
        let eq = body
            .iter()
            .position(|b| *b == b'=')
            .ok_or("a PAX record has no `=`")?;
        out.push((&body[..eq], &body[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

/// `sec[.nsec]` as PAX writes times; before 1970 the whole value is
/// negative (`-1.5` is 1.5 s before the epoch).
fn format_pax_time(t: Timespec) -> String {
    if t.tv_sec < 0 && t.tv_nsec > 0 {
        format!("-{}.{:09}", -(t.tv_sec + 1), 1_000_000_000 - t.tv_nsec)
    } else if t.tv_nsec > 0 {
        format!("{}.{:09}", t.tv_sec, t.tv_nsec)
    } else {
        t.tv_sec.to_string()
    }
}

/// The inverse of [`format_pax_time`] (also reading fewer fraction digits).
fn parse_pax_time(s: &str) -> Option<Timespec> {
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    if sec.is_empty()
        || !sec.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let sec: i64 = sec.parse().ok()?;
    let nsec: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(match (negative, nsec) {
        (false, _) => Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        (true, 0) => Timespec {
            tv_sec: -sec,
            tv_nsec: 0,
        },
        (true, _) => Timespec {
            tv_sec: -sec - 1,
            tv_nsec: 1_000_000_000 - nsec,
        },
    })
}

/// One directory on the way down in [`Walker::walk`].
struct Level {
    /// Its path in the archive (empty for the root).
    path: Vec<u8>,
    /// `(st_dev, st_ino)`, checked when climbing back up through `..`.
    id: (u64, u64),
    /// Names still to write, last first.
    pending: Vec<OsString>,
}

/// State of one [`write_layer`].
struct Walker<'p, W: Write> {
    out: ArchiveOut<W>,
    /// Device of the root: entries on others are mount points, left out.
    dev: u64,
    /// Archive path of the first name of every multiply linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: WriteStats,
    /// The directory written, for error messages.
    base: &'p Path,
}

impl<W: Write> Walker<'_, W> {
    fn err(&self, action: &'static str, path: &[u8], e: impl Into<io::Error>) -> ImageError {
        ImageError::io(action, &self.base.join(OsStr::from_bytes(path)), e.into())
    }

    /// Depth first, one directory fd at a time however deep the tree: down
    /// with `O_NOFOLLOW` opens, up through `..` with an identity check.
    fn walk(&mut self, root: OwnedFd) -> Result<(), ImageError> {
        let st = rfs::fstat(&root).map_err(|e| self.err("stat", b"", e))?;
        let mut stack = vec![Level {
            path: Vec::new(),
            id: (st.st_dev, st.st_ino),
            pending: sorted_names(root.as_fd()).map_err(|e| self.err("list", b"", e))?,
        }];
        let mut cur = root;
        loop {
            let Some(level) = stack.last_mut() else {
                return Ok(());
            };
            if let Some(name) = level.pending.pop() {
                let path = child_path(&level.path, &name);
                let Some(st) =
                    fsx::lstat_at(cur.as_fd(), &name).map_err(|e| self.err("stat", &path, e))?
                else {
                    // A committed layer does not change: something removes
                    // it (a GC), and the archive would be incomplete.
                    return Err(self.err(
                        "stat",
                        &path,
                        io::Error::other("the entry vanished while the layer was archived"),
                    ));
                };
                if st.st_dev != self.dev {
                    tracing::debug!(path = %String::from_utf8_lossy(&path), "leaving out a mount point below a layer");
                    continue;
                }
                if fsx::is_dir(&st) {
                    let fd = rfs::openat(&cur, name.as_os_str(), DIR_FLAGS, Mode::empty())
                        .map_err(|e| self.err("open", &path, e))?;
                    let fst = rfs::fstat(&fd).map_err(|e| self.err("stat", &path, e))?;
                    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) {
                        return Err(self.err(
                            "open",
                            &path,
                            io::Error::other("the directory was replaced while it was archived"),
                        ));
                    }
                    let pending =
                        sorted_names(fd.as_fd()).map_err(|e| self.err("list", &path, e))?;
                    stack.push(Level {
                        path,
                        id: (st.st_dev, st.st_ino),
                        pending,
                    });
                    cur = fd;
                } else {
                    self.non_dir(cur.as_fd(), &name, &st, &path)?;
                }
                continue;
            }
            // Everything in `cur` is written: now the directory itself.
            let done = stack
                .pop()
                .expect("the loop only runs with a non-empty stack");
            self.dir(cur.as_fd(), &done.path)?;
            let Some(parent) = stack.last() else {
                return Ok(());
            };
            let up = rfs::openat(&cur, "..", DIR_FLAGS, Mode::empty())
                .map_err(|e| self.err("open", &parent.path, e))?;
            let st = rfs::fstat(&up).map_err(|e| self.err("stat", &parent.path, e))?;
            if (st.st_dev, st.st_ino) != parent.id {
                return Err(self.err(
                    "walk back up to",
                    &parent.path,
                    io::Error::other("the tree was moved while it was archived"),
                ));
            }
            cur = up;
        }
    }

    /// The member of the directory `fd` (the root when `path` is empty).
    fn dir(&mut self, fd: BorrowedFd<'_>, path: &[u8]) -> Result<(), ImageError> {
        let st = rfs::fstat(fd).map_err(|e| self.err("stat", path, e))?;
        let xattrs = fd_xattrs(fd).map_err(|e| self.err("read the xattrs of", path, e))?;
        let name: &[u8] = if path.is_empty() { b"." } else { path };
        let m = Member::from_stat(EntryType::Directory, name, &st, &xattrs);
        self.put(&m, &mut io::empty(), path)
    }

    fn non_dir(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        st: &rfs::Stat,
        path: &[u8],
    ) -> Result<(), ImageError> {
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind == FileType::Socket {
            self.stats.sockets_skipped += 1;
            return Ok(());
        }
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key).cloned() {
                let mut m = Member::from_stat(EntryType::Link, path, st, &[]);
                m.link = &first;
                self.put(&m, &mut io::empty(), path)?;
                self.stats.hard_links += 1;
                return Ok(());
            }
            self.links.insert(key, path.to_vec());
        }
        match kind {
            FileType::RegularFile => {
                // O_NONBLOCK: should a fifo have taken its place, the open
                // must not hang (the fstat below then refuses it).
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.err("open", path, e))?;
                let fst = rfs::fstat(&fd).map_err(|e| self.err("stat", path, e))?;
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino)
                    || FileType::from_raw_mode(fst.st_mode) != FileType::RegularFile
                {
                    return Err(self.err(
                        "open",
                        path,
                        io::Error::other("the file was replaced while it was archived"),
                    ));
                }
                let xattrs =
                    fd_xattrs(fd.as_fd()).map_err(|e| self.err("read the xattrs of", path, e))?;
                let size = u64::try_from(fst.st_size).unwrap_or(0);
                let mut m = Member::from_stat(EntryType::Regular, path, &fst, &xattrs);
                m.size = size;
                self.put(&m, &mut File::from(fd), path)?;
                self.stats.bytes += size;
            }
            FileType::Symlink => {
                let target = rfs::readlinkat(dir, name, Vec::new())
                    .map_err(|e| self.err("read the symlink", path, e))?;
                let xattrs =
                    at_xattrs(dir, name).map_err(|e| self.err("read the xattrs of", path, e))?;
                let mut m = Member::from_stat(EntryType::Symlink, path, st, &xattrs);
                m.link = target.as_bytes();
                self.put(&m, &mut io::empty(), path)?;
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                let xattrs =
                    at_xattrs(dir, name).map_err(|e| self.err("read the xattrs of", path, e))?;
                let tar_kind = match kind {
                    FileType::CharacterDevice => EntryType::Char,
                    FileType::BlockDevice => EntryType::Block,
                    _ => EntryType::Fifo,
                };
                let mut m = Member::from_stat(tar_kind, path, st, &xattrs);
                if tar_kind != EntryType::Fifo {
                    m.rdev = (rfs::major(st.st_rdev), rfs::minor(st.st_rdev));
                }
                self.put(&m, &mut io::empty(), path)?;
            }
            _ => {
                return Err(self.err(
                    "archive",
                    path,
                    io::Error::other("it is of a file type a layer cannot hold"),
                ));
            }
        }
        Ok(())
    }

    fn put(&mut self, m: &Member<'_>, data: &mut dyn Read, path: &[u8]) -> Result<(), ImageError> {
        self.out
            .member(m, data)
            .map_err(|e| self.err("write to the archive", path, e))?;
        self.stats.entries += 1;
        self.stats.xattrs += m.xattrs.len() as u64;
        Ok(())
    }
}

/// `parent/name` (just `name` below the root).
fn child_path(parent: &[u8], name: &OsStr) -> Vec<u8> {
    if parent.is_empty() {
        name.as_bytes().to_vec()
    } else {
        [parent, b"/", name.as_bytes()].concat()
    }
}

/// Names in `dir`, sorted by bytes, last first (to be popped).
fn sorted_names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = fsx::list(dir)?;
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok(names)
}

/// `/proc/self/fd/<dir>/<name>`: names `name` in `dir` for the calls that
/// have no `*at` form (xattrs of symlinks and special files). The magic link
/// resolves to `dir` itself; `name` is then one component, which the `l*`
/// calls do not follow.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// Every xattr of an open file or directory, sorted by name.
fn fd_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = read_sized(|buf| match buf {
        None => rfs::flistxattr_query(fd),
        Some(b) => rfs::flistxattr(fd, b),
    })?;
    collect_xattrs(&names, |name| {
        read_sized(|buf| match buf {
            None => rfs::fgetxattr_query(fd, name),
            Some(b) => rfs::fgetxattr(fd, name, b),
        })
    })
}

/// Every xattr of `name` in `dir` (not followed), sorted by name.
fn at_xattrs(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = proc_path(dir, name);
    let names = read_sized(|buf| match buf {
        None => rfs::llistxattr_query(&path),
        Some(b) => rfs::llistxattr(&path, b),
    })?;
    collect_xattrs(&names, |xname| {
        read_sized(|buf| match buf {
            None => rfs::lgetxattr_query(&path, xname),
            Some(b) => rfs::lgetxattr(&path, xname, b),
        })
    })
}

/// Values of the NUL-separated xattr `names`, sorted by name.
fn collect_xattrs(
    names: &[u8],
    mut get: impl FnMut(&[u8]) -> io::Result<Vec<u8>>,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        match get(name) {
            Ok(value) => out.push((name.to_vec(), value)),
            // Removed since listed.
            Err(e) if e.raw_os_error() == Some(Errno::NODATA.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// The size-query-then-read dance of the xattr calls; a value that grew in
/// between is read again. A file system without xattrs gives nothing.
fn read_sized(
    mut call: impl FnMut(Option<&mut [u8]>) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    loop {
        let size = match call(None) {
            Ok(n) => n,
            Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; size];
        match call(Some(&mut buf[..])) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Reads an archive [`write_layer`] wrote into the existing, empty directory
/// `dest`, refusing anything the module docs list; returns once the trailer
/// checked out. Needs root (owners, whiteouts, `trusted.*` xattrs).
///
/// On error `dest` is left partly filled: the caller removes it.
pub fn read_layer(
    input: impl Read,
    dest: &Path,
    opts: &ReadOptions,
) -> Result<ReadStats, ImageError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot {
            action: "reading a layer archive",
        });
    }
    let root = fsx::open_dir(dest).map_err(|e| ImageError::io("open", dest, e))?;
    let tail = Rc::new(RefCell::new(TailHasher::default()));
    let reader = HashingInput {
        inner: BufReader::with_capacity(IO_BUFFER, input),
        tail: tail.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut state = Reader {
        root,
        opts: *opts,
        parent: None,
        stats: ReadStats::default(),
    };
    let mut pax: Option<Pax> = None;
    let mut trailer = false;
    // Raw: PAX headers come to us (see the module docs on why).
    for entry in archive.entries().map_err(archive_err)?.raw(true) {
        let mut entry = entry.map_err(archive_err)?;
        if trailer {
            return Err(invalid("members follow the trailer"));
        }
        match entry.header().entry_type() {
            EntryType::XHeader => {
                if pax.is_some() {
                    return Err(invalid("two PAX headers describe one member"));
                }
                pax = Some(Pax::parse(&read_pax_data(&mut entry)?)?);
            }
            EntryType::XGlobalHeader => {
                if pax.is_some() {
                    return Err(invalid("a PAX header describes the trailer"));
                }
                let digest = tail.borrow().digest_before(entry.raw_header_position())?;
                let data = read_pax_data(&mut entry)?;
                check_trailer(&data, state.stats.entries, &digest)?;
                state.stats.digest = digest;
                trailer = true;
            }
            _ => {
                let pax = pax.take().unwrap_or_default();
                state.member(&mut entry, pax)?;
            }
        }
    }
    if !trailer || pax.is_some() {
        return Err(ImageError::LayerArchive {
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends before its trailer: the copy was cut short",
            ),
        });
    }
    Ok(state.stats)
}

fn archive_err(source: io::Error) -> ImageError {
    ImageError::LayerArchive { source }
}

fn invalid(what: &str) -> ImageError {
    ImageError::LayerArchive {
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_owned()),
    }
}

/// The data of a PAX header member, bounded.
fn read_pax_data(entry: &mut impl Read) -> Result<Vec<u8>, ImageError> {
    let mut data = Vec::new();
    entry
        .take(MAX_PAX_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(archive_err)?;
    if data.len() as u64 > MAX_PAX_BYTES {
        return Err(invalid("a PAX header is larger than 1 MiB"));
    }
    Ok(data)
}

/// Checks the trailer's records against what was read before it.
fn check_trailer(data: &[u8], entries: u64, digest: &str) -> Result<(), ImageError> {
    let records = parse_pax(data).map_err(invalid)?;
    let get = |key: &str| {
        records
            .iter()
            .find(|(k, _)| *k == key.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let format = get(KEY_FORMAT).ok_or_else(|| invalid("the trailer has no format version"))?;
    if format != FORMAT_VERSION.to_string() {
        return Err(invalid(&format!(
            "layer archive format {format} is not supported (this node reads {FORMAT_VERSION}): \
             run the same arca version on every node"
        )));
    }
    let expected = get(KEY_SHA256).ok_or_else(|| invalid("the trailer has no digest"))?;
    if expected != digest {
        return Err(ImageError::DigestMismatch {
            what: "layer archive".to_owned(),
            expected: expected.to_owned(),
            actual: digest.to_owned(),
        });
    }
    let said: u64 = get(KEY_ENTRIES)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("the trailer has no member count"))?;
    if said != entries {
        return Err(invalid(&format!(
            "the trailer counts {said} members, the archive has {entries}"
        )));
    }
    Ok(())
}

/// Hashes what is read, holding the last block back: when the tar reader
/// hands out the trailer, its header (the last block read) is not in the
/// digest yet, which then covers exactly what came before it.
#[derive(Default)]
struct TailHasher {
    hasher: Sha256,
    /// Bytes hashed.
    hashed: u64,
    /// Up to one block read but not hashed yet.
    held: Vec<u8>,
}

impl TailHasher {
    fn update(&mut self, bytes: &[u8]) {
        if bytes.len() >= BLOCK {
            self.hasher.update(&self.held);
            self.hashed += self.held.len() as u64;
            let (now, keep) = bytes.split_at(bytes.len() - BLOCK);
            self.hasher.update(now);
            self.hashed += now.len() as u64;
            self.held.clear();
            self.held.extend_from_slice(keep);
        } else {
            self.held.extend_from_slice(bytes);
            if self.held.len() > BLOCK {
                let excess = self.held.len() - BLOCK;
                self.hasher.update(&self.held[..excess]);
                self.hashed += excess as u64;
                self.held.drain(..excess);
            }
        }
    }

    /// `sha256:<hex>` of the bytes before `pos`, which must be where the
    /// last block read starts.
    fn digest_before(&self, pos: u64) -> Result<String, ImageError> {
        if self.hashed != pos || self.held.len() != BLOCK {
            return Err(invalid("the trailer is not where the archive ends"));
        }
        Ok(format!("sha256:{}", hex(&self.hasher.clone().finalize())))
    }
}

/// The input, through a [`TailHasher`] the reader loop can look at.
struct HashingInput<R> {
    inner: R,
    tail: Rc<RefCell<TailHasher>>,
}

impl<R: Read> Read for HashingInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tail.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

/// What a PAX header says about the next member.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    mtime: Option<Timespec>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pax {
    fn parse(data: &[u8]) -> Result<Self, ImageError> {
        let mut pax = Pax::default();
        for (key, value) in parse_pax(data).map_err(invalid)? {
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.link = Some(value.to_vec()),
                b"mtime" => {
                    pax.mtime = Some(
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(parse_pax_time)
                            .ok_or_else(|| invalid("a PAX mtime is malformed"))?,
                    );
                }
                // Sizes and ids are in the header; a `size` here would make
                // us and the tar framing disagree about where members start.
                b"size" | b"uid" | b"gid" => {
                    return Err(invalid(
                        "a PAX header sets size, uid or gid, which this format keeps in the \
                         header",
                    ));
                }
                _ => {
                    if let Some(name) = key.strip_prefix(XATTR_KEY) {
                        pax.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
        Ok(pax)
    }
}

/// Owner, mode, time and xattrs of one member.
struct Attrs {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Whether a layer may carry xattr `name`.
fn xattr_kept(name: &[u8]) -> bool {
    XATTRS_KEPT.iter().any(|k| k.as_bytes() == name)
        || XATTR_PREFIXES_KEPT
            .iter()
            .any(|p| name.starts_with(p.as_bytes()) && name.len() > p.len())
}

/// Splits an archive path into components: `.` is the root (no
/// components); anything not plainly relative is refused.
fn components(raw: &[u8]) -> Result<Vec<OsString>, String> {
    if raw == b"." {
        return Ok(Vec::new());
    }
    if raw.is_empty() {
        return Err("its path is empty".to_owned());
    }
    if raw.starts_with(b"/") {
        return Err("its path is absolute".to_owned());
    }
    if raw.contains(&0) {
        return Err("its path contains a NUL byte".to_owned());
    }
    raw.split(|b| *b == b'/')
        .map(|part| match part {
            b"" => Err("its path has an empty component (`//` or a trailing `/`)".to_owned()),
            b"." => Err("its path has a `.` component".to_owned()),
            b".." => Err("its path has a `..` component".to_owned()),
            _ => Ok(OsStr::from_bytes(part).to_os_string()),
        })
        .collect()
}

/// Bytes of a header field up to its first NUL.
fn field(bytes: &[u8]) -> &[u8] {
    bytes
        .iter()
        .position(|b| *b == 0)
        .map_or(bytes, |n| &bytes[..n])
}

/// State of one [`read_layer`].
struct Reader {
    root: OwnedFd,
    opts: ReadOptions,
    /// The parent directory of the last member (members of one directory
    /// come together), by components.
    parent: Option<(Vec<OsString>, OwnedFd)>,
    stats: ReadStats,
}

impl Reader {
    fn member<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        pax: Pax,
    ) -> Result<(), ImageError> {
        let header = entry.header().clone();
        let kind = header.entry_type();
        let raw_path = match pax.path {
            Some(ref p) => p.clone(),
            None => field(&header.as_old().name).to_vec(),
        };
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let refuse = |reason: String| ImageError::UnsafeEntry {
            entry: shown.clone(),
            reason,
        };
        if header.as_ustar().is_some_and(|u| u.prefix[0] != 0) {
            return Err(refuse(
                "it uses the ustar name prefix, which this format never writes".to_owned(),
            ));
        }
        let comps = components(&raw_path).map_err(refuse)?;
        let bad = |what: &str| refuse(format!("its {what} field is malformed"));
        let id = |value: u64, what: &str| -> Result<u32, ImageError> {
            u32::try_from(value)
                .ok()
                .filter(|v| *v >= self.opts.min_id)
                .ok_or_else(|| {
                    refuse(format!(
                        "its {what} {value} is outside the accepted range (from {})",
                        self.opts.min_id
                    ))
                })
        };
        let uid = id(header.uid().map_err(|_| bad("uid"))?, "uid")?;
        let gid = id(header.gid().map_err(|_| bad("gid"))?, "gid")?;
        let mode = header.mode().map_err(|_| bad("mode"))? & 0o7777;
        let mtime = match pax.mtime {
            Some(t) => t,
            None => Timespec {
                tv_sec: i64::try_from(header.mtime().map_err(|_| bad("mtime"))?)
                    .unwrap_or(i64::MAX),
                tv_nsec: 0,
            },
        };
        let mut xattrs = Vec::new();
        for (name, value) in pax.xattrs {
            if xattr_kept(&name) {
                xattrs.push((name, value));
            } else {
                tracing::debug!(entry = %shown, xattr = %String::from_utf8_lossy(&name), "skipping an xattr a layer does not need");
                self.stats.xattrs_skipped += 1;
            }
        }
        let attrs = Attrs {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        };
        let link = pax
            .link
            .unwrap_or_else(|| field(&header.as_old().linkname).to_vec());

        let Some((name, parents)) = comps.split_last() else {
            if kind != EntryType::Directory {
                return Err(refuse(
                    "it names the layer root but is not a directory".to_owned(),
                ));
            }
            let root = rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
                .map_err(|e| unpack_err(&shown, "open", e))?;
            self.apply_fd(root.as_fd(), &attrs, &shown)?;
            self.stats.entries += 1;
            return Ok(());
        };
        let parent = self.take_parent(parents, &shown)?;
        let result = self.create(entry, parent.as_fd(), name, &attrs, &link, &shown);
        self.parent = Some((parents.to_vec(), parent));
        result?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Makes `name` in `parent` as the member says.
    fn create<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        attrs: &Attrs,
        link: &[u8],
        shown: &str,
    ) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        let refuse = |reason: &str| ImageError::UnsafeEntry {
            entry: shown.to_owned(),
            reason: reason.to_owned(),
        };
        let exists = |e: Errno| {
            if e == Errno::EXIST {
                refuse("its name exists already (an archive names each inode once)")
            } else {
                unpack_err(shown, "create", e)
            }
        };
        match kind {
            EntryType::Regular => {
                let fd = rfs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::RUSR | Mode::WUSR,
                )
                .map_err(exists)?;
                let mut file = File::from(fd);
                let size = entry.size();
                let copied = copy_data(entry, &mut file, shown)?;
                if copied != size {
                    return Err(ImageError::LayerArchive {
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the data of `{shown}` is cut short"),
                        ),
                    });
                }
                self.stats.bytes += copied;
                self.apply_fd(file.as_fd(), attrs, shown)
            }
            EntryType::Directory => {
                match fsx::lstat_at(parent, name).map_err(|e| unpack_io(shown, "stat", e))? {
                    None => rfs::mkdirat(parent, name, Mode::RWXU).map_err(exists)?,
                    Some(st) if fsx::is_dir(&st) => {}
                    Some(_) => {
                        return Err(refuse("its name exists already and is not a directory"));
                    }
                }
                let dir = rfs::openat(parent, name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| unpack_err(shown, "open", e))?;
                self.apply_fd(dir.as_fd(), attrs, shown)
            }
            EntryType::Symlink => {
                if link.is_empty() || link.contains(&0) {
                    return Err(refuse("it is a symlink without a valid target"));
                }
                rfs::symlinkat(link, parent, name).map_err(exists)?;
                self.apply_at(parent, name, attrs, false, shown)
            }
            EntryType::Link => self.hard_link(parent, name, link, shown),
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = if kind == EntryType::Fifo {
                    (FileType::Fifo, 0)
                } else {
                    let header = entry.header();
                    let (Some(major), Some(minor)) = (
                        header.device_major().ok().flatten(),
                        header.device_minor().ok().flatten(),
                    ) else {
                        return Err(refuse("it is a device without readable numbers"));
                    };
                    let file_type = if kind == EntryType::Char {
                        FileType::CharacterDevice
                    } else {
                        FileType::BlockDevice
                    };
                    (file_type, rfs::makedev(major, minor))
                };
                rfs::mknodat(parent, name, file_type, Mode::empty(), dev).map_err(exists)?;
                if kind == EntryType::Char && dev == rfs::makedev(0, 0) {
                    self.stats.whiteouts += 1;
                }
                self.apply_at(parent, name, attrs, true, shown)
            }
            other => Err(refuse(&format!(
                "its member type {:?} is not one this format writes",
                other.as_byte() as char
            ))),
        }
    }

    /// The directory `parents` below the root, made (0700, root) where
    /// missing, never through a symlink.
    fn take_parent(&mut self, parents: &[OsString], shown: &str) -> Result<OwnedFd, ImageError> {
        if let Some((comps, fd)) = self.parent.take() {
            if comps == parents {
                return Ok(fd);
            }
        }
        let mut cur = rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| unpack_err(shown, "open the layer root for", e))?;
        for (i, comp) in parents.iter().enumerate() {
            let open = |dir: &OwnedFd| rfs::openat(dir, comp.as_os_str(), DIR_FLAGS, Mode::empty());
            cur = match open(&cur) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    rfs::mkdirat(&cur, comp.as_os_str(), Mode::RWXU)
                        .map_err(|e| unpack_err(shown, "create a parent directory of", e))?;
                    open(&cur).map_err(|e| unpack_err(shown, "open a parent directory of", e))?
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let prefix = parents[..=i]
                        .iter()
                        .map(|c| c.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/");
                    let is_link = fsx::lstat_at(cur.as_fd(), comp)
                        .ok()
                        .flatten()
                        .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                    return Err(ImageError::UnsafeEntry {
                        entry: shown.to_owned(),
                        reason: if is_link {
                            format!("its parent `{prefix}` is a symlink, which is never followed")
                        } else {
                            format!("its parent `{prefix}` is not a directory")
                        },
                    });
                }
                Err(e) => return Err(unpack_err(shown, "open a parent directory of", e)),
            };
        }
        Ok(cur)
    }

    fn hard_link(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        target: &[u8],
        shown: &str,
    ) -> Result<(), ImageError> {
        let refuse = |reason: String| ImageError::UnsafeEntry {
            entry: shown.to_owned(),
            reason,
        };
        let comps = components(target).map_err(|r| refuse(format!("its link target: {r}")))?;
        let Some((target_name, target_parents)) = comps.split_last() else {
            return Err(refuse("it is a hard link to the layer root".to_owned()));
        };
        let not_earlier = || {
            refuse(format!(
                "its link target `{}` is not an earlier file of this archive",
                String::from_utf8_lossy(target)
            ))
        };
        let mut dir = rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| unpack_err(shown, "open the layer root for", e))?;
        for comp in target_parents {
            dir = rfs::openat(&dir, comp.as_os_str(), DIR_FLAGS, Mode::empty())
                .map_err(|_| not_earlier())?;
        }
        match fsx::lstat_at(dir.as_fd(), target_name) {
            Ok(Some(st)) if !fsx::is_dir(&st) => {}
            _ => return Err(not_earlier()),
        }
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
        rfs::linkat(
            &dir,
            target_name.as_os_str(),
            parent,
            name,
            AtFlags::empty(),
        )
        .map_err(|e| {
            if e == Errno::EXIST {
                refuse("its name exists already (an archive names each inode once)".to_owned())
            } else {
                unpack_err(shown, "create the hard link", e)
            }
        })?;
        self.stats.hard_links += 1;
        Ok(())
    }

    /// Owner, mode, xattrs and mtime of an open file or directory, in the
    /// order that keeps them all (chown clears setuid bits and capabilities).
    fn apply_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        attrs: &Attrs,
        shown: &str,
    ) -> Result<(), ImageError> {
        rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(attrs.uid)),
            Some(rfs::Gid::from_raw(attrs.gid)),
        )
        .map_err(|e| unpack_err(shown, "chown", e))?;
        rfs::fchmod(fd, Mode::from_raw_mode(attrs.mode))
            .map_err(|e| unpack_err(shown, "chmod", e))?;
        for (name, value) in &attrs.xattrs {
            rfs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty())
                .map_err(|e| unpack_err(shown, "set an xattr of", e))?;
            self.stats.xattrs += 1;
        }
        let ts = Timestamps {
            last_access: attrs.mtime,
            last_modification: attrs.mtime,
        };
        rfs::futimens(fd, &ts).map_err(|e| unpack_err(shown, "set the mtime of", e))
    }

    /// The same for a symlink, device or fifo, by name without following
    /// (`chmod` only for the device or fifo just made: symlinks have none).
    fn apply_at(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        attrs: &Attrs,
        chmod: bool,
        shown: &str,
    ) -> Result<(), ImageError> {
        rfs::chownat(
            dir,
            name,
            Some(rfs::Uid::from_raw(attrs.uid)),
            Some(rfs::Gid::from_raw(attrs.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| unpack_err(shown, "chown", e))?;
        if chmod {
            // The node was made by us a moment ago in a directory only we
            // write: it is not a symlink, so chmodat cannot be redirected.
            rfs::chmodat(dir, name, Mode::from_raw_mode(attrs.mode), AtFlags::empty())
                .map_err(|e| unpack_err(shown, "chmod", e))?;
        }
        if !attrs.xattrs.is_empty() {
            let path = proc_path(dir, name);
            for (xname, value) in &attrs.xattrs {
                rfs::lsetxattr(&path, xname.as_slice(), value, XattrFlags::empty())
                    .map_err(|e| unpack_err(shown, "set an xattr of", e))?;
                self.stats.xattrs += 1;
            }
        }
        let ts = Timestamps {
            last_access: attrs.mtime,
            last_modification: attrs.mtime,
        };
        rfs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| unpack_err(shown, "set the mtime of", e))
    }
}

fn unpack_err(entry: &str, action: &'static str, e: Errno) -> ImageError {
    unpack_io(entry, action, e.into())
}

fn unpack_io(entry: &str, action: &'static str, source: io::Error) -> ImageError {
    ImageError::UnpackEntry {
        entry: entry.to_owned(),
        action,
        source,
    }
}

/// Copies a member's data, telling a broken archive from a failing disk.
fn copy_data(from: &mut impl Read, to: &mut File, shown: &str) -> Result<u64, ImageError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(ImageError::LayerArchive { source }),
        };
        to.write_all(&buf[..n])
            .map_err(|e| unpack_io(shown, "write", e))?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::test_root::require_root;
    use crate::testing::{fill_sample_layer, snapshot};

    const R: u32 = 100_000;

    #[test]
    fn pax_records_round_trip_binary_values() {
        let mut data = Vec::new();
        let values: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"a=b\nc\0d".to_vec(),
            vec![b'x'; 90], // record length crosses 99 -> 100
            vec![b'y'; 994],
            (0..=255u8).collect(),
        ];
        for (i, v) in values.iter().enumerate() {
            pax_record(&mut data, format!("k{i}").as_bytes(), v);
        }
        let parsed = parse_pax(&data).unwrap();
        assert_eq!(parsed.len(), values.len());
        for (i, (k, v)) in parsed.iter().enumerate() {
            assert_eq!(*k, format!("k{i}").as_bytes());
            assert_eq!(*v, values[i].as_slice());
        }
        for bad in [
            &b"5 a=b"[..],
            b"x a=b\n",
            b"6 ab\n\n",
            b"100 a=b\n",
            b"3 a\n",
        ] {
            assert!(
                parse_pax(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn pax_times_round_trip() {
        for (sec, nsec) in [
            (0, 0),
            (1_600_000_000, 1),
            (1_600_000_000, 999_999_999),
            (-1, 500_000_000),
            (-86_400, 0),
            (-86_401, 750_000_000),
        ] {
            let t = Timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            };
            let text = format_pax_time(t);
            let back = parse_pax_time(&text).unwrap();
            assert_eq!((back.tv_sec, back.tv_nsec), (sec, nsec), "{text}");
        }
        assert_eq!(
            format_pax_time(Timespec {
                tv_sec: -1,
                tv_nsec: 500_000_000
            }),
            "-0.500000000"
        );
        let t = parse_pax_time("12.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 500_000_000));
        for bad in ["", "-", "1.2.3", "1e9", "1.0000000001", " 1", "--1"] {
            assert!(parse_pax_time(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn paths_are_plainly_relative_or_refused() {
        assert_eq!(components(b".").unwrap(), Vec::<OsString>::new());
        assert_eq!(
            components(b"a/b c/\xff").unwrap(),
            vec![
                OsString::from("a"),
                OsString::from("b c"),
                OsStr::from_bytes(b"\xff").to_os_string()
            ]
        );
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"../x",
            b"a/../../x",
            b"a/..",
            b"./a",
            b"a/./b",
            b"a//b",
            b"a/",
            b"a\0b",
        ] {
            assert!(
                components(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A tempdir with `src/`, `dst/` and `outside/secret`.
    struct Fixture {
        tmp: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            for d in ["src", "dst", "outside"] {
                fs::create_dir(tmp.path().join(d)).unwrap();
            }
            fs::write(tmp.path().join("outside/secret"), b"untouched").unwrap();
            Self { tmp }
        }
        fn src(&self) -> PathBuf {
            self.tmp.path().join("src")
        }
        fn dst(&self) -> PathBuf {
            self.tmp.path().join("dst")
        }
        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }
        fn read(&self, archive: &[u8]) -> Result<ReadStats, ImageError> {
            read_layer(archive, &self.dst(), &ReadOptions::with_min_id(R))
        }
        /// Nothing but `dst/` changed.
        fn assert_outside_untouched(&self) {
            let mut names: Vec<_> = fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["dst", "outside", "src"]);
            let outside: Vec<_> = fs::read_dir(self.outside())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(outside, ["secret"]);
            let m = fs::symlink_metadata(self.outside().join("secret")).unwrap();
            assert_eq!(m.nlink(), 1, "no hard link to the outside file");
            assert_eq!(m.uid(), 0, "not chowned");
            assert_eq!(
                fs::read(self.outside().join("secret")).unwrap(),
                b"untouched"
            );
            assert!(!Path::new("/tmp/arca-layer-tar-evil").exists());
        }
    }

    #[test]
    fn round_trip_keeps_every_property() {
        if !require_root("layer archive round trip") {
            return;
        }
        let fx = Fixture::new();
        fill_sample_layer(&fx.src(), "one").unwrap();
        let before = snapshot(&fx.src()).unwrap();
        let mut archive = Vec::new();
        let written = write_layer(&fx.src(), &mut archive).unwrap();
        assert_eq!(
            snapshot(&fx.src()).unwrap(),
            before,
            "writing changes nothing"
        );
        let read = fx.read(&archive).unwrap();
        let after = snapshot(&fx.dst()).unwrap();
        assert_eq!(before.len(), after.len());
        for (a, b) in before.iter().zip(&after) {
            assert_eq!(a, b);
        }
        // The fixture has what the test claims to cover.
        let kinds: String = before.iter().map(|e| e.kind).collect();
        for k in ['d', 'f', 'l', 'c', 'p'] {
            assert!(kinds.contains(k), "{kinds}");
        }
        assert!(before.iter().any(|e| e.mode & 0o4000 != 0));
        assert!(before.iter().any(|e| e.mtime.0 < 0));
        assert!(before.iter().any(|e| e.path.len() > 200));
        assert_eq!(before.iter().filter(|e| e.link_of.is_some()).count(), 2);

        assert_eq!(written.entries, before.len() as u64);
        assert_eq!(read.entries, written.entries);
        assert_eq!(read.hard_links, 2);
        assert_eq!(written.hard_links, 2);
        assert_eq!(read.whiteouts, 1);
        assert_eq!(read.xattrs, written.xattrs);
        assert_eq!(read.xattrs, 4);
        assert_eq!(read.digest, written.digest);
        assert_eq!(read.bytes, written.bytes);
        // Same tree, same bytes.
        let mut again = Vec::new();
        write_layer(&fx.dst(), &mut again).unwrap();
        assert!(again == archive, "archives of equal trees differ");
        fx.assert_outside_untouched();
    }

    #[test]
    fn sockets_are_left_out_and_other_xattrs_skipped() {
        if !require_root("layer archive of a socket") {
            return;
        }
        let fx = Fixture::new();
        let src = fx.src();
        std::os::unix::fs::chown(&src, Some(R), Some(R)).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
        fs::write(src.join("f"), b"x").unwrap();
        std::os::unix::fs::chown(src.join("f"), Some(R), Some(R)).unwrap();
        rfs::setxattr(src.join("f"), "trusted.other", b"v", XattrFlags::empty()).unwrap();
        let mut archive = Vec::new();
        let written = write_layer(&src, &mut archive).unwrap();
        assert_eq!(written.sockets_skipped, 1);
        assert_eq!(written.entries, 2);
        let read = fx.read(&archive).unwrap();
        assert_eq!(read.xattrs_skipped, 1);
        assert!(!fx.dst().join("sock").exists());
        let mut buf = [0u8; 8];
        assert!(rfs::getxattr(fx.dst().join("f"), "trusted.other", &mut buf[..]).is_err());
    }

    /// Test members: owned by the shifted root, 0644, fixed mtime.
    fn m<'a>(kind: EntryType, path: &'a [u8], link: &'a [u8], size: u64) -> Member<'a> {
        Member {
            kind,
            path,
            link,
            mode: 0o644,
            uid: R,
            gid: R,
            mtime: Timespec {
                tv_sec: 1_600_000_000,
                tv_nsec: 0,
            },
            size,
            rdev: (0, 0),
            xattrs: &[],
        }
    }

    /// An archive of `members` (data `b"evil"` for regular files) with a
    /// valid trailer, so that only the members themselves can be refused.
    fn archive(members: &[Member<'_>]) -> Vec<u8> {
        let mut out = ArchiveOut::new(Vec::new());
        for member in members {
            let data: &[u8] = if member.kind == EntryType::Regular {
                b"evil"
            } else {
                b""
            };
            let mut member = Member { ..*member };
            member.size = data.len() as u64;
            out.member(&member, &mut &data[..]).unwrap();
        }
        out.finish().unwrap().0
    }

    fn assert_refused(fx: &Fixture, members: &[Member<'_>], why: &str) {
        let bytes = archive(members);
        match fx.read(&bytes) {
            Err(ImageError::UnsafeEntry { entry, reason }) => {
                assert!(reason.contains(why), "{entry}: {reason} (wanted `{why}`)");
            }
            other => panic!("wanted a refusal ({why}), got {other:?}"),
        }
        fx.assert_outside_untouched();
    }

    #[test]
    fn hostile_archives_are_refused_without_writing_outside() {
        if !require_root("hostile layer archives") {
            return;
        }
        use EntryType::{Directory, Link, Regular, Symlink};
        let outside = Fixture::new().outside(); // only for its absolute form
        let abs_outside = outside.as_os_str().as_bytes().to_vec();
        let cases: Vec<(Vec<Member<'_>>, &str)> = vec![
            (vec![m(Regular, b"../outside/evil", b"", 0)], "`..`"),
            (vec![m(Regular, b"a/../../outside/evil", b"", 0)], "`..`"),
            (
                vec![m(Regular, b"/tmp/arca-layer-tar-evil", b"", 0)],
                "absolute",
            ),
            (vec![m(Regular, b"a//b", b"", 0)], "empty component"),
            (vec![m(Regular, b"./a", b"", 0)], "`.` component"),
            (vec![m(Regular, b"", b"", 0)], "empty"),
            (vec![m(Regular, b".", b"", 0)], "layer root"),
            (
                vec![
                    m(Symlink, b"link", b"../outside", 0),
                    m(Regular, b"link/evil", b"", 0),
                ],
                "symlink",
            ),
            (
                vec![
                    m(Symlink, b"link", b"../outside", 0),
                    m(Regular, b"link/secret", b"", 0),
                ],
                "symlink",
            ),
            (
                vec![
                    m(Symlink, b"link", &abs_outside, 0),
                    m(Directory, b"link", b"", 0),
                ],
                "not a directory",
            ),
            (
                vec![
                    m(Symlink, b"link", b"../outside", 0),
                    m(Link, b"h", b"link/secret", 0),
                ],
                "not an earlier file",
            ),
            (vec![m(Link, b"h", b"../outside/secret", 0)], "`..`"),
            (vec![m(Link, b"h", &abs_outside, 0)], "absolute"),
            (
                vec![m(Directory, b"d", b"", 0), m(Link, b"h", b"d", 0)],
                "not an earlier file",
            ),
            (
                vec![m(Regular, b"f", b"", 0), m(Regular, b"f", b"", 0)],
                "exists already",
            ),
            (
                vec![
                    m(Symlink, b"f", b"../outside/secret", 0),
                    m(Regular, b"f", b"", 0),
                ],
                "exists already",
            ),
            (
                vec![m(Regular, b"f", b"", 0), m(Regular, b"f/g", b"", 0)],
                "not a directory",
            ),
            (
                vec![{
                    let mut r = m(Regular, b"root-owned", b"", 0);
                    r.uid = 0;
                    r
                }],
                "uid 0",
            ),
            (
                vec![{
                    let mut r = m(Directory, b"d", b"", 0);
                    r.gid = 1000;
                    r
                }],
                "gid 1000",
            ),
            (vec![m(EntryType::Continuous, b"c", b"", 0)], "member type"),
            (vec![m(EntryType::GNULongName, b"c", b"", 0)], "member type"),
            (vec![m(Symlink, b"s", b"", 0)], "without a valid target"),
        ];
        for (members, why) in &cases {
            let fx = Fixture::new();
            assert_refused(&fx, members, why);
        }
        // Long names travel in PAX, where a NUL could hide.
        let fx = Fixture::new();
        let long = [&[b'a'; 150][..], b"\0/../../outside/evil"].concat();
        assert_refused(&fx, &[m(Regular, &long, b"", 0)], "NUL");
    }

    #[test]
    fn broken_archives_are_refused() {
        if !require_root("broken layer archives") {
            return;
        }
        let fx = Fixture::new();
        fs::write(fx.src().join("a"), vec![7u8; 5000]).unwrap();
        fs::write(fx.src().join("b"), b"bbb").unwrap();
        for p in ["", "a", "b"] {
            std::os::unix::fs::chown(fx.src().join(p), Some(R), Some(R)).unwrap();
        }
        let mut good = Vec::new();
        write_layer(&fx.src(), &mut good).unwrap();
        let fresh = |fx: &Fixture| {
            fs::remove_dir_all(fx.dst()).unwrap();
            fs::create_dir(fx.dst()).unwrap();
        };
        fx.read(&good).unwrap();

        // Cut short anywhere (block boundaries included) before the end blocks.
        let end = good.len() - 2 * BLOCK;
        for cut in (0..end).step_by(BLOCK).chain([end - 1, end - 100, 700]) {
            fresh(&fx);
            let err = fx.read(&good[..cut]).unwrap_err();
            assert!(
                matches!(err, ImageError::LayerArchive { .. }),
                "cut at {cut}: {err:?}"
            );
        }

        // One flipped data byte.
        fresh(&fx);
        let mut bad = good.clone();
        let at = bad.windows(4).position(|w| w == b"bbb\0").unwrap();
        bad[at] = b'c';
        assert!(matches!(
            fx.read(&bad),
            Err(ImageError::DigestMismatch { .. })
        ));

        // A member after the trailer.
        fresh(&fx);
        let mut extra = good[..end].to_vec();
        let mut more = ArchiveOut::new(Vec::new());
        more.member(&m(EntryType::Regular, b"late", b"", 0), &mut io::empty())
            .unwrap();
        extra.extend_from_slice(&more.out);
        extra.extend_from_slice(&[0u8; 2 * BLOCK]);
        let err = fx.read(&extra).unwrap_err();
        assert!(
            format!("{err:?}").contains("members follow the trailer"),
            "{err:?}"
        );
        assert!(!fx.dst().join("late").exists());

        // A trailer counting other members than there are.
        fresh(&fx);
        let mut out = ArchiveOut::new(Vec::new());
        out.member(&m(EntryType::Regular, b"x", b"", 0), &mut io::empty())
            .unwrap();
        out.entries = 2;
        let err = fx.read(&out.finish().unwrap().0).unwrap_err();
        assert!(format!("{err:?}").contains("counts 2 members"), "{err:?}");

        // A plain tar, no trailer.
        fresh(&fx);
        let mut plain = tar::Builder::new(Vec::new());
        let mut h = Header::new_ustar();
        h.set_path("x").unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(R.into());
        h.set_gid(R.into());
        h.set_cksum();
        plain.append(&h, io::empty()).unwrap();
        let err = fx.read(&plain.into_inner().unwrap()).unwrap_err();
        assert!(format!("{err:?}").contains("cut short"), "{err:?}");

        // An oversized PAX header.
        fresh(&fx);
        let mut out = ArchiveOut::new(Vec::new());
        let huge = vec![(b"user.big".to_vec(), vec![0u8; 2 << 20])];
        let mut member = m(EntryType::Regular, b"x", b"", 0);
        member.xattrs = &huge;
        out.member(&member, &mut io::empty()).unwrap();
        let err = fx.read(&out.finish().unwrap().0).unwrap_err();
        assert!(format!("{err:?}").contains("1 MiB"), "{err:?}");
        fx.assert_outside_untouched();
    }

    #[test]
    fn symlinks_in_the_archive_are_never_followed_when_read() {
        if !require_root("layer archive symlinks") {
            return;
        }
        let fx = Fixture::new();
        // A symlink to the outside, then a hard link member and a directory
        // member that would act through it if it were followed.
        let target = fx.outside();
        let target = target.as_os_str().as_bytes();
        let bytes = archive(&[
            m(EntryType::Symlink, b"s", target, 0),
            m(EntryType::Link, b"h", b"s", 0),
            m(EntryType::Directory, b".", b"", 0),
        ]);
        fx.read(&bytes).unwrap();
        // The hard link is to the symlink itself.
        let h = fs::symlink_metadata(fx.dst().join("h")).unwrap();
        assert!(h.file_type().is_symlink());
        assert_eq!(fs::read_link(fx.dst().join("h")).unwrap(), fx.outside());
        assert_eq!(h.uid(), R);
        fx.assert_outside_untouched();
    }
}
