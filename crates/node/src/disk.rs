//! Each sandbox's disk: an ext4 image of its `diskSizeMB`, so writes stop at
//! the limit. Images are copied (sparsely: only the few blocks mkfs wrote)
//! from one formatted image per size, made once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use nix::unistd::{Whence, lseek};

/// Formatted empty images, one per size.
pub(crate) struct DiskTemplates {
    dir: PathBuf,
    owner: u32,
    lock: Mutex<()>,
}

impl DiskTemplates {
    pub(crate) fn new(dir: PathBuf, owner: u32) -> Self {
        DiskTemplates {
            dir,
            owner,
            lock: Mutex::new(()),
        }
    }

    /// The formatted image of `size_mib`, made now if missing.
    pub(crate) fn template(&self, size_mib: u32) -> io::Result<PathBuf> {
        let path = self.dir.join(format!("ext4-{size_mib}m.img"));
        if path.is_file() {
            return Ok(path);
        }
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!("ext4-{size_mib}m.img.tmp"));
        let f = File::create(&tmp)?;
        f.set_len(u64::from(size_mib) << 20)?;
        drop(f);
        // No journal (the writable layer is scratch space that dies with the
        // sandbox), no reserved blocks, root dir owned by sandbox root.
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-m", "0", "-E"])
            .arg(format!(
                "root_owner={0}:{0},lazy_itable_init=1,nodiscard",
                self.owner
            ))
            .arg(&tmp)
            .output()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("running mkfs.ext4 (install e2fsprogs): {e}"),
                )
            })?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// Copies `src` to `dst` keeping holes: only data ranges are read and written.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let to = File::create(dst)?;
    to.set_len(len)?;
    let len = i64::try_from(len).map_err(|_| io::Error::other("image too large"))?;
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let data = match lseek(&from, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(&from, data, Whence::SeekHole).map_err(io::Error::from)?;
        let mut at = data;
        while at < hole {
            let want = usize::try_from((hole - at).min(buf.len() as i64)).unwrap_or(buf.len());
            let off = u64::try_from(at).unwrap_or(0);
            let n = from.read_at(&mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            to.write_all_at(&buf[..n], off)?;
            at += i64::try_from(n).unwrap_or(0);
        }
        pos = hole;
    }
    Ok(())
}

/// Waits until no loop device is backed by `image` (a sandbox's disk
/// detaches itself once its mount namespace is gone); `false` if one still
/// is after `within`. Blocking.
pub(crate) fn wait_released(image: &Path, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if !attached(image) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether a loop device is backed by `image`.
fn attached(image: &Path) -> bool {
    // The kernel names the backing file by its resolved path.
    let Ok(image) = std::fs::canonicalize(image) else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("loop")
            && std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|f| Path::new(f.trim_end()) == image.as_path())
    })
}

/// (total, used) bytes of the file system at `path`.
pub(crate) fn usage(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = s.fragment_size();
    Some((s.blocks() * frag, (s.blocks() - s.blocks_free()) * frag))
}

/// Copies the writable layer a build step left on its disk image (`upper/`
/// of the ext4 image) into `dest`, whiteouts, xattrs and owners included:
/// the image is mounted read-only (nodev, nosuid, noexec) on `mount_point`
/// for the copy and unmounted whatever happens. Blocking.
pub(crate) fn copy_upper_out(image: &Path, mount_point: &Path, dest: &Path) -> io::Result<()> {
    std::fs::create_dir_all(mount_point)?;
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,ro,nodev,nosuid,noexec"])
        .arg(image)
        .arg(mount_point))?;
    let mut src = mount_point.join("upper").into_os_string();
    src.push("/.");
    let copied = run(Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(&src)
        .arg(dest));
    let unmounted = run(Command::new("umount").arg(mount_point));
    copied.and(unmounted)
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        sparse_copy(&src, &dst).unwrap();
        let d = File::open(&dst).unwrap();
        assert_eq!(d.metadata().unwrap().len(), 64 << 20);
        let mut b = [0u8; 6];
        d.read_exact_at(&mut b, 32 << 20).unwrap();
        assert_eq!(&b, b"middle");
        use std::os::unix::fs::MetadataExt;
        assert!(
            d.metadata().unwrap().blocks() * 512 < 1 << 20,
            "holes were filled"
        );
    }
}
