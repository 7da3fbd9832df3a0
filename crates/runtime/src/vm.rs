//! Host-side building blocks of the `vm` isolation backend: a QEMU
//! `-M microvm` guest per sandbox, booting Debian's cloud kernel with an
//! initramfs whose `/init` is `arca-envd` itself (see `arca_envd::vminit`
//! for the guest side).
//!
//! The pieces, all blocking std code:
//!
//! - [`VmAssets::detect`]: the kernel and modules `scripts/vm-assets.sh`
//!   fetched, and QEMU; [`kvm_usable`] says whether to ask for KVM.
//! - [`write_initramfs`]: a newc cpio with envd as `/init` and the modules.
//! - [`make_overlay`]: each sandbox's qcow2 copy-on-write layer over its
//!   template's read-only ext4 image (`arca_image::export_ext4_with`).
//! - [`qemu_args`]: the QEMU command line for a [`VmConfig`].
//! - [`setup_tap`]: wires the guest into a network slot (netns + veth), so
//!   the host reaches envd at the sandbox's usual address.
//! - [`Qmp`]: a small QMP client: stop, cont, save to a file, quit.
//!
//! A sandbox's life: `make_overlay(template.ext4, disk.qcow2)`, `setup_tap`
//! in its slot, `ip netns exec SLOT qemu-system-x86_64 <qemu_args>`, wait for
//! `GET http://<sandbox ip>:49983/health`. Pause: [`Qmp::migrate_to_file`],
//! [`Qmp::quit`]. Resume: the same command line with
//! [`VmConfig::incoming`] set (QEMU starts stopped, `-S`),
//! [`Qmp::wait_incoming`], then [`Qmp::cont`]. Guest power-off (envd got
//! SIGTERM) ends QEMU.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The QEMU binary looked up in `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// What a VM needs from the host, as `scripts/vm-assets.sh DIR` lays it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmAssets {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The guest kernel (`DIR/vmlinuz`).
    pub kernel: PathBuf,
    /// The guest's modules (`DIR/modules`, with `DIR/modules.order` beside
    /// it listing them in load order).
    pub modules_dir: PathBuf,
}

impl VmAssets {
    /// Finds the assets in `dir` and QEMU in `PATH`; the error names what is
    /// missing and how to get it.
    pub fn detect(dir: &Path) -> Result<VmAssets, String> {
        let hint = format!("run scripts/vm-assets.sh {}", dir.display());
        let kernel = dir.join("vmlinuz");
        if !kernel.is_file() {
            return Err(format!("no guest kernel at {}; {hint}", kernel.display()));
        }
        let modules_dir = dir.join("modules");
        let order = dir.join("modules.order");
        if !modules_dir.is_dir() || !order.is_file() {
            return Err(format!(
                "no guest modules at {} (with {}); {hint}",
                modules_dir.display(),
                order.display()
            ));
        }
        for name in module_order(dir).map_err(|e| format!("reading {}: {e}", order.display()))? {
            if !modules_dir.join(&name).is_file() {
                return Err(format!(
                    "{} lists {name}, missing from {}; {hint}",
                    order.display(),
                    modules_dir.display()
                ));
            }
        }
        let qemu = crate::find_in_path(QEMU_BINARY).ok_or_else(|| {
            format!("{QEMU_BINARY} is not in PATH; install qemu-system-x86 (or {hint})")
        })?;
        Ok(VmAssets {
            qemu,
            kernel,
            modules_dir,
        })
    }
}

