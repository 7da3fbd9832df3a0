//! Pulls from a real registry: Debian's `docker-registry` (distribution
//! 2.8) started by each test on 127.0.0.1 with storage in a tempdir, images
//! pushed by the test's own minimal client. Skips (saying why) when the
//! binary is missing; `ARCA_TEST_REGISTRY=1` turns that into a failure.
//! Nothing here talks to anything but 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod support;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use arca_image::ImageError;
use arca_image::registry::{Credentials, Platform, PullOptions, PullProgress, pull};
use arca_image::store::{LayerId, LayerStore};
use support::{Auth, Registry, SigningKey, TarBuilder, TestImage, TokenServer};

fn store() -> (tempfile::TempDir, LayerStore) {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = LayerStore::open(&tmp.path().join("layers")).unwrap();
    store.set_sync(false);
    (tmp, store)
}

fn opts() -> PullOptions {
    PullOptions {
        id_offset: support::offset(),
        platform: Platform::parse("linux/amd64").unwrap(),
        ..PullOptions::default()
    }
}

/// Collects progress events.
#[derive(Default)]
struct Events(Mutex<Vec<PullProgress>>);

impl Events {
    fn push(&self, p: PullProgress) {
        self.0.lock().unwrap().push(p);
    }
    fn take(&self) -> Vec<PullProgress> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The store holds nothing but committed layers: no temp dirs left.
fn assert_no_leftovers(store: &LayerStore) {
    let tmp: Vec<_> = fs::read_dir(store.root().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "leftovers in tmp: {tmp:?}");
}

fn two_layer_image() -> TestImage {
    let busybox = fs::read("/bin/busybox").unwrap_or_else(|_| b"#!/bin/true\n".to_vec());
    let base = TarBuilder::new()
        .dir("bin")
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .dir("etc")
        .file("etc/os-release", 0o644, b"ID=arca-test\n")
        .layer();
    let app = TarBuilder::new()
        .dir("srv")
        .owned_file("srv/app.txt", 1000, b"app data\n")
        .layer();
    TestImage::new(vec![base, app], "amd64", false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_tag_then_by_digest_from_the_cache() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::None);
    let image = two_layer_image();
    let digest = reg.push_image("test/simple", "v1", &image);
    let (_tmp, store) = store();
    let events = Events::default();

    let pulled = pull(
        &format!("{}/test/simple:v1", reg.addr),
        &opts(),
        &store,
        &|p| events.push(p),
    )
    .await
    .unwrap();
    assert_eq!(pulled.manifest_digest, digest);
    assert_eq!(pulled.index_digest, None);
    assert_eq!(pulled.reference, format!("{}/test/simple:v1", reg.addr));
    let want: Vec<LayerId> = image
        .layers
        .iter()
        .map(|l| LayerId::from_digest(&l.digest).unwrap())
        .collect();
    assert_eq!(pulled.layers, want);
    let c = &pulled.config;
    assert_eq!(
        c.cmd.as_deref(),
        Some(&["/bin/sh".to_owned(), "-c".to_owned(), "echo hi".to_owned()][..])
    );
    assert_eq!(c.entrypoint, None);
    assert!(
        c.env
            .contains(&("GREETING".to_owned(), "hello=world".to_owned()))
    );
    assert_eq!(c.workdir.as_deref(), Some("/srv"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    assert_eq!(c.exposed_ports, vec!["8080/tcp".to_owned()]);
    assert_eq!(
        c.labels.get("org.example").map(String::as_str),
        Some("arca")
    );

    let base = store.path(&pulled.layers[0]);
    let app = store.path(&pulled.layers[1]);
    assert_eq!(
        fs::read_link(base.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read(base.join("etc/os-release")).unwrap(),
        b"ID=arca-test\n"
    );
    assert_eq!(
        fs::metadata(base.join("bin/busybox")).unwrap().mode() & 0o7777,
        0o755
    );
    let off = support::offset();
    if support::is_root() {
        assert_eq!(fs::metadata(base.join("bin/busybox")).unwrap().uid(), off);
        assert_eq!(
            fs::metadata(&base).unwrap().uid(),
            off,
            "layer roots belong to the shifted root"
        );
        assert_eq!(
            fs::metadata(app.join("srv/app.txt")).unwrap().uid(),
            off + 1000
        );
    }
    let meta = store.meta(&pulled.layers[1]).unwrap().unwrap();
    assert_eq!(
        meta.diff_id.as_deref(),
        Some(image.layers[1].diff_id.as_str())
    );
    assert_eq!(meta.id_offset, Some(off));
    let ev = events.take();
    assert!(
        matches!(&ev[0], PullProgress::Resolved { layers: 2, .. }),
        "{ev:?}"
    );
    let done = ev
        .iter()
        .filter(|e| matches!(e, PullProgress::LayerDone { .. }))
        .count();
    assert_eq!(done, 2, "{ev:?}");
    assert_no_leftovers(&store);

    // By digest: same image, nothing downloaded again.
    let by_digest = format!("{}/test/simple@{digest}", reg.addr);
    let again = pull(&by_digest, &opts(), &store, &|p| events.push(p))
        .await
        .unwrap();
    assert_eq!(again.layers, pulled.layers);
    assert_eq!(again.manifest_digest, digest);
    let ev = events.take();
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, PullProgress::LayerCached { .. }))
            .count(),
        2,
        "{ev:?}"
    );
    assert!(
        !ev.iter()
            .any(|e| matches!(e, PullProgress::Downloading { .. })),
        "{ev:?}"
    );

    // Unknown images name the reference and the registry.
    for missing in ["test/simple:nope", "test/missing:v1"] {
        let err = pull(&format!("{}/{missing}", reg.addr), &opts(), &store, &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::ManifestUnknown { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(missing) && msg.contains(&reg.addr) && msg.contains("manifest unknown"),
            "{msg}"
        );
    }
    // A digest that does not exist.
    let zero = format!("{}/test/simple@sha256:{}", reg.addr, "0".repeat(64));
    let err = pull(&zero, &opts(), &store, &|_| {}).await.unwrap_err();
    assert!(matches!(err, ImageError::ManifestUnknown { .. }), "{err:?}");

    // A registry that is not there: the error names it.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = pull(&format!("127.0.0.1:{gone}/x:1"), &opts(), &store, &|_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::RegistryUnreachable { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{gone}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_gives_the_wanted_platform() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::None);
    let mut entries = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let layer = TarBuilder::new()
            .file("arch", 0o644, arch.as_bytes())
            .layer();
        let image = TestImage::new(vec![layer], arch, true);
        let d = reg.push_image("test/multi", &format!("only-{arch}"), &image);
        entries.push((d, image.manifest.len(), "linux", arch, variant));
    }
    // An attestation-style entry that must never be chosen.
    let att = TestImage::new(
        vec![TarBuilder::new().file("att", 0o644, b"x").layer()],
        "unknown",
        true,
    );
    let att_digest = reg.push_image("test/multi", "att", &att);
    entries.insert(
        0,
        (att_digest, att.manifest.len(), "unknown", "unknown", None),
    );
    let index = support::index(&entries);
    let index_digest = reg.push_manifest("test/multi", "latest", support::OCI_INDEX, &index);
    let (_tmp, store) = store();
    let reference = format!("{}/test/multi", reg.addr);

    for (platform, want_entry, content) in
        [("linux/amd64", 1, "amd64"), ("linux/arm64", 2, "arm64")]
    {
        let mut o = opts();
        o.platform = Platform::parse(platform).unwrap();
        let pulled = pull(&reference, &o, &store, &|_| {}).await.unwrap();
        assert_eq!(pulled.index_digest.as_deref(), Some(index_digest.as_str()));
        assert_eq!(pulled.manifest_digest, entries[want_entry].0);
        assert_eq!(pulled.config.architecture, content);
        let top = store.path(pulled.layers.last().unwrap());
        assert_eq!(fs::read_to_string(top.join("arch")).unwrap(), content);
    }
    let mut o = opts();
    o.platform = Platform::parse("linux/s390x").unwrap();
    let err = pull(&reference, &o, &store, &|_| {}).await.unwrap_err();
    assert!(
        matches!(err, ImageError::NoMatchingPlatform { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/arm64/v8"),
        "{msg}"
    );
    assert_no_leftovers(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_layers_delete_and_replace_in_overlay_format() {
    if !support::have_registry() {
        return;
    }
    if !support::is_root() {
        eprintln!("skipped: opaque directories (trusted.* xattrs) and overlay mounts need root");
        return;
    }
    let reg = Registry::start(Auth::None);
    let lower = TarBuilder::new()
        .dir("etc")
        .file("etc/deleted", 0o644, b"old")
        .file("etc/kept", 0o644, b"kept")
        .dir("var")
        .dir("var/cache")
        .file("var/cache/old", 0o644, b"old")
        .dir("var/cache/olddir")
        .file("var/cache/olddir/x", 0o644, b"x")
        .layer();
    let upper = TarBuilder::new()
        .dir("etc")
        .file("etc/.wh.deleted", 0o644, b"")
        .dir("var/cache")
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/new", 0o644, b"new")
        .layer();
    let image = TestImage::new(vec![lower, upper], "amd64", true);
    reg.push_image("test/layers", "v1", &image);
    let (tmp, store) = store();
    let pulled = pull(
        &format!("{}/test/layers:v1", reg.addr),
        &opts(),
        &store,
        &|_| {},
    )
    .await
    .unwrap();
    let top = store.path(&pulled.layers[1]);
    let wh = fs::symlink_metadata(top.join("etc/deleted")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "a 0:0 whiteout"
    );
    assert!(!top.join("etc/.wh.deleted").exists());
    let mut buf = [0u8; 4];
    let n = rustix::fs::lgetxattr(
        top.join("var/cache"),
        "trusted.overlay.opaque",
        &mut buf[..],
    )
    .unwrap();
    assert_eq!(&buf[..n], b"y");
    assert!(!top.join("var/cache/.wh..wh..opq").exists());

    // What a sandbox would see: mount the layers as overlayfs.
    let lowerdir = pulled
        .layers
        .iter()
        .rev()
        .map(|id| store.path(id).display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = nix::mount::mount(
        Some("overlay"),
        &mnt,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={lowerdir}").as_str()),
    );
    if mounted.is_ok() {
        let seen = {
            let etc: HashSet<String> = fs::read_dir(mnt.join("etc"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            let cache: HashSet<String> = fs::read_dir(mnt.join("var/cache"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            (etc, cache)
        };
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(seen.0, HashSet::from(["kept".to_owned()]));
        assert_eq!(seen.1, HashSet::from(["new".to_owned()]));
    } else {
        eprintln!("overlay mount not possible here ({mounted:?}); checked the on-disk format only");
    }

    // The same stack flattened into an ext4 image, ids moved back.
    let layers: Vec<_> = pulled
        .layers
        .iter()
        .rev()
        .map(|id| store.path(id))
        .collect();
    let flat = tmp.path().join("flat");
    fs::create_dir(&flat).unwrap();
    arca_image::flatten(&layers, &flat, 100_000).unwrap();
    let names = |p: &Path| -> HashSet<String> {
        fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert_eq!(names(&flat.join("etc")), HashSet::from(["kept".to_owned()]));
    assert_eq!(
        names(&flat.join("var/cache")),
        HashSet::from(["new".to_owned()])
    );
    assert_eq!(fs::metadata(flat.join("etc/kept")).unwrap().uid(), 0);
    assert!(
        rustix::fs::lgetxattr(
            flat.join("var/cache"),
            "trusted.overlay.opaque",
            &mut buf[..]
        )
        .is_err()
    );
    let img = tmp.path().join("rootfs.ext4");
    arca_image::export_ext4(&layers, &img, 0).unwrap();
    let ls = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /var/cache"])
        .arg(&img)
        .output();
    if let Ok(out) = ls {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("new") && !text.contains("olddir"), "{text}");
    }
    assert_no_leftovers(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_needs_the_right_credentials() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::Htpasswd {
        user: "alice".to_owned(),
        password: "s3cret".to_owned(),
    });
    let digest = reg.push_image("test/private", "v1", &two_layer_image());
    let reference = format!("{}/test/private:v1", reg.addr);
    let (_tmp, store) = store();

    let err = pull(&reference, &opts(), &store, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("none were given"), "{err}");

    let mut wrong = opts();
    wrong.auth = Some(Credentials::new("alice", "wrong"));
    let err = pull(&reference, &wrong, &store, &|_| {}).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("not accepted"), "{err}");
    assert!(store.list().unwrap().is_empty());

    let mut right = opts();
    right.auth = Some(Credentials::new("alice", "s3cret"));
    let pulled = pull(&reference, &right, &store, &|_| {}).await.unwrap();
    assert_eq!(pulled.manifest_digest, digest);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_layer_is_not_given_to_another_repository_by_digest() {
    if !support::have_registry() {
        return;
    }
    // The layers of a private image are in the store after an authorised pull.
    let private = Registry::start(Auth::Htpasswd {
        user: "alice".to_owned(),
        password: "s3cret".to_owned(),
    });
    let image = two_layer_image();
    private.push_image("team-a/secret", "v1", &image);
    let (_tmp, store) = store();
    let mut alice = opts();
    alice.auth = Some(Credentials::new("alice", "s3cret"));
    pull(
        &format!("{}/team-a/secret:v1", private.addr),
        &alice,
        &store,
        &|_| {},
    )
    .await
    .unwrap();
    // Another registry serves a manifest naming the same layers, but it
    // does not have (or let anyone read) their blobs.
    let other = Registry::start(Auth::None);
    other.push_image("team-b/thief", "v1", &image);
    for l in &image.layers {
        fs::remove_file(other.blob_path(&l.digest)).unwrap();
    }
    let err = pull(
        &format!("{}/team-b/thief:v1", other.addr),
        &opts(),
        &store,
        &|_| {},
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains(&image.layers[0].digest)
            || matches!(err, ImageError::Layer { .. }),
        "{err}"
    );
    // The same repository is trusted with its own cached layers.
    pull(
        &format!("{}/team-a/secret:v1", private.addr),
        &alice,
        &store,
        &|_| {},
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_come_from_the_realm() {
    if !support::have_registry() {
        return;
    }
    let Some(key) = SigningKey::new() else {
        eprintln!("skipped: the openssl CLI could not make a signing key");
        return;
    };
    let key = Arc::new(key);
    let (issuer, service) = ("arca-test-issuer", "arca-test-registry");
    let tokens = TokenServer::start(key.clone(), issuer, "bob", "hunter2");
    let mut reg = Registry::start(Auth::Token {
        realm: tokens.realm(),
        service: service.to_owned(),
        issuer: issuer.to_owned(),
        cert: key.cert(),
    });
    let push = key.mint(
        issuer,
        service,
        "bob",
        &[(
            "test/tok".to_owned(),
            vec!["pull".to_owned(), "push".to_owned()],
        )],
    );
    reg.push_auth = Some(format!("Bearer {push}"));
    let digest = reg.push_image("test/tok", "v1", &two_layer_image());
    let reference = format!("{}/test/tok:v1", reg.addr);
    let (_tmp, store) = store();

    let err = pull(&reference, &opts(), &store, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("token server") && msg.contains("none were given"),
        "{msg}"
    );
    let asked = tokens.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked >= 1);

    let mut o = opts();
    o.auth = Some(Credentials::new("bob", "hunter2"));
    let pulled = pull(&reference, &o, &store, &|_| {}).await.unwrap();
    assert_eq!(pulled.manifest_digest, digest);
    assert!(tokens.requests.load(std::sync::atomic::Ordering::SeqCst) > asked);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_without_leftovers() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::None);
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"untouched").unwrap();
    let target = outside.path().display().to_string();
    let good = TarBuilder::new().file("ok", 0o644, b"fine").layer();
    let hostile = [
        (
            "dotdot",
            TarBuilder::new()
                .file("a", 0o644, b"x")
                .raw_file("../escape", b"evil")
                .layer(),
            "../escape",
        ),
        (
            "symlink",
            TarBuilder::new()
                .raw_symlink("a", &target)
                .raw_file("a/secret", b"evil")
                .layer(),
            "a/secret",
        ),
        (
            "etc",
            TarBuilder::new()
                .raw_symlink("a", "/etc")
                .raw_file("a/passwd", b"evil")
                .layer(),
            "a/passwd",
        ),
    ];
    let (_tmp, store) = store();
    for (name, layer, entry) in hostile {
        let good = support::Layer::from_tar(good.tar.clone());
        let image = TestImage::new(vec![good, layer], "amd64", false);
        let bad_digest = image.layers[1].digest.clone();
        reg.push_image(&format!("test/{name}"), "v1", &image);
        let err = pull(
            &format!("{}/test/{name}:v1", reg.addr),
            &opts(),
            &store,
            &|_| {},
        )
        .await
        .unwrap_err();
        match &err {
            ImageError::Layer { digest, source } => {
                assert_eq!(digest, &bad_digest);
                assert!(
                    matches!(&**source, ImageError::UnsafeEntry { entry: e, .. } if e == entry),
                    "{source:?}"
                );
            }
            other => panic!("{name}: expected a refused layer, got {other:?}"),
        }
        assert!(!store.contains(&LayerId::from_digest(&bad_digest).unwrap()));
        assert_no_leftovers(&store);
    }
    assert_eq!(
        fs::read(outside.path().join("secret")).unwrap(),
        b"untouched"
    );
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
    assert!(!fs::read_to_string("/etc/passwd").unwrap().contains("evil"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_does_not_match_its_digest_is_refused() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::None);
    let (_tmp, store) = store();

    // A layer blob changed in the registry's storage (same size).
    let image = TestImage::new(
        vec![TarBuilder::new().file("f", 0o644, b"original").layer()],
        "amd64",
        false,
    );
    let layer_digest = image.layers[0].digest.clone();
    reg.push_image("test/tampered", "v1", &image);
    let blob = reg.blob_path(&layer_digest);
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let err = pull(
        &format!("{}/test/tampered:v1", reg.addr),
        &opts(),
        &store,
        &|_| {},
    )
    .await
    .unwrap_err();
    match &err {
        ImageError::Layer { source, .. } => {
            assert!(
                matches!(&**source, ImageError::DigestMismatch { .. }),
                "{source:?}"
            );
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(store.list().unwrap().is_empty());
    assert_no_leftovers(&store);

    // A config that lies about the uncompressed layer (diff_id).
    let layer = TarBuilder::new().file("g", 0o644, b"data").layer();
    let image = TestImage::with_diff_ids(
        vec![layer],
        "amd64",
        true,
        Some(vec![format!("sha256:{}", "1".repeat(64))]),
    );
    reg.push_image("test/diffid", "v1", &image);
    let err = pull(
        &format!("{}/test/diffid:v1", reg.addr),
        &opts(),
        &store,
        &|_| {},
    )
    .await
    .unwrap_err();
    match &err {
        ImageError::Layer { source, .. } => {
            assert!(
                matches!(&**source, ImageError::DigestMismatch { what, .. } if what.contains("diff_id")),
                "{source:?}"
            );
        }
        other => panic!("expected a diff_id mismatch, got {other:?}"),
    }
    assert!(store.list().unwrap().is_empty());
    assert_no_leftovers(&store);

    // A manifest pulled by digest whose stored bytes changed.
    let image = TestImage::new(
        vec![TarBuilder::new().file("h", 0o644, b"m").layer()],
        "amd64",
        false,
    );
    let manifest_digest = reg.push_image("test/manifest", "v1", &image);
    let blob = reg.blob_path(&manifest_digest);
    let text = fs::read_to_string(&blob)
        .unwrap()
        .replace("\"schemaVersion\":2", "\"schemaVersion\":2 ");
    fs::write(&blob, text).unwrap();
    let err = pull(
        &format!("{}/test/manifest@{manifest_digest}", reg.addr),
        &opts(),
        &store,
        &|_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_references_go_to_the_mirror() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::None);
    let image = TestImage::new(
        vec![TarBuilder::new().file("m", 0o644, b"mirrored").layer()],
        "amd64",
        false,
    );
    let digest = reg.push_image("library/mirrored", "v1", &image);
    let (_tmp, store) = store();
    let mut o = opts();
    o.mirror = Some(reg.url());
    let pulled = pull("mirrored:v1", &o, &store, &|_| {}).await.unwrap();
    assert_eq!(pulled.reference, "docker.io/library/mirrored:v1");
    assert_eq!(pulled.manifest_digest, digest);
    let err = pull("docker.io/library/absent:v1", &o, &store, &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("mirror of docker.io"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_what_images_use() {
    if !support::have_registry() {
        return;
    }
    let reg = Registry::start(Auth::None);
    let shared = TarBuilder::new().file("shared", 0o644, b"s").layer();
    let a = TestImage::new(
        vec![
            support::Layer::from_tar(shared.tar.clone()),
            TarBuilder::new().file("a", 0o644, b"a").layer(),
        ],
        "amd64",
        false,
    );
    let b = TestImage::new(
        vec![shared, TarBuilder::new().file("b", 0o644, b"b").layer()],
        "amd64",
        false,
    );
    reg.push_image("test/a", "v1", &a);
    reg.push_image("test/b", "v1", &b);
    let (_tmp, store) = store();
    let pa = pull(&format!("{}/test/a:v1", reg.addr), &opts(), &store, &|_| {})
        .await
        .unwrap();
    let pb = pull(&format!("{}/test/b:v1", reg.addr), &opts(), &store, &|_| {})
        .await
        .unwrap();
    assert_eq!(
        pa.layers[0], pb.layers[0],
        "the shared layer is stored once"
    );
    assert_eq!(store.list().unwrap().len(), 3);
    let keep: HashSet<LayerId> = pb.layers.iter().cloned().collect();
    let stats = store.gc(&keep).unwrap();
    assert_eq!(stats.layers_removed, 1);
    assert!(!store.contains(&pa.layers[1]));
    assert!(store.contains(&pa.layers[0]));
    // Pulling again restores only what GC removed.
    let events = Events::default();
    pull(&format!("{}/test/a:v1", reg.addr), &opts(), &store, &|p| {
        events.push(p)
    })
    .await
    .unwrap();
    let ev = events.take();
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, PullProgress::LayerCached { .. }))
            .count(),
        1,
        "{ev:?}"
    );
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, PullProgress::LayerDone { .. }))
            .count(),
        1,
        "{ev:?}"
    );
}
