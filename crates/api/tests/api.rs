//! The E2B REST API over real HTTP against a fake node (issue 3).
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use std::time::Duration;

use arca_proto::node::{NodeError, PauseMode};
use chrono::{DateTime, Utc};
use common::{FakeBuilder, FakeNode, Opts, Server, TestDb, on_both_backends};
use serde_json::{Value, json};

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

fn secs_from_now(v: &Value) -> i64 {
    (time(v) - Utc::now()).num_seconds()
}

/// Polls until `f` holds (events are handled asynchronously).
async fn eventually<F: AsyncFnMut() -> bool>(mut f: F) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never became true");
}

#[tokio::test]
async fn missing_or_wrong_key_is_401_with_the_e2b_body() {
    let s = Server::start().await;
    let r = s.raw("GET", "/v2/sandboxes", &[], None).await;
    let v = r.assert_error(401);
    assert!(v["message"].as_str().unwrap().contains("X-API-Key"));
    let r = s.call_as("e2b_0000", "GET", "/v2/sandboxes", None).await;
    r.assert_error(401);
    // Header names are case-insensitive; the SDK sends X-API-KEY.
    let r = s
        .raw("GET", "/v2/sandboxes", &[("x-api-key", &s.key)], None)
        .await;
    assert_eq!(r.status, 200);
    // Health needs no key.
    assert_eq!(s.raw("GET", "/health", &[], None).await.status, 200);
}

