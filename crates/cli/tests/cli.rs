//! The `arca` binary's user interface: help, exit codes, stdout/stderr, and
//! the commands that need no running server (doctor, keys).
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use std::path::Path;

use common::{arca, run};

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn help_lists_the_commands() {
    let (code, out, _) = run(&mut arca(&["--help"]));
    assert_eq!(code, 0);
    for c in ["up", "sandbox", "keys", "doctor", "completion", "--json"] {
        assert!(out.contains(c), "{c} missing from:\n{out}");
    }
    let (code, out, _) = run(&mut arca(&["sandbox", "--help"]));
    assert_eq!(code, 0);
    for c in ["create", "list", "exec", "logs", "kill", "E2B_API_URL"] {
        assert!(out.contains(c), "{c} missing from:\n{out}");
    }
    let (code, out, _) = run(&mut arca(&["sandbox", "exec", "--help"]));
    assert_eq!(code, 0);
    assert!(out.contains("125"), "{out}");
    // Usage errors are clap's exit code 2.
    let (code, _, err) = run(&mut arca(&["sandbox", "frobnicate"]));
    assert_eq!(code, 2);
    assert!(err.contains("--help"), "{err}");
}

#[test]
fn doctor_reports_each_check_and_exits_by_what_is_missing() {
    let (code, out, _) = run(&mut arca(&["doctor"]));
    assert!(code == 0 || code == 2, "{code}");
    assert_eq!(code == 2, out.contains("MISSING"), "{out}");
    let cgroup = out
        .lines()
        .find(|l| l.contains("cgroups"))
        .unwrap_or_else(|| panic!("no cgroup line in:\n{out}"));
    assert!(
        cgroup.starts_with("OK") || cgroup.starts_with("MISSING"),
        "{cgroup}"
    );
    for c in [
        "kernel",
        "root",
        "userns",
        "overlayfs",
        "nftables",
        "kvm",
        "criu",
    ] {
        assert!(out.contains(c), "{c} missing from:\n{out}");
    }
    for l in out.lines().filter(|l| l.starts_with("MISSING")) {
        let next = out.lines().skip_while(|x| *x != l).nth(1).unwrap_or("");
        assert!(next.contains("fix:"), "no fix after {l}");
    }

    let (code2, out, _) = run(&mut arca(&["doctor", "--json"]));
    assert_eq!(code2, code);
    let checks: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cg = checks.iter().find(|c| c["check"] == "cgroups").unwrap();
    assert!(cg["status"] == "ok" || cg["fix"].is_string(), "{cg}");
    assert!(checks.iter().all(|c| c["detail"].is_string()));
}

fn keys(home: &Path, args: &[&str]) -> (i32, String, String) {
    let mut c = arca(&["keys"]);
    c.args(args).env("ARCA_HOME", home);
    run(&mut c)
}

#[test]
fn keys_can_live_in_a_database_named_by_url() {
    // A cluster's database (PostgreSQL there; any URL arca api takes).
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let url = format!("sqlite:{}", dir.path().join("cluster/arca.db").display());
    let (code, first, err) = keys(&home, &["--database-url", &url, "create"]);
    assert_eq!(code, 0, "{err}");
    assert!(first.trim().starts_with("e2b_"));
    assert!(dir.path().join("cluster/arca.db").is_file());
    // Not the home's database: that one does not exist.
    assert!(!home.join("arca.db").exists());
    let (code, out, err) = keys(&home, &["--database-url", &url, "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("default")).count(),
        1,
        "{out}"
    );
    let (code, _, err) = keys(&home, &["list"]);
    assert_eq!(code, 2);
    assert!(err.contains("no Arca database"), "{err}");
}

#[test]
fn keys_create_list_revoke_on_a_fresh_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");

    // No database yet: list and revoke say how to get one.
    let (code, out, err) = keys(&home, &["list"]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.contains("no Arca database") && err.contains("arca keys create"),
        "{err}"
    );

    // The first key bootstraps the team and is saved like `arca up` does.
    let (code, first, err) = keys(&home, &["create"]);
    assert_eq!(code, 0, "{err}");
    let first = first.trim().to_string();
    assert!(first.starts_with("e2b_") && first.len() == 44, "{first}");
    assert!(err.contains("api_key"), "{err}");
    assert_eq!(
        std::fs::read_to_string(home.join("api_key"))
            .unwrap()
            .trim(),
        first
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(home.join("api_key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A second key, as JSON.
    let (code, out, _) = keys(&home, &["create", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let second = v["key"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(v["team"], "default");

    // An unknown team is "not found".
    let (code, out, err) = keys(&home, &["create", "--team", "nope"]);
    assert_eq!(code, 1);
    assert!(out.is_empty() && err.contains("nope"), "{err}");

    // Listing never shows a key, only masks.
    let (code, out, _) = keys(&home, &["list"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&first) && !out.contains(&second));
    assert!(out.contains(&first[..8]) && out.contains("active"), "{out}");
    let (_, out, _) = keys(&home, &["--json", "list"]);
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    let id = listed[1]["id"].as_str().unwrap().to_string();

    // Revoke one known and one unknown id: goes on, exit 1.
    let (code, _, err) = keys(&home, &["revoke", &id, "no-such-id"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("revoked {id}")) && err.contains("no-such-id"),
        "{err}"
    );
    let (_, out, _) = keys(&home, &["list", "--json"]);
    let revoked: Vec<bool> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["revoked"] == true)
        .collect();
    assert_eq!(revoked, [false, true]);
    let (code, _, _) = keys(&home, &["revoke", &id]);
    assert_eq!(code, 0, "revoking twice is fine");
}

#[test]
fn sandbox_commands_without_a_server_say_how_to_start_one() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let (code, out, err) = run(arca(&["sandbox", "list"])
        .env("E2B_API_URL", &url)
        .env("E2B_API_KEY", "e2b_00"));
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("arca up") && err.contains(&url), "{err}");

    // exec keeps 125 for its own failures.
    let (code, _, err) = run(arca(&["sandbox", "exec", "isomething", "--", "true"])
        .env("E2B_API_URL", &url)
        .env("E2B_API_KEY", "e2b_00"));
    assert_eq!(code, 125);
    assert!(err.contains("arca up"), "{err}");

    // No key anywhere: how to give one.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(arca(&["sandbox", "list"])
        .env("E2B_API_URL", &url)
        .env("ARCA_HOME", dir.path()));
    assert_eq!(code, 2);
    assert!(err.contains("E2B_API_KEY"), "{err}");

    // kill goes through every id even when each fails.
    let (code, _, err) = run(arca(&["sandbox", "kill", "ia", "ib"])
        .env("E2B_API_URL", &url)
        .env("E2B_API_KEY", "e2b_00"));
    assert_eq!(code, 2);
    assert_eq!(err.matches("cannot reach").count(), 2, "{err}");
}

#[test]
fn completion_scripts_are_generated() {
    let (code, out, _) = run(&mut arca(&["completion", "bash"]));
    assert_eq!(code, 0);
    assert!(out.contains("sandbox") && out.contains("doctor"));
}
