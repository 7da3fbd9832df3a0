//! The client over real HTTP against a fake API and a fake envd behind a
//! fake proxy (one axum server plays all three).
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_proto::connect::{self, Codec, EnvelopeDecoder, FLAG_END_STREAM, end_stream_payload};
use arca_proto::process::{ProcessEvent, StartRequest, StartResponse, process_event};
use arca_sdk::{Client, EgressLogEntry, Output, RunOptions, SdkError, Verdict};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

#[derive(Default)]
struct Fake {
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    creates: Mutex<Vec<Value>>,
    /// Request targets of the egress log, as sent (still encoded).
    network_log_requests: Mutex<Vec<String>>,
}

type St = State<Arc<Fake>>;

fn e2b_error(status: u16, msg: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        json!({"code": status, "message": msg}).to_string(),
    )
        .into_response()
}

fn authed(h: &HeaderMap) -> bool {
    h.get("x-api-key").and_then(|v| v.to_str().ok()) == Some("e2b_good")
}

fn listed(id: &str) -> Value {
    json!({"templateID": "base", "sandboxID": id, "clientID": "x", "startedAt": "2026-01-01T00:00:00Z",
           "endAt": "2026-01-01T00:05:00Z", "cpuCount": 2, "memoryMB": 512, "diskSizeMB": 1024,
           "state": "running", "envdVersion": "0.6.13", "metadata": {}})
}

async fn create(State(f): St, h: HeaderMap, body: Bytes) -> Response {
    if !authed(&h) {
        return e2b_error(401, "invalid API key");
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    if v["templateID"] != "base" {
        return e2b_error(404, "template 'nope' not found");
    }
    f.creates.lock().unwrap().push(v);
    (
        StatusCode::CREATED,
        axum::Json(
            json!({"sandboxID": "isb1", "templateID": "base", "clientID": "x",
                          "envdVersion": "0.6.13", "envdAccessToken": "tok"}),
        ),
    )
        .into_response()
}

async fn list(h: HeaderMap, Query(q): Query<BTreeMap<String, String>>) -> Response {
    if !authed(&h) {
        return e2b_error(401, "invalid API key");
    }
    assert_eq!(q["limit"], "100");
    // Two pages.
    match q.get("nextToken").map(String::as_str) {
        None => ([("x-next-token", "p2")], axum::Json(json!([listed("ia")]))).into_response(),
        Some("p2") => axum::Json(json!([listed("ib")])).into_response(),
        Some(t) => panic!("token {t}"),
    }
}

async fn sandbox(Path(id): Path<String>, h: HeaderMap) -> Response {
    if !authed(&h) {
        return e2b_error(401, "invalid API key");
    }
    if id != "isb1" {
        return e2b_error(404, &format!("sandbox '{id}' not found"));
    }
    let mut v = listed("isb1");
    v["envdAccessToken"] = json!("tok");
    axum::Json(v).into_response()
}

async fn kill(Path(id): Path<String>) -> Response {
    if id == "isb1" {
        StatusCode::NO_CONTENT.into_response()
    } else {
        e2b_error(404, "not found")
    }
}

async fn logs(Path(_): Path<String>) -> Response {
    axum::Json(json!({"logs": [{"timestamp": "t", "line": "booted"}], "logEntries": []}))
        .into_response()
}

async fn network_logs(State(f): St, uri: Uri, h: HeaderMap) -> Response {
    if !authed(&h) {
        return e2b_error(401, "invalid API key");
    }
    f.network_log_requests
        .lock()
        .unwrap()
        .push(uri.path_and_query().unwrap().to_string());
    if uri.path() != "/sandboxes/i%2Fsb/network/logs" {
        return e2b_error(404, "sandbox not found");
    }
    axum::Json(json!({"entries": [
        {"timestamp": "2026-01-01T10:00:00.100Z", "protocol": "tcp", "destination": "198.18.0.2",
         "port": 443, "name": "a.test", "verdict": "denied", "rule": "denyOut", "count": 3},
        {"timestamp": "2026-01-01T10:00:01Z", "protocol": "icmp", "destination": "198.18.0.3",
         "verdict": "allowed", "rule": "default", "count": 1, "somethingNew": true}
    ]}))
    .into_response()
}

fn envd_ok(h: &HeaderMap) -> Option<Response> {
    if h.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) != Some("isb1") {
        return Some(
            (
                StatusCode::BAD_GATEWAY,
                axum::Json(
                    json!({"sandboxId": "x", "message": "The sandbox was not found", "code": 502}),
                ),
            )
                .into_response(),
        );
    }
    assert_eq!(h["e2b-sandbox-port"], "49983");
    if h.get("x-access-token").and_then(|v| v.to_str().ok()) != Some("tok") {
        return Some(e2b_error(401, "bad access token"));
    }
    None
}