async fn create_v1_and_v2_return_every_required_field(db: TestDb) {
    let s = Server::on(db).await;
    let r = s
        .call(
            "POST",
            "/sandboxes",
            Some(json!({"templateID": "base", "secure": true, "metadata": {"a": "1"}})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let v = r.json();
    for k in [
        "sandboxID",
        "templateID",
        "clientID",
        "envdVersion",
        "envdAccessToken",
    ] {
        assert!(v[k].as_str().is_some_and(|s| !s.is_empty()), "{k} in {v}");
    }
    let id = v["sandboxID"].as_str().unwrap();
    assert!(id.starts_with('i') && id.len() == 21, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert_eq!(v["templateID"], "base");
    assert_eq!(v["alias"], "base");
    assert_eq!(v["clientID"], "6532622b");
    assert_eq!(v["envdVersion"], "0.6.13");
    assert_eq!(v["domain"], "arca.test");
    // v1's default lifetime is 15 s.
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((13..=15).contains(&secs_from_now(&d["endAt"])), "{d}");

    let r = s
        .call("POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
        .await;
    assert_eq!(r.status, 201);
    let v = r.json();
    let id2 = v["sandboxID"].as_str().unwrap();
    assert_ne!(id2, id);
    let d = s
        .call("GET", &format!("/sandboxes/{id2}"), None)
        .await
        .json();
    // v2's default lifetime is 300 s.
    assert!((298..=300).contains(&secs_from_now(&d["endAt"])), "{d}");

    // The node got what the api decided.
    let specs = s.node.specs.lock().unwrap().clone();
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[1].sandbox_id.as_str(), id2);
    assert_eq!(specs[1].envd_access_token, v["envdAccessToken"]);
    assert_eq!(
        (
            specs[1].cpu_count,
            specs[1].memory_mb,
            specs[1].disk_size_mb
        ),
        (2, 512, 1024)
    );
}
on_both_backends!(create_v1_and_v2_return_every_required_field);

#[tokio::test]
async fn get_info_returns_the_sandbox_detail() {
    let s = Server::start().await;
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({
                "templateID": "base", "timeout": 60, "metadata": {"k": "v"},
                "envVars": {"A": "B"}, "allow_internet_access": true,
            })),
        )
        .await;
    let created = r.json();
    let id = created["sandboxID"].as_str().unwrap();
    let d = s.call("GET", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(d.status, 200);
    let d = d.json();
    for k in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ] {
        assert!(!d[k].is_null(), "{k} missing in {d}");
    }
    assert_eq!(d["state"], "running");
    assert_eq!(d["cpuCount"], 2);
    assert_eq!(d["memoryMB"], 512);
    assert_eq!(d["diskSizeMB"], 1024);
    // The default runtime adds nothing to the caller's metadata; the
    // detail names it.
    assert_eq!(d["metadata"], json!({"k": "v"}));
    assert_eq!(d["runtime"], "ns");
    assert_eq!(d["envdAccessToken"], created["envdAccessToken"]);
    assert_eq!(d["allowInternetAccess"], true);
    assert_eq!(
        d["lifecycle"],
        json!({"autoResume": false, "onTimeout": "kill"})
    );
    assert!(time(&d["startedAt"]) <= Utc::now());
    assert!((58..=60).contains(&secs_from_now(&d["endAt"])));
    let spec = s.node.specs.lock().unwrap()[0].clone();
    assert_eq!(spec.env_vars.get("A").map(String::as_str), Some("B"));
    assert!(spec.allow_internet_access);
    // A legacy `-<clientID>` suffix is accepted; junk ids are 400.
    let r = s
        .call("GET", &format!("/sandboxes/{id}-6532622b"), None)
        .await;
    assert_eq!(r.status, 200);
    s.call("GET", "/sandboxes/NOT.AN.ID", None)
        .await
        .assert_error(400);
    s.call("GET", "/sandboxes/inope", None)
        .await
        .assert_error(404);
}

async fn list_filters_by_metadata_state_template_and_time_in_both_orders(db: TestDb) {
    let s = Server::on(db).await;
    let a = s
        .create(json!({"templateID": "base", "metadata": {"app": "x", "n": "1"}}))
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let b = s
        .create(json!({"templateID": "base", "metadata": {"app": "x", "n": "2"}}))
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let c = s
        .create(json!({"templateID": "base", "metadata": {"app": "y & z", "n": "3"}}))
        .await;

    let ids = |r: &common::Resp| -> Vec<String> {
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["sandboxID"].as_str().unwrap().to_string())
            .collect()
    };
    let r = s.call("GET", "/v2/sandboxes", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        ids(&r),
        [&c, &b, &a].map(|x: &String| x.clone()),
        "newest first by default"
    );
    assert!(r.headers.get("x-next-token").is_none());
    let item = &r.json()[0];
    for k in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "envdVersion",
    ] {
        assert!(!item[k].is_null(), "{k} missing in {item}");
    }
    let r = s.call("GET", "/v2/sandboxes?order=asc", None).await;
    assert_eq!(ids(&r), [&a, &b, &c].map(|x: &String| x.clone()));
    s.call("GET", "/v2/sandboxes?order=up", None)
        .await
        .assert_error(400);

    // metadata is `k=v&k2=v2`, URL-encoded as one value, keys and values
    // encoded once more (what the SDKs send).
    let r = s.call("GET", "/v2/sandboxes?metadata=app%3Dx", None).await;
    assert_eq!(ids(&r), [&b, &a].map(|x: &String| x.clone()));
    let r = s
        .call("GET", "/v2/sandboxes?metadata=app%3Dx%26n%3D2", None)
        .await;
    assert_eq!(ids(&r), [&b].map(|x: &String| x.clone()));
    let r = s
        .call(
            "GET",
            "/v2/sandboxes?metadata=app%3Dy%2520%2526%2520z",
            None,
        )
        .await;
    assert_eq!(ids(&r), [&c].map(|x: &String| x.clone()));

    let r = s.call("GET", "/v2/sandboxes?state=running", None).await;
    assert_eq!(ids(&r).len(), 3);
    let r = s.call("GET", "/v2/sandboxes?state=paused", None).await;
    assert!(ids(&r).is_empty());
    let r = s
        .call("GET", "/v2/sandboxes?state=running%2Cpaused", None)
        .await;
    assert_eq!(ids(&r).len(), 3);
    s.call("GET", "/v2/sandboxes?state=gone", None)
        .await
        .assert_error(400);

    let r = s.call("GET", "/v2/sandboxes?template=base", None).await;
    assert_eq!(ids(&r).len(), 3);
    let r = s.call("GET", "/v2/sandboxes?template=other", None).await;
    assert_eq!(r.status, 200);
    assert!(ids(&r).is_empty());

    // startedAfter is an inclusive bound at full precision, any offset.
    let b_started = s.call("GET", &format!("/sandboxes/{b}"), None).await.json()["startedAt"]
        .as_str()
        .unwrap()
        .to_string();
    let after = time(&json!(b_started))
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
        .replace('+', "%2B");
    let r = s
        .call(
            "GET",
            &format!("/v2/sandboxes?startedAfter={after}&order=asc"),
            None,
        )
        .await;
    assert_eq!(ids(&r), [&b, &c].map(|x: &String| x.clone()));
    s.call("GET", "/v2/sandboxes?startedAfter=yesterday", None)
        .await
        .assert_error(400);

    // The deprecated list: running ones, metadata filter.
    let r = s.call("GET", "/sandboxes?metadata=app%3Dx", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(ids(&r).len(), 2);
}
on_both_backends!(list_filters_by_metadata_state_template_and_time_in_both_orders);

