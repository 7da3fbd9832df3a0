//! The only `unsafe` in the runtime: fork, the seccomp and capability
//! `prctl`s, and `close_range`, none of which nix wraps safely.

use std::io;

use nix::libc;

use crate::seccomp::Insn;

/// Forks a single-threaded process. Returns `Ok(None)` in the child,
/// `Ok(Some(pid))` in the parent; refuses when other threads exist, since
/// locks they hold would stay locked forever in the child.
pub(crate) fn fork() -> io::Result<Option<nix::unistd::Pid>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(io::Error::other(
            "refusing to fork a multi-threaded process",
        ));
    }
    // SAFETY: checked just above that this process has one thread, so the
    // child can allocate and run arbitrary code.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
    }
}

/// Installs a seccomp filter on the calling thread (inherited by children
/// and across exec). Needs `no_new_privs` or CAP_SYS_ADMIN in the current
/// user namespace.
pub(crate) fn install_seccomp(program: &[Insn]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "filter too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel
    // copies the filter before returning.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes a capability from the bounding set.
pub(crate) fn drop_bounding_cap(cap: u32) -> io::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes an integer; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // Capabilities this kernel does not know are not in the set.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Ok(())
}

/// Marks every descriptor from `first` on close-on-exec.
pub(crate) fn cloexec_from(first: u32) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes integers only; setting FD_CLOEXEC cannot
    // invalidate any descriptor this process still uses before exec.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_uint::from(first),
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8): attach a backing file and set flags at once.
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// Detach the loop device when its last user (the mount) goes away.
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches `image` to a free loop device that detaches itself once
/// unmounted; returns the open device and its path.
pub(crate) fn attach_loop(
    image: &std::path::Path,
) -> io::Result<(std::os::fd::OwnedFd, std::path::PathBuf)> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let config = LoopConfig {
            fd: u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: `config` is a properly laid out `struct loop_config` that
        // outlives the call; the kernel only reads it.
        let rc = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                LOOP_CONFIGURE,
                &config as *const LoopConfig,
            )
        };
        if rc == 0 {
            return Ok((OwnedFd::from(dev), path));
        }
        let err = io::Error::last_os_error();
        // Another process took this device between the two calls: try again.
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Err(io::Error::other("no free loop device after 64 attempts"))
}
