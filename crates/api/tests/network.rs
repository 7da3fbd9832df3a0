//! Network settings over real HTTP against a fake node (issue 6, ADR 0005):
//! create with `network` and `allow_internet_access`, the 400s, the echo in
//! `GET /sandboxes/{id}`, `PUT /sandboxes/{id}/network`, the egress log,
//! traffic access tokens through create, connect and fork.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use arca_proto::network::{EgressLogEntry, IngressSpec, NetworkSpec, Verdict};
use arca_proto::node::NodeError;
use chrono::{DateTime, Utc};
use common::{Server, TestDb, on_both_backends};
use serde_json::{Value, json};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// A private sandbox with every supported key set.
fn full_network() -> Value {
    json!({
        "allowOut": ["10.1.0.0/16", "allowed.test", "*.wild.test"],
        "denyOut": ["0.0.0.0/0"],
        "dnsServers": ["198.18.0.2"],
        "allowPublicTraffic": false,
        "maskRequestHost": "${PORT}-masked.test",
        "rules": {},
        "egressProxy": null,
        "httpsPorts": []
    })
}

async fn info(s: &Server, id: &str) -> Value {
    let r = s.call("GET", &format!("/sandboxes/{id}"), None).await;
    r.assert_status(200);
    r.json()
}

async fn put(s: &Server, id: &str, body: Value) -> common::Resp {
    s.call("PUT", &format!("/sandboxes/{id}/network"), Some(body))
        .await
}

#[tokio::test]
async fn create_sends_network_and_ingress_to_the_node_and_get_echoes_them() {
    let s = Server::start().await;
    for path in ["/v2/sandboxes", "/sandboxes"] {
        let r = s
            .call(
                "POST",
                path,
                Some(json!({"templateID": "base", "network": full_network(), "allow_internet_access": true})),
            )
            .await;
        r.assert_status(201);
        let v = r.json();
        let id = v["sandboxID"].as_str().unwrap().to_string();
        let token = v["trafficAccessToken"].as_str().unwrap().to_string();
        assert_eq!(token.len(), 64, "{v}");
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(token, v["envdAccessToken"].as_str().unwrap());

        let spec = s.node.spec(&id);
        assert_eq!(
            spec.network,
            NetworkSpec {
                allow_out: strings(&["10.1.0.0/16", "allowed.test", "*.wild.test"]),
                deny_out: strings(&["0.0.0.0/0"]),
                dns_servers: strings(&["198.18.0.2"]),
            }
        );
        assert!(spec.allow_internet_access);
        assert_eq!(
            spec.ingress,
            IngressSpec {
                traffic_access_token: Some(token.clone()),
                mask_request_host: Some("${PORT}-masked.test".into()),
            }
        );

        let d = info(&s, &id).await;
        assert_eq!(
            d["network"],
            json!({
                "allowOut": ["10.1.0.0/16", "allowed.test", "*.wild.test"],
                "denyOut": ["0.0.0.0/0"],
                "dnsServers": ["198.18.0.2"],
                "allowPublicTraffic": false,
                "maskRequestHost": "${PORT}-masked.test"
            }),
            "{path}"
        );
        assert_eq!(d["allowInternetAccess"], true);
        // The token is not part of the detail (only create and connect
        // hand it out).
        assert!(d.get("trafficAccessToken").is_none(), "{d}");
    }
}

