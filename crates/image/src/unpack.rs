//! Unpacking one OCI / Docker layer (a tar stream, gzip- or zstd-compressed or
//! not) into a directory in overlayfs format, so that it can be an overlay
//! `lowerdir` as it is.
//!
//! # Format conversion
//!
//! | in the tar | on disk |
//! |---|---|
//! | `dir/.wh.name` | `dir/name`: a character device 0:0 (an overlayfs whiteout), owned by the shifted root |
//! | `dir/.wh..wh..opq` | xattr [`OPAQUE_XATTR`]` = y` on `dir` |
//! | other `.wh..wh.*` (aufs bookkeeping) | skipped |
//! | files, dirs, symlinks, hard links, devices, fifos | the same, with mode (setuid, setgid, sticky included), mtime and owner + `id_offset` |
//! | PAX `SCHILY.xattr.user.*` | kept |
//! | PAX `SCHILY.xattr.security.capability` | kept; with an id offset, rewritten as a v3 (namespaced) capability whose root id is the shifted root, so that it is honoured inside the sandbox's user namespace |
//! | other xattrs (`trusted.*` such as `trusted.overlay.*`, `system.*` ACLs with unshifted ids, `security.selinux`) | skipped and counted in [`UnpackStats::xattrs_skipped`] |
//!
//! # Safety against hostile layers
//!
//! Layers come from registries and are untrusted, digest or not. So:
//!
//! - A leading `/` is stripped (as Docker does) and `.` components dropped;
//!   any `..` component refuses the entry (also inside hard-link targets).
//! - Every entry is created relative to a directory fd that was reached one
//!   component at a time with `O_NOFOLLOW | O_DIRECTORY`: a symlink in the
//!   layer (`a -> /etc`, `a -> ../..`, even `a -> b` inside the layer) is never
//!   followed while unpacking; an entry below one is refused.
//! - Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`; an existing entry
//!   of the same name (tars may repeat names: the last wins) is removed first
//!   without following anything.
//! - Hard-link targets must be earlier non-directory entries of the same
//!   layer, resolved the same way.
//! - Owners are `id + id_offset`; an id that would overflow is refused.
//! - Paths deeper than [`MAX_DEPTH`] components are refused.
//!
//! A refused entry fails the whole unpack with [`ImageError::UnsafeEntry`]
//! naming it; the caller (the layer store) then discards the partial layer.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::ImageError;
use crate::fsx;

/// The xattr overlayfs reads to treat a directory as opaque (hiding lower
/// layers' content below it). Arca mounts overlays as host root, so the
/// `trusted.` namespace (not `user.`, which overlayfs only reads with the
/// `userxattr` mount option).
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Deepest path (in components) a layer entry may have.
pub const MAX_DEPTH: usize = 1024;

/// `security.capability`, which gets special handling.
const CAPABILITY_XATTR: &str = "security.capability";

/// Buffer between the registry blob and the decompressor.
const READ_BUFFER: usize = 256 * 1024;

/// How to unpack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnpackOptions {
    /// Added to every uid and gid (Arca: 100000, see [`crate::shift`]). With 0
    /// and when not root, owners are left as the unpacking user.
    pub id_offset: u32,
}

impl UnpackOptions {
    /// Options with the given id offset.
    pub fn new(id_offset: u32) -> Self {
        Self { id_offset }
    }
}

/// Compression of a layer stream, detected from its first bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// A plain tar.
    #[default]
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

/// What [`unpack_layer`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnpackStats {
    /// Tar entries seen (whiteouts included, PAX/GNU meta headers not).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteouts created.
    pub whiteouts: u64,
    /// Directories marked opaque.
    pub opaque_dirs: u64,
    /// Extended attributes not applied (namespace not allowed, or not
    /// supported by the file system).
    pub xattrs_skipped: u64,
    /// Entries of kinds that have no place in a root file system (tar volume
    /// labels, unknown types) or aufs bookkeeping, skipped.
    pub entries_skipped: u64,
    /// `sha256:<hex>` of the uncompressed tar stream: the layer's OCI `diff_id`.
    pub diff_id: String,
    /// Compression the stream had.
    pub compression: Compression,
}

/// Unpacks the layer read from `reader` into the existing directory `dest`,
/// converting whiteouts to overlayfs format, as the module docs describe.
///
/// `dest` is normally empty; entries already there are replaced like repeated
/// tar entries are. `dest` itself is given owner `id_offset:id_offset` and
/// mode 0755 unless the tar has an entry for `.` saying otherwise. Needs root
/// unless `id_offset` is 0. On error `dest` is left partly filled: the caller
/// removes it.
pub fn unpack_layer(
    reader: impl Read,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, ImageError> {
    let root = fsx::open_dir(dest).map_err(|e| ImageError::io("open", dest, e))?;
    let is_root = nix::unistd::geteuid().is_root();
    if !is_root && opts.id_offset != 0 {
        return Err(ImageError::NotRoot {
            action: "unpacking a layer with shifted owners",
        });
    }
    let mut buffered = BufReader::with_capacity(READ_BUFFER, reader);
    let compression = detect(
        buffered
            .fill_buf()
            .map_err(|source| ImageError::LayerArchive { source })?,
    )?;
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(ZstdReader::new(buffered)),
    };
    let hashing = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
    };
    let mut unpacker = Unpacker {
        root,
        offset: opts.id_offset,
        chown: is_root,
        dir_times: Vec::new(),
        stats: UnpackStats {
            compression,
            ..UnpackStats::default()
        },
    };
    unpacker.init_root()?;
    let mut archive = tar::Archive::new(hashing);
    for entry in archive
        .entries()
        .map_err(|source| ImageError::LayerArchive { source })?
    {
        let mut entry = entry.map_err(|source| ImageError::LayerArchive { source })?;
        unpacker.entry(&mut entry)?;
    }
    // Hash what follows the end-of-archive blocks too: the diff_id covers
    // the whole uncompressed stream.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|source| ImageError::LayerArchive { source })?;
    unpacker.finish_dir_times()?;
    let mut stats = unpacker.stats;
    stats.diff_id = format!("sha256:{}", hex(&rest.hasher.finalize()));
    Ok(stats)
}