async fn list_pages_with_limit_and_next_token(db: TestDb) {
    let s = Server::on(db).await;
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(s.create(json!({"templateID": "base"})).await);
    }
    for order in ["asc", "desc"] {
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut path = format!("/v2/sandboxes?limit=2&order={order}");
            if let Some(t) = &token {
                path.push_str(&format!("&nextToken={t}"));
            }
            let r = s.call("GET", &path, None).await;
            assert_eq!(r.status, 200);
            pages += 1;
            let page = r.json();
            for v in page.as_array().unwrap() {
                seen.push(v["sandboxID"].as_str().unwrap().to_string());
            }
            match r.headers.get("x-next-token") {
                Some(t) => token = Some(t.to_str().unwrap().to_string()),
                None => break,
            }
        }
        assert_eq!(pages, 3, "{order}");
        let mut expected = made.clone();
        if order == "desc" {
            expected.reverse();
        }
        assert_eq!(seen, expected, "{order}");
    }
    // Exactly one full page: no token.
    let r = s.call("GET", "/v2/sandboxes?limit=5", None).await;
    assert!(r.headers.get("x-next-token").is_none());
    for bad in ["limit=0", "limit=101", "limit=x", "nextToken=%21%21"] {
        s.call("GET", &format!("/v2/sandboxes?{bad}"), None)
            .await
            .assert_error(400);
    }
}
on_both_backends!(list_pages_with_limit_and_next_token);

async fn another_team_sees_404(db: TestDb) {
    let s = Server::on(db).await;
    let id = s.create(json!({"templateID": "base"})).await;
    // Another key of the same team sees it.
    let same_team = s.api.create_key("default").await.unwrap();
    assert_eq!(
        s.call_as(&same_team, "GET", &format!("/sandboxes/{id}"), None)
            .await
            .status,
        200
    );
    // A key of another team does not.
    s.api.create_team("other").await.unwrap();
    assert!(s.api.create_team("other").await.is_err());
    let foreign = s.api.create_key("other").await.unwrap();
    for (m, p) in [
        ("GET", format!("/sandboxes/{id}")),
        ("DELETE", format!("/sandboxes/{id}")),
        ("GET", format!("/sandboxes/{id}/metrics")),
        ("GET", format!("/sandboxes/{id}/logs")),
    ] {
        s.call_as(&foreign, m, &p, None).await.assert_error(404);
    }
    for p in [
        format!("/sandboxes/{id}/timeout"),
        format!("/sandboxes/{id}/connect"),
    ] {
        s.call_as(&foreign, "POST", &p, Some(json!({"timeout": 10})))
            .await
            .assert_error(404);
    }
    let r = s.call_as(&foreign, "GET", "/v2/sandboxes", None).await;
    assert_eq!(r.json(), json!([]));
    // Still alive for its owner.
    assert_eq!(s.node.ids(), [id]);
}
on_both_backends!(another_team_sees_404);

