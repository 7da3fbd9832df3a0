//! `arca sandbox logs --network` against a stub of the API's
//! `GET /sandboxes/{id}/network/logs`: the lines, `--json`, `--follow`,
//! not found, and the key from `$ARCA_HOME/api_key`.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::run;
use serde_json::{Value, json};

const KEY: &str = "e2b_0123456789abcdef";

/// The API's side: a log per sandbox `ibox`, every request line seen.
#[derive(Default)]
struct Stub {
    entries: Mutex<Vec<Value>>,
    requests: Mutex<Vec<String>>,
}

fn entry(ts: &str, verdict: &str, name: Option<&str>, count: u32) -> Value {
    let mut e = json!({
        "timestamp": ts, "protocol": "tcp", "destination": "198.18.0.2", "port": 443,
        "verdict": verdict, "rule": "denyOut", "count": count
    });
    if let Some(n) = name {
        e["name"] = n.into();
    }
    e
}

fn start_stub(stub: Arc<Stub>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            answer(&stub, conn);
        }
    });
    url
}

fn answer(stub: &Stub, mut conn: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let line = head.lines().next().unwrap_or("").to_string();
    stub.requests.lock().unwrap().push(line.clone());
    let target = line.split(' ').nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let key_ok = head
        .lines()
        .any(|l| l.to_ascii_lowercase() == format!("x-api-key: {}", KEY.to_ascii_lowercase()));
    let (status, body) = if !key_ok {
        (
            "401 Unauthorized",
            json!({"code": 401, "message": "invalid API key"}),
        )
    } else if path != "/sandboxes/ibox/network/logs" {
        (
            "404 Not Found",
            json!({"code": 404, "message": "sandbox not found"}),
        )
    } else {
        let start = query
            .split('&')
            .find_map(|p| p.strip_prefix("start="))
            .map(|s| {
                let s = s.replace("%3A", ":").replace("%2B", "+");
                DateTime::parse_from_rfc3339(&s)
                    .unwrap()
                    .with_timezone(&Utc)
            });
        let entries: Vec<Value> = stub
            .entries
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                let t = DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
                start.is_none_or(|s| t >= s)
            })
            .cloned()
            .collect();
        ("200 OK", json!({ "entries": entries }))
    };
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `arca args` against the stub at `url`, with its key.
fn arca(url: &str, args: &[&str]) -> Command {
    let mut c = common::arca(args);
    c.env("E2B_API_URL", url).env("E2B_API_KEY", KEY);
    c
}

fn sample() -> Vec<Value> {
    vec![
        entry(
            "2026-01-01T10:00:00.100Z",
            "allowed",
            Some("allowed.test"),
            1,
        ),
        entry("2026-01-01T10:00:01.200Z", "denied", Some("denied.test"), 3),
        entry("2026-01-01T10:00:02.300Z", "denied", None, 1),
    ]
}

#[test]
fn lines_and_json_records() {
    let stub = Arc::new(Stub::default());
    *stub.entries.lock().unwrap() = sample();
    let url = start_stub(Arc::clone(&stub));

    let (code, out, err) = run(&mut arca(&url, &["sandbox", "logs", "--network", "ibox"]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("2026-01-01T10:00:00.100Z allowed tcp   198.18.0.2:443"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(" allowed.test ") && lines[0].contains(" denyOut"));
    assert!(
        lines[1].contains(" denied ") && lines[1].ends_with(" x3"),
        "{}",
        lines[1]
    );
    assert!(!lines[0].ends_with(" x1"));
    assert!(lines[2].contains(" - "), "{}", lines[2]);
    let req = stub.requests.lock().unwrap()[0].clone();
    assert!(
        req.starts_with("GET /sandboxes/ibox/network/logs?limit=2000 "),
        "{req}"
    );

    let (code, out, _) = run(&mut arca(
        &url,
        &["--json", "sandbox", "logs", "--network", "ibox"],
    ));
    assert_eq!(code, 0);
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records, sample());
}

#[test]
fn not_found_usage_and_the_saved_key() {
    let stub = Arc::new(Stub::default());
    let url = start_stub(Arc::clone(&stub));
    let (code, out, err) = run(&mut arca(&url, &["sandbox", "logs", "--network", "inope"]));
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("inope not found"), "{err}");

    // --follow belongs to --network.
    let (code, _, err) = run(&mut arca(&url, &["sandbox", "logs", "--follow", "ibox"]));
    assert_eq!(code, 2);
    assert!(err.contains("--network"), "{err}");

    // The key `arca up` saved, when none is given.
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("api_key"), format!("{KEY}\n")).unwrap();
    let mut c = arca(&url, &["sandbox", "logs", "--network", "ibox"]);
    c.env_remove("E2B_API_KEY").env("ARCA_HOME", home.path());
    let (code, _, err) = run(&mut c);
    assert_eq!(code, 0, "{err}");
    // A wrong key is the API's 401, explained.
    let mut c = arca(&url, &["sandbox", "logs", "--network", "ibox"]);
    c.env("E2B_API_KEY", "e2b_ff");
    let (code, _, err) = run(&mut c);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid API key") && err.contains("E2B_API_KEY"),
        "{err}"
    );
}

#[test]
fn follow_prints_new_entries_once() {
    let stub = Arc::new(Stub::default());
    *stub.entries.lock().unwrap() = sample();
    let url = start_stub(Arc::clone(&stub));
    let mut child = arca(&url, &["sandbox", "logs", "--network", "--follow", "ibox"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stub.entries.lock().unwrap().extend([
        entry("2026-01-01T10:00:02.300Z", "allowed", Some("late.test"), 1),
        entry("2026-01-01T10:00:05.000Z", "allowed", Some("new.test"), 2),
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines[3].contains("late.test"), "{stdout}");
    assert!(
        lines[4].contains("new.test") && lines[4].ends_with(" x2"),
        "{stdout}"
    );
    // Polls after the first start where the last one ended.
    let requests = stub.requests.lock().unwrap().clone();
    assert!(requests.len() >= 3, "{requests:?}");
    assert!(
        requests[1].contains("&start=2026-01-01T10%3A00%3A02.300000000Z"),
        "{requests:?}"
    );
}