#[tokio::test]
async fn sandboxes_without_network_are_unrestricted_and_public() {
    let s = Server::start().await;
    let r = s
        .call("POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
        .await;
    r.assert_status(201);
    let v = r.json();
    // Documented nullable: present, null.
    assert!(v.as_object().unwrap().contains_key("trafficAccessToken"));
    assert!(v["trafficAccessToken"].is_null());
    let id = v["sandboxID"].as_str().unwrap();
    let spec = s.node.spec(id);
    assert_eq!(spec.network, NetworkSpec::default());
    assert_eq!(spec.ingress, IngressSpec::default());
    assert!(spec.allow_internet_access);
    let d = info(&s, id).await;
    assert!(d.get("network").is_none(), "{d}");
    assert!(d.get("allowInternetAccess").is_none(), "{d}");

    // Public explicitly, or no ingress key at all: no token.
    for network in [
        json!({"allowPublicTraffic": true}),
        json!({"allowPublicTraffic": null}),
        json!({"denyOut": ["10.0.0.0/8"]}),
        json!({"maskRequestHost": ""}),
    ] {
        let r = s
            .call(
                "POST",
                "/v2/sandboxes",
                Some(json!({"templateID": "base", "network": network})),
            )
            .await;
        r.assert_status(201);
        let v = r.json();
        assert!(v["trafficAccessToken"].is_null(), "{network} {v}");
        let spec = s.node.spec(v["sandboxID"].as_str().unwrap());
        assert_eq!(spec.ingress, IngressSpec::default(), "{network}");
    }
}

#[tokio::test]
async fn allow_internet_access_false_is_accepted_and_echoed() {
    let s = Server::start().await;
    let id = s
        .create(json!({"templateID": "base", "allow_internet_access": false}))
        .await;
    let spec = s.node.spec(&id);
    assert!(!spec.allow_internet_access);
    assert_eq!(spec.network, NetworkSpec::default());
    assert_eq!(info(&s, &id).await["allowInternetAccess"], false);
    // It denies everything, so domains may be allowed without 0.0.0.0/0.
    let id = s
        .create(json!({
            "templateID": "base",
            "allow_internet_access": false,
            "network": {"allowOut": ["allowed.test"]}
        }))
        .await;
    assert_eq!(s.node.spec(&id).network.allow_out, ["allowed.test"]);
}

#[tokio::test]
async fn what_cannot_be_enforced_is_a_400_naming_the_key() {
    let s = Server::start().await;
    let cases = [
        (
            json!({"rules": {"api.test": [{"transform": {"headers": {"X-Key": "v"}}}]}}),
            "network.rules (header transforms) are not supported",
        ),
        (
            json!({"egressProxy": {"address": "127.0.0.1:1080"}}),
            "network.egressProxy",
        ),
        (json!({"httpsPorts": [3000]}), "network.httpsPorts"),
        (json!({"maskRequestHost": "a b.test"}), "maskRequestHost"),
        (
            json!({"maskRequestHost": "x".repeat(254)}),
            "maskRequestHost",
        ),
        (json!({"allowOut": ["allowed.test"]}), "0.0.0.0/0"),
        (
            json!({"allowOut": ["allowed.test"], "denyOut": ["10.0.0.0/8"]}),
            "0.0.0.0/0",
        ),
        (json!({"denyOut": ["denied.test"]}), "no domains"),
        (json!({"allowOut": ["2001:db8::/32"]}), "IPv6"),
        (json!({"denyOut": ["10.1.2.3/24"]}), "10.1.2.0/24"),
        (
            json!({"dnsServers": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4", "9.9.9.9",
                "1.1.1.2", "1.1.1.3", "1.0.0.2", "1.0.0.3", "4.4.4.4", "5.5.5.5"]}),
            "at most 10",
        ),
        (json!({"dnsServers": ["dns.google"]}), "dns.google"),
    ];
    for path in ["/v2/sandboxes", "/sandboxes"] {
        for (network, needle) in &cases {
            let v = s
                .call(
                    "POST",
                    path,
                    Some(json!({"templateID": "base", "network": network})),
                )
                .await
                .assert_error(400);
            let msg = v["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{path} {network}: {msg}");
        }
    }
    assert!(
        s.node.specs.lock().unwrap().is_empty(),
        "a refused create reached the node"
    );
    // Empty forms of the refused keys are fine.
    s.create(json!({"templateID": "base", "network": {"rules": {}, "egressProxy": null, "httpsPorts": []}}))
        .await;
}

