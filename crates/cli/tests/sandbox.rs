//! The `ns` runtime end to end: real namespaces, cgroups, overlayfs and
//! seccomp around a real static envd, started through `arca __init`.
//! Isolation properties are tried from inside the sandbox. Needs root and
//! the static envd (`cargo build --release -p arca-envd --target
//! x86_64-unknown-linux-musl`, which scripts/test.sh does first).
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arca_runtime::cgroup::{Cgroup, Layout, Limits};
use arca_runtime::{DEFAULT_ID_MAP, InitConfig};

fn envd_static() -> Option<PathBuf> {
    let p = std::env::var_os("ARCA_ENVD_STATIC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-musl/release/arca-envd")
        });
    p.is_file().then_some(p)
}

/// Skips (with the reason) when the machine cannot run these tests, unless
/// ARCA_TEST_PRIVILEGED=1 asks for them, in which case that is a failure.
fn prerequisites() -> Option<PathBuf> {
    let strict = std::env::var("ARCA_TEST_PRIVILEGED").as_deref() == Ok("1");
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root"
    } else if !Path::new("/bin/busybox").is_file() {
        "needs busybox-static (scripts/setup.sh installs it)"
    } else if envd_static().is_none() {
        "needs the static envd (cargo build --release -p arca-envd --target x86_64-unknown-linux-musl)"
    } else {
        return envd_static();
    };
    assert!(!strict, "ARCA_TEST_PRIVILEGED=1 but this test {why}");
    eprintln!("skipped: sandbox runtime test {why}");
    None
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Recursively shifts ownership by the sandbox id map, as template layers are stored.
fn shift(root: &Path) {
    for entry in walk(root) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::lchown(
            &entry,
            Some(meta.uid() + DEFAULT_ID_MAP.outside),
            Some(meta.gid() + DEFAULT_ID_MAP.outside),
        )
        .unwrap();
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

/// A busybox root file system with root and `user` accounts.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("layer");
    for d in [
        "bin",
        "etc",
        "home/user",
        "tmp",
        "proc",
        "sys",
        "dev",
        "run",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let st = Command::new(root.join("bin/busybox"))
        .args(["--install", "-s"])
        .arg(root.join("bin"))
        .status()
        .unwrap();
    assert!(st.success());
    // --install links to the absolute path it was run from; point them at /bin/busybox.
    for e in std::fs::read_dir(root.join("bin")).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            std::fs::remove_file(&p).unwrap();
            std::os::unix::fs::symlink("/bin/busybox", &p).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\ntty:x:5:\nuser:x:1000:\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("root")).unwrap();
    shift(&root);
    std::os::unix::fs::lchown(root.join("home/user"), Some(101_000), Some(101_000)).unwrap();
    root
}

struct Sandbox {
    dir: tempfile::TempDir,
    cgroup: Cgroup,
    pid: i32,
    boot_id: String,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.cgroup.kill_all();
        let _ = self.cgroup.remove();
        let _ = &self.dir;
    }
}

fn start(envd: &Path, limits: Limits) -> Sandbox {
    match try_start(envd, limits, &|_| {}, vec![]) {
        Ok(s) => s,
        Err(b) => panic!("sandbox did not start: {}", b.1),
    }
}