/// Whether to run guests with KVM: only when `/dev/kvm` opens read-write
/// **and** `ARCA_VM_KVM=1` is set. Off by default because an openable
/// `/dev/kvm` does not mean a working one: on hosts that are themselves
/// VMs with nested paravirtual KVM (the developers' and CI's machines),
/// ordinary guest kernels hang under it, while TCG (software emulation)
/// boots them reliably, if slowly. An operator who knows KVM works turns
/// it on.
pub fn kvm_usable() -> bool {
    std::env::var("ARCA_VM_KVM").is_ok_and(|v| v == "1")
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// The names in `dir/modules.order`, in order.
fn module_order(dir: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(dir.join("modules.order"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// Writer of a newc ("070701") cpio archive, the format the kernel unpacks
/// as an initramfs. Owners are root, times 0: the output depends only on
/// the contents.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

/// `S_IFDIR`, `S_IFREG`, `S_IFCHR` of the cpio mode field.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 0,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Zeroes up to the next multiple of 4 bytes.
    fn pad(&mut self) -> std::io::Result<()> {
        let n = self.written.next_multiple_of(4) - self.written;
        self.put(&[0u8; 3][..usize::try_from(n).unwrap_or(0)])
    }

    /// One entry: `name` (relative, no leading `/`), mode with type bits,
    /// device numbers for a device node, `data` for a regular file.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| std::io::Error::other(format!("{name} is too big for a cpio archive")))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| std::io::Error::other("name too long for a cpio archive"))?;
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check.
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn finish(mut self) -> std::io::Result<W> {
        // TRAILER!!!: every field zero but nlink and namesize.
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0
        );
        self.put(header.as_bytes())?;
        self.put(b"TRAILER!!!\0")?;
        self.pad()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// An I/O error with the path it concerns.
fn with(e: std::io::Error, what: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", what.display()))
}

/// Writes the guest's initramfs to `out`: an uncompressed newc cpio with
/// `/init` (the static `envd` binary, mode 0755), `/modules/*` and
/// `/modules.order` (from `modules_dir` and the `modules.order` beside it,
/// only the listed files), the empty directories `/dev`, `/proc`, `/sys`
/// and `/newroot`, and `/dev/console` (so the kernel gives `/init` the
/// console as stdio). Deterministic: the same inputs make the same bytes.
/// `out` appears atomically.
pub fn write_initramfs(envd: &Path, modules_dir: &Path, out: &Path) -> std::io::Result<()> {
    let order_dir = modules_dir.parent().unwrap_or(Path::new("."));
    let order = match module_order(order_dir) {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(with(e, &order_dir.join("modules.order"))),
    };
    let tmp = out.with_extension("tmp");
    let written = write_cpio(envd, modules_dir, &order, &tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| with(e, out))
}

/// The archive of [`write_initramfs`], into `tmp`.
fn write_cpio(
    envd: &Path,
    modules_dir: &Path,
    order: &[String],
    tmp: &Path,
) -> std::io::Result<()> {
    let file = std::fs::File::create(tmp).map_err(|e| with(e, tmp))?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    for dir in ["dev", "proc", "sys", "newroot", "modules"] {
        cpio.entry(dir, S_IFDIR | 0o755, (0, 0), &[])?;
    }
    cpio.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[])?;
    let init = std::fs::read(envd).map_err(|e| with(e, envd))?;
    cpio.entry("init", S_IFREG | 0o755, (0, 0), &init)?;
    for name in order {
        let path = modules_dir.join(name);
        let data = std::fs::read(&path).map_err(|e| with(e, &path))?;
        cpio.entry(&format!("modules/{name}"), S_IFREG | 0o644, (0, 0), &data)?;
    }
    let listing: String = order.iter().map(|n| format!("{n}\n")).collect();
    cpio.entry("modules.order", S_IFREG | 0o644, (0, 0), listing.as_bytes())?;
    let w = cpio.finish()?;
    w.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()
}

/// Runs a command; the error has its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes a sandbox's disk: a qcow2 `overlay` whose backing file is the
/// template's raw ext4 image `base` (`qemu-img create -f qcow2 -F raw -b`).
/// Writes go to the overlay; `base` is only read and can be shared by every
/// sandbox of the template. Needs `qemu-img` (Debian: qemu-utils). `base`
/// is recorded as given: pass an absolute path.
pub fn make_overlay(base: &Path, overlay: &Path) -> Result<(), String> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay))
    .map(drop)
}

