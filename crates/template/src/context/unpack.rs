//! Unpacking the tar archives the SDKs upload (COPY files, build contexts).
//!
//! The archive is untrusted input unpacked by root, so every entry is
//! checked before anything is written:
//!
//! 1. its path must be relative and without `..` (a leading `./` is fine);
//!    anything else refuses the whole archive;
//! 2. every parent directory inside `dest` is looked at with `lstat`: a
//!    symlink there (say one an earlier entry made) refuses the archive, so
//!    nothing is ever written through a link; missing parents are created
//!    as `0755` directories;
//! 3. a file is created with `O_CREAT | O_EXCL` after removing whatever
//!    non-directory was at its path, so the open itself never follows a
//!    link either;
//! 4. a hard link must name a regular file already unpacked inside `dest`,
//!    reached without symlinks.
//!
//! Symlinks are created as they are, whatever they point at: they are data
//! here, and [`super::resolve_copy`] never follows one out of the context.
//! Permission bits (setuid/setgid/sticky included) are kept; owners and
//! times are not (files belong to the unpacking user; COPY sets owners in
//! the sandbox). Directory modes are applied last, deepest first, so a
//! read-only directory does not stop its own contents from being written.
//! Devices, FIFOs and other special entries are skipped and reported.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

/// An upload that could not be unpacked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// `dest` exists and has something in it.
    #[error("unpack destination {} is not empty", path.display())]
    NotEmpty {
        /// The destination.
        path: PathBuf,
    },
    /// An entry that would escape the destination or clobber it: refused
    /// with the whole archive (bad user input).
    #[error(
        "archive entry `{entry}` is refused: {reason}; build the archive from relative paths inside the context"
    )]
    UnsafeEntry {
        /// The entry's path as stored in the archive.
        entry: String,
        /// Why.
        reason: &'static str,
    },
    /// The archive could not be read (truncated, not a tar, bad gzip).
    #[error("cannot read the uploaded archive {}; upload a tar or tar.gz archive", path.display())]
    Read {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive unpacks to more than [`MAX_UNPACKED_BYTES`] (a
    /// decompression bomb, or simply too much for one build context).
    #[error(
        "the uploaded archive unpacks to more than {} GiB; copy less in one step",
        MAX_UNPACKED_BYTES >> 30
    )]
    TooLarge,
    /// Writing into the destination failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// What was being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// Whether the archive itself is at fault (the edge maps it to 4xx),
    /// rather than the node's file system.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::UnsafeEntry { .. } | Self::Read { .. } | Self::TooLarge
        )
    }
}

/// Most bytes of file content one archive may unpack to.
pub const MAX_UNPACKED_BYTES: u64 = 16 << 30;

/// What [`unpack_upload`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    /// Regular files written (hard links included).
    pub files: usize,
    /// Directory entries (implicitly created parents not counted).
    pub dirs: usize,
    /// Symlinks created.
    pub symlinks: usize,
    /// Entries skipped: devices, FIFOs and other special files, by path.
    pub skipped: Vec<String>,
}

/// Unpacks a tar archive, plain or gzip-compressed (sniffed from the first
/// two bytes), into `dest`, which must be empty or missing (then it is
/// created). See the module docs for the checks made on every entry.
///
/// # Errors
///
/// [`UnpackError::UnsafeEntry`] for an entry that would escape `dest` (an
/// absolute path, `..`, a path through a symlink, a hard link to something
/// that is not a file unpacked before it) or replace a directory with a
/// non-directory; [`UnpackError::Read`] for a corrupt archive;
/// [`UnpackError::NotEmpty`] and [`UnpackError::Write`] otherwise. On error
/// `dest` holds a partial result the caller should remove.
pub fn unpack_upload(archive: &Path, dest: &Path) -> Result<UnpackSummary, UnpackError> {
    unpack_limited(archive, dest, MAX_UNPACKED_BYTES)
}