/// Starts a sandbox whose template `tweak` may change first, writing
/// `files` into it; the guard cleans up whether or not the start worked.
fn try_start(
    envd: &Path,
    limits: Limits,
    tweak: &dyn Fn(&Path),
    files: Vec<(String, String)>,
) -> Result<Sandbox, Box<(Sandbox, arca_runtime::RuntimeError)>> {
    let dir = tempfile::tempdir().unwrap();
    let lower = busybox_rootfs(dir.path());
    tweak(&lower);
    let (upper, work, root) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("root"),
    );
    for d in [&upper, &work, &root] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::chown(
        &upper,
        Some(DEFAULT_ID_MAP.outside),
        Some(DEFAULT_ID_MAP.outside),
    )
    .unwrap();
    let name = format!("arcatest{}", rand_suffix());
    let cgroup = Layout::detect().unwrap().create(&name, limits).unwrap();
    let boot_id = arca_runtime::new_boot_id();
    let cfg = InitConfig {
        sandbox_id: name.clone(),
        hostname: "arca-test".into(),
        lower_dirs: vec![lower],
        upper_dir: upper,
        work_dir: work,
        root_dir: root,
        envd_binary: envd.to_path_buf(),
        envd_args: vec![],
        env: vec![("PATH".into(), "/bin".into())],
        // Its own network namespace, with `lo` only: envd is reached on
        // 127.0.0.1 from inside it.
        own_netns: true,
        cgroup_dirs: cgroup.dirs().to_vec(),
        id_map: DEFAULT_ID_MAP,
        boot_id: boot_id.clone(),
        no_new_privs: false,
        disk: None,
        files,
    };
    let mut sbx = Sandbox {
        dir,
        cgroup,
        pid: 0,
        boot_id,
    };
    match arca_runtime::launch(Path::new(env!("CARGO_BIN_EXE_arca")), &cfg) {
        Ok(pid) => sbx.pid = pid,
        Err(e) => return Err(Box::new((sbx, e))),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sbx.request("GET", "/health", "", "").0 != 204 {
        assert!(
            Instant::now() < deadline,
            "envd never answered inside the sandbox"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(sbx)
}

impl Sandbox {
    /// One HTTP/1.1 request to envd, from a socket made inside the sandbox's netns.
    fn request(&self, method: &str, path: &str, ctype: &str, body: &str) -> (u16, Vec<u8>) {
        let ns = format!("/proc/{}/ns/net", self.pid);
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let mut req = req;
        req.extend_from_slice(body.as_bytes());
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", 49983)) else {
                return (0, Vec::new());
            };
            s.write_all(&req).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out);
            let status = text
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body_at = out
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(out.len(), |i| i + 4);
            (status, out[body_at..].to_vec())
        })
        .join()
        .unwrap()
    }

    /// Runs a shell command through envd's Start and returns (exit code, stdout+stderr).
    fn sh(&self, cmd: &str) -> (i64, String) {
        let msg =
            serde_json::json!({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}, "stdin": false})
                .to_string();
        let mut env = vec![0u8];
        env.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
        env.extend_from_slice(msg.as_bytes());
        let (status, body) = self.request_bytes("/process.Process/Start", &env);
        assert_eq!(status, 200);
        let body = dechunk(&body);
        let (mut out, mut code) = (String::new(), 0);
        let mut i = 0;
        while i + 5 <= body.len() {
            let len = u32::from_be_bytes(body[i + 1..i + 5].try_into().unwrap()) as usize;
            let v: serde_json::Value = serde_json::from_slice(&body[i + 5..i + 5 + len]).unwrap();
            let ev = &v["event"];
            for k in ["stdout", "stderr"] {
                if let Some(b) = ev["data"][k].as_str() {
                    use base64::Engine as _;
                    out.push_str(&String::from_utf8_lossy(
                        &base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
                    ));
                }
            }
            if ev.get("end").is_some() {
                code = ev["end"]["exitCode"].as_i64().unwrap_or(0);
            }
            i += 5 + len;
        }
        (code, out)
    }

    fn request_bytes(&self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let ns = format!("/proc/{}/ns/net", self.pid);
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/connect+json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 49983)).unwrap();
            s.write_all(&req).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let status = String::from_utf8_lossy(&out[..out.len().min(16)])
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body_at = out
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(out.len(), |i| i + 4);
            (status, out[body_at..].to_vec())
        })
        .join()
        .unwrap()
    }
}

fn dechunk(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let Some(nl) = b[i..].windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[i..i + nl]).trim(), 16).unwrap_or(0);
        i += nl + 2;
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
    out
}