fn ev(e: process_event::Event) -> Bytes {
    connect::envelope(
        0,
        &Codec::Json.encode(&StartResponse {
            event: Some(ProcessEvent { event: Some(e) }),
        }),
    )
}

async fn start(h: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = envd_ok(&h) {
        return r;
    }
    let mut dec = EnvelopeDecoder::new();
    dec.push(&body);
    let req: StartRequest = Codec::Json
        .decode(&dec.next_envelope().unwrap().unwrap().payload)
        .unwrap();
    let p = req.process.unwrap();
    assert_eq!(p.cmd, "/bin/bash");
    let script = p.args[2].clone();
    let mut out = Vec::new();
    out.extend_from_slice(&ev(process_event::Event::Start(
        process_event::StartEvent { pid: 42 },
    )));
    use process_event::data_event::Output as O;
    out.extend_from_slice(&ev(process_event::Event::Data(process_event::DataEvent {
        output: Some(O::Stdout(script.as_bytes().to_vec())),
    })));
    out.extend_from_slice(&ev(process_event::Event::Data(process_event::DataEvent {
        output: Some(O::Stderr(b"warn".to_vec())),
    })));
    let code = script
        .strip_prefix("exit ")
        .map_or(0, |c| c.parse().unwrap());
    out.extend_from_slice(&ev(process_event::Event::End(process_event::EndEvent {
        exit_code: code,
        exited: true,
        status: format!("exit status {code}"),
        error: None,
    })));
    out.extend_from_slice(&connect::envelope(
        FLAG_END_STREAM,
        &end_stream_payload(None),
    ));
    ([("content-type", "application/connect+json")], out).into_response()
}

async fn files_get(
    State(f): St,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = envd_ok(&h) {
        return r;
    }
    match f.files.lock().unwrap().get(&q["path"]) {
        Some(b) => b.clone().into_response(),
        None => e2b_error(404, "file not found"),
    }
}

async fn files_post(
    State(f): St,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(r) = envd_ok(&h) {
        return r;
    }
    assert_eq!(h["content-type"], "application/octet-stream");
    let path = q["path"].clone();
    f.files.lock().unwrap().insert(path.clone(), body.to_vec());
    axum::Json(json!([{"path": path, "name": "n", "type": "file"}])).into_response()
}

async fn serve() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(sandbox).delete(kill))
        .route("/sandboxes/{id}/logs", get(logs))
        .route("/sandboxes/{id}/network/logs", get(network_logs))
        .route("/process.Process/Start", post(start))
        .route("/files", get(files_get).post(files_post))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), fake)
}