/// Compression from a stream's first bytes.
fn detect(magic: &[u8]) -> Result<Compression, ImageError> {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if magic.starts_with(b"BZh") {
        Err(ImageError::UnsupportedCompression { format: "bzip2" })
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(ImageError::UnsupportedCompression { format: "xz" })
    } else {
        Ok(Compression::None)
    }
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A zstd decoder over every frame of a stream (ruzstd's own streaming
/// decoder stops after the first).
struct ZstdReader<R> {
    src: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    fn new(src: R) -> Self {
        Self {
            src,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.in_frame {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                self.decoder
                    .reset(&mut self.src)
                    .map_err(io::Error::other)?;
                self.in_frame = true;
            }
            while self.decoder.can_collect() == 0 && !self.decoder.is_finished() {
                self.decoder
                    .decode_blocks(
                        &mut self.src,
                        ruzstd::decoding::BlockDecodingStrategy::UptoBlocks(1),
                    )
                    .map_err(io::Error::other)?;
            }
            if self.decoder.can_collect() > 0 {
                return self.decoder.read(buf);
            }
            // This frame is done; another may follow.
            self.in_frame = false;
        }
    }
}

/// Which side of a copy failed.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies an entry's data, telling a broken archive from a failing disk.
fn copy_data(from: &mut impl Read, to: &mut File) -> Result<u64, CopyError> {
    use std::io::Write as _;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

/// Owner, mode, times and xattrs of one entry, ids already shifted.
struct Attrs {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// State of one unpack.
struct Unpacker {
    root: OwnedFd,
    offset: u32,
    /// Whether to chown (root only).
    chown: bool,
    /// Directories whose mtime is set at the end (creating children changes it).
    dir_times: Vec<(Vec<OsString>, Timespec)>,
    stats: UnpackStats,
}

/// Splits a tar path into components: leading `/` and `.` dropped, `..`
/// refused.
fn components(raw: &[u8]) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("it has a `..` component".to_owned()),
            _ => out.push(OsStr::from_bytes(part).to_os_string()),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(format!("it is deeper than {MAX_DEPTH} directories"));
    }
    Ok(out)
}

/// Display form of components, for error messages.
fn display(comps: &[OsString]) -> String {
    comps
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// `sec[.frac]` as PAX writes times.
fn parse_pax_time(s: &str) -> Option<Timespec> {
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let tv_sec: i64 = sec.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let tv_nsec: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    // "-1.5" means 1.5 s before the epoch.
    let (tv_sec, tv_nsec) = if tv_sec < 0 || sec.starts_with('-') {
        if tv_nsec > 0 {
            (tv_sec - 1, 1_000_000_000 - tv_nsec)
        } else {
            (tv_sec, 0)
        }
    } else {
        (tv_sec, tv_nsec)
    };
    Some(Timespec { tv_sec, tv_nsec })
}

/// Rewrites a `security.capability` value for a user namespace whose root is
/// host uid `root_id`: v2 (global) becomes v3 with that root id, v3 gets
/// `root_id` added to its root id. `None` for values we do not understand.
pub(crate) fn shift_capability(value: &[u8], root_id: u32) -> Option<Vec<u8>> {
    const REVISION_MASK: u32 = 0xff00_0000;
    const REVISION_2: u32 = 0x0200_0000;
    const REVISION_3: u32 = 0x0300_0000;
    let magic = u32::from_le_bytes(value.get(..4)?.try_into().ok()?);
    match (magic & REVISION_MASK, value.len()) {
        (REVISION_2, 20) => {
            let mut out = value.to_vec();
            out[..4].copy_from_slice(&((magic & !REVISION_MASK) | REVISION_3).to_le_bytes());
            out.extend_from_slice(&root_id.to_le_bytes());
            Some(out)
        }
        (REVISION_3, 24) => {
            let old = u32::from_le_bytes(value[20..24].try_into().ok()?);
            let mut out = value.to_vec();
            out[20..24].copy_from_slice(&old.checked_add(root_id)?.to_le_bytes());
            Some(out)
        }
        _ => None,
    }
}

/// The inverse of [`shift_capability`] for the ext4 export: a v3 capability
/// whose root id is `root_id` becomes v2 (global). Others are returned as they are.
pub(crate) fn unshift_capability(value: &[u8], root_id: u32) -> Vec<u8> {
    const REVISION_MASK: u32 = 0xff00_0000;
    const REVISION_2: u32 = 0x0200_0000;
    const REVISION_3: u32 = 0x0300_0000;
    let magic = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    let rootid = value
        .get(20..24)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    match (magic, rootid) {
        (Some(m), Some(r))
            if m & REVISION_MASK == REVISION_3 && value.len() == 24 && r == root_id =>
        {
            let mut out = value[..20].to_vec();
            out[..4].copy_from_slice(&((m & !REVISION_MASK) | REVISION_2).to_le_bytes());
            out
        }
        _ => value.to_vec(),
    }
}

impl Unpacker {
    fn shift(&self, id: u64, what: &str, entry: &str) -> Result<u32, ImageError> {
        u32::try_from(id)
            .ok()
            .and_then(|id| id.checked_add(self.offset))
            .filter(|id| *id != u32::MAX)
            .ok_or_else(|| ImageError::UnsafeEntry {
                entry: entry.to_owned(),
                reason: format!(
                    "its {what} {id} plus the id offset {} is out of range",
                    self.offset
                ),
            })
    }

    /// The layer root: shifted root owner, 0755.
    fn init_root(&mut self) -> Result<(), ImageError> {
        let io_err = |action, e: Errno| ImageError::UnpackEntry {
            entry: ".".to_owned(),
            action,
            source: e.into(),
        };
        if self.chown {
            let id = self.offset;
            rfs::fchown(
                &self.root,
                Some(rustix::fs::Uid::from_raw(id)),
                Some(rustix::fs::Gid::from_raw(id)),
            )
            .map_err(|e| io_err("chown", e))?;
        }
        rfs::fchmod(&self.root, Mode::from_raw_mode(0o755)).map_err(|e| io_err("chmod", e))
    }

    fn attrs<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Attrs, ImageError> {
        let header = entry.header();
        let bad = |what: &str| ImageError::UnsafeEntry {
            entry: name.to_owned(),
            reason: format!("its {what} field is malformed"),
        };
        let mut uid = header.uid().map_err(|_| bad("uid"))?;
        let mut gid = header.gid().map_err(|_| bad("gid"))?;
        let mode = header.mode().map_err(|_| bad("mode"))? & 0o7777;
        let mtime = header.mtime().map_err(|_| bad("mtime"))?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|source| ImageError::LayerArchive { source })?
        {
            for ext in pax {
                let ext = ext.map_err(|source| ImageError::LayerArchive { source })?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                let text = std::str::from_utf8(value).unwrap_or("");
                match key {
                    "uid" => uid = text.parse().map_err(|_| bad("PAX uid"))?,
                    "gid" => gid = text.parse().map_err(|_| bad("PAX gid"))?,
                    "mtime" => mtime = parse_pax_time(text).ok_or_else(|| bad("PAX mtime"))?,
                    _ => {
                        if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                            match self.filter_xattr(xattr, value) {
                                Some(v) => xattrs.push((xattr.to_owned(), v)),
                                None => self.stats.xattrs_skipped += 1,
                            }
                        }
                    }
                }
            }
        }
        Ok(Attrs {
            uid: self.shift(uid, "uid", name)?,
            gid: self.shift(gid, "gid", name)?,
            mode,
            mtime,
            xattrs,
        })
    }

    /// The value to set for a PAX xattr, or `None` to skip it.
    fn filter_xattr(&self, name: &str, value: &[u8]) -> Option<Vec<u8>> {
        if name == CAPABILITY_XATTR {
            if self.offset == 0 {
                return Some(value.to_vec());
            }
            return shift_capability(value, self.offset);
        }
        name.starts_with("user.").then(|| value.to_vec())
    }

    /// Opens (creating missing ones, 0755 shifted root) the directories
    /// `parents` below the root, never following a symlink.
    fn parent_dir(&self, parents: &[OsString], entry: &str) -> Result<OwnedFd, ImageError> {
        let mut cur = rfs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action: "open the layer root for",
            source: e.into(),
        })?;
        for (i, comp) in parents.iter().enumerate() {
            let io_err = |action, source| ImageError::UnpackEntry {
                entry: entry.to_owned(),
                action,
                source,
            };
            match fsx::open_child_dir(cur.as_fd(), comp) {
                Ok(fd) => cur = fd,
                Err(e) => match Errno::from_io_error(&e) {
                    Some(Errno::NOENT) => {
                        rfs::mkdirat(&cur, comp.as_os_str(), Mode::RWXU)
                            .map_err(|e| io_err("create a parent directory of", e.into()))?;
                        let fd = fsx::open_child_dir(cur.as_fd(), comp)
                            .map_err(|e| io_err("open a parent directory of", e))?;
                        if self.chown {
                            rfs::fchown(
                                &fd,
                                Some(rustix::fs::Uid::from_raw(self.offset)),
                                Some(rustix::fs::Gid::from_raw(self.offset)),
                            )
                            .map_err(|e| io_err("chown a parent directory of", e.into()))?;
                        }
                        rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
                            .map_err(|e| io_err("chmod a parent directory of", e.into()))?;
                        cur = fd;
                    }
                    Some(Errno::LOOP | Errno::NOTDIR) => {
                        let is_link =
                            fsx::lstat_at(cur.as_fd(), comp)
                                .ok()
                                .flatten()
                                .is_some_and(|st| {
                                    FileType::from_raw_mode(st.st_mode) == FileType::Symlink
                                });
                        let prefix = display(&parents[..=i]);
                        return Err(ImageError::UnsafeEntry {
                            entry: entry.to_owned(),
                            reason: if is_link {
                                format!(
                                    "its parent `{prefix}` is a symlink, which unpacking never follows"
                                )
                            } else {
                                format!("its parent `{prefix}` is not a directory")
                            },
                        });
                    }
                    _ => return Err(io_err("open a parent directory of", e)),
                },
            }
        }
        Ok(cur)
    }

    /// Removes whatever is at `name` in `dir` (keeping a directory if
    /// `keep_dir`); returns whether a directory was kept.
    fn clear(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        keep_dir: bool,
        entry: &str,
    ) -> Result<bool, ImageError> {
        let io_err = |source| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action: "replace the existing",
            source,
        };
        match fsx::lstat_at(dir, name).map_err(io_err)? {
            None => Ok(false),
            Some(st) if keep_dir && fsx::is_dir(&st) => Ok(true),
            Some(_) => {
                fsx::remove_at(dir, name).map_err(io_err)?;
                Ok(false)
            }
        }
    }

    /// Owner, mode, xattrs and (unless deferred) times of an open file or dir.
    fn apply_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        attrs: &Attrs,
        times: bool,
        entry: &str,
    ) -> Result<(), ImageError> {
        let io_err = |action, e: Errno| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action,
            source: e.into(),
        };
        if self.chown {
            rfs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(attrs.uid)),
                Some(rustix::fs::Gid::from_raw(attrs.gid)),
            )
            .map_err(|e| io_err("chown", e))?;
        }
        // After chown, which clears setuid/setgid.
        rfs::fchmod(fd, Mode::from_raw_mode(attrs.mode)).map_err(|e| io_err("chmod", e))?;
        for (name, value) in &attrs.xattrs {
            match rfs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::OPNOTSUPP | Errno::PERM) => self.stats.xattrs_skipped += 1,
                Err(e) => return Err(io_err("set an xattr of", e)),
            }
        }
        if times {
            let ts = Timestamps {
                last_access: attrs.mtime,
                last_modification: attrs.mtime,
            };
            rfs::futimens(fd, &ts).map_err(|e| io_err("set the mtime of", e))?;
        }
        Ok(())
    }

    /// Owner and times of a symlink or special file, by name (no fd).
    fn apply_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        attrs: &Attrs,
        chmod: bool,
        entry: &str,
    ) -> Result<(), ImageError> {
        let io_err = |action, e: Errno| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action,
            source: e.into(),
        };
        if self.chown {
            rfs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(attrs.uid)),
                Some(rustix::fs::Gid::from_raw(attrs.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err("chown", e))?;
        }
        if chmod {
            // Only for the device or fifo just made here (not a symlink), so
            // chmodat cannot be redirected.
            rfs::chmodat(dir, name, Mode::from_raw_mode(attrs.mode), AtFlags::empty())
                .map_err(|e| io_err("chmod", e))?;
        }
        let ts = Timestamps {
            last_access: attrs.mtime,
            last_modification: attrs.mtime,
        };
        rfs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("set the mtime of", e))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        self.stats.entries += 1;
        let raw = entry.path_bytes().into_owned();
        let name_for_errors = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
            entry: name_for_errors.clone(),
            reason,
        };
        let comps = components(&raw).map_err(unsafe_entry)?;
        // Old tars mark directories with a trailing slash on a regular entry.
        let kind = if kind == EntryType::Regular && raw.ends_with(b"/") {
            EntryType::Directory
        } else {
            kind
        };
        let attrs = self.attrs(entry, &name_for_errors)?;
        let Some((name, parents)) = comps.split_last() else {
            if kind != EntryType::Directory {
                return Err(unsafe_entry(
                    "it names the layer root but is not a directory".to_owned(),
                ));
            }
            let root = rfs::openat(
                &self.root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| ImageError::UnpackEntry {
                entry: name_for_errors.clone(),
                action: "open",
                source: e.into(),
            })?;
            self.apply_fd(root.as_fd(), &attrs, false, &name_for_errors)?;
            self.dir_times.push((Vec::new(), attrs.mtime));
            return Ok(());
        };

        if let Some(target) = name.as_bytes().strip_prefix(b".wh.") {
            let parent = self.parent_dir(parents, &name_for_errors)?;
            return self.whiteout(parent.as_fd(), target, &name_for_errors);
        }

        let parent = self.parent_dir(parents, &name_for_errors)?;
        let parent = parent.as_fd();
        let io_err = |action, source: io::Error| ImageError::UnpackEntry {
            entry: name_for_errors.clone(),
            action,
            source,
        };
        match kind {
            EntryType::Directory => {
                if !self.clear(parent, name, true, &name_for_errors)? {
                    rfs::mkdirat(parent, name.as_os_str(), Mode::RWXU)
                        .map_err(|e| io_err("create", e.into()))?;
                }
                let dir = fsx::open_child_dir(parent, name).map_err(|e| io_err("open", e))?;
                self.apply_fd(dir.as_fd(), &attrs, false, &name_for_errors)?;
                self.dir_times.push((comps.clone(), attrs.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.clear(parent, name, false, &name_for_errors)?;
                let fd = rfs::openat(
                    parent,
                    name.as_os_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::RUSR | Mode::WUSR,
                )
                .map_err(|e| io_err("create", e.into()))?;
                let mut file = File::from(fd);
                let n = copy_data(entry, &mut file).map_err(|e| match e {
                    CopyError::Read(source) => ImageError::LayerArchive { source },
                    CopyError::Write(e) => io_err("write", e),
                })?;
                self.stats.bytes += n;
                self.apply_fd(file.as_fd(), &attrs, true, &name_for_errors)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("it is a symlink without a target".to_owned()))?
                    .into_owned();
                self.clear(parent, name, false, &name_for_errors)?;
                rfs::symlinkat(OsStr::from_bytes(&target), parent, name.as_os_str())
                    .map_err(|e| io_err("create", e.into()))?;
                self.apply_at(parent, name, &attrs, false, &name_for_errors)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("it is a hard link without a target".to_owned()))?
                    .into_owned();
                self.hard_link(parent, name, &comps, &target, &name_for_errors)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let header = entry.header();
                        let major = header.device_major().ok().flatten().unwrap_or(0);
                        let minor = header.device_minor().ok().flatten().unwrap_or(0);
                        let ft = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (ft, rfs::makedev(major, minor))
                    }
                };
                self.clear(parent, name, false, &name_for_errors)?;
                rfs::mknodat(
                    parent,
                    name.as_os_str(),
                    file_type,
                    Mode::RUSR | Mode::WUSR,
                    dev,
                )
                .map_err(|e| io_err("create", e.into()))?;
                self.apply_at(parent, name, &attrs, true, &name_for_errors)?;
            }
            _ => {
                tracing::debug!(entry = %name_for_errors, ?kind, "skipping a tar entry of this kind");
                self.stats.entries_skipped += 1;
            }
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        parent: BorrowedFd<'_>,
        target: &[u8],
        entry: &str,
    ) -> Result<(), ImageError> {
        let io_err = |action, e: Errno| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action,
            source: e.into(),
        };
        if target == b".wh..opq" {
            rfs::fsetxattr(parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| io_err("mark the directory opaque for", e))?;
            self.stats.opaque_dirs += 1;
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // aufs hard-link and metadata bookkeeping; meaningless here.
            self.stats.entries_skipped += 1;
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ImageError::UnsafeEntry {
                entry: entry.to_owned(),
                reason: "it is a whiteout without a valid name".to_owned(),
            });
        }
        let name = OsStr::from_bytes(target);
        self.clear(parent, name, false, entry)?;
        rfs::mknodat(
            parent,
            name,
            FileType::CharacterDevice,
            Mode::empty(),
            rfs::makedev(0, 0),
        )
        .map_err(|e| io_err("create the whiteout for", e))?;
        if self.chown {
            rfs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(self.offset)),
                Some(rustix::fs::Gid::from_raw(self.offset)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err("chown the whiteout for", e))?;
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn hard_link(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        comps: &[OsString],
        target: &[u8],
        entry: &str,
    ) -> Result<(), ImageError> {
        let refuse = |reason: String| ImageError::UnsafeEntry {
            entry: entry.to_owned(),
            reason,
        };
        let target_comps =
            components(target).map_err(|r| refuse(format!("its hard-link target: {r}")))?;
        let shown = String::from_utf8_lossy(target).into_owned();
        let Some((target_name, target_parents)) = target_comps.split_last() else {
            return Err(refuse("it is a hard link to the layer root".to_owned()));
        };
        if target_comps == comps {
            // A link to itself: nothing to do.
            return Ok(());
        }
        let not_earlier = || {
            refuse(format!(
                "its hard-link target `{shown}` is not an earlier file of this layer"
            ))
        };
        let mut dir = rfs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action: "open the layer root for",
            source: e.into(),
        })?;
        for comp in target_parents {
            dir = fsx::open_child_dir(dir.as_fd(), comp).map_err(|_| not_earlier())?;
        }
        match fsx::lstat_at(dir.as_fd(), target_name) {
            Ok(Some(st)) if !fsx::is_dir(&st) => {}
            _ => return Err(not_earlier()),
        }
        self.clear(parent, name, false, entry)?;
        rfs::linkat(
            &dir,
            target_name.as_os_str(),
            parent,
            name,
            AtFlags::empty(),
        )
        .map_err(|e| ImageError::UnpackEntry {
            entry: entry.to_owned(),
            action: "create the hard link",
            source: e.into(),
        })
    }

    /// Sets directory mtimes once all their children exist.
    fn finish_dir_times(&mut self) -> Result<(), ImageError> {
        for (comps, mtime) in std::mem::take(&mut self.dir_times) {
            let ts = Timestamps {
                last_access: mtime,
                last_modification: mtime,
            };
            let mut dir = match rfs::openat(
                &self.root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(e) => {
                    return Err(ImageError::UnpackEntry {
                        entry: ".".to_owned(),
                        action: "open",
                        source: e.into(),
                    });
                }
            };
            let mut found = true;
            for comp in &comps {
                match fsx::open_child_dir(dir.as_fd(), comp) {
                    Ok(fd) => dir = fd,
                    // Replaced by a later entry: its own attributes stand.
                    Err(_) => {
                        found = false;
                        break;
                    }
                }
            }
            if found {
                rfs::futimens(&dir, &ts).map_err(|e| ImageError::UnpackEntry {
                    entry: display(&comps),
                    action: "set the mtime of",
                    source: e.into(),
                })?;
            }
        }
        Ok(())
    }
}

