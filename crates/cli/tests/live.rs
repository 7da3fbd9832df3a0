//! `arca-sdk` and `arca sandbox` against a real `arca up` of their own (own
//! home, ports, network prefix and address range). Needs root, the static
//! envd and a home with a built `base` template (`ARCA_TEST_BASE_HOME`, default
//! `/var/cache/arca-test/home`, which scripts/test.sh builds; its base layer is linked into the test's home);
//! skips with the reason otherwise, unless ARCA_TEST_PRIVILEGED=1.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arca_sdk::{Client, RunOptions};

fn envd_static() -> PathBuf {
    std::env::var_os("ARCA_ENVD_STATIC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-musl/release/arca-envd")
        })
}

fn base_home() -> PathBuf {
    std::env::var_os("ARCA_TEST_BASE_HOME")
        .map_or_else(|| PathBuf::from("/var/cache/arca-test/home"), PathBuf::from)
}

fn has_base(home: &Path) -> bool {
    home.join("templates/base").is_dir()
        && arca_node::templates::TemplateStore::open(home).is_ok_and(|s| s.has_base())
}

fn prerequisites() -> bool {
    let strict = std::env::var("ARCA_TEST_PRIVILEGED").as_deref() == Ok("1");
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root"
    } else if !envd_static().is_file() {
        "needs the static envd (cargo build --release -p arca-envd --target x86_64-unknown-linux-musl)"
    } else if !has_base(&base_home()) {
        "needs a home with a built base template (run `arca up` once; set ARCA_TEST_BASE_HOME)"
    } else {
        return true;
    };
    assert!(!strict, "ARCA_TEST_PRIVILEGED=1 but this test {why}");
    eprintln!("skipped: live sdk/cli test {why}");
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `arca up`; dropping it kills its sandboxes, stops it and
/// removes whatever it left on the host.
struct Up {
    child: Child,
    prefix: String,
    api: String,
    proxy: String,
    _dir: tempfile::TempDir,
    home: PathBuf,
}

impl Up {
    fn start() -> Up {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        arca_node::templates::TemplateStore::open(&home)
            .unwrap()
            .share_base_from(&arca_node::templates::TemplateStore::open(&base_home()).unwrap())
            .unwrap();
        let letters: String = (0..2)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect();
        let prefix = format!("sdk{letters}");
        let (api_port, proxy_port) = (free_port(), free_port());
        let octet = 200 + rand::random::<u8>() % 50;
        let child = Command::new(env!("CARGO_BIN_EXE_arca"))
            .args(["up", "--home"])
            .arg(&home)
            .arg("--envd")
            .arg(envd_static())
            .args([
                "--api-listen",
                &format!("127.0.0.1:{api_port}"),
                "--proxy-listen",
                &format!("127.0.0.1:{proxy_port}"),
                "--net-prefix",
                &prefix,
                "--sandbox-cidr",
                &format!("10.{octet}.0.0/16"),
                "--warm-slots",
                "1",
                "--warm-pool",
                "0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let up = Up {
            child,
            prefix,
            api: format!("http://127.0.0.1:{api_port}"),
            proxy: format!("http://127.0.0.1:{proxy_port}"),
            _dir: dir,
            home,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !up.home.join("api_key").is_file()
            || std::net::TcpStream::connect(up.api.trim_start_matches("http://")).is_err()
        {
            assert!(Instant::now() < deadline, "arca up did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }

    fn client(&self) -> Client {
        Client::resolve(Some(&self.api), None, Some(&self.proxy), Some(&self.home)).unwrap()
    }

    fn arca(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_arca"));
        c.args(args)
            .env("ARCA_HOME", &self.home)
            .env("E2B_API_URL", &self.api)
            .env("E2B_SANDBOX_URL", &self.proxy)
            .env_remove("E2B_API_KEY");
        c
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let client = self.client();
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                for s in client.list().await.unwrap_or_default() {
                    let _ = client.kill(&s.id).await;
                }
            });
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // Whatever is left: processes in our cgroups, netns, the nft table.
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let dir = Path::new(root).join(&self.prefix);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
            }
        }
        if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&format!("{}-", self.prefix)) {
                    let _ = Command::new("ip").args(["netns", "delete", name]).status();
                }
            }
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.prefix])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for h in hierarchies {
            let dir = h.join(&self.prefix);
            for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(sub.path());
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

#[test]
fn sdk_and_cli_drive_real_sandboxes() {
    if !prerequisites() {
        return;
    }
    // `up` is dropped outside the runtime (its cleanup makes its own), also
    // when a check below panics.
    let up = Up::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(flows(&up));
    drop(rt);
    drop(up);
}

async fn flows(up: &Up) {
    let client = up.client();

    let envs = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
    let md = BTreeMap::from([("suite".to_string(), "sdk".to_string())]);
    let sb = client.create("base", Some(120), &md, &envs).await.unwrap();
    assert!(sb.envd_access_token.is_some());

    // Commands: output streams, exit codes come back, envs and cwd apply.
    let opts = RunOptions {
        envs: BTreeMap::from([("ONE".to_string(), "1".to_string())]),
        timeout: Some(Duration::from_secs(30)),
        ..RunOptions::default()
    };
    let (st, out, err) = client
        .run_collect(
            &sb,
            "echo $GREETING $ONE; echo oops >&2; pwd; whoami; exit 3",
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(st.exit_code, 3);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "hello 1\n/home/user\nuser\n"
    );
    assert_eq!(err, b"oops\n");
    let root = RunOptions {
        user: Some("root".into()),
        cwd: Some("/tmp".into()),
        ..RunOptions::default()
    };
    let (st, out, _) = client.run_collect(&sb, "whoami; pwd", &root).await.unwrap();
    assert!(st.success());
    assert_eq!(out, b"root\n/tmp\n");

    // Files.
    let w = client
        .write_file(&sb, "notes/a.txt", &b"bytes \x00\xff"[..], None)
        .await
        .unwrap();
    assert_eq!(w.path, "/home/user/notes/a.txt");
    assert_eq!(
        client
            .read_file(&sb, "/home/user/notes/a.txt", None)
            .await
            .unwrap(),
        &b"bytes \x00\xff"[..]
    );
    assert!(
        client
            .read_file(&sb, "/nope", None)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // REST reads.
    let listed = client.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|s| s.id == sb.id && s.metadata["suite"] == "sdk")
    );
    let info = client.get(&sb.id).await.unwrap();
    assert_eq!(info.envd_access_token, sb.envd_access_token);
    client.set_timeout(&sb.id, 90).await.unwrap();
    let _ = client.metrics(&sb.id).await.unwrap();
    let _ = client.logs(&sb.id).await.unwrap();

    // The CLI: exit code passthrough, output on stdout/stderr.
    let o = up
        .arca(&[
            "sandbox",
            "exec",
            &sb.id,
            "--",
            "echo out; echo err >&2; exit 5",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(o.stdout, b"out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err"));
    let o = up.arca(&["--json", "sandbox", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(&sb.id));

    // Kill: true once, then false; the CLI says 1 for an unknown id.
    assert!(client.kill(&sb.id).await.unwrap());
    assert!(!client.kill(&sb.id).await.unwrap());
    let o = up.arca(&["sandbox", "kill", &sb.id]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let o = up
        .arca(&["sandbox", "exec", &sb.id, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));

    // A CLI-made sandbox, killed through the CLI.
    let o = up
        .arca(&["sandbox", "create", "--timeout", "60"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let o = up.arca(&["sandbox", "kill", &id]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
}