#[tokio::test]
async fn kill_is_204_then_404() {
    let s = Server::start().await;
    let id = s.create(json!({"templateID": "base"})).await;
    let r = s.call("DELETE", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(r.status, 204);
    assert!(s.node.ids().is_empty());
    s.call("DELETE", &format!("/sandboxes/{id}"), None)
        .await
        .assert_error(404);
    s.call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .assert_error(404);
}

async fn set_timeout_and_connect_move_end_at(db: TestDb) {
    let s = Server::on(db).await;
    let id = s
        .create(json!({"templateID": "base", "timeout": 100}))
        .await;
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 1000})),
        )
        .await;
    assert_eq!(r.status, 204);
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((998..=1000).contains(&secs_from_now(&d["endAt"])));
    assert_eq!(s.node.end_at(&id).unwrap(), time(&d["endAt"]));
    // Shorter works too.
    s.call(
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        Some(json!({"timeout": 50})),
    )
    .await;
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((48..=50).contains(&secs_from_now(&d["endAt"])));

    // Connect never shortens...
    let r = s
        .call(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 10})),
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["sandboxID"], id.as_str());
    assert!(v["envdAccessToken"].as_str().is_some());
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((48..=50).contains(&secs_from_now(&d["endAt"])));
    // ...but extends (v1 needs a timeout, v2 defaults to 300).
    s.call("POST", &format!("/sandboxes/{id}/connect"), Some(json!({})))
        .await
        .assert_error(400);
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": 200})),
        )
        .await;
    assert_eq!(r.status, 200);
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((198..=200).contains(&secs_from_now(&d["endAt"])));
    let r = s
        .raw(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            &[("X-API-Key", &s.key)],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((298..=300).contains(&secs_from_now(&d["endAt"])));
    // The deprecated keep-alive extends as well.
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/refreshes"),
            Some(json!({"duration": 3600})),
        )
        .await;
    assert_eq!(r.status, 204);
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert!((3598..=3600).contains(&secs_from_now(&d["endAt"])));

    // 0 expires it now: the node ends it and the record follows.
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 0})),
        )
        .await;
    assert_eq!(r.status, 204);
    eventually(async || {
        s.call("GET", &format!("/sandboxes/{id}"), None)
            .await
            .status
            == 404
    })
    .await;
}
on_both_backends!(set_timeout_and_connect_move_end_at);

