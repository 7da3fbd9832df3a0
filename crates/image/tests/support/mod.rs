//! Test support: a real `docker-registry` on 127.0.0.1 (killed by pid on
//! drop), a minimal push client, image builders, and a bearer-token server
//! that signs JWTs with a key the `openssl` CLI makes.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sha2::{Digest, Sha256};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Whether the registry binary is there; prints why a test skips if not.
pub fn have_registry() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    assert!(
        std::env::var("ARCA_TEST_REGISTRY").as_deref() != Ok("1"),
        "ARCA_TEST_REGISTRY=1 but {REGISTRY_BIN} is missing"
    );
    eprintln!(
        "skipped: {REGISTRY_BIN} missing (apt-get install docker-registry; scripts/setup.sh does)"
    );
    false
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The id offset tests unpack with: Arca's when root, none otherwise.
pub fn offset() -> u32 {
    if is_root() { 100_000 } else { 0 }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the registry authenticates.
pub enum Auth {
    None,
    Htpasswd {
        user: String,
        password: String,
    },
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert: PathBuf,
    },
}

/// A running `docker-registry serve`, killed (by its pid) on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    /// Authorization header value the push client sends.
    pub push_auth: Option<String>,
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let mut push_auth = None;
        let auth_yaml = match auth {
            Auth::None => String::new(),
            Auth::Htpasswd { user, password } => {
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{user}:{}\n", bcrypt(&password))).unwrap();
                push_auth = Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                ));
                format!(
                    "auth:\n  htpasswd:\n    realm: arca-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token {
                realm,
                service,
                issuer,
                cert,
            } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                cert.display()
            ),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: arca-test-secret\n{auth_yaml}",
            data.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut reg = Registry {
            child,
            addr,
            dir,
            push_auth,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = reg.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", reg.log());
            }
            if TcpStream::connect(&reg.addr).is_ok() {
                let (status, _, _) = http(&reg.addr, "GET", "/v2/", &[], b"");
                if status == 200 || status == 401 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "registry did not come up: {}",
                reg.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Path of a blob in the registry's filesystem storage (for tampering).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    fn headers(&self, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let mut h: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        if let Some(a) = &self.push_auth {
            h.push(("Authorization".to_owned(), a.clone()));
        }
        h
    }

    /// Uploads a blob (POST, then monolithic PUT); returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let h = self.headers(&[]);
        let h: Vec<(&str, String)> = h.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (status, headers, body) = http(
            &self.addr,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &h,
            b"",
        );
        assert_eq!(
            status,
            202,
            "start upload: {}",
            String::from_utf8_lossy(&body)
        );
        let location = header(&headers, "location").unwrap();
        let path = location
            .strip_prefix(&format!("http://{}", self.addr))
            .unwrap_or(&location)
            .to_owned();
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut h2 = h.clone();
        h2.push(("Content-Type", "application/octet-stream".to_owned()));
        let (status, _, body) = http(
            &self.addr,
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &h2,
            bytes,
        );
        assert_eq!(
            status,
            201,
            "finish upload: {}",
            String::from_utf8_lossy(&body)
        );
        digest
    }

    /// PUTs a manifest under `reference` (tag or digest); returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let h = self.headers(&[("Content-Type", media_type.to_owned())]);
        let h: Vec<(&str, String)> = h.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (status, _, body) = http(
            &self.addr,
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &h,
            bytes,
        );
        assert_eq!(
            status,
            201,
            "put manifest: {}",
            String::from_utf8_lossy(&body)
        );
        sha256(bytes)
    }

    /// Pushes a single-platform image; returns its manifest digest.
    pub fn push_image(&self, repo: &str, tag: &str, image: &TestImage) -> String {
        for layer in &image.layers {
            self.push_blob(repo, &layer.gz);
        }
        self.push_blob(repo, &image.config);
        self.push_manifest(repo, tag, &image.manifest_type, &image.manifest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Child::kill signals exactly this pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..eol]).into_owned();
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
    out
}

/// A bcrypt hash for htpasswd: `htpasswd -B` (apache2-utils), else python3's crypt.
fn bcrypt(password: &str) -> String {
    if let Ok(out) = Command::new("htpasswd")
        .args(["-nbB", "u", password])
        .output()
    {
        if out.status.success() {
            let text = String::from_utf8(out.stdout).unwrap();
            return text.trim().strip_prefix("u:").unwrap().to_owned();
        }
    }
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .expect("neither htpasswd (apache2-utils) nor python3 to make a bcrypt hash");
    assert!(
        out.status.success(),
        "python3 crypt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A layer: its tar, gzipped blob, and digests.
pub struct Layer {
    pub tar: Vec<u8>,
    pub gz: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
}

impl Layer {
    pub fn from_tar(tar: Vec<u8>) -> Layer {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&tar).unwrap();
        let gz = enc.finish().unwrap();
        Layer {
            digest: sha256(&gz),
            diff_id: sha256(&tar),
            tar,
            gz,
        }
    }
}

/// Builds a layer tar with proper headers (uid/gid 0, fixed mtime).
pub struct TarBuilder(tar::Builder<Vec<u8>>);

impl TarBuilder {
    pub fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    pub fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, &b""[..]).unwrap();
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn owned_file(mut self, path: &str, uid: u64, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(uid);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    /// An entry with an unchecked raw name (for hostile layers).
    pub fn raw_file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn raw_symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname = [0; 100];
        old.linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.0.append(&h, &b""[..]).unwrap();
        self
    }

    pub fn layer(self) -> Layer {
        Layer::from_tar(self.0.into_inner().unwrap())
    }
}