fn unpack_limited(
    archive: &Path,
    dest: &Path,
    max_bytes: u64,
) -> Result<UnpackSummary, UnpackError> {
    prepare_dest(dest)?;
    let read_err = |source| UnpackError::Read {
        path: archive.to_owned(),
        source,
    };
    let mut file = File::open(archive).map_err(read_err)?;
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut file, &mut magic).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut unpacker = Unpacker {
        dest,
        summary: UnpackSummary::default(),
        dir_modes: Vec::new(),
        written: 0,
        max_bytes,
    };
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        unpacker.entry(entry, &read_err)?;
    }
    // Deepest first: a directory's mode never blocks its children.
    unpacker
        .dir_modes
        .sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    for (path, mode) in &unpacker.dir_modes {
        fs::set_permissions(path, fs::Permissions::from_mode(*mode)).map_err(|source| {
            UnpackError::Write {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok(unpacker.summary)
}

fn prepare_dest(dest: &Path) -> Result<(), UnpackError> {
    let write_err = |source| UnpackError::Write {
        path: dest.to_owned(),
        source,
    };
    match fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(UnpackError::NotEmpty {
                    path: dest.to_owned(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(write_err)
        }
        Err(e) => Err(write_err(e)),
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

struct Unpacker<'a> {
    dest: &'a Path,
    summary: UnpackSummary,
    /// Directory modes to apply at the end.
    dir_modes: Vec<(PathBuf, u32)>,
    /// File bytes written so far.
    written: u64,
    /// Most file bytes to write.
    max_bytes: u64,
}

impl Unpacker<'_> {
    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        read_err: &dyn Fn(io::Error) -> UnpackError,
    ) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        // pax headers: the tar crate applies per-entry ones itself; global
        // ones carry nothing a COPY uses.
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let raw = entry.path().map_err(read_err)?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let rel = relative(&raw).map_err(|reason| UnpackError::UnsafeEntry {
            entry: shown.clone(),
            reason,
        })?;
        let mode = entry.header().mode().map_err(read_err)? & 0o7777;
        let unsafe_entry = |reason| UnpackError::UnsafeEntry {
            entry: shown.clone(),
            reason,
        };
        if rel.as_os_str().is_empty() {
            // `./`: the root itself. Only its mode can be taken.
            if kind != EntryType::Directory {
                return Err(unsafe_entry("only a directory can be the archive root"));
            }
            self.dir_modes.push((self.dest.to_owned(), mode));
            self.summary.dirs += 1;
            return Ok(());
        }
        let target = self.dest.join(&rel);
        match kind {
            EntryType::Directory => {
                self.parents(&rel, true, &shown)?;
                match fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => return Err(unsafe_entry("a directory would replace a file or link")),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&target)
                            .map_err(|source| self.write_err(&target, source))?;
                    }
                    Err(source) => return Err(self.write_err(&target, source)),
                }
                self.dir_modes.push((target, mode));
                self.summary.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous => {
                self.parents(&rel, true, &shown)?;
                self.clear(&target, &shown)?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(|source| self.write_err(&target, source))?;
                let left = self.max_bytes.saturating_sub(self.written);
                let n = io::copy(&mut io::Read::take(&mut entry, left + 1), &mut out)
                    .map_err(read_err)?;
                if n > left {
                    return Err(UnpackError::TooLarge);
                }
                self.written += n;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(|source| self.write_err(&target, source))?;
                self.summary.files += 1;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(read_err)?
                    .ok_or_else(|| unsafe_entry("a symlink without a target"))?
                    .into_owned();
                self.parents(&rel, true, &shown)?;
                self.clear(&target, &shown)?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|source| self.write_err(&target, source))?;
                self.summary.symlinks += 1;
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(read_err)?
                    .ok_or_else(|| unsafe_entry("a hard link without a target"))?
                    .into_owned();
                let link_rel = relative(&link)
                    .map_err(|_| unsafe_entry("a hard link to a path outside the archive"))?;
                self.parents(&link_rel, false, &shown)?;
                let source = self.dest.join(&link_rel);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if meta.is_file() => {}
                    _ => {
                        return Err(unsafe_entry(
                            "a hard link must name a regular file earlier in the archive",
                        ));
                    }
                }
                self.parents(&rel, true, &shown)?;
                self.clear(&target, &shown)?;
                fs::hard_link(&source, &target).map_err(|e| self.write_err(&target, e))?;
                self.summary.files += 1;
            }
            _ => self.summary.skipped.push(shown),
        }
        Ok(())
    }

    fn write_err(&self, path: &Path, source: io::Error) -> UnpackError {
        UnpackError::Write {
            path: path.to_owned(),
            source,
        }
    }

    /// Checks (and with `create`, makes) the parents of `rel` inside dest:
    /// each must be a real directory, never a symlink.
    fn parents(&self, rel: &Path, create: bool, shown: &str) -> Result<(), UnpackError> {
        let mut dir = self.dest.to_owned();
        let comps: Vec<_> = rel.components().collect();
        for comp in &comps[..comps.len().saturating_sub(1)] {
            dir.push(comp);
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(UnpackError::UnsafeEntry {
                        entry: shown.to_owned(),
                        reason: "its path goes through a symlink",
                    });
                }
                Ok(_) => {
                    return Err(UnpackError::UnsafeEntry {
                        entry: shown.to_owned(),
                        reason: "its parent is not a directory",
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&dir).map_err(|source| self.write_err(&dir, source))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                        .map_err(|source| self.write_err(&dir, source))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(UnpackError::UnsafeEntry {
                        entry: shown.to_owned(),
                        reason: "a hard link must name a regular file earlier in the archive",
                    });
                }
                Err(source) => return Err(self.write_err(&dir, source)),
            }
        }
        Ok(())
    }

    /// Removes a non-directory at `target` (a later entry replaces an
    /// earlier one, as tar does); refuses to replace a directory.
    fn clear(&self, target: &Path, shown: &str) -> Result<(), UnpackError> {
        match fs::symlink_metadata(target) {
            Ok(meta) if meta.is_dir() => Err(UnpackError::UnsafeEntry {
                entry: shown.to_owned(),
                reason: "a file or link would replace a directory",
            }),
            Ok(_) => fs::remove_file(target).map_err(|source| self.write_err(target, source)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(self.write_err(target, source)),
        }
    }
}