/// Unpacks a layer file (any supported compression) into `dest`; a
/// convenience over [`unpack_layer`].
pub fn unpack_layer_file(
    path: &Path,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    unpack_layer(file, dest, opts)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use super::*;

    /// Builds tars entry by entry, with raw (unvalidated) names so that
    /// hostile archives can be made.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn raw(
            &mut self,
            kind: EntryType,
            path: &str,
            link: &str,
            mode: u32,
            data: &[u8],
        ) -> &mut Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.raw(EntryType::Regular, path, "", 0o644, data)
        }

        fn dir(&mut self, path: &str) -> &mut Self {
            self.raw(EntryType::Directory, path, "", 0o755, b"")
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.raw(EntryType::Symlink, path, target, 0o777, b"")
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.raw(EntryType::Link, path, target, 0o644, b"")
        }

        fn finish(&mut self) -> Vec<u8> {
            let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
            b.into_inner().unwrap()
        }
    }

    /// A tempdir with `layer/` (the destination) and `outside/secret`.
    struct Fixture {
        tmp: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir(tmp.path().join("layer")).unwrap();
            fs::create_dir(tmp.path().join("outside")).unwrap();
            fs::write(tmp.path().join("outside/secret"), b"untouched").unwrap();
            Self { tmp }
        }
        fn layer(&self) -> PathBuf {
            self.tmp.path().join("layer")
        }
        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }
        fn unpack(&self, tar: &[u8]) -> Result<UnpackStats, ImageError> {
            unpack_layer(tar, &self.layer(), &UnpackOptions::default())
        }
        /// Everything in the tempdir but `layer/` is as the fixture made it.
        fn assert_outside_untouched(&self) {
            let names: Vec<_> = fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
            let outside: Vec<_> = fs::read_dir(self.outside())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(outside, vec![OsString::from("secret")]);
            assert_eq!(
                fs::read(self.outside().join("secret")).unwrap(),
                b"untouched"
            );
            let m = fs::symlink_metadata(self.outside().join("secret")).unwrap();
            assert_eq!(m.nlink(), 1, "no hard link to the outside file was made");
        }
    }

    fn refused(result: Result<UnpackStats, ImageError>, entry: &str) -> String {
        match result {
            Err(ImageError::UnsafeEntry { entry: e, reason }) => {
                assert_eq!(e, entry);
                reason
            }
            other => panic!("expected {entry} to be refused, got {other:?}"),
        }
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        let c = |s: &str| components(s.as_bytes()).map(|v| display(&v));
        assert_eq!(c("/etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(c("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(c("./").unwrap(), "");
        assert!(c("../x").is_err());
        assert!(c("a/../b").is_err());
        assert!(c("/../../etc/x").is_err());
        assert!(c(&"d/".repeat(MAX_DEPTH + 1)).is_err());
        assert!(c(&"d/".repeat(MAX_DEPTH)).is_ok());
    }

    #[test]
    fn pax_times_parse() {
        let t = |s: &str| parse_pax_time(s).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("x"), None);
        assert_eq!(t("1.x"), None);
    }

    #[test]
    fn capabilities_get_a_namespace_root() {
        let mut v2 = Vec::new();
        v2.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
        v2.extend_from_slice(&[0xaa; 16]);
        let v3 = shift_capability(&v2, 100_000).unwrap();
        assert_eq!(v3.len(), 24);
        assert_eq!(u32::from_le_bytes(v3[..4].try_into().unwrap()), 0x0300_0001);
        assert_eq!(&v3[4..20], &v2[4..20]);
        assert_eq!(u32::from_le_bytes(v3[20..].try_into().unwrap()), 100_000);
        // v3 root ids are shifted, and the export turns them back into v2.
        let again = shift_capability(&v3, 5).unwrap();
        assert_eq!(u32::from_le_bytes(again[20..].try_into().unwrap()), 100_005);
        assert_eq!(unshift_capability(&v3, 100_000), v2);
        assert_eq!(unshift_capability(&v3, 7), v3, "another root id stays");
        assert_eq!(shift_capability(b"junk", 1), None);
    }

    #[test]
    fn dotdot_entries_are_refused() {
        for path in ["../x", "/../../etc/x", "a/../../x", "./../outside/secret"] {
            let f = Fixture::new();
            let tar = Tar::new().file(path, b"evil").finish();
            let reason = refused(f.unpack(&tar), path);
            assert!(reason.contains(".."), "{reason}");
            f.assert_outside_untouched();
        }
    }

    #[test]
    fn absolute_paths_land_inside() {
        let f = Fixture::new();
        let tar = Tar::new().file("/etc/passwd", b"inside").finish();
        f.unpack(&tar).unwrap();
        assert_eq!(fs::read(f.layer().join("etc/passwd")).unwrap(), b"inside");
        f.assert_outside_untouched();
    }

    #[test]
    fn entries_below_symlinks_are_refused() {
        let f = Fixture::new();
        let outside = f.outside().to_string_lossy().into_owned();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                Tar::new()
                    .symlink("a", "/etc")
                    .file("a/passwd", b"evil")
                    .finish(),
                "a/passwd",
            ),
            (
                Tar::new()
                    .symlink("a", &outside)
                    .file("a/secret", b"evil")
                    .finish(),
                "a/secret",
            ),
            (
                Tar::new()
                    .symlink("a", "../..")
                    .file("a/x", b"evil")
                    .finish(),
                "a/x",
            ),
            (
                Tar::new()
                    .symlink("a", "..")
                    .file("a/outside/secret", b"evil")
                    .finish(),
                "a/outside/secret",
            ),
            // Even a symlink to a directory inside the layer is not followed.
            (
                Tar::new()
                    .dir("d")
                    .symlink("a", "d")
                    .file("a/x", b"x")
                    .finish(),
                "a/x",
            ),
            // A directory swapped for a symlink by a later entry.
            (
                Tar::new()
                    .dir("d")
                    .symlink("d", &outside)
                    .file("d/secret", b"evil")
                    .finish(),
                "d/secret",
            ),
            (
                Tar::new().symlink("a", &outside).dir("a/sub").finish(),
                "a/sub",
            ),
            (
                Tar::new()
                    .symlink("a", &outside)
                    .symlink("a/l", "/")
                    .finish(),
                "a/l",
            ),
            (
                Tar::new()
                    .symlink("a", &outside)
                    .raw(EntryType::Fifo, "a/p", "", 0o644, b"")
                    .finish(),
                "a/p",
            ),
            (
                Tar::new()
                    .symlink("a", &outside)
                    .file("a/.wh.secret", b"")
                    .finish(),
                "a/.wh.secret",
            ),
        ];
        for (tar, entry) in cases {
            let f = Fixture::new();
            let reason = refused(f.unpack(&tar), entry);
            assert!(reason.contains("symlink"), "{entry}: {reason}");
            f.assert_outside_untouched();
            assert!(!fs::read_to_string("/etc/passwd").unwrap().contains("evil"));
        }
        let _ = f;
    }

    #[test]
    fn hard_links_must_stay_inside() {
        let f0 = Fixture::new();
        let outside_secret = f0.outside().join("secret").to_string_lossy().into_owned();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Tar::new().hardlink("h", "../outside/secret").finish(), "h"),
            (Tar::new().hardlink("h", "/etc/passwd").finish(), "h"),
            (Tar::new().hardlink("h", &outside_secret).finish(), "h"),
            (
                Tar::new()
                    .symlink("s", &f0.outside().to_string_lossy())
                    .hardlink("h", "s/secret")
                    .finish(),
                "h",
            ),
            (
                Tar::new()
                    .symlink("s", &outside_secret)
                    .dir("d")
                    .hardlink("h", "d")
                    .finish(),
                "h",
            ),
            (Tar::new().hardlink("h", "").finish(), "h"),
        ];
        for (tar, entry) in cases {
            let f = Fixture::new();
            let result = f.unpack(&tar);
            assert!(
                matches!(&result, Err(ImageError::UnsafeEntry { entry: e, .. }) if e == entry),
                "{result:?}"
            );
            f.assert_outside_untouched();
        }
        // A hard link to a symlink links the symlink itself, not its target.
        let f = Fixture::new();
        let tar = Tar::new()
            .symlink("s", &outside_secret)
            .hardlink("h", "s")
            .finish();
        f.unpack(&tar).unwrap();
        let m = fs::symlink_metadata(f.layer().join("h")).unwrap();
        assert!(m.file_type().is_symlink());
        f.assert_outside_untouched();
    }

    #[test]
    fn replacing_a_symlink_never_writes_through_it() {
        let f = Fixture::new();
        let secret = f.outside().join("secret").to_string_lossy().into_owned();
        let outside = f.outside().to_string_lossy().into_owned();
        let tar = Tar::new()
            .symlink("f", &secret)
            .file("f", b"new")
            .symlink("d", &outside)
            .dir("d")
            .file("d/x", b"x")
            .finish();
        f.unpack(&tar).unwrap();
        assert_eq!(fs::read(f.layer().join("f")).unwrap(), b"new");
        assert!(
            !fs::symlink_metadata(f.layer().join("f"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(f.layer().join("d/x").is_file());
        assert!(
            !fs::symlink_metadata(f.layer().join("d"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        f.assert_outside_untouched();
    }

    #[test]
    fn bad_whiteouts_are_refused() {
        for path in ["d/.wh...", ".wh.."] {
            let f = Fixture::new();
            let tar = Tar::new().file(path, b"").finish();
            let result = f.unpack(&tar);
            assert!(
                matches!(result, Err(ImageError::UnsafeEntry { .. })),
                "{path}: {result:?}"
            );
            f.assert_outside_untouched();
        }
    }

    #[test]
    fn unpacks_every_kind_of_entry_with_metadata() {
        if !crate::test_root::require_root("this unpack test") {
            return;
        }
        let f = Fixture::new();
        let mut t = Tar::new();
        t.raw(EntryType::Directory, "bin/", "", 0o755, b"");
        t.raw(EntryType::Regular, "bin/su", "", 0o4755, b"#!/bin/true\n");
        t.raw(EntryType::Directory, "tmp", "", 0o1777, b"");
        t.raw(EntryType::Directory, "locked", "", 0o500, b"");
        t.raw(EntryType::Regular, "locked/f", "", 0o400, b"ro");
        t.raw(EntryType::Link, "bin/su2", "bin/su", 0, b"");
        t.raw(EntryType::Symlink, "sh", "/bin/busybox", 0o777, b"");
        t.raw(EntryType::Fifo, "fifo", "", 0o600, b"");
        {
            let mut h = tar::Header::new_gnu();
            h.set_path("dev/null").unwrap();
            h.set_entry_type(EntryType::Char);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(0o666);
            h.set_size(0);
            h.set_mtime(1_600_000_000);
            h.set_cksum();
            t.0.append(&h, &b""[..]).unwrap();
        }
        // uid 1000 and xattrs through PAX.
        let mut cap = Vec::new();
        cap.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
        cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
        cap.extend_from_slice(&[0; 12]);
        t.0.append_pax_extensions([
            ("SCHILY.xattr.user.note", &b"kept"[..]),
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
            ("SCHILY.xattr.security.capability", &cap[..]),
            ("mtime", &b"1700000000.25"[..]),
        ])
        .unwrap();
        {
            let mut h = tar::Header::new_gnu();
            h.set_path("home/user/ping").unwrap();
            h.set_entry_type(EntryType::Regular);
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mode(0o755);
            h.set_size(4);
            h.set_mtime(1);
            h.set_cksum();
            t.0.append(&h, &b"ping"[..]).unwrap();
        }
        let tar = t.finish();
        let stats = unpack_layer(&tar[..], &f.layer(), &UnpackOptions::new(100_000)).unwrap();
        let l = f.layer();
        let meta = |p: &str| fs::symlink_metadata(l.join(p)).unwrap();

        assert_eq!((meta("").uid(), meta("").mode() & 0o7777), (100_000, 0o755));
        assert_eq!(
            meta("bin/su").mode() & 0o7777,
            0o4755,
            "setuid survives chown"
        );
        assert_eq!(
            (meta("bin/su").uid(), meta("bin/su").gid()),
            (100_000, 100_000)
        );
        assert_eq!(meta("bin/su").mtime(), 1_600_000_000);
        assert_eq!(
            meta("bin").mtime(),
            1_600_000_000,
            "dir mtimes are set last"
        );
        assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);
        assert_eq!(meta("locked").mode() & 0o7777, 0o500);
        assert_eq!(meta("bin/su2").ino(), meta("bin/su").ino());
        assert_eq!(
            fs::read_link(l.join("sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(meta("sh").uid(), 100_000);
        assert!(meta("fifo").file_type().is_fifo());
        assert!(meta("dev/null").file_type().is_char_device());
        assert_eq!(meta("dev/null").rdev(), rfs::makedev(1, 3));
        assert_eq!(meta("dev/null").mode() & 0o7777, 0o666);
        assert_eq!(
            meta("dev").uid(),
            100_000,
            "implicit parents are owned by the shifted root"
        );
        let ping = meta("home/user/ping");
        assert_eq!((ping.uid(), ping.gid()), (101_000, 101_000));
        assert_eq!(
            (ping.mtime(), ping.mtime_nsec()),
            (1_700_000_000, 250_000_000)
        );
        let mut buf = [0u8; 64];
        let n = rustix::fs::lgetxattr(l.join("home/user/ping"), "user.note", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"kept");
        assert!(
            rustix::fs::lgetxattr(
                l.join("home/user/ping"),
                "trusted.overlay.redirect",
                &mut buf[..]
            )
            .is_err()
        );
        let n = rustix::fs::lgetxattr(l.join("home/user/ping"), CAPABILITY_XATTR, &mut buf[..])
            .unwrap();
        assert_eq!(n, 24, "stored as a v3 capability");
        assert_eq!(u32::from_le_bytes(buf[20..24].try_into().unwrap()), 100_000);
        assert_eq!(stats.xattrs_skipped, 1);
        assert_eq!(stats.bytes, 12 + 2 + 4);
        assert_eq!(
            stats.diff_id,
            format!("sha256:{}", hex(&Sha256::digest(&tar)))
        );
        f.assert_outside_untouched();
    }

    #[test]
    fn whiteouts_and_opaque_dirs_become_overlay_format() {
        if !crate::test_root::require_root("this unpack test") {
            return;
        }
        let f = Fixture::new();
        let tar = Tar::new()
            .dir("etc")
            .file("etc/.wh.motd", b"")
            .dir("var/cache")
            .file("var/cache/.wh..wh..opq", b"")
            .file("var/cache/new", b"n")
            .file(".wh.gone-dir", b"")
            .file("x/.wh..wh.plnk", b"")
            .finish();
        let stats = unpack_layer(&tar[..], &f.layer(), &UnpackOptions::new(100_000)).unwrap();
        let l = f.layer();
        for w in ["etc/motd", "gone-dir"] {
            let m = fs::symlink_metadata(l.join(w)).unwrap();
            assert!(m.file_type().is_char_device(), "{w}");
            assert_eq!(m.rdev(), 0, "{w}");
            assert_eq!(m.uid(), 100_000);
        }
        assert!(!l.join("etc/.wh.motd").exists());
        let mut buf = [0u8; 8];
        let n = rustix::fs::lgetxattr(l.join("var/cache"), OPAQUE_XATTR, &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"y");
        assert!(rustix::fs::lgetxattr(l.join("etc"), OPAQUE_XATTR, &mut buf[..]).is_err());
        assert!(!l.join("var/cache/.wh..wh..opq").exists());
        assert_eq!(fs::read(l.join("var/cache/new")).unwrap(), b"n");
        assert!(!l.join("x/.wh..wh.plnk").exists());
        assert_eq!(
            (stats.whiteouts, stats.opaque_dirs, stats.entries_skipped),
            (2, 1, 1)
        );
    }

    #[test]
    fn compressions_are_detected_and_hash_the_same() {
        let mut t = Tar::new();
        t.dir("d")
            .file("d/f", &vec![7u8; 100_000])
            .symlink("l", "d/f");
        let tar = t.finish();
        let plain = format!("sha256:{}", hex(&Sha256::digest(&tar)));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        // Two zstd frames back to back must decode as one stream.
        let half = tar.len() / 2;
        let mut zst = ruzstd::encoding::compress_to_vec(
            &tar[..half],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        zst.extend(ruzstd::encoding::compress_to_vec(
            &tar[half..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));

        for (bytes, want) in [
            (&tar, Compression::None),
            (&gz, Compression::Gzip),
            (&zst, Compression::Zstd),
        ] {
            let f = Fixture::new();
            let stats = f.unpack(bytes).unwrap();
            assert_eq!(stats.compression, want);
            assert_eq!(stats.diff_id, plain, "{want:?}");
            assert_eq!(fs::read(f.layer().join("d/f")).unwrap().len(), 100_000);
        }
        // Trailing bytes after the end-of-archive blocks count in the diff_id.
        let mut padded = tar.clone();
        padded.extend_from_slice(&[0u8; 10240]);
        let f = Fixture::new();
        let stats = f.unpack(&padded).unwrap();
        assert_eq!(
            stats.diff_id,
            format!("sha256:{}", hex(&Sha256::digest(&padded)))
        );

        let f = Fixture::new();
        assert!(matches!(
            f.unpack(b"BZh91AY&SY"),
            Err(ImageError::UnsupportedCompression { format: "bzip2" })
        ));
        let f = Fixture::new();
        let mut broken = gz.clone();
        broken.truncate(gz.len() / 2);
        assert!(matches!(
            f.unpack(&broken),
            Err(ImageError::LayerArchive { .. })
        ));
    }

    #[test]
    fn repeated_names_take_the_last_entry() {
        let f = Fixture::new();
        let tar = Tar::new()
            .dir("a")
            .file("a/x", b"1")
            .file("a", b"file now")
            .file("b", b"1")
            .dir("b")
            .file("b/y", b"2")
            .finish();
        f.unpack(&tar).unwrap();
        assert_eq!(fs::read(f.layer().join("a")).unwrap(), b"file now");
        assert_eq!(fs::read(f.layer().join("b/y")).unwrap(), b"2");
        let _ = fs::Permissions::from_mode(0o755);
    }
}