/// One guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest kernel ([`VmAssets::kernel`]).
    pub kernel: PathBuf,
    /// Initramfs from [`write_initramfs`].
    pub initramfs: PathBuf,
    /// The sandbox's qcow2 disk from [`make_overlay`]; the guest's `/dev/vda`.
    pub disk: PathBuf,
    /// Tap device in the sandbox's netns ([`setup_tap`]).
    pub tap: String,
    /// The guest's MAC address (`52:54:00:xx:xx:xx`).
    pub mac: String,
    /// The sandbox's address (the guest's `eth0`).
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The guest's default gateway (the host end of the veth).
    pub gateway: Ipv4Addr,
    /// The guest's host name.
    pub hostname: String,
    /// QMP socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// File the guest's serial console is written to; `None`: a ring
    /// buffer of [`CONSOLE_RING`] bytes in QEMU ([`Qmp::console_tail`]), so
    /// a guest writing to its console for ever fills no host disk.
    pub console_log: Option<PathBuf>,
    /// Restore from this file ([`Qmp::migrate_to_file`]) instead of
    /// booting; QEMU then starts stopped and waits for [`Qmp::cont`].
    pub incoming: Option<PathBuf>,
    /// Use KVM ([`kvm_usable`]) rather than TCG.
    pub kvm: bool,
}

/// A MAC address for a guest, derived from its IPv4 address (unique per
/// slot): `52:54:00` (QEMU's locally administered prefix) and the last
/// three octets.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

/// The kernel command line of a guest.
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    [
        // The serial port is the console: the log file.
        "console=ttyS0",
        "quiet",
        // A panic reboots at once, a reboot is a triple fault, and QEMU's
        // -no-reboot turns either into QEMU's exit.
        "panic=-1",
        "reboot=t",
        // Under TCG, calibrating the TSC and delay loop costs seconds; these
        // values are as good as any for an emulated CPU (and harmless
        // under KVM, where the TSC is real).
        "tsc_early_khz=2500000",
        "lpj=5000000",
        "no_timer_check",
        "tsc=reliable",
        "clocksource=tsc",
        // No legacy probing that microvm cannot answer.
        "8250.nr_uarts=1",
        "i8042.noaux",
        "i8042.nokbd",
        "pci=off",
        // Emulated spectre mitigations only slow a TCG guest down; a
        // sandbox's isolation is the hypervisor boundary.
        "mitigations=off",
        "random.trust_cpu=on",
        "audit=0",
        // The crypto self-tests take about half a second of emulated CPU
        // (the largest single item of a TCG boot); they check the
        // kernel's implementations, not the sandbox.
        "cryptomgr.notests",
        // No BIOS disk probing in the real-mode setup code.
        "edd=off",
        // Not `init_on_free=1`: zeroed free pages would shrink a saved
        // state (60 instead of 95 MB for a fresh 256 MiB guest), but the
        // kernel zeroes all free memory at boot then, so every running
        // guest's RAM is resident from the start (QEMU RSS 367 instead of
        // 233 MiB). Running guests outnumber saved ones.
    ]
    .iter()
    .map(|s| (*s).to_string())
    .chain([
        format!("arca.ip={}/{}", cfg.ip, cfg.prefix),
        format!("arca.gw={}", cfg.gateway),
        format!("arca.host={}", cfg.hostname),
        "arca.root=/dev/vda".to_string(),
    ])
    .collect::<Vec<_>>()
    .join(" ")
}