/// The entry path made relative: `./` prefixes and `.` components dropped;
/// absolute paths and `..` refused.
fn relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("it is an absolute path"),
            Component::ParentDir => return Err("it contains `..`"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A raw tar header for `path` (no validation, so hostile names fit).
    fn header(
        path: &str,
        kind: EntryType,
        size: u64,
        mode: u32,
        link: Option<&str>,
    ) -> tar::Header {
        let mut h = tar::Header::new_old();
        {
            let bytes = h.as_old_mut();
            bytes.name = [0; 100];
            bytes.name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                bytes.linkname = [0; 100];
                bytes.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_cksum();
        h
    }

    enum E<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str, u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn archive(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match e {
                E::File(p, data, mode) => {
                    let h = header(p, EntryType::Regular, data.len() as u64, *mode, None);
                    b.append(&h, *data).unwrap();
                }
                E::Dir(p, mode) => {
                    b.append(&header(p, EntryType::Directory, 0, *mode, None), &[][..])
                        .unwrap();
                }
                E::Sym(p, t) => {
                    b.append(&header(p, EntryType::Symlink, 0, 0o777, Some(t)), &[][..])
                        .unwrap();
                }
                E::Hard(p, t) => {
                    b.append(&header(p, EntryType::Link, 0, 0o644, Some(t)), &[][..])
                        .unwrap();
                }
                E::Fifo(p) => {
                    b.append(&header(p, EntryType::Fifo, 0, 0o644, None), &[][..])
                        .unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    struct Fixture {
        root: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            fs::create_dir(root.path().join("outside")).unwrap();
            Self { root }
        }
        fn dest(&self) -> PathBuf {
            self.root.path().join("dest")
        }
        fn outside(&self) -> PathBuf {
            self.root.path().join("outside")
        }
        fn unpack(&self, bytes: &[u8]) -> Result<UnpackSummary, UnpackError> {
            let path = self.root.path().join("upload.tar");
            fs::write(&path, bytes).unwrap();
            unpack_upload(&path, &self.dest())
        }
        /// Everything under the fixture root but `dest/` and the upload.
        fn stray_files(&self) -> Vec<PathBuf> {
            let mut out = Vec::new();
            for e in fs::read_dir(self.root.path()).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name == "outside" {
                    out.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                } else if name != "dest" && name != "upload.tar" {
                    out.push(p);
                }
            }
            out
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn unpacks_files_dirs_links_and_modes() {
        let f = Fixture::new();
        let bytes = archive(&[
            E::Dir("./", 0o750),
            E::Dir("app", 0o700),
            E::File("app/run.sh", b"#!/bin/sh\n", 0o4755),
            E::File("./deep/er/x.txt", b"x", 0o600),
            E::Sym("app/link", "/etc/passwd"),
            E::Hard("app/again.sh", "app/run.sh"),
        ]);
        let s = f.unpack(&bytes).unwrap();
        assert_eq!(
            s,
            UnpackSummary {
                files: 3,
                dirs: 2,
                symlinks: 1,
                skipped: vec![]
            }
        );
        let d = f.dest();
        assert_eq!(fs::read(d.join("app/run.sh")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(mode_of(&d.join("app/run.sh")), 0o4755);
        assert_eq!(mode_of(&d.join("app")), 0o700);
        assert_eq!(mode_of(&d), 0o750);
        assert_eq!(mode_of(&d.join("deep/er")), 0o755);
        assert_eq!(mode_of(&d.join("deep/er/x.txt")), 0o600);
        assert_eq!(
            fs::read_link(d.join("app/link")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
        assert_eq!(fs::read(d.join("app/again.sh")).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn archives_that_unpack_to_too_much_are_refused() {
        let f = Fixture::new();
        let bytes = archive(&[
            E::File("a", &[0; 600], 0o644),
            E::File("b", &[0; 600], 0o644),
        ]);
        let path = f.root.path().join("bomb.tar");
        fs::write(&path, bytes).unwrap();
        let e = unpack_limited(&path, &f.dest(), 1000).unwrap_err();
        assert!(matches!(e, UnpackError::TooLarge), "{e}");
        assert!(e.is_invalid_input());
        let ok = f.root.path().join("ok");
        unpack_limited(&path, &ok, 1200).unwrap();
    }

    #[test]
    fn gzip_is_sniffed() {
        let f = Fixture::new();
        let plain = archive(&[E::File("a.txt", b"hello", 0o644)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        f.unpack(&gz.finish().unwrap()).unwrap();
        assert_eq!(fs::read(f.dest().join("a.txt")).unwrap(), b"hello");
    }

    #[test]
    fn dot_dot_is_refused_and_nothing_escapes() {
        for name in ["../x", "a/../../x", "./../outside/x"] {
            let f = Fixture::new();
            let e = f
                .unpack(&archive(&[E::File(name, b"pwn", 0o644)]))
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    UnpackError::UnsafeEntry {
                        reason: "it contains `..`",
                        ..
                    }
                ),
                "{name}: {e:?}"
            );
            assert!(e.is_invalid_input());
            assert_eq!(f.stray_files(), Vec::<PathBuf>::new(), "{name}");
        }
    }

    #[test]
    fn absolute_paths_are_refused() {
        let f = Fixture::new();
        let target = f.outside().join("abs");
        let e = f
            .unpack(&archive(&[E::File(
                target.to_str().unwrap(),
                b"pwn",
                0o644,
            )]))
            .unwrap_err();
        assert!(matches!(
            e,
            UnpackError::UnsafeEntry {
                reason: "it is an absolute path",
                ..
            }
        ));
        assert!(!target.exists());
        assert_eq!(f.stray_files(), Vec::<PathBuf>::new());
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let f = Fixture::new();
        let out = f.outside();
        let bytes = archive(&[
            E::Sym("link", out.to_str().unwrap()),
            E::File("link/pwned", b"pwn", 0o644),
        ]);
        let e = f.unpack(&bytes).unwrap_err();
        assert!(matches!(
            e,
            UnpackError::UnsafeEntry {
                reason: "its path goes through a symlink",
                ..
            }
        ));
        assert_eq!(f.stray_files(), Vec::<PathBuf>::new());
        // Relative links that climb out are no better.
        let f = Fixture::new();
        let bytes = archive(&[
            E::Dir("d", 0o755),
            E::Sym("d/up", "../../outside"),
            E::Dir("d/up/sub", 0o755),
        ]);
        assert!(f.unpack(&bytes).is_err());
        assert_eq!(f.stray_files(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_file_replacing_a_symlink_does_not_follow_it() {
        let f = Fixture::new();
        let victim = f.outside().join("victim");
        fs::write(&victim, "keep").unwrap();
        let bytes = archive(&[
            E::Sym("f", victim.to_str().unwrap()),
            E::File("f", b"new", 0o644),
        ]);
        f.unpack(&bytes).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read(f.dest().join("f")).unwrap(), b"new");
        assert!(fs::symlink_metadata(f.dest().join("f")).unwrap().is_file());
    }

    #[test]
    fn hard_links_must_stay_inside() {
        let f = Fixture::new();
        let victim = f.outside().join("victim");
        fs::write(&victim, "secret").unwrap();
        for (name, link) in [
            ("h", victim.to_str().unwrap()),
            ("h", "../outside/victim"),
            ("h", "missing"),
        ] {
            let f2 = Fixture::new();
            let e = f2.unpack(&archive(&[E::Hard(name, link)])).unwrap_err();
            assert!(
                matches!(e, UnpackError::UnsafeEntry { .. }),
                "{link}: {e:?}"
            );
        }
        // Through a symlink to a file outside.
        let bytes = archive(&[
            E::Sym("l", f.outside().to_str().unwrap()),
            E::Hard("h", "l/victim"),
        ]);
        assert!(f.unpack(&bytes).is_err());
        // To a symlink (which could point anywhere).
        let f3 = Fixture::new();
        let bytes = archive(&[E::Sym("s", "/etc/shadow"), E::Hard("h", "s")]);
        assert!(f3.unpack(&bytes).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "secret");
        assert_eq!(f.stray_files(), vec![victim]);
    }

    #[test]
    fn directories_are_not_replaced_and_specials_are_skipped() {
        let f = Fixture::new();
        let e = f
            .unpack(&archive(&[E::Dir("d", 0o755), E::File("d", b"x", 0o644)]))
            .unwrap_err();
        assert!(matches!(e, UnpackError::UnsafeEntry { .. }));
        let f = Fixture::new();
        let s = f
            .unpack(&archive(&[E::Fifo("pipe"), E::File("a", b"", 0o644)]))
            .unwrap();
        assert_eq!(s.skipped, vec!["pipe".to_owned()]);
        assert!(!f.dest().join("pipe").exists());
    }

    #[test]
    fn destination_must_be_empty_and_archive_valid() {
        let f = Fixture::new();
        fs::create_dir(f.dest()).unwrap();
        fs::write(f.dest().join("x"), "").unwrap();
        let e = f.unpack(&archive(&[])).unwrap_err();
        assert!(matches!(e, UnpackError::NotEmpty { .. }));
        assert!(!e.is_invalid_input());
        let f = Fixture::new();
        let e = f.unpack(&[0x1f, 0x8b, 1, 2, 3]).unwrap_err();
        assert!(matches!(e, UnpackError::Read { .. }), "{e:?}");
    }
}
