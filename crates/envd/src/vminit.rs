//! Guest boot for the `vm` isolation backend: envd as the `/init` of an
//! initramfs.
//!
//! In a VM, the kernel unpacks an initramfs holding only this binary (as
//! `/init`), the kernel modules the guest needs (`/modules/*.ko`, in the
//! load order `/modules.order` gives) and empty `/dev`, `/proc`, `/sys` and
//! `/newroot` directories, and runs `/init` as PID 1. [`boot`] then turns the
//! guest into a sandbox:
//!
//! 1. mounts devtmpfs, proc and sysfs, and puts the console on fds 0-2;
//! 2. loads the modules (`finit_module`), passing each the `module.key=value`
//!    parameters of the kernel command line, as modprobe would;
//! 3. reads its settings from `/proc/cmdline`: `arca.ip=A.B.C.D/prefix`,
//!    `arca.gw=A.B.C.D`, `arca.host=NAME`, `arca.root=/dev/vda` (default),
//!    `arca.dns=A.B.C.D[,A.B.C.D]` (optional: written to `/etc/resolv.conf`),
//!    `arca.log=FILTER` (optional: envd's log filter);
//! 4. waits for the root disk, mounts it (ext4) on `/newroot`;
//! 5. brings `lo` and `eth0` up with the address and the default route
//!    (plain ioctls: no netlink code needed for one address and one route);
//! 6. sets the host name, puts a tmpfs on `/run` of the new root and copies
//!    itself to `/run/arca/envd` (where the `ns` backend mounts envd too);
//! 7. moves `/dev`, `/proc` and `/sys` into the new root, frees the
//!    initramfs' files and switches root (`mount --move . /; chroot .`);
//! 8. mounts `/dev/pts` (a new instance), `/dev/shm` and the `/dev/fd`
//!    links a sandbox expects, and sets `PATH`.
//!
//! Then `main` carries on as the ordinary envd server, still PID 1. Any
//! failure is printed to the console (the serial port) and the VM powers off,
//! so QEMU (run with `-no-reboot`) exits instead of hanging on a kernel
//! panic. On SIGTERM envd stops its processes, then [`power_off`] syncs and
//! powers the VM off.
//!
//! Guest-side only: nothing here knows the host's Arca crates.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::libc;
use nix::mount::{MsFlags, mount};

/// Where the root disk is mounted before the switch.
const NEWROOT: &str = "/newroot";
/// Where envd lives in the sandbox (the `ns` backend's layout too).
const ENVD_IN_ROOT: &str = "/run/arca/envd";
/// `PATH` of envd and every process it starts.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long to wait for the root disk and `eth0` to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// Whether this process is the init of an Arca VM: PID 1 started as
/// `/init`, which only the kernel does, from an initramfs. (In the `ns`
/// backend envd is PID 1 too, but runs as `/run/arca/envd`.)
pub fn is_vm_init() -> bool {
    std::process::id() == 1 && std::env::args_os().next().is_some_and(|a| a == "/init")
}

/// Settings of the guest, from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Address and prefix length of `eth0` (`arca.ip=A.B.C.D/prefix`).
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway (`arca.gw=`).
    pub gateway: Option<Ipv4Addr>,
    /// Host name (`arca.host=`).
    pub hostname: Option<String>,
    /// Root block device (`arca.root=`, default `/dev/vda`).
    pub root: String,
    /// Name servers for `/etc/resolv.conf` (`arca.dns=a,b`); none: the
    /// file is left as the disk has it.
    pub dns: Vec<Ipv4Addr>,
    /// envd's log filter (`arca.log=`).
    pub log: Option<String>,
    /// `module.key=value` words, for modules loaded by [`boot`].
    pub module_params: Vec<(String, String)>,
}