const SMALL: Limits = Limits {
    cpus: 1,
    memory_mib: 256,
    pids: 64,
};

#[test]
fn envd_is_pid_1_as_unprivileged_root_with_fresh_boot_id_and_hostname() {
    let Some(envd) = prerequisites() else { return };
    let sbx = start(&envd, SMALL);
    let (code, out) = sbx.sh(
        "id -u; cat /proc/self/uid_map; tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; \
         cat /proc/sys/kernel/random/boot_id; grep Seccomp: /proc/self/status",
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"]);
    assert!(lines[2].starts_with("/run/arca/envd"), "{out}");
    assert_eq!(lines[3], "arca-test");
    assert_eq!(lines[4], sbx.boot_id);
    assert_eq!(
        lines[5].split_whitespace().last(),
        Some("2"),
        "seccomp filter mode: {out}"
    );
    assert!(
        sbx.cgroup.procs().contains(&sbx.pid),
        "envd is in the sandbox's cgroup"
    );
}

#[test]
fn untrusted_code_cannot_reach_host_files_processes_mounts_clock_or_envd() {
    let Some(envd) = prerequisites() else { return };
    let sbx = start(&envd, SMALL);
    let attempts = [
        // The host's accounts are not there; only the template's.
        ("cat /etc/passwd | wc -l", "2"),
        // Only the sandbox's own processes are visible.
        ("ls /proc | grep -c '^[0-9]' | awk '{print ($1 < 10)}'", "1"),
        // /proc/1/root is the sandbox's own root, not the host's.
        ("cat /proc/1/root/etc/passwd | wc -l", "2"),
        (
            "mount -t tmpfs none /tmp 2>/dev/null && echo mounted || echo refused",
            "refused",
        ),
        (
            "mount -o remount,rw /sys 2>/dev/null && echo remounted || echo refused",
            "refused",
        ),
        (
            "umount /proc 2>/dev/null && echo unmounted || echo refused",
            "refused",
        ),
        (
            "hostname evil 2>/dev/null && echo set || echo refused",
            "refused",
        ),
        (
            "(echo 1 > /proc/sys/kernel/panic) 2>/dev/null && echo written || echo refused",
            "refused",
        ),
        (
            "(echo 1 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null && echo written || echo refused",
            "refused",
        ),
        (
            "(echo x > /run/arca/envd) 2>/dev/null && echo written || echo refused",
            "refused",
        ),
        (
            "insmod /nonexistent.ko 2>/dev/null; cat /proc/modules >/dev/null 2>&1; echo checked",
            "checked",
        ),
        (
            "unshare -U true 2>/dev/null && echo unshared || echo refused",
            "refused",
        ),
        (
            "ls /sys/fs/cgroup 2>/dev/null | wc -l | awk '{print ($1 >= 0)}'",
            "1",
        ),
    ];
    for (cmd, want) in attempts {
        let (_, out) = sbx.sh(cmd);
        assert_eq!(out.trim(), want, "`{cmd}` printed {out:?}");
    }
    // Setting the clock is refused: busybox reports success, so check the
    // effect (the year inside stays the host's).
    let year = String::from_utf8(Command::new("date").arg("+%Y").output().unwrap().stdout).unwrap();
    let (_, out) = sbx.sh("date -s 2001-01-01 >/dev/null 2>&1; date +%Y");
    assert_eq!(out.trim(), year.trim(), "the sandbox changed the clock");
    assert_ne!(
        nix::unistd::gethostname().unwrap().to_string_lossy(),
        "evil"
    );
}

#[test]
fn a_fork_bomb_is_contained_by_the_pids_limit() {
    let Some(envd) = prerequisites() else { return };
    let sbx = start(&envd, SMALL);
    // Background children must not hold the output pipe, or Start waits for them.
    let (_, out) = sbx.sh(
        "i=0; while [ $i -lt 200 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; echo started",
    );
    // The shell runs into the limit: fork fails with EAGAIN inside.
    assert!(
        out.contains("can't fork"),
        "200 forks under a limit of {}: {out}",
        SMALL.pids
    );
    let n = sbx.cgroup.procs().len();
    assert!(
        n as u64 <= SMALL.pids,
        "{n} processes in a cgroup limited to {}",
        SMALL.pids
    );
    assert!(
        n > 10,
        "the sleeps that fit under the limit are running ({n})"
    );
    // The host is unaffected: it can still start processes.
    assert!(Command::new("true").status().unwrap().success());
}

#[test]
fn running_out_of_memory_kills_inside_the_sandbox_only() {
    let Some(envd) = prerequisites() else { return };
    let sbx = start(&envd, SMALL);
    let (code, _) = sbx.sh("head -c 600m /dev/zero | tail > /dev/null");
    assert_ne!(
        code, 0,
        "a 600 MiB allocation must fail under a 256 MiB limit"
    );
    assert!(sbx.cgroup.oom_kills() > 0 || code != 0);
    let (code, out) = sbx.sh("echo alive");
    assert_eq!(
        (code, out.trim()),
        (0, "alive"),
        "envd survives the OOM kill"
    );
}

#[test]
fn teardown_leaves_no_mount_process_or_cgroup() {
    let Some(envd) = prerequisites() else { return };
    let sbx = start(&envd, SMALL);
    let root = sbx.dir.path().to_path_buf();
    let dirs = sbx.cgroup.dirs().to_vec();
    let pid = sbx.pid;
    sbx.sh("sleep 100 >/dev/null 2>&1 & echo bg");
    drop(sbx);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z "))
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(root.to_str().unwrap()),
        "a mount of the sandbox is left on the host"
    );
    for d in dirs {
        assert!(!d.exists(), "cgroup {} is left", d.display());
    }
}