/// QEMU's command line (without the program) for `cfg`.
///
/// - `-M microvm` without option ROMs (no SeaBIOS option ROM scan), with
///   the ISA serial port (the console), the RTC (wall clock at boot), and
///   without the PIT and PIC (the kernel uses the TSC and the local APIC;
///   fewer devices to emulate and probe).
/// - `-accel kvm -cpu host` or `-accel tcg,tb-size=128 -cpu max` (the
///   translated-code cache defaults to 1 GiB per guest, filled lazily but
///   never given back; 128 MiB bounds it and holds a sandbox's hot code).
/// - The disk is a `virtio-blk-device` (virtio-mmio) on the qcow2 overlay
///   with `cache=writeback`: a guest flush (its `sync`) writes QEMU's qcow2
///   metadata to the file, so a QEMU killed after the guest synced (a
///   pause to disk keeps only files) leaves a consistent image. Migration
///   inactivates the image the same way before the saved state completes,
///   and the restoring QEMU reads the same file.
/// - The network is a `virtio-net-device` on the existing tap `cfg.tap`,
///   without vhost (not needed; `/dev/vhost-net` may be missing).
/// - QMP on a unix socket, the console to a file, `-no-reboot` so a guest
///   reboot, panic or power-off ends QEMU.
/// - Restore: `-incoming exec:cat FILE` with `-S`. (QEMU 7.2, Debian 12's,
///   has no `file:` migration URI; `exec:` works on every version.)
pub fn qemu_args(cfg: &VmConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_string()));
    push(&[
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,pic=off",
    ]);
    if cfg.kvm {
        push(&["-accel", "kvm", "-cpu", "host"]);
    } else {
        push(&["-accel", "tcg,tb-size=128", "-cpu", "max"]);
    }
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    a.extend([
        "-m".to_string(),
        format!("{}M", cfg.memory_mb),
        "-smp".to_string(),
        cfg.vcpus.to_string(),
        "-kernel".to_string(),
        cfg.kernel.display().to_string(),
        "-initrd".to_string(),
        cfg.initramfs.display().to_string(),
        "-append".to_string(),
        kernel_cmdline(cfg),
        "-drive".to_string(),
        format!(
            "id=root,if=none,format=qcow2,cache=writeback,discard=unmap,file={}",
            qemu_opt_escape(&cfg.disk.display().to_string())
        ),
        "-device".to_string(),
        "virtio-blk-device,drive=root".to_string(),
        "-netdev".to_string(),
        format!(
            "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
            cfg.tap
        ),
        "-device".to_string(),
        format!("virtio-net-device,netdev=net0,mac={}", cfg.mac),
        "-qmp".to_string(),
        format!(
            "unix:{},server=on,wait=off",
            qemu_opt_escape(&cfg.qmp_socket.display().to_string())
        ),
    ]);
    match &cfg.console_log {
        Some(file) => a.extend(["-serial".to_string(), format!("file:{}", file.display())]),
        None => a.extend([
            "-chardev".to_string(),
            format!("ringbuf,id={CONSOLE_ID},size={CONSOLE_RING}"),
            "-serial".to_string(),
            format!("chardev:{CONSOLE_ID}"),
        ]),
    }
    // QEMU's own seccomp filter: no new privileges, no obsolete or
    // resource-control system calls (spawning stays: `exec:` migration).
    a.extend([
        "-sandbox".to_string(),
        "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny".to_string(),
    ]);
    if let Some(file) = &cfg.incoming {
        a.extend([
            "-S".to_string(),
            "-incoming".to_string(),
            format!("exec:cat {}", shell_quote(&file.display().to_string())),
        ]);
    }
    a
}