#[tokio::test]
async fn timeouts_out_of_range_are_400_naming_the_limit() {
    let s = Server::start().await;
    for t in [
        json!(0),
        json!(-1),
        json!(86_401),
        json!(1e30),
        json!(1.5),
        json!("60"),
    ] {
        let r = s
            .call(
                "POST",
                "/v2/sandboxes",
                Some(json!({"templateID": "base", "timeout": t})),
            )
            .await;
        let v = r.assert_error(400);
        if t == json!(86_401) || t == json!(0) {
            assert!(v["message"].as_str().unwrap().contains("86400"), "{v}");
        }
    }
    let r = s
        .raw(
            "POST",
            "/v2/sandboxes",
            &[("X-API-Key", &s.key), ("Content-Type", "application/json")],
            Some(br#"{"templateID":"base","timeout":99999999999999999999999}"#.to_vec()),
        )
        .await;
    r.assert_error(400);
    let r = s
        .call(
            "POST",
            "/sandboxes",
            Some(json!({"templateID": "base", "timeout": 86_400})),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    for t in [json!(-1), json!(86_401)] {
        s.call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": t})),
        )
        .await
        .assert_error(400);
    }
    s.call("POST", &format!("/sandboxes/{id}/timeout"), Some(json!({})))
        .await
        .assert_error(400);
    assert!(
        s.node.specs.lock().unwrap().len() == 1,
        "no rejected create reached the node"
    );
}

async fn lifecycle_combinations_are_checked(db: TestDb) {
    let s = Server::on(db).await;
    for body in [
        json!({"templateID": "base", "autoPauseMemory": false}),
        json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false, "autoResume": {"enabled": true}}),
    ] {
        s.call("POST", "/v2/sandboxes", Some(body))
            .await
            .assert_error(400);
    }
    // autoPauseMemory: false makes the pause at the deadline filesystem-only.
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert!(
        s.node
            .specs
            .lock()
            .unwrap()
            .iter()
            .any(|sp| sp.auto_pause_mode == PauseMode::Filesystem)
    );
    let r = s
        .call("POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert_eq!(
        d["lifecycle"],
        json!({"autoResume": false, "onTimeout": "kill"})
    );
    // autoPause is passed to the node as the timeout action.
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "autoPause": true})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let paused_at_end = r.json()["sandboxID"].as_str().unwrap().to_string();
    let d = s
        .call("GET", &format!("/sandboxes/{paused_at_end}"), None)
        .await
        .json();
    assert_eq!(d["lifecycle"]["onTimeout"], "pause");
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true}})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let woken = r.json()["sandboxID"].as_str().unwrap().to_string();
    let d = s
        .call("GET", &format!("/sandboxes/{woken}"), None)
        .await
        .json();
    assert_eq!(
        d["lifecycle"],
        json!({"autoResume": true, "onTimeout": "pause"})
    );
    assert!(s.node.specs.lock().unwrap().iter().any(|sp| sp.auto_resume));
    // Pause: 204, then 409; paused in get and list; connect resumes (201),
    // a second connect finds it running (200); the deprecated resume of a
    // running sandbox is a 409.
    s.call("POST", &format!("/sandboxes/{id}/pause"), Some(json!({})))
        .await
        .assert_status(204);
    s.call("POST", &format!("/sandboxes/{id}/pause"), None)
        .await
        .assert_error(409);
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert_eq!(d["state"], "paused");
    assert_eq!(d["pauseMode"], "full");
    let listed = s
        .call("GET", "/v2/sandboxes?state=paused", None)
        .await
        .json();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["sandboxID"] == id.as_str())
    );
    let r = s
        .call(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 60})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.json()["sandboxID"], id.as_str());
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert_eq!(d["state"], "running");
    assert!(d.get("pauseMode").is_none(), "{d}");
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": 60})),
        )
        .await;
    assert_eq!(r.status, 200);
    s.call(
        "POST",
        &format!("/sandboxes/{id}/resume"),
        Some(json!({"timeout": 30})),
    )
    .await
    .assert_error(409);
    // memory: false is a filesystem-only pause, which get_info reports.
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/pause"),
            Some(json!({"memory": false})),
        )
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    assert_eq!(
        (&d["state"], &d["pauseMode"]),
        (&json!("paused"), &json!("filesystem"))
    );
    s.call("POST", "/sandboxes/inope/pause", Some(json!({})))
        .await
        .assert_error(404);
}
on_both_backends!(lifecycle_combinations_are_checked);