#[tokio::test]
async fn rest_calls_round_trip() {
    let (url, fake) = serve().await;
    let c = Client::new(&url, "e2b_good", &url);
    let md = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let sb = c
        .create("base", Some(30), &md, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(sb.id, "isb1");
    assert_eq!(sb.envd_access_token.as_deref(), Some("tok"));
    assert_eq!(fake.creates.lock().unwrap()[0]["timeout"], 30);
    assert_eq!(fake.creates.lock().unwrap()[0]["metadata"]["k"], "v");

    let all = c.list().await.unwrap();
    let ids: Vec<_> = all.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["ia", "ib"]);

    let info = c.get("isb1").await.unwrap();
    assert_eq!(info.sandbox().envd_access_token.as_deref(), Some("tok"));
    let e = c.get("nope").await.unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(e.to_string(), "sandbox 'nope' not found (HTTP 404)");

    assert!(c.kill("isb1").await.unwrap());
    assert!(!c.kill("nope").await.unwrap());
    assert_eq!(c.logs("isb1").await.unwrap().logs[0].line, "booted");

    let e = c
        .create("nope", None, &BTreeMap::new(), &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let bad = Client::new(&url, "e2b_bad", &url);
    let e = bad.list().await.unwrap_err();
    assert_eq!(e.status(), Some(401));
}

#[tokio::test]
async fn the_egress_log_is_asked_from_a_time_on_and_parsed() {
    let (url, fake) = serve().await;
    let c = Client::new(&url, "e2b_good", &url);
    let entries: Vec<EgressLogEntry> = c.network_logs("i/sb", None, None).await.unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[0].verdict, entries[0].port, entries[0].count),
        (Verdict::Denied, Some(443), 3)
    );
    assert_eq!(entries[0].name.as_deref(), Some("a.test"));
    assert_eq!(
        (entries[1].verdict, entries[1].port),
        (Verdict::Allowed, None)
    );

    let start: DateTime<Utc> = DateTime::from_timestamp_millis(1_767_261_600_300).unwrap();
    c.network_logs("i/sb", Some(start), Some(2000))
        .await
        .unwrap();
    assert_eq!(
        *fake.network_log_requests.lock().unwrap(),
        [
            "/sandboxes/i%2Fsb/network/logs",
            "/sandboxes/i%2Fsb/network/logs?limit=2000&start=2026-01-01T10%3A00%3A00.300000000Z",
        ]
    );

    let e = c.network_logs("nope", None, Some(1)).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.to_string(), "sandbox not found (HTTP 404)");
    let bad = Client::new(&url, "e2b_bad", &url);
    let e = bad.network_logs("i/sb", None, None).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
}

#[tokio::test]
async fn commands_stream_and_files_move() {
    let (url, _fake) = serve().await;
    let c = Client::new(&url, "e2b_good", &url);
    let sb = c.get("isb1").await.unwrap().sandbox();
    let mut seen = Vec::new();
    let st = c
        .run(&sb, "echo hi", &RunOptions::default(), |o| {
            seen.push(match o {
                Output::Stdout(b) => format!("out:{}", String::from_utf8_lossy(b)),
                Output::Stderr(b) => format!("err:{}", String::from_utf8_lossy(b)),
            });
            Ok(())
        })
        .await
        .unwrap();
    assert!(st.success());
    assert_eq!(st.pid, 42);
    assert_eq!(seen, ["out:echo hi", "err:warn"]);
    let opts = RunOptions {
        timeout: Some(Duration::from_secs(5)),
        ..RunOptions::default()
    };
    let (st, out, err) = c.run_collect(&sb, "exit 3", &opts).await.unwrap();
    assert_eq!(
        (st.exit_code, out.as_slice(), err.as_slice()),
        (3, &b"exit 3"[..], &b"warn"[..])
    );

    let w = c
        .write_file(&sb, "/tmp/x y", "content", None)
        .await
        .unwrap();
    assert_eq!(w.path, "/tmp/x y");
    assert_eq!(c.read_file(&sb, "/tmp/x y", None).await.unwrap(), "content");
    let e = c.read_file(&sb, "/missing", None).await.unwrap_err();
    assert!(e.is_not_found());

    // Wrong token, unknown sandbox: the envd / proxy errors come back typed.
    let mut wrong = sb.clone();
    wrong.envd_access_token = Some("nope".into());
    let e = c
        .run(&wrong, "true", &RunOptions::default(), |_| Ok(()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    wrong.id = "igone".into();
    let e = c.read_file(&wrong, "/x", None).await.unwrap_err();
    assert!(
        matches!(&e, SdkError::Status { status: 502, message, .. } if message.contains("was not found")),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_transport_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let c = Client::new(&url, "e2b_good", &url);
    let e = c.list().await.unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert!(e.to_string().contains(&url), "{e}");
}