/// A value inside a QEMU `key=value,...` option: commas are doubled.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Single-quoted for `/bin/sh` (QEMU's `exec:` URIs run through it).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `ip -n NS ...`.
fn ip_in(netns: &str, args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// `tc -n NS ...`.
fn tc_in(netns: &str, args: &[&str]) -> Result<String, String> {
    run(Command::new("tc").arg("-n").arg(netns).args(args))
}

/// Prefix of the alias [`setup_tap`] leaves on the veth, recording the
/// address it took away.
const ALIAS_PREFIX: &str = "arca-vm-moved:";

/// Puts a guest behind a network slot. In the netns `netns_name`, whose
/// veth end `veth_inside` (`eth0`) carries the sandbox's address and the
/// default route (the node's slot layout), this
///
/// 1. creates the tap device `tap` (persistent, so QEMU can reattach to it
///    on restore),
/// 2. takes the address off `veth_inside` (the guest now owns it; the
///    address is kept in the veth's alias for [`teardown_tap`]),
/// 3. joins `veth_inside` and `tap` into one wire with two tc rules: every
///    frame arriving on the veth is redirected out of the tap (to the
///    guest), and every frame from the guest out of the veth (`ingress`
///    qdisc, `u32` match-all filter, `mirred egress redirect`).
///
/// Why tc rather than a bridge: the two ends are all there is, so there is
/// nothing to learn or forward; the redirect passes every frame unchanged
/// (ARP included) without a bridge's MAC learning, STP delay, promiscuous
/// veth or `br_netfilter` hooks, and it needs only `sch_ingress`,
/// `cls_u32` and `act_mirred`. The host keeps reaching the sandbox's
/// address through its veth end, now answered by the guest, whose default
/// route points at the host's veth address as before. The host's nft rules
/// of the slot (by interface and address) apply unchanged.
pub fn setup_tap(netns_name: &str, veth_inside: &str, tap: &str) -> Result<(), String> {
    let addrs = ip_in(
        netns_name,
        &["-4", "-o", "addr", "show", "dev", veth_inside],
    )?;
    let cidr = addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_owned);
    let routes = ip_in(netns_name, &["-4", "route", "show", "default"])?;
    let gateway = routes
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .map(str::to_owned);
    ip_in(netns_name, &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    let wired = (|| {
        if let Some(cidr) = &cidr {
            let alias = format!(
                "{ALIAS_PREFIX}{cidr}{}",
                gateway
                    .as_ref()
                    .map_or(String::new(), |g| format!(" via {g}"))
            );
            ip_in(
                netns_name,
                &["link", "set", "dev", veth_inside, "alias", &alias],
            )?;
            ip_in(netns_name, &["addr", "flush", "dev", veth_inside])?;
        }
        for (from, to) in [(veth_inside, tap), (tap, veth_inside)] {
            tc_in(netns_name, &["qdisc", "add", "dev", from, "ingress"])?;
            tc_in(
                netns_name,
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            )?;
        }
        ip_in(netns_name, &["link", "set", "dev", tap, "up"])?;
        ip_in(netns_name, &["link", "set", "dev", veth_inside, "up"]).map(drop)
    })();
    if let Err(e) = wired {
        let _ = teardown_tap(netns_name, veth_inside, tap);
        return Err(format!(
            "wiring tap {tap} to {veth_inside} in netns {netns_name}: {e}"
        ));
    }
    Ok(())
}

/// Undoes [`setup_tap`]: removes the tc rules and the tap and gives
/// `veth_inside` its address and the default route back. Deleting the
/// netns removes all of it as well, so a slot that is deleted after use
/// does not need this.
pub fn teardown_tap(netns_name: &str, veth_inside: &str, tap: &str) -> Result<(), String> {
    let _ = tc_in(netns_name, &["qdisc", "del", "dev", veth_inside, "ingress"]);
    let _ = ip_in(netns_name, &["link", "del", "dev", tap]);
    let link = ip_in(netns_name, &["-o", "link", "show", "dev", veth_inside])?;
    let Some(saved) = link
        .split_once(&format!("alias {ALIAS_PREFIX}"))
        .map(|(_, s)| s.trim().to_owned())
    else {
        return Ok(());
    };
    let mut words = saved.split_whitespace();
    if let Some(cidr) = words.next() {
        ip_in(netns_name, &["addr", "replace", cidr, "dev", veth_inside])?;
    }
    if let (Some("via"), Some(gw)) = (words.next(), words.next()) {
        ip_in(
            netns_name,
            &["route", "replace", "default", "via", gw, "dev", veth_inside],
        )?;
    }
    ip_in(
        netns_name,
        &["link", "set", "dev", veth_inside, "alias", ""],
    )
    .map(drop)
}

/// Size of the console ring buffer (bytes).
pub const CONSOLE_RING: u32 = 65_536;
/// Its chardev id.
const CONSOLE_ID: &str = "con0";

/// A QMP connection to one QEMU.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, retrying until `timeout` while QEMU
    /// starts, reads the greeting and enters command mode
    /// (`qmp_capabilities`). Every later read waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("QMP: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP: QEMU closed the connection".to_string());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad message {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` value; a QMP `error` is an
    /// `Err` with its description. Asynchronous events in between are
    /// skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(format!(
                    "QMP {command}: {}",
                    err.get("desc").and_then(Value::as_str).unwrap_or("error")
                ));
            }
        }
    }

    /// Pauses the guest's CPUs.
    pub fn stop(&mut self) -> Result<(), String> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the guest. After a restore, call [`Qmp::wait_incoming`]
    /// first: a `cont` while the state is still loading does not resume a
    /// guest that was saved stopped.
    pub fn cont(&mut self) -> Result<(), String> {
        self.execute("cont", None).map(drop)
    }

    /// On a QEMU started with [`VmConfig::incoming`]: waits up to `timeout`
    /// for the saved state to be loaded (the run state leaves `inmigrate`).
    /// The guest is then stopped, as it was saved; [`Qmp::cont`] runs it.
    pub fn wait_incoming(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if status != "inmigrate" {
                let info = self.execute("query-migrate", None)?;
                return match info.get("status").and_then(Value::as_str) {
                    Some("failed" | "cancelled") => Err(format!(
                        "loading the saved VM failed: {}",
                        info.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                    )),
                    _ => Ok(()),
                };
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the saved VM did not load within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> Result<String, String> {
        let v = self.execute("query-status", None)?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }

    /// Saves the guest to `path`: stops it, streams its state through
    /// `exec:cat > path` with the bandwidth limit lifted (QEMU's default
    /// is 32 MiB/s) and waits up to `timeout` for `completed`. The guest
    /// stays stopped (`postmigrate`); [`Qmp::quit`] it, or [`Qmp::cont`]
    /// to let it run on. The disk is not in the file: the restoring QEMU
    /// must use the same overlay, unchanged in between.
    pub fn migrate_to_file(&mut self, path: &Path, timeout: Duration) -> Result<(), String> {
        self.stop()?;
        self.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 64u64 << 30 })),
        )?;
        let uri = format!("exec:cat > {}", shell_quote(&path.display().to_string()));
        self.execute("migrate", Some(json!({ "uri": uri })))?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", None)?;
            match info.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                s @ ("failed" | "cancelled") => {
                    return Err(format!(
                        "saving the VM to {} {s}: {}",
                        path.display(),
                        info.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                    ));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = self.execute("migrate_cancel", None);
                return Err(format!(
                    "saving the VM to {} took over {} s; cancelled",
                    path.display(),
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `bytes` of the console ring buffer (when the guest's
    /// console is one, [`VmConfig::console_log`] `None`); reading empties it.
    pub fn console_tail(&mut self, bytes: u32) -> Result<String, String> {
        let v = self.execute(
            "ringbuf-read",
            Some(json!({ "device": CONSOLE_ID, "size": bytes, "format": "utf8" })),
        )?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Ends QEMU (`quit`). QEMU may close the socket before answering;
    /// that counts as done.
    pub fn quit(mut self) -> Result<(), String> {
        match self.execute("quit", None) {
            Ok(_) => Ok(()),
            Err(e) if e.contains("closed the connection") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            memory_mb: 256,
            vcpus: 1,
            kernel: "/a/vmlinuz".into(),
            initramfs: "/a/initrd".into(),
            disk: "/d/disk,1.qcow2".into(),
            tap: "tap0".into(),
            mac: mac_for(Ipv4Addr::new(10, 88, 0, 2)),
            ip: Ipv4Addr::new(10, 88, 0, 2),
            prefix: 30,
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            hostname: "sbx".into(),
            qmp_socket: "/r/qmp.sock".into(),
            console_log: Some("/r/console.log".into()),
            incoming: None,
            kvm: false,
        }
    }

    #[test]
    fn command_lines_carry_the_settings() {
        let mut cfg = config();
        let args = qemu_args(&cfg);
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg,tb-size=128 -cpu max"));
        assert!(joined.contains("file=/d/disk,,1.qcow2"));
        assert!(joined.contains("mac=52:54:00:58:00:02"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.contains("arca.ip=10.88.0.2/30 arca.gw=10.88.0.1 arca.host=sbx"));
        assert!(!joined.contains("-incoming"));
        cfg.incoming = Some("/s/it's.state".into());
        cfg.kvm = true;
        let args = qemu_args(&cfg);
        assert!(args.join(" ").contains("-accel kvm"));
        assert_eq!(args[args.len() - 1], r"exec:cat '/s/it'\''s.state'");
        assert_eq!(args[args.len() - 3], "-S");
    }

    #[test]
    fn initramfs_is_a_deterministic_newc_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let envd = tmp.path().join("envd");
        std::fs::write(&envd, b"#!init").unwrap();
        let mods = tmp.path().join("modules");
        std::fs::create_dir(&mods).unwrap();
        std::fs::write(mods.join("a.ko"), b"abc").unwrap();
        std::fs::write(mods.join("unlisted.ko"), b"x").unwrap();
        std::fs::write(tmp.path().join("modules.order"), "a.ko\n").unwrap();
        let (one, two) = (tmp.path().join("1.cpio"), tmp.path().join("2.cpio"));
        write_initramfs(&envd, &mods, &one).unwrap();
        write_initramfs(&envd, &mods, &two).unwrap();
        let bytes = std::fs::read(&one).unwrap();
        assert_eq!(bytes, std::fs::read(&two).unwrap());
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        for name in [
            "init\0",
            "modules/a.ko\0",
            "modules.order\0",
            "dev/console\0",
            "newroot\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(!text.contains("unlisted"));
        // Walk the headers: every entry's name and data are 4-aligned.
        let mut at = 0;
        let mut names = Vec::new();
        loop {
            let h = &text[at..at + 110];
            let field =
                |i: usize| u32::from_str_radix(&h[6 + 8 * i..14 + 8 * i], 16).unwrap() as usize;
            let (size, namesize) = (field(6), field(11));
            let name = &text[at + 110..at + 110 + namesize - 1];
            names.push(name.to_string());
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(at, bytes.len());
        assert_eq!(names[names.len() - 2], "modules.order");
    }
}

/// What `arca __vm` reads on its stdin: how to start one guest's QEMU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmLaunch {
    /// cgroup directories QEMU runs in (the sandbox's: its memory, CPU and
    /// pids limits hold the whole guest).
    pub cgroup_dirs: Vec<PathBuf>,
    /// The network namespace it runs in (the slot's, wired by
    /// [`setup_tap`]).
    pub netns: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// Its arguments ([`qemu_args`]).
    pub args: Vec<String>,
    /// QEMU's own stdout and stderr go here.
    pub log: PathBuf,
}

/// Starts a guest's QEMU by re-executing `exe __vm` (the `arca` binary),
/// which joins the cgroups and netns, forks QEMU off and reports its pid;
/// QEMU is then the caller's child only through `PR_SET_CHILD_SUBREAPER`.
/// Blocking.
pub fn launch(exe: &Path, launch: &VmLaunch) -> Result<i32, crate::RuntimeError> {
    crate::launch::run_helper(exe, "__vm", launch)
}

/// Entry point of `arca __vm`: prints `{"pid": N}` (QEMU's) or
/// `{"error": ...}` and returns the exit status.
pub fn vm_main() -> i32 {
    crate::launch::helper_main(start_qemu)
}

fn start_qemu(cfg: &VmLaunch) -> Result<i32, String> {
    use std::os::unix::process::CommandExt as _;
    crate::launch::join_cgroups(&cfg.cgroup_dirs)?;
    let netns = std::fs::File::open(&cfg.netns)
        .map_err(|e| format!("opening {}: {e}", cfg.netns.display()))?;
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining {}: {e}", cfg.netns.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.log)
        .map_err(|e| format!("opening {}: {e}", cfg.log.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", cfg.log.display()))?;
    // QEMU in a process group of its own, not a child this helper waits for: it
    // is orphaned to the node (a child subreaper) when this exits.
    let child = Command::new(&cfg.qemu)
        .args(&cfg.args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("running {}: {e}", cfg.qemu.display()))?;
    let pid = i32::try_from(child.id()).map_err(|_| "bad pid".to_string())?;
    // A QEMU that refuses its command line exits at once: say why.
    std::thread::sleep(Duration::from_millis(50));
    let mut child = child;
    if let Ok(Some(status)) = child.try_wait() {
        let tail = std::fs::read_to_string(&cfg.log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(3).collect();
        return Err(format!(
            "QEMU exited at once ({status}): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    Ok(pid)
}

/// Whether `tap` exists in the namespace `netns_name` (a slot kept while
/// its VM was saved to a file is still wired).
pub fn tap_exists(netns_name: &str, tap: &str) -> bool {
    ip_in(netns_name, &["link", "show", "dev", tap]).is_ok()
}