#[tokio::test]
async fn bad_bodies_and_routes_get_e2b_errors() {
    let s = Server::start().await;
    let key = s.key.clone();
    let json_headers = [
        ("X-API-Key", key.as_str()),
        ("Content-Type", "application/json"),
    ];
    // Malformed JSON.
    s.raw(
        "POST",
        "/v2/sandboxes",
        &json_headers,
        Some(b"{\"templateID\":".to_vec()),
    )
    .await
    .assert_error(400);
    // Missing required field.
    s.raw("POST", "/v2/sandboxes", &json_headers, Some(b"{}".to_vec()))
        .await
        .assert_error(400);
    // Oversized.
    let big = format!(
        "{{\"templateID\":\"base\",\"metadata\":{{\"x\":\"{}\"}}}}",
        "a".repeat(2 << 20)
    );
    s.raw(
        "POST",
        "/v2/sandboxes",
        &json_headers,
        Some(big.into_bytes()),
    )
    .await
    .assert_error(413);
    // Not JSON.
    s.raw(
        "POST",
        "/v2/sandboxes",
        &[("X-API-Key", key.as_str()), ("Content-Type", "text/plain")],
        Some(b"templateID=base".to_vec()),
    )
    .await
    .assert_error(415);
    // Unknown fields are accepted.
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "fromTheFuture": {"x": 1}, "mcp": null, "network": {}})),
        )
        .await;
    assert_eq!(r.status, 201);
    // Unknown template.
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": "nope"})))
        .await
        .assert_error(404);
    s.call("POST", "/sandboxes", Some(json!({"templateID": "base:v9"})))
        .await
        .assert_error(404);
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "someone/base:default"})),
        )
        .await;
    assert_eq!(r.status, 201);
    // Router-level errors.
    s.call("GET", "/nope", None).await.assert_error(404);
    let r = s.call("PUT", "/v2/sandboxes", None).await;
    r.assert_error(405);
    assert!(r.headers.get("allow").is_some());
}

#[tokio::test]
async fn node_failures_leave_no_record() {
    let s = Server::start().await;
    let cases = [
        (NodeError::Capacity("all slots busy".into()), 503),
        (
            NodeError::Internal("runtime exploded at /secret/path".into()),
            500,
        ),
        (NodeError::TemplateNotFound("base".into()), 404),
        (NodeError::InvalidInput("too many cpus".into()), 400),
    ];
    for (err, status) in cases {
        s.node.fail_next_create(err);
        let r = s
            .call("POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
            .await;
        let v = r.assert_error(status);
        match status {
            503 => {
                assert_eq!(v["error_code"], "sandbox_capacity_unavailable");
                assert_eq!(r.headers["should-retry"], "false");
            }
            500 => {
                assert_eq!(v["error_code"], "internal_server_error");
                assert!(!v["message"].as_str().unwrap().contains("secret"), "{v}");
            }
            _ => {}
        }
        let list = s.call("GET", "/v2/sandboxes", None).await.json();
        assert_eq!(list, json!([]), "after a {status}");
    }
    assert!(s.node.ids().is_empty());
    // And the next create works.
    s.create(json!({"templateID": "base"})).await;
}

async fn an_ended_event_removes_the_record(db: TestDb) {
    let s = Server::on(db).await;
    let id = s.create(json!({"templateID": "base"})).await;
    let keep = s.create(json!({"templateID": "base"})).await;
    s.node.end(&id);
    eventually(async || {
        s.call("GET", &format!("/sandboxes/{id}"), None)
            .await
            .status
            == 404
    })
    .await;
    let list = s.call("GET", "/v2/sandboxes", None).await.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["sandboxID"], keep.as_str());
}
on_both_backends!(an_ended_event_removes_the_record);