async fn put_replaces_egress_and_keeps_ingress(db: TestDb) {
    let s = Server::on(db).await;
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "network": full_network(), "allow_internet_access": false})),
        )
        .await;
    r.assert_status(201);
    let created = r.json();
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["trafficAccessToken"].as_str().unwrap().to_string();

    let r = put(
        &s,
        &id,
        json!({"allowOut": ["1.2.3.4", "new.test"], "denyOut": ["0.0.0.0/0"], "dnsServers": ["9.9.9.9"], "allow_internet_access": true}),
    )
    .await;
    r.assert_status(204);
    assert!(r.body.is_empty());
    {
        let ups = s.node.network_updates.lock().unwrap();
        let (uid, spec, allow) = ups.last().unwrap();
        assert_eq!(uid.as_str(), id);
        assert_eq!(spec.allow_out, ["1.2.3.4", "new.test"]);
        assert_eq!(spec.deny_out, ["0.0.0.0/0"]);
        assert_eq!(spec.dns_servers, ["9.9.9.9"]);
        assert!(*allow);
    }
    let d = info(&s, &id).await;
    assert_eq!(
        d["network"],
        json!({
            "allowOut": ["1.2.3.4", "new.test"],
            "denyOut": ["0.0.0.0/0"],
            "dnsServers": ["9.9.9.9"],
            "allowPublicTraffic": false,
            "maskRequestHost": "${PORT}-masked.test"
        })
    );
    assert_eq!(d["allowInternetAccess"], true);

    // Omitted keys are cleared; the flag defaults to allowed.
    put(&s, &id, json!({})).await.assert_status(204);
    {
        let ups = s.node.network_updates.lock().unwrap();
        assert_eq!(ups.last().unwrap().1, NetworkSpec::default());
        assert!(ups.last().unwrap().2);
    }
    let d = info(&s, &id).await;
    assert_eq!(
        d["network"],
        json!({"allowPublicTraffic": false, "maskRequestHost": "${PORT}-masked.test"})
    );
    assert!(d.get("allowInternetAccess").is_none(), "{d}");

    // allow_internet_access alone denies all (domains need nothing else).
    put(
        &s,
        &id,
        json!({"allow_internet_access": false, "allowOut": ["allowed.test"], "rules": {}, "egressProxy": null}),
    )
    .await
    .assert_status(204);
    assert!(!s.node.network_updates.lock().unwrap().last().unwrap().2);
    assert_eq!(info(&s, &id).await["allowInternetAccess"], false);

    // The token stays: connect hands out the one create did.
    let r = s
        .call(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({})),
        )
        .await;
    r.assert_status(200);
    assert_eq!(r.json()["trafficAccessToken"], token.as_str());

    // A sandbox made without network gets egress keys only.
    let plain = s.create(json!({"templateID": "base"})).await;
    put(&s, &plain, json!({"denyOut": ["10.0.0.0/8"]}))
        .await
        .assert_status(204);
    assert_eq!(
        info(&s, &plain).await["network"],
        json!({"denyOut": ["10.0.0.0/8"]})
    );
}
on_both_backends!(put_replaces_egress_and_keeps_ingress);

#[tokio::test]
async fn put_errors_leave_the_stored_settings_alone() {
    let s = Server::start().await;
    let id = s
        .create(json!({"templateID": "base", "network": {"denyOut": ["10.0.0.0/8"]}}))
        .await;
    let before = info(&s, &id).await["network"].clone();
    for (body, needle) in [
        (json!({"allowOut": ["allowed.test"]}), "0.0.0.0/0"),
        (json!({"denyOut": ["x.test"]}), "no domains"),
        (json!({"rules": {"a.test": [{}]}}), "network.rules"),
        (
            json!({"egressProxy": {"address": "p:1"}}),
            "network.egressProxy",
        ),
        (json!({"dnsServers": ["::1"]}), "dnsServers"),
    ] {
        let v = put(&s, &id, body.clone()).await.assert_error(400);
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    assert!(s.node.network_updates.lock().unwrap().is_empty());

    // Unknown, and another team's: 404 alike.
    put(&s, "inope", json!({})).await.assert_error(404);
    s.api.create_team("other").await.unwrap();
    let other_key = s.api.create_key("other").await.unwrap();
    s.call_as(
        &other_key,
        "PUT",
        &format!("/sandboxes/{id}/network"),
        Some(json!({})),
    )
    .await
    .assert_error(404);

    // Paused: the node refuses, 409.
    s.call("POST", &format!("/sandboxes/{id}/pause"), Some(json!({})))
        .await
        .assert_status(204);
    let v = put(&s, &id, json!({"denyOut": ["0.0.0.0/0"]}))
        .await
        .assert_error(409);
    assert!(v["message"].as_str().unwrap().contains("paused"), "{v}");

    // A node failure is a 500 with the generic body.
    s.call(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({})),
    )
    .await
    .assert_status(201);
    s.node
        .fail_next_network_update(NodeError::Internal("nft said no".into()));
    let v = put(&s, &id, json!({})).await.assert_error(500);
    assert!(!v["message"].as_str().unwrap().contains("nft"), "{v}");

    assert_eq!(info(&s, &id).await["network"], before);
    assert!(s.node.network_updates.lock().unwrap().is_empty());

    // A sandbox the node lost: 404, and the record goes.
    s.node.end(&id);
    put(&s, &id, json!({})).await.assert_error(404);
}

