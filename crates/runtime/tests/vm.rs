//! The `vm` backend's building blocks end to end: a busybox root disk, a
//! qcow2 overlay, a network slot like the node's (netns + veth, `eth0` with
//! the sandbox address), a tap wired into it, QEMU (TCG unless
//! `ARCA_VM_KVM=1`) booting envd as `/init`; then envd's `/health` and a
//! `/files` round trip from the host, a save to a file, a restore into a new
//! QEMU, and the same checks again.
//!
//! Needs root, the assets of `scripts/vm-assets.sh DIR` in `ARCA_VM_ASSETS`
//! and a static envd (`ARCA_ENVD_BIN`, default the musl release build);
//! skips with a reason otherwise. About 10-15 s under TCG.
#![allow(
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    missing_docs,
    unreachable_pub
)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arca_runtime::vm::{self, Qmp, VmAssets, VmConfig};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 254, 77, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 254, 77, 2);
const ENVD_PORT: u16 = 49983;
const MEMORY_MB: u32 = 256;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What the test needs, or why it cannot run here.
fn prerequisites() -> Result<(VmAssets, PathBuf), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root (needs netns, tap devices and mkfs of a tree owned by root)".into());
    }
    let dir = std::env::var_os("ARCA_VM_ASSETS")
        .ok_or("ARCA_VM_ASSETS is not set (run scripts/vm-assets.sh DIR and point it there)")?;
    let assets = VmAssets::detect(Path::new(&dir))?;
    let envd = std::env::var_os("ARCA_ENVD_BIN").map_or_else(
        || workspace_root().join("target/x86_64-unknown-linux-musl/release/arca-envd"),
        PathBuf::from,
    );
    if !envd.is_file() {
        return Err(format!(
            "no static envd at {} (cargo build --release -p arca-envd --target x86_64-unknown-linux-musl, or set ARCA_ENVD_BIN)",
            envd.display()
        ));
    }
    for tool in ["qemu-img", "mkfs.ext4", "ip", "tc"] {
        if Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"),
            ])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            return Err(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Err("no /bin/busybox (install busybox-static)".into());
    }
    Ok((assets, envd))
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A busybox root file system: `/bin/busybox`, its applets, root and user.
fn busybox_tree(root: &Path) {
    for d in [
        "bin",
        "etc",
        "root",
        "tmp",
        "dev",
        "proc",
        "sys",
        "run",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "ls", "cat", "echo", "mkdir", "rm", "cp", "mv", "sleep", "ps", "kill", "mount", "ip",
        "ping", "hostname", "env", "true", "false", "id", "uname",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
}

/// The network slot (netns, veth, addresses) and QEMU processes: removed and
/// killed on drop, whatever happened.
struct Slot {
    netns: String,
    host_if: String,
    qemus: Vec<Child>,
}

impl Slot {
    /// What the node's pool prepares: a netns whose `eth0` has the sandbox
    /// address and a default route via the host end of the veth.
    fn create() -> Slot {
        let pid = std::process::id();
        let slot = Slot {
            netns: format!("arca-vmtest-{pid}"),
            host_if: format!("avmt{pid}h"),
            qemus: Vec::new(),
        };
        let ns = slot.netns.as_str();
        sh(Command::new("ip").args(["netns", "add", ns]));
        sh(Command::new("ip").args([
            "link",
            "add",
            &slot.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ]));
        sh(Command::new("ip").args([
            "addr",
            "add",
            &format!("{HOST_IP}/30"),
            "dev",
            &slot.host_if,
        ]));
        sh(Command::new("ip").args(["link", "set", &slot.host_if, "up"]));
        sh(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        sh(Command::new("ip").args([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{GUEST_IP}/30"),
            "dev",
            "eth0",
        ]));
        sh(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]));
        sh(Command::new("ip").args([
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &HOST_IP.to_string(),
        ]));
        slot
    }

    /// Starts QEMU inside the netns (where the tap is).
    fn start_qemu(&mut self, qemu: &Path, cfg: &VmConfig, log: &Path) -> u32 {
        let _ = std::fs::remove_file(&cfg.qmp_socket);
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(qemu)
            .args(vm::qemu_args(cfg))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.qemus.push(child);
        pid
    }

    /// Waits up to `limit` for the last QEMU to exit.
    fn wait_qemu_exit(&mut self, limit: Duration) -> bool {
        let child = self.qemus.last_mut().unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        for c in &mut self.qemus {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        // The veth goes with the netns; this only matters if that failed.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// One HTTP/1.0 exchange (no chunked bodies, the server closes):
/// `(status, body)`.
fn http(
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::from((GUEST_IP, ENVD_PORT));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {GUEST_IP}:{ENVD_PORT}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, resp[split + 4..].to_vec()))
}

/// Polls `GET /health` until it answers 200/204, up to `limit`; fails
/// early, with the console, if QEMU exits.
fn wait_health(slot: &mut Slot, limit: Duration, console: &Path) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok((status, _)) = http("GET", "/health", &[], b"") {
            if status == 200 || status == 204 {
                return start.elapsed();
            }
        }
        let exited = slot.qemus.last_mut().unwrap().try_wait().unwrap();
        let console_text = || std::fs::read_to_string(console).unwrap_or_default();
        assert!(
            exited.is_none(),
            "QEMU exited ({exited:?}); console:\n{}",
            console_text()
        );
        assert!(
            start.elapsed() < limit,
            "envd did not answer /health within {} s; console:\n{}",
            limit.as_secs(),
            console_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn upload(path: &str, content: &[u8]) {
    let boundary = "arcaVmTestBoundary7MA4YWxkTrZu0gW";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, resp) = http(
        "POST",
        &format!("/files?path={path}&username=root"),
        &[(
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        )],
        &body,
    )
    .unwrap();
    assert_eq!(status, 200, "upload: {}", String::from_utf8_lossy(&resp));
}

fn download(path: &str) -> Vec<u8> {
    let (status, body) = http(
        "GET",
        &format!("/files?path={path}&username=root"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(status, 200, "download: {}", String::from_utf8_lossy(&body));
    body
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn vm_boots_serves_envd_and_survives_save_and_restore() {
    let (assets, envd) = match prerequisites() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipping the vm test: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Disk: a read-only ext4 base and the sandbox's qcow2 overlay.
    let tree = dir.join("rootfs");
    busybox_tree(&tree);
    let base = dir.join("base.ext4");
    ext4_image(&tree, &base, 64);
    let disk = dir.join("disk.qcow2");
    vm::make_overlay(&base, &disk).unwrap();
    let initramfs = dir.join("initramfs.cpio");
    vm::write_initramfs(&envd, &assets.modules_dir, &initramfs).unwrap();

    let mut slot = Slot::create();
    vm::setup_tap(&slot.netns, "eth0", "tap0").unwrap();

    let kvm = vm::kvm_usable();
    let mut cfg = VmConfig {
        memory_mb: MEMORY_MB,
        vcpus: 1,
        kernel: assets.kernel.clone(),
        initramfs,
        disk,
        tap: "tap0".into(),
        mac: vm::mac_for(GUEST_IP),
        ip: GUEST_IP,
        prefix: 30,
        gateway: HOST_IP,
        hostname: "vmtest".into(),
        qmp_socket: dir.join("qmp.sock"),
        console_log: Some(dir.join("console.log")),
        incoming: None,
        kvm,
    };
    eprintln!(
        "qemu argv: {} {}",
        assets.qemu.display(),
        vm::qemu_args(&cfg)
            .iter()
            .map(|a| if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            })
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Boot.
    let pid = slot.start_qemu(&assets.qemu, &cfg, &dir.join("qemu1.log"));
    let console = cfg.console_log.clone().unwrap();
    let boot = wait_health(&mut slot, Duration::from_secs(60), &console);
    eprintln!(
        "boot to /health: {:.2} s ({}), QEMU RSS {} MiB",
        boot.as_secs_f64(),
        if kvm { "kvm" } else { "tcg" },
        rss_kib(pid) / 1024
    );

    // A file round trip through envd.
    let content = b"hello from the host\n\x00\x01\x02 binary too".to_vec();
    upload("/root/hello.txt", &content);
    assert_eq!(download("/root/hello.txt"), content);

    // Save to a file and stop this QEMU.
    let state = dir.join("vm.state");
    let mut qmp = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(10)).unwrap();
    let t = Instant::now();
    qmp.migrate_to_file(&state, Duration::from_secs(60))
        .unwrap();
    let save = t.elapsed();
    let size = std::fs::metadata(&state).unwrap().len();
    eprintln!(
        "save: {:.2} s, {} MiB state for a {MEMORY_MB} MiB guest",
        save.as_secs_f64(),
        size >> 20
    );
    assert_eq!(qmp.status().unwrap(), "postmigrate");
    qmp.quit().unwrap();
    assert!(
        slot.wait_qemu_exit(Duration::from_secs(10)),
        "QEMU did not quit"
    );
    assert!(
        http("GET", "/health", &[], b"").is_err(),
        "envd still answers after quit"
    );

    // Restore into a new QEMU with the same disk.
    cfg.incoming = Some(state);
    cfg.qmp_socket = dir.join("qmp2.sock");
    let t = Instant::now();
    let pid = slot.start_qemu(&assets.qemu, &cfg, &dir.join("qemu2.log"));
    let mut qmp = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(10)).unwrap();
    qmp.wait_incoming(Duration::from_secs(60)).unwrap();
    let loaded = t.elapsed();
    qmp.cont().unwrap();
    assert_eq!(qmp.status().unwrap(), "running");
    wait_health(&mut slot, Duration::from_secs(30), &console);
    eprintln!(
        "restore: state loaded in {:.2} s, /health {:.2} s after start, QEMU RSS {} MiB",
        loaded.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        rss_kib(pid) / 1024
    );
    assert_eq!(download("/root/hello.txt"), content);
    // The restored guest still writes to its disk.
    upload("/root/after.txt", b"after restore");
    assert_eq!(download("/root/after.txt"), b"after restore");

    // SIGTERM to envd (PID 1) powers the guest off, which ends QEMU.
    let call = br#"{"process":{"cmd":"/bin/kill","args":["-TERM","1"]}}"#;
    let mut envelope = vec![0u8];
    envelope.extend_from_slice(&u32::try_from(call.len()).unwrap().to_be_bytes());
    envelope.extend_from_slice(call);
    // The answer may be cut off by the power-off: only the exit counts.
    let _ = http(
        "POST",
        "/process.Process/Start",
        &[("Content-Type", "application/connect+json".to_string())],
        &envelope,
    );
    let t = Instant::now();
    if !slot.wait_qemu_exit(Duration::from_secs(30)) {
        let _ = qmp.quit();
        panic!(
            "the guest did not power off after SIGTERM to envd; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
    }
    eprintln!("SIGTERM to power-off: {:.2} s", t.elapsed().as_secs_f64());
    vm::teardown_tap(&slot.netns, "eth0", "tap0").unwrap();
    let addr = Command::new("ip")
        .args(["-n", &slot.netns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&addr.stdout).contains(&format!("{GUEST_IP}/30")),
        "teardown_tap did not give eth0 its address back"
    );
}

/// An ext4 image `out` of `size_mb` MiB holding `tree` (what the node gets
/// from `arca_image::export_ext4_with` for a template).
fn ext4_image(tree: &Path, out: &Path, size_mb: u64) {
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"));
    let status = Command::new(mkfs)
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mb}M"))
        .status()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(status.success(), "mkfs.ext4 failed: {status}");
}