#[tokio::test]
async fn metrics_and_logs_have_every_field() {
    let s = Server::start().await;
    let id = s.create(json!({"templateID": "base"})).await;
    let r = s
        .call("GET", &format!("/sandboxes/{id}/metrics"), None)
        .await;
    assert_eq!(r.status, 200);
    let m = r.json();
    assert_eq!(m.as_array().unwrap().len(), 3);
    for k in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(!m[0][k].is_null(), "{k} missing in {m}");
    }
    assert_eq!(m[0]["timestampUnix"], 1000);
    let r = s
        .call(
            "GET",
            &format!("/sandboxes/{id}/metrics?start=1005&end=1010"),
            None,
        )
        .await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = s
        .call(
            "GET",
            &format!("/sandboxes/{id}/metrics?start=1&end=2"),
            None,
        )
        .await;
    assert_eq!(r.json(), json!([]));
    s.call("GET", &format!("/sandboxes/{id}/metrics?start=x"), None)
        .await
        .assert_error(400);

    let r = s.call("GET", &format!("/sandboxes/{id}/logs"), None).await;
    assert_eq!(r.status, 200);
    let l = r.json();
    assert_eq!(l["logs"].as_array().unwrap().len(), 3);
    assert_eq!(l["logs"][0]["line"], "line 0");
    assert_eq!(l["logEntries"][2]["level"], "error");
    assert_eq!(l["logEntries"][1]["fields"], json!({"n": "1"}));
    let r = s
        .call(
            "GET",
            &format!("/sandboxes/{id}/logs?start=1001000&limit=1"),
            None,
        )
        .await;
    assert_eq!(r.json()["logEntries"][0]["message"], "line 1");

    let r = s
        .call("GET", &format!("/v2/sandboxes/{id}/logs?level=info"), None)
        .await;
    assert_eq!(r.json()["logs"].as_array().unwrap().len(), 2);
    let r = s
        .call(
            "GET",
            &format!("/v2/sandboxes/{id}/logs?direction=backward&limit=1"),
            None,
        )
        .await;
    assert_eq!(r.json()["logs"][0]["message"], "line 2");
    let r = s
        .call(
            "GET",
            &format!("/v2/sandboxes/{id}/logs?search=LINE%201"),
            None,
        )
        .await;
    assert_eq!(r.json()["logs"].as_array().unwrap().len(), 1);
    s.call(
        "GET",
        &format!("/v2/sandboxes/{id}/logs?direction=up"),
        None,
    )
    .await
    .assert_error(400);
}

async fn idempotency_key_replays_and_detects_mismatches(db: TestDb) {
    let s = Server::on(db).await;
    let key = s.key.clone();
    let post = |body: &'static str, idem: &'static str| {
        let key = key.clone();
        let s = &s;
        async move {
            s.raw(
                "POST",
                "/v2/sandboxes",
                &[
                    ("X-API-Key", key.as_str()),
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", idem),
                ],
                Some(body.as_bytes().to_vec()),
            )
            .await
        }
    };
    let a = post(r#"{"templateID":"base","timeout":60}"#, "k-1").await;
    assert_eq!(a.status, 201);
    // Same key, same document (other key order): same sandbox.
    let b = post(r#"{"timeout":60,"templateID":"base"}"#, "k-1").await;
    assert_eq!(b.status, 201);
    assert_eq!(a.json()["sandboxID"], b.json()["sandboxID"]);
    assert_eq!(a.json()["envdAccessToken"], b.json()["envdAccessToken"]);
    assert_eq!(s.node.ids().len(), 1);
    // Same key, other body: 409.
    let c = post(r#"{"templateID":"base","timeout":61}"#, "k-1").await;
    let v = c.assert_error(409);
    assert_eq!(v["error_code"], "idempotency_request_mismatch");
    // Other key: new sandbox; bad key: 400.
    assert_eq!(post(r#"{"templateID":"base"}"#, "k-2").await.status, 201);
    post(r#"{"templateID":"base"}"#, "Bad Key")
        .await
        .assert_error(400);
    assert_eq!(s.node.ids().len(), 2);
}
on_both_backends!(idempotency_key_replays_and_detects_mismatches);

#[tokio::test]
async fn bootstrap_key_has_the_e2b_format_and_is_stored_hashed() {
    let node = FakeNode::new();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}/deep/er/arca.db", dir.path().display());
    let config = arca_api::ApiConfig {
        uploads_dir: dir.path().join("uploads"),
        ..arca_api::ApiConfig::default()
    };
    let api = arca_api::Api::open(&url, config.clone(), node.clone(), FakeBuilder::new())
        .await
        .unwrap();
    let key = api.ensure_bootstrap().await.unwrap().unwrap();
    assert_eq!(key.len(), 44);
    assert!(key.starts_with("e2b_"));
    assert!(
        key[4..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{key}"
    );
    assert_eq!(api.ensure_bootstrap().await.unwrap(), None);

    let second = api.create_key("default").await.unwrap();
    assert_ne!(second, key);
    let keys = api.list_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.team == "default" && !k.revoked));
    assert!(keys[0].mask.starts_with(&key[..8]));
    assert!(api.create_key("no-such-team").await.is_err());

    // Neither plaintext is anywhere in the database files.
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("deep/er")).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains(&key[4..]) && !text.contains(&second[4..]));

    // Revoked keys stop working; reopening keeps keys and says no bootstrap.
    api.revoke_key(&keys[1].id).await.unwrap();
    api.revoke_key(&keys[1].id).await.unwrap();
    assert!(api.revoke_key("nope").await.is_err());
    drop(api);
    let api = arca_api::Api::open(&url, config, node, FakeBuilder::new())
        .await
        .unwrap();
    assert_eq!(api.ensure_bootstrap().await.unwrap(), None);
    let keys = api.list_keys().await.unwrap();
    assert!(!keys[0].revoked && keys[1].revoked);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api.serve(listener));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    for (k, status) in [(&key, 200), (&second, 401)] {
        let req = http::Request::get(format!("http://{addr}/v2/sandboxes"))
            .header("X-API-Key", k.as_str())
            .body(http_body_util::Empty::new())
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), status);
    }
}

