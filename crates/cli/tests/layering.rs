//! The crate edges of ARCHITECTURE.md section 2: every `arca-*` dependency
//! of every crate must be in this table; a new edge needs an ADR first.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

/// crate directory -> the arca crates it may depend on.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("proto", &[][..]),
        ("envd", &["proto"][..]),
        ("runtime", &[][..]),
        // ADR 0005: net compiles the egress policy arca-proto defines;
        // egress (the node's DNS forwarder and name checks) is new.
        ("net", &["proto"][..]),
        ("egress", &["proto"][..]),
        ("image", &[][..]),
        ("template", &["image"][..]),
        (
            "node",
            &["runtime", "net", "egress", "image", "template", "proto"][..],
        ),
        ("proxy", &["proto"][..]),
        ("api", &["proto"][..]),
        ("sdk", &["proto"][..]),
        (
            "cli",
            &[
                "proto", "runtime", "net", "image", "template", "node", "proxy", "api", "sdk",
            ][..],
        ),
    ])
}

/// `arca-*` names in the `[dependencies]` table of a manifest (dev and
/// build dependencies may reach further: tests drive other crates).
fn arca_deps(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps {
            if let Some(name) = line
                .split(['=', '.', ' '])
                .next()
                .and_then(|n| n.strip_prefix("arca-"))
            {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[test]
fn every_crate_edge_is_one_the_architecture_allows() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let table = allowed();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&crates).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.is_file() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let allowed = table.get(name.as_str()).unwrap_or_else(|| {
            panic!("crate {name} is not in the architecture's table: add it by ADR")
        });
        for dep in arca_deps(&std::fs::read_to_string(&manifest).unwrap()) {
            assert!(
                allowed.contains(&dep.as_str()),
                "{name} depends on arca-{dep}, an edge ARCHITECTURE.md does not allow"
            );
        }
        seen.push(name);
    }
    assert!(seen.len() >= 10, "read only {seen:?}");
}

#[test]
fn the_parser_reads_only_the_dependencies_table() {
    let m = "[package]\nname = \"arca-x\"\n[dependencies]\narca-proto.workspace = true\narca-net = { path = \"../net\" }\nserde = \"1\"\n[dev-dependencies]\narca-api = { path = \"../api\" }\n";
    assert_eq!(arca_deps(m), vec!["proto".to_string(), "net".to_string()]);
}