fn log_entry(ms: i64, verdict: Verdict, name: Option<&str>) -> EgressLogEntry {
    EgressLogEntry {
        timestamp: DateTime::<Utc>::from_timestamp_millis(ms).unwrap(),
        protocol: "tls".into(),
        destination: "198.18.0.2".into(),
        port: Some(443),
        name: name.map(str::to_string),
        verdict,
        rule: "allowOut".into(),
        count: 1,
    }
}

#[tokio::test]
async fn network_logs_filter_by_start_and_limit() {
    let s = Server::start().await;
    let id = s.create(json!({"templateID": "base"})).await;
    let path = format!("/sandboxes/{id}/network/logs");
    // Empty log.
    let r = s.call("GET", &path, None).await;
    r.assert_status(200);
    assert_eq!(r.json(), json!({"entries": []}));

    let base = 1_700_000_000_000;
    s.node.set_egress_log(
        &id,
        vec![
            log_entry(base + 2000, Verdict::Denied, None),
            log_entry(base, Verdict::Allowed, Some("allowed.test")),
            log_entry(base + 1000, Verdict::Denied, Some("denied.test")),
        ],
    );
    let r = s.call("GET", &path, None).await;
    r.assert_status(200);
    let v = r.json();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    // Oldest first, with the entry's fields.
    assert_eq!(entries[0]["name"], "allowed.test");
    assert_eq!(entries[0]["verdict"], "allowed");
    assert_eq!(entries[0]["protocol"], "tls");
    assert_eq!(entries[0]["destination"], "198.18.0.2");
    assert_eq!(entries[0]["port"], 443);
    assert_eq!(entries[0]["rule"], "allowOut");
    assert_eq!(entries[0]["count"], 1);
    assert_eq!(entries[1]["name"], "denied.test");
    assert!(entries[2].get("name").is_none());
    let back: EgressLogEntry = serde_json::from_value(entries[1].clone()).unwrap();
    assert_eq!(
        back,
        log_entry(base + 1000, Verdict::Denied, Some("denied.test"))
    );

    let names = |v: Value| -> Vec<Value> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["timestamp"].clone())
            .collect()
    };
    let by_ms = s
        .call("GET", &format!("{path}?start={}", base + 1000), None)
        .await;
    by_ms.assert_status(200);
    assert_eq!(names(by_ms.json()).len(), 2);
    let by_time = s
        .call(
            "GET",
            &format!("{path}?start=2023-11-14T22:13:21.000Z"),
            None,
        )
        .await;
    by_time.assert_status(200);
    assert_eq!(names(by_time.json()), names(by_ms.json()));
    let one = s.call("GET", &format!("{path}?limit=1"), None).await;
    assert_eq!(one.json()["entries"][0]["name"], "allowed.test");
    assert_eq!(names(one.json()).len(), 1);
    let later = s
        .call("GET", &format!("{path}?start={}&limit=1", base + 1), None)
        .await;
    assert_eq!(later.json()["entries"][0]["name"], "denied.test");

    for q in ["limit=2001", "limit=-1", "limit=x", "start=yesterday"] {
        s.call("GET", &format!("{path}?{q}"), None)
            .await
            .assert_error(400);
    }
    s.call("GET", &format!("{path}?limit=2000"), None)
        .await
        .assert_status(200);
    s.call("GET", "/sandboxes/inope/network/logs", None)
        .await
        .assert_error(404);
    s.api.create_team("other").await.unwrap();
    let other_key = s.api.create_key("other").await.unwrap();
    s.call_as(&other_key, "GET", &path, None)
        .await
        .assert_error(404);
}