#[test]
fn template_symlinks_cannot_redirect_init_to_host_files() {
    let Some(envd) = prerequisites() else { return };
    // A host file the template's links point at; it must stay untouched.
    let host = tempfile::tempdir().unwrap();
    let victim = host.path().join("victim");
    std::fs::write(&victim, "host data\n").unwrap();
    let victim_s = victim.display().to_string();
    let link_hosts = |lower: &Path| {
        let hosts = lower.join("etc/hosts");
        let _ = std::fs::remove_file(&hosts);
        std::os::unix::fs::symlink(&victim_s, &hosts).unwrap();
        // /tmp pointing at a host directory must not get mode 1777.
        std::fs::remove_dir(lower.join("tmp")).unwrap();
        std::os::unix::fs::symlink(host.path(), lower.join("tmp")).unwrap();
    };
    let files = vec![(
        "/etc/hosts".to_string(),
        "127.0.0.1 localhost\n".to_string(),
    )];
    let started = try_start(&envd, SMALL, &link_hosts, files);
    // Writing through the link stays inside the sandbox (or fails there).
    if let Ok(sbx) = &started {
        let (_, out) = sbx.sh("cat /etc/hosts 2>&1; ls -ld /tmp");
        assert!(!out.contains("host data"), "{out}");
    }
    drop(started);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host data\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(host.path()).unwrap().permissions().mode() & 0o7777;
    assert_ne!(mode, 0o1777, "the host directory was made world-writable");

    // A mount point that is a link to a host directory is refused.
    let target = tempfile::tempdir().unwrap();
    let link_run = |lower: &Path| {
        std::fs::remove_dir(lower.join("run")).unwrap();
        std::os::unix::fs::symlink(target.path(), lower.join("run")).unwrap();
    };
    let err = match try_start(&envd, SMALL, &link_run, vec![]) {
        Ok(_) => panic!("a template whose /run is a symlink started"),
        Err(b) => b.1.to_string(),
    };
    assert!(err.contains("/run"), "{err}");
    assert!(
        std::fs::read_dir(target.path()).unwrap().next().is_none(),
        "something was mounted or made on the host"
    );
}
