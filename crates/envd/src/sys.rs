//! The only place in envd with `unsafe`: process spawning with a pre-exec
//! hook, terminal ioctls and extended attributes, for which neither std nor
//! nix has a safe wrapper.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::libc;
use nix::sys::inotify::Inotify;
use nix::unistd::{Gid, Uid};
use tokio::io::unix::AsyncFd;

/// What to start and as whom.
pub(crate) struct SpawnSpec<'a> {
    pub(crate) program: &'a str,
    pub(crate) args: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) cwd: &'a Path,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: &'a [u32],
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    /// stdin is a terminal that becomes the controlling terminal.
    pub(crate) controlling_tty: bool,
}

/// Forks and execs a process in a new session, as the given user.
pub(crate) fn spawn(spec: SpawnSpec<'_>) -> io::Result<u32> {
    let mut cmd = Command::new(spec.program);
    cmd.args(spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.cwd)
        .stdin(Stdio::from(spec.stdin))
        .stdout(Stdio::from(spec.stdout))
        .stderr(Stdio::from(spec.stderr));
    let groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid, tty) = (
        Uid::from_raw(spec.uid),
        Gid::from_raw(spec.gid),
        spec.controlling_tty,
    );
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid,
    // setuid) on values prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if tty {
                // SAFETY: fd 0 is the terminal's slave side, set up by std
                // before this hook; TIOCSCTTY takes an integer argument.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // The child is reaped by envd's own reaper (waitpid on any pid), never
    // through `Child::wait`; dropping the handle does not wait.
    Ok(child.id())
}

/// Sets a terminal's window size.
pub(crate) fn set_window_size(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a valid open descriptor for the duration of the call
    // and `ws` is a properly initialised winsize that outlives it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn cname(name: &str) -> io::Result<CString> {
    CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// Names of the extended attributes of `path` (following symlinks).
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<String>> {
    let p = cpath(path)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `p` is NUL-terminated and `buf` is a writable buffer of
        // the length passed.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            let n = usize::try_from(n).unwrap_or(0);
            return Ok(buf[..n]
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(err);
    }
}

/// Value of one extended attribute.
pub(crate) fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(path)?, cname(name)?);
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(usize::try_from(len).unwrap_or(0));
    Ok(buf)
}

/// Sets one extended attribute.
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(path)?, cname(name)?);
    // SAFETY: both strings are NUL-terminated; `value` is readable for its length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes one extended attribute.
pub(crate) fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(path)?, cname(name)?);
    // SAFETY: both strings are NUL-terminated.
    let rc = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An inotify instance that tokio can poll.
pub(crate) struct PolledInotify(Inotify);

impl PolledInotify {
    pub(crate) fn get(&self) -> &Inotify {
        &self.0
    }
}

impl AsRawFd for PolledInotify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
    }
}

/// Registers an owned descriptor with tokio's reactor.
pub(crate) fn poll_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and names the same descriptor for as
    // long as it is owned, which is the AsyncFd's whole lifetime.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Registers an inotify instance with tokio's reactor.
pub(crate) fn poll_inotify(inotify: Inotify) -> io::Result<AsyncFd<PolledInotify>> {
    // SAFETY: an Inotify owns its descriptor, never replaces it, and closes
    // it only when dropped, which happens after the AsyncFd lets go of it.
    unsafe { AsyncFd::register(PolledInotify(inotify)) }.map_err(|e| e.into_parts().1)
}