async fn start_reconciles_records_with_the_node(db: TestDb) {
    let node = FakeNode::new();
    let s = Server::start_opts(Opts {
        node: node.clone(),
        db: Some(db),
        ..Opts::new()
    })
    .await;
    let gone = s.create(json!({"templateID": "base"})).await;
    let kept = s.create(json!({"templateID": "base"})).await;
    let Server { dir, api, db, .. } = s;
    drop(api);
    // While the api was down: one sandbox ended, a stray one appeared.
    node.kill(&arca_proto::node::SandboxId::parse(&gone).unwrap())
        .await
        .unwrap();
    node.insert("istray");
    let s = Server::start_opts(Opts {
        node: node.clone(),
        dir,
        db,
        ..Opts::new()
    })
    .await;
    s.call("GET", &format!("/sandboxes/{gone}"), None)
        .await
        .assert_error(404);
    assert_eq!(
        s.call("GET", &format!("/sandboxes/{kept}"), None)
            .await
            .status,
        200
    );
    assert_eq!(node.ids(), [kept]);
}
on_both_backends!(start_reconciles_records_with_the_node);

use arca_proto::node::NodeService as _;

async fn key_store_manages_keys_beside_a_running_api_without_touching_sandboxes(db: TestDb) {
    let s = Server::on(db).await;
    let id = s.create(json!({"templateID": "base"})).await;
    let store = arca_api::keys_only(&s.db_url).await.unwrap();
    assert_eq!(store.ensure_bootstrap().await.unwrap(), None);
    let key = store.create_key("default").await.unwrap();
    assert!(key.starts_with("e2b_") && key.len() == 44);
    let keys = store.list_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    // The running api accepts the new key at once and still lists the sandbox.
    let r = s.call_as(&key, "GET", "/v2/sandboxes", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert_eq!(s.node.ids(), vec![id]);
    assert!(s.node.kills.lock().unwrap().is_empty());
    // Revoking through the store locks the key out of the api.
    store.revoke_key(&keys[1].id).await.unwrap();
    s.call_as(&key, "GET", "/v2/sandboxes", None)
        .await
        .assert_error(401);
    assert!(matches!(
        store.revoke_key("nope").await,
        Err(arca_api::ApiError::NotFound(_))
    ));
    assert!(store.create_team("ops").await.is_ok());
    assert!(store.create_key("ops").await.is_ok());
}
on_both_backends!(key_store_manages_keys_beside_a_running_api_without_touching_sandboxes);

#[tokio::test]
async fn key_store_creates_a_fresh_database_and_bootstraps_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}/home/arca.db", dir.path().display());
    let store = arca_api::KeyStore::open(&url).await.unwrap();
    let first = store.ensure_bootstrap().await.unwrap().unwrap();
    assert!(first.starts_with("e2b_"));
    assert_eq!(store.list_keys().await.unwrap().len(), 1);
}
