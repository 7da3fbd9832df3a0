//! The official E2B Python SDKs (2.63.0: v2 create; 2.45.1: v1 create)
//! against the api with a fake node: create, get_info, list with paging,
//! set_timeout, metrics and kill parse and behave as the SDK expects; and
//! both SDKs' `Template` builder against the template registry with a fake
//! builder; forks and snapshots (create, start from, list, delete); network
//! settings (create with `network` and `allow_internet_access`, `get_info`,
//! `update_network`, traffic access tokens, the 400s and 409).
//!
//! Needs the virtualenvs that `scripts/setup.sh` makes under
//! `.cache/venv/`; without them the test is skipped, unless
//! `ARCA_TEST_SDK=1` asks for it, in which case it fails.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use std::path::PathBuf;

use common::Server;

fn venv_python(version: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/venv")
        .join(format!("e2b-{version}"))
        .join("bin/python");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("ARCA_TEST_SDK").as_deref() != Ok("1"),
        "ARCA_TEST_SDK=1 but {} is missing: run scripts/setup.sh",
        p.display()
    );
    eprintln!("skipped: {} is missing (run scripts/setup.sh)", p.display());
    None
}

async fn run_script(version: &str, script: &str, ok: &str) -> Option<Server> {
    let python = venv_python(version)?;
    let s = Server::start().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let base = s.base.clone();
    let key = s.key.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env_remove("E2B_DEBUG")
            .env_remove("E2B_SANDBOX_URL")
            .env("E2B_API_URL", base)
            .env("E2B_API_KEY", key)
            .env("E2B_DOMAIN", "arca.test")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(ok),
        "python sdk {version} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    Some(s)
}

async fn run_shapes(version: &str) {
    if let Some(s) = run_script(version, "tests/sdk/shapes.py", "sdk ok").await {
        assert!(s.node.ids().is_empty());
    }
}

async fn run_template_builder(version: &str) {
    let Some(s) = run_script(version, "tests/sdk/templates.py", "sdk templates ok").await else {
        return;
    };
    // The script's builds reached the builder: two good ones (the second
    // found its COPY archive present), the failing one; `base` never did.
    let specs = s.builder.specs.lock().unwrap().clone();
    assert_eq!(specs.len(), 3, "{specs:?}");
    assert!(s.node.ids().is_empty());
    // The archive the SDK uploaded is a gzipped tar, in the team's directory.
    let files: Vec<_> = std::fs::read_dir(&s.uploads)
        .unwrap()
        .flat_map(|team| std::fs::read_dir(team.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    assert_eq!(&bytes[..2], [0x1f, 0x8b]);
}

async fn run_snapshots(version: &str) {
    let Some(s) = run_script(version, "tests/sdk/snapshots.py", "sdk snapshots ok").await else {
        return;
    };
    // Three forks in two node calls, two snapshots; everything killed.
    let forks = s.node.forks.lock().unwrap().clone();
    assert_eq!(forks.iter().map(|(_, specs)| specs.len()).sum::<usize>(), 3);
    assert_eq!(s.node.snapshots.lock().unwrap().len(), 2);
    assert!(s.node.ids().is_empty());
}

async fn run_network(version: &str) {
    let Some(s) = run_script(version, "tests/sdk/network.py", "sdk network ok").await else {
        return;
    };
    // Two updates reached the node (the refused and the paused one did not).
    let updates = s.node.network_updates.lock().unwrap().clone();
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert_eq!(updates[0].1.allow_out, ["1.2.3.4", "new.test"]);
    assert!(updates[0].2);
    assert!(updates[1].1.is_empty() && !updates[1].2);
    // The first create carried its settings and a traffic token to the node.
    let first = s.node.specs.lock().unwrap()[0].clone();
    assert!(!first.allow_internet_access);
    assert_eq!(first.network.deny_out, ["0.0.0.0/0"]);
    assert_eq!(
        first.ingress.traffic_access_token.as_ref().map(String::len),
        Some(64)
    );
    assert_eq!(
        first.ingress.mask_request_host.as_deref(),
        Some("${PORT}-masked.test")
    );
    assert!(s.node.ids().is_empty());
}

#[tokio::test]
async fn python_sdk_2_63_network() {
    run_network("2.63.0").await;
}

#[tokio::test]
async fn python_sdk_2_45_network() {
    run_network("2.45.1").await;
}

#[tokio::test]
async fn python_sdk_2_63_snapshots_and_forks() {
    run_snapshots("2.63.0").await;
}

#[tokio::test]
async fn python_sdk_2_45_snapshots_and_forks() {
    run_snapshots("2.45.1").await;
}

#[tokio::test]
async fn python_sdk_2_63_template_builder() {
    run_template_builder("2.63.0").await;
}

#[tokio::test]
async fn python_sdk_2_45_template_builder() {
    run_template_builder("2.45.1").await;
}

#[tokio::test]
async fn python_sdk_2_63_control_plane_shapes() {
    run_shapes("2.63.0").await;
}

#[tokio::test]
async fn python_sdk_2_45_control_plane_shapes() {
    run_shapes("2.45.1").await;
}
