//! End-to-end: builds the `base` root file system from Debian's mirror and
//! runs the tools the E2B SDKs expect inside it. Slow (minutes) and needs the
//! network, so it runs only with `ARCA_TEST_DEBOOTSTRAP=1` (and root).
//!
//! `ARCA_TEST_DEBOOTSTRAP_DEST=/path` keeps the result there (it must not
//! exist yet); otherwise it is built in a temporary directory and removed.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use arca_image::debian::{BootstrapOptions, Phase, Progress, bootstrap};

fn chroot_sh(root: &Path, script: &str) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(["/bin/bash", "-lc", script])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("TERM", "xterm")
        .env("HOME", "/root")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn bootstrap_builds_a_working_base_rootfs() {
    if std::env::var("ARCA_TEST_DEBOOTSTRAP").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set ARCA_TEST_DEBOOTSTRAP=1 to build the base rootfs with debootstrap \
             (minutes, needs root and Debian's mirror)"
        );
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "ARCA_TEST_DEBOOTSTRAP=1 needs root"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dest: PathBuf = std::env::var_os("ARCA_TEST_DEBOOTSTRAP_DEST")
        .map_or_else(|| tmp.path().join("rootfs"), PathBuf::from);

    let reports: Mutex<Vec<Progress>> = Mutex::new(Vec::new());
    let started = Instant::now();
    bootstrap(&BootstrapOptions::base(&dest), &|p| {
        reports.lock().unwrap().push(p);
    })
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f32();
    let bytes = arca_image::disk_usage(&dest).unwrap();
    eprintln!(
        "bootstrap: {secs:.0} s, {:.0} MB in {}",
        bytes as f64 / 1e6,
        dest.display()
    );

    let reports = reports.into_inner().unwrap();
    for pair in reports.windows(2) {
        assert!(pair[1].fraction >= pair[0].fraction, "{pair:?}");
    }
    let last = reports.last().unwrap();
    assert_eq!(last.phase, Phase::Done);
    eprintln!("last progress: {last:?}");
    for phase in [
        Phase::Retrieving,
        Phase::Extracting,
        Phase::Unpacking,
        Phase::Configuring,
    ] {
        assert!(reports.iter().any(|r| r.phase == phase), "no {phase:?}");
    }
    // No temporary directory left beside the result.
    let parent = dest.parent().unwrap();
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.tmp-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let out = chroot_sh(
        &dest,
        "python3 --version; python --version; node --version; git --version; \
         curl --version | head -1; sudo -V | head -1; id user; tput cols; \
         test -x /usr/lib/git-core/git-daemon && echo git-daemon",
    );
    eprintln!("{out}");
    assert!(out.contains("Python 3.11"), "{out}");
    assert!(out.contains("git version"), "{out}");
    assert!(
        out.contains("uid=1000(user) gid=1000(user) groups=1000(user),27(sudo)"),
        "{out}"
    );
    assert!(out.contains("git-daemon"), "{out}");
    // Passwordless sudo for `user`.
    let out = chroot_sh(&dest, "su -s /bin/bash user -c 'sudo -n id -u; echo ~'");
    assert_eq!(out, "0\n/home/user\n");

    let sudoers = std::fs::metadata(dest.join("etc/sudoers.d/user")).unwrap();
    assert_eq!(sudoers.mode() & 0o7777, 0o440);
    assert_eq!(sudoers.uid(), 0);
    let home = std::fs::metadata(dest.join("home/user")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    eprintln!("/home/user mode {:o}", home.mode() & 0o7777);
    assert_eq!(std::fs::read(dest.join("etc/resolv.conf")).unwrap(), b"");
    let lists: Vec<_> = std::fs::read_dir(dest.join("var/lib/apt/lists"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .collect();
    assert!(lists.is_empty(), "{lists:?}");
    let sudo = std::fs::metadata(dest.join("usr/bin/sudo")).unwrap();
    assert_eq!(sudo.mode() & 0o4000, 0o4000);
}