impl Settings {
    /// Parses a kernel command line. Unknown words are ignored; malformed
    /// `arca.*` values are errors (a VM without its address is useless).
    pub fn parse(cmdline: &str) -> Result<Settings, String> {
        let mut s = Settings {
            ip: None,
            gateway: None,
            hostname: None,
            root: "/dev/vda".to_string(),
            dns: Vec::new(),
            log: None,
            module_params: Vec::new(),
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let addr = |v: &str| {
                v.parse::<Ipv4Addr>()
                    .map_err(|_| format!("{key}={value}: '{v}' is not an IPv4 address"))
            };
            match key {
                "arca.ip" => {
                    let (a, p) = value
                        .split_once('/')
                        .ok_or_else(|| format!("arca.ip={value}: expected A.B.C.D/prefix"))?;
                    let prefix = p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 32)
                        .ok_or_else(|| format!("arca.ip={value}: bad prefix length '{p}'"))?;
                    s.ip = Some((addr(a)?, prefix));
                }
                "arca.gw" => s.gateway = Some(addr(value)?),
                "arca.host" => s.hostname = Some(value.to_string()),
                "arca.root" => s.root = value.to_string(),
                "arca.dns" => {
                    s.dns = value
                        .split(',')
                        .filter(|v| !v.is_empty())
                        .map(addr)
                        .collect::<Result<_, _>>()?;
                }
                "arca.log" => s.log = Some(value.to_string()),
                _ => {
                    if let Some((module, param)) = key.split_once('.') {
                        if module != "arca" && !module.is_empty() && !param.is_empty() {
                            s.module_params
                                .push((module.replace('-', "_"), format!("{param}={value}")));
                        }
                    }
                }
            }
        }
        Ok(s)
    }

    /// The parameter string for module `name` (file name without `.ko`).
    fn params_for(&self, name: &str) -> String {
        let name = name.replace('-', "_");
        self.module_params
            .iter()
            .filter(|(m, _)| *m == name)
            .map(|(_, p)| p.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Prints one line to the console (stderr is the console once [`boot`]
/// has set it up).
fn say(msg: &str) {
    let _ = writeln!(io::stderr(), "arca-init: {msg}");
}

/// Boots the guest (the steps in the module docs) and returns in the new
/// root, ready for envd's server. Never returns on failure: the error goes
/// to the console and the VM powers off.
pub fn boot() {
    if let Err(e) = try_boot() {
        say(&format!("fatal: {e}"));
        say("powering off");
        power_off();
    }
}

/// Adds what failed to an error.
trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, String> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

fn try_boot() -> Result<(), String> {
    let started = Instant::now();
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    console_on_stdio();
    mount_fs("proc", "/proc", nodev, None)?;
    mount_fs("sysfs", "/sys", nodev, None)?;

    let cmdline = fs::read_to_string("/proc/cmdline").ctx(|| "reading /proc/cmdline".into())?;
    let settings = Settings::parse(&cmdline)?;
    load_modules(&settings)?;

    wait_for(Path::new(&settings.root), "the root disk")?;
    mount(
        Some(settings.root.as_str()),
        NEWROOT,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .ctx(|| format!("mounting {} (ext4) on {NEWROOT}", settings.root))?;

    net::link_up("lo", None).ctx(|| "bringing lo up".into())?;
    if let Some((ip, prefix)) = settings.ip {
        wait_for(Path::new("/sys/class/net/eth0"), "eth0")?;
        net::link_up("eth0", Some((ip, prefix)))
            .ctx(|| format!("configuring eth0 as {ip}/{prefix}"))?;
        if let Some(gw) = settings.gateway {
            net::default_route(gw).ctx(|| format!("adding the default route via {gw}"))?;
        }
    }
    if let Some(host) = &settings.hostname {
        nix_sethostname(host).ctx(|| format!("setting the host name {host}"))?;
    }
    for (file, value) in [
        ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
        ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
    ] {
        // Best effort: what the `ns` backend allows too.
        let _ = fs::write(file, value);
    }

    // /run: a tmpfs with envd in it.
    let run = format!("{NEWROOT}/run");
    ensure_dir(&run, 0o755)?;
    mount_fs(
        "tmpfs",
        &run,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )?;
    let envd = format!("{NEWROOT}{ENVD_IN_ROOT}");
    ensure_dir(&format!("{NEWROOT}/run/arca"), 0o755)?;
    fs::copy("/init", &envd).ctx(|| format!("copying /init to {envd}"))?;
    fs::set_permissions(&envd, fs::Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {envd}"))?;
    if !settings.dns.is_empty() {
        write_resolv_conf(&settings.dns)?;
    }
    ensure_dir(&format!("{NEWROOT}/tmp"), 0o1777)?;

    // Move the API file systems over, free the initramfs, switch.
    for d in ["/dev", "/proc", "/sys"] {
        let to = format!("{NEWROOT}{d}");
        ensure_dir(&to, 0o755)?;
        mount(
            Some(d),
            to.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .ctx(|| format!("moving {d} to {to}"))?;
    }
    // The initramfs stays in memory until its files are deleted; nothing
    // in it is needed any more (envd runs from its mapped, deleted file).
    let _ = fs::remove_file("/init");
    let _ = fs::remove_dir_all("/modules");
    let _ = fs::remove_file("/modules.order");
    nix::unistd::chdir(NEWROOT).ctx(|| format!("chdir {NEWROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .ctx(|| "moving the root disk onto /".into())?;
    nix::unistd::chroot(".").ctx(|| "chroot".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;

    setup_dev()?;
    set_env("PATH", PATH);
    if let Some(log) = &settings.log {
        set_env("ARCA_ENVD_LOG", log);
    }
    say(&format!(
        "booted in {} ms (since init started); root {} , ip {}, starting envd",
        started.elapsed().as_millis(),
        settings.root,
        settings
            .ip
            .map_or_else(|| "none".to_string(), |(a, p)| format!("{a}/{p}")),
    ));
    Ok(())
}

/// Sets an environment variable of this process.
fn set_env(key: &str, value: &str) {
    // SAFETY: called from `boot`, before envd starts any thread (the tokio
    // runtime is built after `boot` returns), so no one reads the
    // environment concurrently.
    unsafe { std::env::set_var(key, value) };
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // The kernel may have mounted devtmpfs already (DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) if fstype == "devtmpfs" => Ok(()),
        Err(e) => Err(format!("mounting {fstype} on {target}: {e}")),
    }
}

fn ensure_dir(path: &str, mode: u32) -> Result<(), String> {
    if Path::new(path).is_dir() {
        return Ok(());
    }
    fs::create_dir_all(path).ctx(|| format!("creating {path}"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx(|| format!("chmod {path}"))
}

/// Makes `/dev/console` stdin, stdout and stderr. The kernel does this
/// when the initramfs has `/dev/console`; this covers one without it.
fn console_on_stdio() {
    if nix::fcntl::fcntl(io::stderr(), nix::fcntl::FcntlArg::F_GETFD).is_ok() {
        return;
    }
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let fd = OwnedFd::from(console);
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which are closed
        // (F_GETFD failed above) and owned by no Rust object.
        unsafe { libc::dup2(fd.as_raw_fd(), target) };
    }
}

/// Loads `/modules.order`'s modules from `/modules`, in order.
fn load_modules(settings: &Settings) -> Result<(), String> {
    let order = match fs::read_to_string("/modules.order") {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("reading /modules.order: {e}")),
    };
    for name in order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = format!("/modules/{name}");
        let module = name.split(".ko").next().unwrap_or(name);
        let params = settings.params_for(module);
        let compressed = name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz");
        let file = fs::File::open(&path).ctx(|| format!("opening {path}"))?;
        match finit_module(&file, &params, compressed) {
            Ok(()) => {}
            // Built in or loaded already: fine.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("loading module {path}: {e}")),
        }
    }
    Ok(())
}

/// `finit_module(2)`.
fn finit_module(file: &fs::File, params: &str, compressed: bool) -> io::Result<()> {
    /// `MODULE_INIT_COMPRESSED_FILE` of `<linux/module.h>`.
    const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;
    let params = CString::new(params).map_err(io::Error::other)?;
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: finit_module reads the open file and a NUL-terminated string
    // that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Polls for a path to exist, bounded by [`DEVICE_WAIT`].
fn wait_for(path: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} ({}) did not appear within {} s; is the device attached and its driver in /modules.order?",
                path.display(),
                DEVICE_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn nix_sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive
    // the call; sethostname copies them.
    let r = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write_resolv_conf(dns: &[Ipv4Addr]) -> Result<(), String> {
    let path = format!("{NEWROOT}/etc/resolv.conf");
    ensure_dir(&format!("{NEWROOT}/etc"), 0o755)?;
    // A symlink (to systemd-resolved's file, say) would lead elsewhere.
    if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = fs::remove_file(&path);
    }
    let text: String = dns.iter().map(|a| format!("nameserver {a}\n")).collect();
    fs::write(&path, text).ctx(|| format!("writing {path}"))
}

/// What a sandbox expects in `/dev` beyond devtmpfs' nodes: a private
/// devpts, `/dev/shm` and the `/proc/self/fd` links.
fn setup_dev() -> Result<(), String> {
    ensure_dir("/dev/pts", 0o755)?;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .ctx(|| "mounting devpts on /dev/pts".into())?;
    // devtmpfs' /dev/ptmx node would find the neighbouring pts instance
    // too (Linux >= 4.7); the link is what the `ns` backend has.
    let _ = fs::remove_file("/dev/ptmx");
    symlink("pts/ptmx", "/dev/ptmx").ctx(|| "linking /dev/ptmx".into())?;
    ensure_dir("/dev/shm", 0o1777)?;
    mount(
        Some("tmpfs"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .ctx(|| "mounting tmpfs on /dev/shm".into())?;
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            symlink(to, link).ctx(|| format!("linking {link}"))?;
        }
    }
    Ok(())
}

/// Syncs the disks and powers the VM off. Only for PID 1 of a VM.
pub fn power_off() -> ! {
    nix::unistd::sync();
    // SAFETY: reboot(2) with a valid command; it returns only on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    // Still here (no CAP_SYS_BOOT?): exiting PID 1 panics the kernel, and
    // with panic=-1 and QEMU's -no-reboot that ends the VM as well.
    say(&format!("poweroff failed: {}", io::Error::last_os_error()));
    std::process::abort()
}

/// Interface configuration with the classic `SIOCSIF*` / `SIOCADDRT`
/// ioctls on an `AF_INET` datagram socket.
mod net {
    use super::*;

    fn socket() -> io::Result<OwnedFd> {
        // SAFETY: socket(2) with constant arguments; the result is checked
        // and owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
        #[allow(clippy::cast_possible_truncation)] // AF_INET is 2
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes)
        // and sockaddr is plain data; this is how the ioctls take it.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data (integers, arrays, a union of those
        // and a pointer); all zeroes is a valid value.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        r
    }

    /// The request number as this libc's `ioctl` takes it (an `int` on
    /// musl, an `unsigned long` on glibc); the values fit in 16 bits.
    #[allow(clippy::cast_possible_truncation, clippy::unnecessary_cast)]
    fn req(r: libc::c_ulong) -> libc::Ioctl {
        r as libc::Ioctl
    }

    fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request used here takes a pointer to the struct
        // type its caller passes (ifreq or rtentry), valid for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req(request), std::ptr::from_mut(arg)) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Gives `name` an address (if any) and sets it up.
    pub(super) fn link_up(name: &str, addr: Option<(Ipv4Addr, u8)>) -> io::Result<()> {
        let s = socket()?;
        if let Some((ip, prefix)) = addr {
            let mut r = ifreq(name);
            r.ifr_ifru.ifru_addr = sockaddr(ip);
            ioctl(&s, libc::SIOCSIFADDR, &mut r)?;
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            let mut r = ifreq(name);
            r.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
            ioctl(&s, libc::SIOCSIFNETMASK, &mut r)?;
        }
        let mut r = ifreq(name);
        ioctl(&s, libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        #[allow(clippy::cast_possible_truncation)]
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        r.ifr_ifru.ifru_flags = flags | up;
        ioctl(&s, libc::SIOCSIFFLAGS, &mut r)
    }

    /// Adds `default via gw`.
    pub(super) fn default_route(gw: Ipv4Addr) -> io::Result<()> {
        let s = socket()?;
        // SAFETY: rtentry is plain data and a null `rt_dev` pointer means
        // "any device"; all zeroes is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(&s, libc::SIOCADDRT, &mut rt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_command_line() {
        let s = Settings::parse(
            "console=ttyS0 quiet arca.ip=10.1.2.3/30 arca.gw=10.1.2.1 arca.host=sbx-1 \
             arca.dns=1.1.1.1,9.9.9.9 virtio_mmio.device=512@0xfeb00e00:12 virtio-net.napi_tx=0",
        )
        .unwrap();
        assert_eq!(s.ip, Some((Ipv4Addr::new(10, 1, 2, 3), 30)));
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(s.hostname.as_deref(), Some("sbx-1"));
        assert_eq!(s.root, "/dev/vda");
        assert_eq!(s.dns.len(), 2);
        assert_eq!(s.params_for("virtio_mmio"), "device=512@0xfeb00e00:12");
        assert_eq!(s.params_for("virtio_net"), "napi_tx=0");
        assert_eq!(s.params_for("virtio_blk"), "");
    }

    #[test]
    fn malformed_settings_are_errors() {
        assert!(Settings::parse("arca.ip=10.0.0.1").is_err());
        assert!(Settings::parse("arca.ip=10.0.0.1/33").is_err());
        assert!(Settings::parse("arca.gw=nope").is_err());
        assert_eq!(
            Settings::parse("arca.root=/dev/vdb").unwrap().root,
            "/dev/vdb"
        );
    }
}