#[tokio::test]
async fn connect_and_resume_return_the_token_of_private_sandboxes_only() {
    let s = Server::start().await;
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "network": {"allowPublicTraffic": false}})),
        )
        .await;
    r.assert_status(201);
    let id = r.json()["sandboxID"].as_str().unwrap().to_string();
    let token = r.json()["trafficAccessToken"].as_str().unwrap().to_string();
    let public = s.create(json!({"templateID": "base"})).await;

    for (sid, want) in [(id.as_str(), json!(token)), (public.as_str(), Value::Null)] {
        // Running: v1 and v2 connect.
        let r = s
            .call(
                "POST",
                &format!("/sandboxes/{sid}/connect"),
                Some(json!({"timeout": 60})),
            )
            .await;
        r.assert_status(200);
        assert_eq!(r.json()["trafficAccessToken"], want);
        // Paused: connect resumes (201), so does the deprecated resume.
        for (path, body) in [
            (format!("/v2/sandboxes/{sid}/connect"), json!({})),
            (format!("/sandboxes/{sid}/resume"), json!({"timeout": 60})),
        ] {
            s.call("POST", &format!("/sandboxes/{sid}/pause"), Some(json!({})))
                .await
                .assert_status(204);
            let r = s.call("POST", &path, Some(body)).await;
            r.assert_status(201);
            assert_eq!(r.json()["trafficAccessToken"], want, "{path}");
        }
    }
}

async fn forks_copy_the_network_settings_with_tokens_of_their_own(db: TestDb) {
    let s = Server::on(db).await;
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "network": full_network(), "allow_internet_access": false})),
        )
        .await;
    r.assert_status(201);
    let src = r.json()["sandboxID"].as_str().unwrap().to_string();
    let src_token = r.json()["trafficAccessToken"].as_str().unwrap().to_string();
    let src_spec = s.node.spec(&src);

    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{src}/fork"),
            Some(json!({"count": 2})),
        )
        .await;
    r.assert_status(201);
    let forks = r.json();
    let specs = s.node.forks.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(specs.len(), 2);
    let mut tokens = vec![src_token];
    for (f, spec) in forks.as_array().unwrap().iter().zip(&specs) {
        let sb = &f["sandbox"];
        assert_eq!(sb["sandboxID"], spec.sandbox_id.as_str());
        assert_eq!(spec.network, src_spec.network);
        assert!(!spec.allow_internet_access);
        assert_eq!(
            spec.ingress.mask_request_host.as_deref(),
            Some("${PORT}-masked.test")
        );
        let token = sb["trafficAccessToken"].as_str().unwrap().to_string();
        assert_eq!(
            spec.ingress.traffic_access_token.as_deref(),
            Some(token.as_str())
        );
        assert!(!tokens.contains(&token), "forks share a token");
        tokens.push(token);
        let d = info(&s, sb["sandboxID"].as_str().unwrap()).await;
        assert_eq!(d["network"], info(&s, &src).await["network"]);
        assert_eq!(d["allowInternetAccess"], false);
    }

    // Forks of a public sandbox are public.
    let public = s
        .create(json!({"templateID": "base", "network": {"denyOut": ["10.0.0.0/8"]}}))
        .await;
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{public}/fork"),
            Some(json!({})),
        )
        .await;
    r.assert_status(201);
    let f = &r.json()[0]["sandbox"];
    assert!(f["trafficAccessToken"].is_null(), "{f}");
    let spec = s.node.forks.lock().unwrap().last().unwrap().1[0].clone();
    assert_eq!(spec.network.deny_out, ["10.0.0.0/8"]);
    assert_eq!(spec.ingress, IngressSpec::default());
}
on_both_backends!(forks_copy_the_network_settings_with_tokens_of_their_own);