/// A single-platform image ready to push.
pub struct TestImage {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub manifest_type: String,
}

impl TestImage {
    /// An image with a Docker v2 schema 2 (`oci = false`) or OCI manifest.
    pub fn new(layers: Vec<Layer>, arch: &str, oci: bool) -> TestImage {
        Self::with_diff_ids(layers, arch, oci, None)
    }

    /// Like `new`, with the config's diff_ids overridden.
    pub fn with_diff_ids(
        layers: Vec<Layer>,
        arch: &str,
        oci: bool,
        diff_ids: Option<Vec<String>>,
    ) -> TestImage {
        let diff_ids =
            diff_ids.unwrap_or_else(|| layers.iter().map(|l| l.diff_id.clone()).collect());
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin:/bin", "GREETING=hello=world"],
                "Cmd": ["/bin/sh", "-c", "echo hi"],
                "Entrypoint": null,
                "WorkingDir": "/srv",
                "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}},
                "Labels": {"org.example": "arca"}
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        }))
        .unwrap();
        let (mt, ct, lt) = if oci {
            (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
        } else {
            (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": ct, "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": lt, "digest": l.digest, "size": l.gz.len()
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        TestImage {
            layers,
            config,
            manifest,
            manifest_type: mt.to_owned(),
        }
    }
}

/// An OCI index over pushed manifests: (digest, size, os, arch, variant).
pub fn index(entries: &[(String, usize, &str, &str, Option<&str>)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries.iter().map(|(d, size, os, arch, variant)| {
            let mut p = serde_json::json!({"os": os, "architecture": arch});
            if let Some(v) = variant {
                p["variant"] = serde_json::json!(v);
            }
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": size, "platform": p})
        }).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// An RSA key and self-signed certificate made with the openssl CLI.
pub struct SigningKey {
    pub dir: tempfile::TempDir,
    pub x5c: String,
}

impl SigningKey {
    pub fn new() -> Option<SigningKey> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=arca-test-token",
            ])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(dir.path().join("cert.pem"))
            .output()
            .ok()?;
        if !der.status.success() {
            return None;
        }
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
        Some(SigningKey { dir, x5c })
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// An RS256 JWT the registry accepts for `access` (repository, actions).
    pub fn mint(
        &self,
        issuer: &str,
        service: &str,
        subject: &str,
        access: &[(String, Vec<String>)],
    ) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": issuer, "sub": subject, "aud": service,
            "exp": now + 600, "nbf": now - 60, "iat": now,
            "jti": format!("{now}-{}", rand_u64()),
            "access": access.iter().map(|(name, actions)| serde_json::json!({
                "type": "repository", "name": name, "actions": actions
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header).unwrap()),
            b64(&serde_json::to_vec(&claims).unwrap())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.dir.path().join("key.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        format!("{signing_input}.{}", b64(&out.stdout))
    }
}

fn rand_u64() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(t) ^ u64::from(std::process::id())
}

/// A token server on 127.0.0.1 (its own thread, blocking std I/O): issues
/// JWTs for the requested scope to `user:password` (basic auth), 401 otherwise.
pub struct TokenServer {
    pub port: u16,
    pub requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    pub fn start(key: Arc<SigningKey>, issuer: &str, user: &str, password: &str) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (issuer, user) = (issuer.to_owned(), user.to_owned());
        let (req_count, stop2) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                req_count.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                let authorized = head
                    .split("\r\n")
                    .filter_map(|l| l.split_once(':'))
                    .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == expected);
                let (status, body) = if authorized {
                    let query = target.split_once('?').map_or("", |(_, q)| q);
                    let mut service = String::new();
                    let mut access = Vec::new();
                    for pair in query.split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        let v = percent_decode(v);
                        match k {
                            "service" => service = v,
                            "scope" => {
                                let parts: Vec<&str> = v.split(':').collect();
                                if parts.len() == 3 && parts[0] == "repository" {
                                    access.push((
                                        parts[1].to_owned(),
                                        parts[2].split(',').map(str::to_owned).collect(),
                                    ));
                                }
                            }
                            _ => {}
                        }
                    }
                    let token = key.mint(&issuer, &service, &user, &access);
                    (
                        "200 OK",
                        serde_json::json!({"token": token, "expires_in": 600}).to_string(),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#
                            .to_owned(),
                    )
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
