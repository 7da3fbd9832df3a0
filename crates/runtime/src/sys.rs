//! The only `unsafe` in the runtime: clone, the seccomp and capability
//! `prctl`s, `close_range`, and the loop device and interface ioctls, none
//! of which nix wraps safely.

use std::io;

use nix::libc;

use crate::seccomp::Insn;

/// Forks the calling process with the child in the new namespaces of
/// `flags` (a raw `clone` on a copy of the caller's stack, as fork(2)
/// does); `None` in the child. With `CLONE_NEWUSER` the new user namespace
/// owns every other namespace made with it. Refuses a multi-threaded
/// caller, whose child could not safely allocate.
pub(crate) fn clone_into(flags: nix::sched::CloneFlags) -> io::Result<Option<nix::unistd::Pid>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(io::Error::other(
            "refusing to clone a multi-threaded process",
        ));
    }
    let bits = libc::c_ulong::try_from(flags.bits())
        .map_err(|_| io::Error::other("bad clone flags"))?
        | libc::c_ulong::try_from(libc::SIGCHLD).map_err(|_| io::Error::other("bad signal"))?;
    // SAFETY: a single-threaded process (checked above); with a null stack
    // the child runs on a copy of the caller's, exactly as after fork(2),
    // and the pointers for parent/child tids and TLS are unused (null).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            bits,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(nix::unistd::Pid::from_raw(
            i32::try_from(pid).map_err(|_| io::Error::other("bad pid"))?,
        ))),
    }
}

/// A detached copy of the mount tree at `fd` (open_tree(2) with
/// `OPEN_TREE_CLONE`; `recursive` copies the mounts under it too), owned
/// by the caller's mount namespace: unlike the mounts a new namespace
/// copies from a more privileged one, it is not locked.
pub(crate) fn clone_tree(
    fd: std::os::fd::BorrowedFd<'_>,
    recursive: bool,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let mut flags = OPEN_TREE_CLONE
        | libc::c_uint::try_from(libc::O_CLOEXEC).map_err(|_| io::Error::other("flag"))?
        | libc::c_uint::try_from(libc::AT_EMPTY_PATH).map_err(|_| io::Error::other("flag"))?;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: an empty, NUL-terminated path and integer arguments; the
    // result is checked before it is owned.
    let rc = unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(rc).map_err(|_| io::Error::other("bad descriptor"))?;
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Attaches the detached mount tree `tree` (from [`clone_tree`]) on `to`,
/// a path relative to the current directory, or on `to_fd` itself when
/// `to` is empty (move_mount(2)).
pub(crate) fn attach_tree(
    tree: std::os::fd::BorrowedFd<'_>,
    to_fd: Option<std::os::fd::BorrowedFd<'_>>,
    to: &std::ffi::CStr,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    let mut flags = MOVE_MOUNT_F_EMPTY_PATH;
    let dir = match to_fd {
        Some(fd) => {
            if to.is_empty() {
                flags |= MOVE_MOUNT_T_EMPTY_PATH;
            }
            fd.as_raw_fd()
        }
        None => libc::AT_FDCWD,
    };
    // SAFETY: NUL-terminated paths that outlive the call and integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            dir,
            to.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the network interface `name` of the current network namespace
/// up (`SIOCSIFFLAGS`), as `ip link set <name> up` does.
pub(crate) fn link_up(name: &str) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket takes integers only; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero `ifreq` is valid (a name and a union of integers).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, b) in req.ifr_name.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*b]);
    }
    const IFF_UP: libc::c_short = 1;
    // SAFETY: `req` is a valid ifreq that outlives both calls; the kernel
    // reads the name and reads or writes the flags.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= IFF_UP;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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

/// Marks the detached mount tree `tree` (from [`clone_tree`]) as idmapped
/// through the user namespace `userns` (mount_setattr(2) with
/// `MOUNT_ATTR_IDMAP`): files appear owned by the namespace's ids for
/// their owners on disk, and new files are stored with the reverse map.
pub(crate) fn idmap_tree(
    tree: std::os::fd::BorrowedFd<'_>,
    userns: std::os::fd::BorrowedFd<'_>,
    read_only: bool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?,
    };
    let flags =
        libc::c_uint::try_from(libc::AT_EMPTY_PATH).map_err(|_| io::Error::other("flag"))?;
    // SAFETY: an empty NUL-terminated path, and `attr` is a properly laid
    // out `struct mount_attr` (size passed) that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A user namespace whose only mapping is `count` ids from `inside` (in
/// it) to `outside` (in the caller's), for idmapped mounts: a child is
/// cloned into it, held while its maps are written and the namespace is
/// opened, then let go. Single-threaded callers only ([`clone_into`]).
pub(crate) fn mapping_userns(
    inside: u32,
    outside: u32,
    count: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    let (rd, wr) = nix::unistd::pipe()?;
    match clone_into(nix::sched::CloneFlags::CLONE_NEWUSER)? {
        None => {
            // The child: wait until the parent closes its end, then go.
            drop(wr);
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(&rd, &mut b);
            // SAFETY: _exit ends the child without running the parent's
            // destructors or atexit handlers on its copy of the memory.
            unsafe { libc::_exit(0) }
        }
        Some(child) => {
            drop(rd);
            let line = format!("{inside} {outside} {count}\n");
            let result = (|| {
                for file in ["uid_map", "gid_map"] {
                    std::fs::write(format!("/proc/{}/{file}", child.as_raw()), &line)?;
                }
                std::fs::File::open(format!("/proc/{}/ns/user", child.as_raw()))
                    .map(std::os::fd::OwnedFd::from)
            })();
            drop(wr);
            let _ = nix::sys::wait::waitpid(child, None);
            result
        }
    }
}
