//! End-to-end tests of the `arca-envd` binary over real sockets: protocol
//! details the SDK suites do not reach (binary codec, h2c, client streams,
//! token and signature checks) and the PID 1 duties. They need root, as envd
//! runs processes as other users; without root they say so and skip.

#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arca_proto::connect::{Codec, FLAG_END_STREAM, decode_stream, envelope};
use arca_proto::process::{
    ProcessConfig, ProcessEvent, ProcessInput, ProcessSelector, StartRequest, StartResponse,
    StreamInputRequest, process_event, process_input, process_selector, stream_input_request,
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Envd {
    child: Child,
    port: u16,
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            assert!(
                std::env::var("ARCA_TEST_PRIVILEGED").as_deref() != Ok("1"),
                "ARCA_TEST_PRIVILEGED=1 but not running as root"
            );
            eprintln!("skipped: envd end-to-end tests need root (run as root or in CI)");
            return;
        }
    };
}

fn start_envd() -> Envd {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_arca-envd"))
        .args(["--port", &port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("start arca-envd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "envd did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Envd { child, port }
}

type Resp = (u16, http::HeaderMap, Bytes);

async fn post(
    port: u16,
    path: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    h2: bool,
) -> Resp {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http::<Full<Bytes>>();
    let mut req = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", content_type);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body)).expect("request"))
        .await
        .expect("send request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

async fn get(port: u16, path: &str) -> Resp {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = client
        .request(
            http::Request::get(format!("http://127.0.0.1:{port}{path}"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("send request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

fn bash(cmd: &str) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), cmd.into()],
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

/// Output and end event of a whole `Start` stream.
fn summarize(events: &[StartResponse]) -> (String, Option<process_event::EndEvent>) {
    let mut out = String::new();
    let mut end = None;
    for e in events {
        match e.event.as_ref().and_then(|e| e.event.clone()) {
            Some(process_event::Event::Data(d)) => {
                if let Some(process_event::data_event::Output::Stdout(b)) = d.output {
                    out.push_str(&String::from_utf8_lossy(&b));
                }
            }
            Some(process_event::Event::End(e)) => end = Some(e),
            _ => {}
        }
    }
    (out, end)
}

async fn run(port: u16, codec: Codec, req: &StartRequest, h2: bool) -> Vec<StartResponse> {
    let (status, headers, body) = post(
        port,
        "/process.Process/Start",
        codec.stream_content_type(),
        &[],
        envelope(0, &codec.encode(req)),
        h2,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], codec.stream_content_type());
    let (events, result) = decode_stream::<StartResponse>(codec, &body);
    result.expect("stream ends without error");
    events
}

#[tokio::test]
async fn start_streams_start_first_then_output_then_end_in_both_codecs() {
    require_root!();
    let envd = start_envd();
    for codec in [Codec::Json, Codec::Proto] {
        let events = run(envd.port, codec, &bash("echo hello; exit 3"), false).await;
        let first = events[0].event.as_ref().and_then(|e| e.event.clone());
        assert!(
            matches!(first, Some(process_event::Event::Start(ref s)) if s.pid > 0),
            "first event must be start, got {first:?}"
        );
        let (out, end) = summarize(&events);
        assert_eq!(out, "hello\n");
        let end = end.expect("an end event");
        assert_eq!((end.exit_code, end.exited), (3, true));
        assert_eq!(end.status, "exit status 3");
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    require_root!();
    let envd = start_envd();
    let events = run(envd.port, Codec::Json, &bash("echo over-h2"), true).await;
    assert_eq!(summarize(&events).0, "over-h2\n");
    let (status, headers, body) = post(
        envd.port,
        "/filesystem.Filesystem/Stat",
        "application/json",
        &[],
        Bytes::from_static(br#"{"path":"/"}"#),
        true,
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["entry"]["type"], "FILE_TYPE_DIRECTORY");
}

#[tokio::test]
async fn unary_errors_carry_connect_codes_and_statuses() {
    require_root!();
    let envd = start_envd();
    let (status, _, body) = post(
        envd.port,
        "/filesystem.Filesystem/Stat",
        "application/json",
        &[],
        Bytes::from_static(br#"{"path":"/definitely/not/here"}"#),
        false,
    )
    .await;
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "not_found");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("/definitely/not/here")
    );

    let (status, _, _) = post(
        envd.port,
        "/process.Process/Nope",
        "application/json",
        &[],
        Bytes::from_static(b"{}"),
        false,
    )
    .await;
    assert_eq!(status, 501);
    let (status, _, _) = post(
        envd.port,
        "/process.Process/List",
        "text/plain",
        &[],
        Bytes::from_static(b"{}"),
        false,
    )
    .await;
    assert_eq!(status, 415);
    // An unknown user is refused before anything runs, as a stream error.
    let (status, _, body) = post(
        envd.port,
        "/process.Process/Start",
        "application/connect+json",
        &[("authorization", "Basic bm9ib2R5LWhlcmU6")], // "nobody-here:"
        envelope(0, &Codec::Json.encode(&bash("true"))),
        false,
    )
    .await;
    assert_eq!(status, 200);
    let (events, result) = decode_stream::<StartResponse>(Codec::Json, &body);
    assert!(events.is_empty());
    let err = result.unwrap_err();
    assert_eq!(err.code(), arca_proto::connect::Code::Unauthenticated);
    assert!(err.message().contains("nobody-here"));
}

#[tokio::test]
async fn stream_input_feeds_stdin_in_order() {
    require_root!();
    let envd = start_envd();
    let port = envd.port;
    let mut req = bash("cat");
    req.stdin = Some(true);
    req.tag = Some("catter".into());
    let start = tokio::spawn(async move { run(port, Codec::Json, &req, false).await });
    // Wait until the tagged process exists.
    let sel = ProcessSelector {
        selector: Some(process_selector::Selector::Tag("catter".into())),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, body) = post(
            port,
            "/process.Process/List",
            "application/json",
            &[],
            Bytes::from_static(b"{}"),
            false,
        )
        .await;
        if String::from_utf8_lossy(&body).contains("catter") {
            break;
        }
        assert!(Instant::now() < deadline, "tagged process never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut wire = Vec::new();
    let msgs = [
        stream_input_request::Event::Start(stream_input_request::StartEvent {
            process: Some(sel.clone()),
        }),
        stream_input_request::Event::Data(stream_input_request::DataEvent {
            input: Some(ProcessInput {
                input: Some(process_input::Input::Stdin(b"one ".to_vec())),
            }),
        }),
        stream_input_request::Event::Keepalive(stream_input_request::KeepAlive {}),
        stream_input_request::Event::Data(stream_input_request::DataEvent {
            input: Some(ProcessInput {
                input: Some(process_input::Input::Stdin(b"two\n".to_vec())),
            }),
        }),
    ];
    for m in msgs {
        let msg = StreamInputRequest { event: Some(m) };
        wire.extend_from_slice(&envelope(0, &Codec::Json.encode(&msg)));
    }
    wire.extend_from_slice(&envelope(FLAG_END_STREAM, b"{}"));
    let (status, headers, body) = post(
        port,
        "/process.Process/StreamInput",
        "application/connect+json",
        &[],
        Bytes::from(wire),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/connect+json");
    let (resp, result) =
        decode_stream::<arca_proto::process::StreamInputResponse>(Codec::Json, &body);
    result.expect("StreamInput succeeds");
    assert_eq!(resp.len(), 1);
    let close = r#"{"process":{"tag":"catter"}}"#.to_string();
    let (status, _, _) = post(
        port,
        "/process.Process/CloseStdin",
        "application/json",
        &[],
        Bytes::from(close),
        false,
    )
    .await;
    assert_eq!(status, 200);
    let events = start.await.unwrap();
    let (out, end) = summarize(&events);
    assert_eq!(out, "one two\n");
    assert_eq!(end.unwrap().exit_code, 0);
}

#[tokio::test]
async fn access_token_guards_rpcs_and_files_accept_signatures() {
    require_root!();
    let envd = start_envd();
    let port = envd.port;
    let (status, headers, _) = post(
        port,
        "/init",
        "application/json",
        &[],
        Bytes::from_static(br#"{"accessToken":"sekret"}"#),
        false,
    )
    .await;
    assert_eq!(status, 204);
    assert!(headers.contains_key("x-envd-version"));
    let list = || {
        post(
            port,
            "/process.Process/List",
            "application/json",
            &[],
            Bytes::from_static(b"{}"),
            false,
        )
    };
    let (status, _, body) = list().await;
    assert_eq!(status, 401);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], 401);
    let (status, _, _) = post(
        port,
        "/process.Process/List",
        "application/json",
        &[("x-access-token", "sekret")],
        Bytes::from_static(b"{}"),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(get(port, "/health").await.0, 204);
    // /init itself now needs the token.
    let (status, _, _) = post(
        port,
        "/init",
        "application/json",
        &[],
        Bytes::from_static(br#"{"accessToken":"mine"}"#),
        false,
    )
    .await;
    assert_eq!(status, 401);

    // A file written with the token header ...
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("signed.txt");
    let path = file.to_str().unwrap();
    let (status, _, body) = post(
        port,
        &format!("/files?path={path}"),
        "application/octet-stream",
        &[("x-access-token", "sekret")],
        Bytes::from_static(b"payload"),
        false,
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    // ... is readable through a signed URL, not through an unsigned or forged one.
    use base64::Engine as _;
    use sha2::Digest as _;
    // Percent-encoded for the query, as the SDKs send it ('+' and '/' occur).
    let sign = |raw: String| {
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(sha2::Sha256::digest(raw.as_bytes()))
        )
        .replace('+', "%2B")
        .replace('/', "%2F")
    };
    let future = chrono::Utc::now().timestamp() + 60;
    let good = sign(format!("{path}:read::sekret:{future}"));
    let (status, _, body) = get(
        port,
        &format!("/files?path={path}&signature={good}&signature_expiration={future}"),
    )
    .await;
    assert_eq!((status, &body[..]), (200, &b"payload"[..]));
    let (status, _, _) = get(port, &format!("/files?path={path}")).await;
    assert_eq!(status, 401);
    let forged = sign(format!("{path}:read::wrong:{future}"));
    let (status, _, _) = get(
        port,
        &format!("/files?path={path}&signature={forged}&signature_expiration={future}"),
    )
    .await;
    assert_eq!(status, 401);
    let past = chrono::Utc::now().timestamp() - 10;
    let expired = sign(format!("{path}:read::sekret:{past}"));
    let (status, _, body) = get(
        port,
        &format!("/files?path={path}&signature={expired}&signature_expiration={past}"),
    )
    .await;
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("expired"));
    // A read signature does not authorize a write.
    let (status, _, _) = post(
        port,
        &format!("/files?path={path}&signature={good}&signature_expiration={future}"),
        "application/octet-stream",
        &[],
        Bytes::from_static(b"x"),
        false,
    )
    .await;
    assert_eq!(status, 401);
}

fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields[0].chars().next().unwrap_or('?');
        if fields[1].parse::<u32>() == Ok(pid) {
            out.push((p, state));
        }
    }
    out
}

#[tokio::test]
async fn orphans_are_reaped_and_sigterm_reaches_processes_before_a_clean_exit() {
    require_root!();
    let mut envd = start_envd();
    let port = envd.port;
    let envd_pid = envd.child.id();
    // The command exits at once; its background child becomes an orphan that
    // envd (subreaper here, PID 1 in a sandbox) must reap.
    let events = run(
        port,
        Codec::Json,
        &bash("(sleep 0.3 &) ; echo parent-done"),
        false,
    )
    .await;
    assert_eq!(summarize(&events).0, "parent-done\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kids = children_of(envd_pid);
        if kids.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "children left behind: {kids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A long-running process ends when envd is told to terminate.
    let long =
        tokio::spawn(async move { run(port, Codec::Json, &bash("exec sleep 100"), false).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while children_of(envd_pid).is_empty() {
        assert!(Instant::now() < deadline, "sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sleeper = children_of(envd_pid)[0].0;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(envd_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = envd.child.wait().unwrap();
    assert!(
        status.success(),
        "envd exits cleanly on SIGTERM: {status:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{sleeper}")).exists(),
        "the sleep process was not terminated"
    );
    let _ = long.await;
}

#[tokio::test]
async fn kill_returns_after_the_process_is_gone_and_end_reports_the_signal() {
    require_root!();
    let envd = start_envd();
    let port = envd.port;
    let run_task =
        tokio::spawn(async move { run(port, Codec::Json, &bash("exec sleep 100"), false).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        let (_, _, body) = post(
            port,
            "/process.Process/List",
            "application/json",
            &[],
            Bytes::from_static(b"{}"),
            false,
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if let Some(pid) = v["processes"][0]["pid"].as_u64() {
            break pid;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let body = format!(r#"{{"process":{{"pid":{pid}}},"signal":"SIGNAL_SIGKILL"}}"#);
    let (status, _, _) = post(
        port,
        "/process.Process/SendSignal",
        "application/json",
        &[],
        Bytes::from(body.clone()),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after kill returned"
    );
    let (_, end) = summarize(&run_task.await.unwrap());
    let end = end.unwrap();
    assert_eq!((end.exit_code, end.status.as_str()), (-1, "signal: killed"));
    // A second kill finds nothing.
    let (status, _, _) = post(
        port,
        "/process.Process/SendSignal",
        "application/json",
        &[],
        Bytes::from(body),
        false,
    )
    .await;
    assert_eq!(status, 404);
    let _ = ProcessEvent::default();
}

#[tokio::test]
async fn uploads_and_downloads_are_checked_as_the_requesting_user() {
    require_root!();
    let envd = start_envd();
    let port = envd.port;
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A root-only file, and a link to it where `nobody` may write.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let (status, _, body) = post(
        port,
        &format!("/files?path={}&username=nobody", link.display()),
        "application/octet-stream",
        &[],
        Bytes::from_static(b"overwritten"),
        false,
    )
    .await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only\n");
    let (status, _, _) = get(
        port,
        &format!("/files?path={}&username=nobody", secret.display()),
    )
    .await;
    assert_eq!(status, 403);
    // Root can, and a file `nobody` writes where it may belongs to nobody.
    let (status, _, body) = get(
        port,
        &format!("/files?path={}&username=root", secret.display()),
    )
    .await;
    assert_eq!((status, &body[..]), (200, &b"root only\n"[..]));
    let mine = dir.path().join("mine");
    let (status, _, _) = post(
        port,
        &format!("/files?path={}&username=nobody", mine.display()),
        "application/octet-stream",
        &[],
        Bytes::from_static(b"x"),
        false,
    )
    .await;
    assert_eq!(status, 200);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&mine).unwrap().uid(), 65534);
}

#[tokio::test]
async fn gzip_downloads_stream_the_whole_file() {
    require_root!();
    let envd = start_envd();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.txt");
    // Several chunks of compressible but not constant data.
    let data: Vec<u8> = (0..3_000_000usize)
        .map(|i| b"arca sandbox "[i % 13] ^ u8::from((i / 4096) % 2 == 1))
        .collect();
    std::fs::write(&path, &data).unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = client
        .request(
            http::Request::get(format!(
                "http://127.0.0.1:{}/files?path={}",
                envd.port,
                path.display()
            ))
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.len() < data.len() / 4,
        "not compressed: {} bytes",
        body.len()
    );
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out).unwrap();
    assert!(
        out == data,
        "the decompressed download differs from the file"
    );
}
