//! Forks and snapshots (CONTRACT 2.5) over real HTTP against a fake node
//! and a fake builder.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use std::collections::BTreeSet;

use arca_proto::build::BASE_BUILD_ID;
use arca_proto::node::{NodeError, SandboxId, TimeoutAction};
use chrono::{DateTime, Utc};
use common::{BUILT_ENVD_VERSION, Server, TestDb, on_both_backends, run_steps};
use serde_json::{Value, json};

/// A second team with its own key.
async fn other_team(s: &Server) -> String {
    s.api.create_team("other").await.unwrap();
    s.api.create_key("other").await.unwrap()
}

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

/// Ids of the team's listed sandboxes.
async fn listed(s: &Server) -> BTreeSet<String> {
    let r = s.call("GET", "/v2/sandboxes", None).await;
    r.assert_status(200);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["sandboxID"].as_str().unwrap().to_string())
        .collect()
}

/// `GET /snapshots{query}` as `key`: the snapshot ids.
async fn snapshot_ids(s: &Server, key: &str, query: &str) -> Vec<String> {
    let r = s
        .call_as(key, "GET", &format!("/snapshots{query}"), None)
        .await;
    r.assert_status(200);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["snapshotID"].as_str().unwrap().to_string())
        .collect()
}

/// `POST /sandboxes/{id}/snapshots` expecting 201.
async fn snapshot(s: &Server, id: &str, body: Value) -> Value {
    let r = s
        .call("POST", &format!("/sandboxes/{id}/snapshots"), Some(body))
        .await;
    r.assert_status(201);
    r.json()
}

/// Creates a sandbox from `r`; the build the node was asked to start.
async fn build_started_from(s: &Server, r: &str) -> String {
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": r})))
        .await
        .assert_status(201);
    s.node
        .specs
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .build_id
        .clone()
}

fn enc(r: &str) -> String {
    r.replace('/', "%2F").replace(':', "%3A")
}

async fn forks_are_new_sandboxes_and_the_source_stays_as_it_is(db: TestDb) {
    let s = Server::on(db).await;
    let src = s
        .create(json!({
            "templateID": "base",
            "timeout": 600,
            "metadata": {"who": "src"},
            "autoPause": true,
            "autoResume": {"enabled": true},
        }))
        .await;
    let before = s
        .call("GET", &format!("/sandboxes/{src}"), None)
        .await
        .json();

    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{src}/fork"),
            Some(json!({"timeout": 60, "count": 3})),
        )
        .await;
    r.assert_status(201);
    let v = r.json();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3, "{v}");
    let mut ids = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for it in items {
        assert!(it.get("error").is_none(), "{it}");
        let sb = &it["sandbox"];
        for k in [
            "sandboxID",
            "templateID",
            "clientID",
            "envdVersion",
            "envdAccessToken",
        ] {
            assert!(sb.get(k).is_some(), "{k} missing in {sb}");
        }
        assert_eq!(sb["templateID"], "base");
        assert_eq!(sb["alias"], "base");
        assert_eq!(sb["domain"], "arca.test");
        ids.insert(sb["sandboxID"].as_str().unwrap().to_string());
        tokens.insert(sb["envdAccessToken"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 3);
    assert!(!ids.contains(&src));
    assert_eq!(tokens.len(), 3);
    assert!(!tokens.contains(before["envdAccessToken"].as_str().unwrap()));

    // One node call with one spec per fork, in answer order.
    let forks = s.node.forks.lock().unwrap().clone();
    assert_eq!(forks.len(), 1);
    let (source, specs) = &forks[0];
    assert_eq!(source.as_str(), src);
    let spec_ids: Vec<&str> = specs.iter().map(|s| s.sandbox_id.as_str()).collect();
    let answer_ids: Vec<&str> = items
        .iter()
        .map(|i| i["sandbox"]["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(spec_ids, answer_ids);
    for spec in specs {
        assert_eq!(spec.template_id, "base");
        assert_eq!(spec.build_id, BASE_BUILD_ID);
        assert_eq!(spec.on_timeout, TimeoutAction::Pause);
        assert!(spec.auto_resume);
        assert_eq!(spec.timeout_secs, 60);
        let left = (spec.end_at - Utc::now()).num_seconds();
        assert!((55..=60).contains(&left), "{left}");
    }

    // Listed, with the source's metadata and lifecycle.
    let all = listed(&s).await;
    assert_eq!(all.len(), 4);
    assert!(ids.iter().all(|id| all.contains(id)));
    for id in &ids {
        let d = s.call("GET", &format!("/sandboxes/{id}"), None).await;
        d.assert_status(200);
        let d = d.json();
        assert_eq!(d["metadata"], json!({"who": "src"}));
        assert_eq!(
            d["lifecycle"],
            json!({"autoResume": true, "onTimeout": "pause"})
        );
        assert_eq!(d["state"], "running");
        let left = (time(&d["endAt"]) - Utc::now()).num_seconds();
        assert!((55..=60).contains(&left), "{left}");
    }

    // The source is untouched.
    let after = s
        .call("GET", &format!("/sandboxes/{src}"), None)
        .await
        .json();
    assert_eq!(after["sandboxID"], before["sandboxID"]);
    assert_eq!(after["endAt"], before["endAt"]);
    assert_eq!(after["envdAccessToken"], before["envdAccessToken"]);

    // Defaults: one fork of 15 seconds.
    let r = s
        .call("POST", &format!("/sandboxes/{src}/fork"), None)
        .await;
    r.assert_status(201);
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let id = v[0]["sandbox"]["sandboxID"].as_str().unwrap();
    let d = s
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .json();
    let left = (time(&d["endAt"]) - Utc::now()).num_seconds();
    assert!((10..=15).contains(&left), "{left}");
}
on_both_backends!(forks_are_new_sandboxes_and_the_source_stays_as_it_is);

#[tokio::test]
async fn forks_of_a_built_template_name_its_build() {
    let s = Server::start().await;
    let (t, b, st) = s.build("app", run_steps(&["echo hi"])).await;
    assert_eq!(st["status"], "ready");
    let src = s.create(json!({"templateID": "app"})).await;
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{src}/fork"),
            Some(json!({"count": 2})),
        )
        .await;
    r.assert_status(201);
    let v = r.json();
    assert_eq!(v[0]["sandbox"]["templateID"], t.as_str());
    assert_eq!(v[0]["sandbox"]["alias"], "app");
    let forks = s.node.forks.lock().unwrap().clone();
    assert!(
        forks[0]
            .1
            .iter()
            .all(|spec| spec.template_id == t && spec.build_id == b)
    );
}

#[tokio::test]
async fn fork_requests_are_validated_and_unknown_sources_are_404() {
    let s = Server::start().await;
    let src = s.create(json!({"templateID": "base"})).await;
    for body in [
        json!({"count": 0}),
        json!({"count": 101}),
        json!({"count": -1}),
        json!({"timeout": 0}),
        json!({"timeout": 1_000_000_000}),
        json!({"count": "two"}),
    ] {
        s.call("POST", &format!("/sandboxes/{src}/fork"), Some(body))
            .await
            .assert_error(400);
    }
    s.call("POST", "/sandboxes/inope/fork", Some(json!({})))
        .await
        .assert_error(404);
    s.call("POST", "/sandboxes/NOPE!/fork", Some(json!({})))
        .await
        .assert_error(400);
    let foreign = other_team(&s).await;
    s.call_as(&foreign, "POST", &format!("/sandboxes/{src}/fork"), None)
        .await
        .assert_error(404);
    let r = s
        .raw("POST", &format!("/sandboxes/{src}/fork"), &[], None)
        .await;
    r.assert_error(401);
    assert!(s.node.forks.lock().unwrap().is_empty());
    assert_eq!(listed(&s).await.len(), 1);
}

#[tokio::test]
async fn each_fork_fails_on_its_own_and_a_failed_call_leaves_nothing() {
    let s = Server::start().await;
    let src = s.create(json!({"templateID": "base"})).await;
    s.node.fail_fork(1, NodeError::Capacity("node full".into()));
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{src}/fork"),
            Some(json!({"count": 3})),
        )
        .await;
    r.assert_status(201);
    let v = r.json();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items[0]["sandbox"]["sandboxID"].is_string(), "{v}");
    assert!(items[2]["sandbox"]["sandboxID"].is_string(), "{v}");
    assert!(items[1].get("sandbox").is_none(), "{v}");
    assert_eq!(items[1]["error"]["code"], 503);
    assert!(
        items[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("node full")
    );
    let failed = s.node.forks.lock().unwrap()[0].1[1].sandbox_id.clone();
    let all = listed(&s).await;
    assert_eq!(all.len(), 3);
    assert!(!all.contains(failed.as_str()));
    s.call("GET", &format!("/sandboxes/{failed}"), None)
        .await
        .assert_error(404);

    // An internal failure of one fork says nothing internal.
    s.node
        .fail_fork(0, NodeError::Internal("disk on fire".into()));
    let v = s
        .call("POST", &format!("/sandboxes/{src}/fork"), None)
        .await
        .json();
    assert_eq!(v[0]["error"]["code"], 500);
    assert!(!v[0]["error"]["message"].as_str().unwrap().contains("fire"));

    // The whole call failing: the usual error, no record left.
    s.node
        .fail_next_fork(NodeError::Conflict("source is paused".into()));
    s.call(
        "POST",
        &format!("/sandboxes/{src}/fork"),
        Some(json!({"count": 2})),
    )
    .await
    .assert_error(409);
    assert_eq!(listed(&s).await.len(), 3);
    // A source the node lost is 404 and loses its record.
    s.node
        .fail_next_fork(NodeError::SandboxNotFound(SandboxId::parse(&src).unwrap()));
    s.call("POST", &format!("/sandboxes/{src}/fork"), None)
        .await
        .assert_error(404);
    let all = listed(&s).await;
    assert_eq!(all.len(), 2);
    assert!(!all.contains(&src));
}

async fn a_snapshot_is_a_template_to_start_from_list_and_delete(db: TestDb) {
    let s = Server::on(db).await;
    let src = s
        .create(json!({"templateID": "base", "metadata": {"k": "v"}}))
        .await;
    let v = snapshot(&s, &src, json!({})).await;
    let id = v["snapshotID"].as_str().unwrap().to_string();
    assert_eq!(v["names"], json!([]));
    let (t, tag) = id.split_once(':').unwrap();
    assert_eq!(tag, "default");
    assert_eq!(t.len(), 20);

    // The node copied the files into the build before it was ready.
    let snaps = s.node.snapshots.lock().unwrap().clone();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].0.as_str(), src);
    assert_eq!(snaps[0].1, t);
    let b = snaps[0].2.clone();
    let st = s.build_status(t, &b, "").await;
    assert_eq!(st["status"], "ready");
    let tpl = s.call("GET", &format!("/templates/{t}"), None).await.json();
    assert_eq!(tpl["public"], false);
    assert_eq!(tpl["buildID"], b.as_str());
    assert_eq!(tpl["envdVersion"], "0.6.13");
    assert_eq!(
        (&tpl["cpuCount"], &tpl["memoryMB"], &tpl["diskSizeMB"]),
        (&json!(2), &json!(512), &json!(1024))
    );

    // The source goes on.
    s.call("GET", &format!("/sandboxes/{src}"), None)
        .await
        .assert_status(200);

    // Sandboxes start from it by its id.
    let r = s
        .call("POST", "/v2/sandboxes", Some(json!({"templateID": id})))
        .await;
    r.assert_status(201);
    assert_eq!(r.json()["templateID"], t);
    let spec = s.node.specs.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        (spec.template_id.as_str(), spec.build_id.as_str()),
        (t, b.as_str())
    );

    // Listed, and found by source and by name or id.
    let named = snapshot(&s, &src, json!({"name": "My-Snap"})).await;
    assert_eq!(named["snapshotID"], "my-snap:default");
    assert_eq!(named["names"], json!(["my-snap"]));
    let key = s.key.clone();
    assert_eq!(
        snapshot_ids(&s, &key, "").await,
        ["my-snap:default", id.as_str()]
    );
    let r = s.call("GET", "/snapshots", None).await.json();
    assert_eq!(
        r[0],
        json!({"snapshotID": "my-snap:default", "names": ["my-snap"]})
    );
    assert_eq!(
        snapshot_ids(&s, &key, &format!("?sandboxID={src}"))
            .await
            .len(),
        2
    );
    assert!(snapshot_ids(&s, &key, "?sandboxID=iother").await.is_empty());
    assert!(
        snapshot_ids(&s, &key, "?sandboxID=NOT-AN-ID")
            .await
            .is_empty()
    );
    for q in ["my-snap", "my-snap:default", "MY-SNAP", "default/my-snap"] {
        assert_eq!(
            snapshot_ids(&s, &key, &format!("?name={}", enc(q))).await,
            ["my-snap:default"],
            "{q}"
        );
    }
    assert_eq!(
        snapshot_ids(&s, &key, &format!("?name={}", enc(&id))).await,
        [id.as_str()]
    );
    for q in ["nope", "my-snap:v9", "base", "someone/my-snap", "a.b"] {
        assert!(
            snapshot_ids(&s, &key, &format!("?name={}", enc(q)))
                .await
                .is_empty(),
            "{q}"
        );
    }

    // Paging, newest first.
    let r = s.call("GET", "/snapshots?limit=1", None).await;
    r.assert_status(200);
    assert_eq!(r.json()[0]["snapshotID"], "my-snap:default");
    let token = r.headers["x-next-token"].to_str().unwrap().to_string();
    let r = s
        .call(
            "GET",
            &format!("/snapshots?limit=1&nextToken={token}"),
            None,
        )
        .await;
    assert_eq!(r.json()[0]["snapshotID"], id.as_str());
    assert!(r.headers.get("x-next-token").is_none());
    s.call("GET", "/snapshots?limit=0", None)
        .await
        .assert_error(400);
    s.call("GET", "/snapshots?nextToken=%21", None)
        .await
        .assert_error(400);

    // Deleted by its id, percent-encoded as the SDK sends it.
    let path = format!("/templates/{}", enc(&id));
    s.call("DELETE", &path, None).await.assert_status(204);
    s.call("DELETE", &path, None).await.assert_error(404);
    assert_eq!(snapshot_ids(&s, &key, "").await, ["my-snap:default"]);
    assert!(
        s.builder
            .deleted
            .lock()
            .unwrap()
            .contains(&(t.to_string(), b.clone()))
    );
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": id})))
        .await
        .assert_error(404);
    s.call("DELETE", "/templates/my-snap%3Adefault", None)
        .await
        .assert_status(204);
    assert!(snapshot_ids(&s, &key, "").await.is_empty());
    // Sandboxes started from it go on.
    assert_eq!(listed(&s).await.len(), 2);
}
on_both_backends!(a_snapshot_is_a_template_to_start_from_list_and_delete);

async fn snapshots_copy_their_source_build_and_names_follow_template_rules(db: TestDb) {
    let s = Server::on(db).await;
    let mut start = run_steps(&["echo hi"]);
    start["startCmd"] = json!("serve");
    start["readyCmd"] = json!("ready");
    let (t, _, st) = s.build("app", start).await;
    assert_eq!(st["status"], "ready");
    let src = s.create(json!({"templateID": "app"})).await;

    let v = snapshot(&s, &src, json!({"name": "snap:v1", "memory": false})).await;
    assert_eq!(v["snapshotID"], "snap:v1");
    assert_eq!(v["names"], json!(["snap"]));
    let b1 = s.node.snapshots.lock().unwrap()[0].2.clone();
    let tpl = s.call("GET", "/templates/snap", None).await.json();
    assert_eq!(tpl["envdVersion"], BUILT_ENVD_VERSION);
    // Start and ready command are the source build's.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&s.db_url).await.unwrap();
    let (start_cmd, ready_cmd): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT start_cmd, ready_cmd FROM template_builds WHERE id = $1")
            .bind(&b1)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (start_cmd.as_deref(), ready_cmd.as_deref()),
        (Some("serve"), Some("ready"))
    );
    pool.close().await;

    // The tag works for create, lookups and the name filter.
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "snap:v1"})),
        )
        .await;
    r.assert_status(201);
    let key = s.key.clone();
    assert_eq!(snapshot_ids(&s, &key, "?name=snap%3Av1").await, ["snap:v1"]);
    assert!(snapshot_ids(&s, &key, "?name=snap%3Av2").await.is_empty());

    // The same name again is a conflict: one snapshot per name, so its id
    // names exactly one copy. The node is not asked.
    let v = s
        .call(
            "POST",
            &format!("/sandboxes/{src}/snapshots"),
            Some(json!({"name": "snap:v2"})),
        )
        .await
        .assert_error(409);
    assert!(v["message"].as_str().unwrap().contains("exists"), "{v}");
    assert_eq!(s.node.snapshots.lock().unwrap().len(), 1);
    assert_eq!(snapshot_ids(&s, &key, "").await, ["snap:v1"]);
    assert_eq!(build_started_from(&s, "snap:v1").await, b1);

    // Names of templates that are not snapshots, or are someone else's,
    // cannot be taken; bad names and memory snapshots are refused.
    for (body, status) in [
        (json!({"name": "app"}), 409),
        (json!({"name": t}), 409),
        (json!({"name": "base"}), 409),
        (json!({"name": "a b"}), 400),
        (
            json!({"name": "snap:00000000-0000-4000-8000-000000000000"}),
            400,
        ),
        (json!({"name": "someone/snap"}), 400),
        (json!({"memory": true}), 400),
    ] {
        let r = s
            .call(
                "POST",
                &format!("/sandboxes/{src}/snapshots"),
                Some(body.clone()),
            )
            .await;
        let e = r.assert_error(status);
        if body.get("memory").is_some() {
            let m = e["message"].as_str().unwrap();
            assert!(m.contains("memory") && m.contains("false"), "{m}");
        }
    }
    s.call("POST", "/sandboxes/inope/snapshots", Some(json!({})))
        .await
        .assert_error(404);
    assert_eq!(s.node.snapshots.lock().unwrap().len(), 1);
    // A team-qualified name with the team's own name is fine.
    let v = snapshot(&s, &src, json!({"name": "default/snap2"})).await;
    assert_eq!(v["snapshotID"], "snap2:default");

    // A snapshot id with a tag deletes the snapshot; a tag of any other
    // template still cannot be deleted this way.
    s.call("DELETE", "/templates/app%3Ax", None)
        .await
        .assert_error(400);
    s.call("DELETE", "/templates/snap%3Anope", None)
        .await
        .assert_error(404);
    s.call("DELETE", "/templates/snap%3Av1", None)
        .await
        .assert_status(204);
    assert_eq!(snapshot_ids(&s, &key, "").await, ["snap2:default"]);
    s.call(
        "POST",
        "/templates/tags",
        Some(json!({"target": "snap2", "tags": ["x"]})),
    )
    .await
    .assert_status(201);
    s.call("DELETE", "/templates/default%2Fsnap2%3Ax", None)
        .await
        .assert_status(204);
    assert!(snapshot_ids(&s, &key, "").await.is_empty());
    s.call("GET", "/templates/app", None)
        .await
        .assert_status(200);
}
on_both_backends!(snapshots_copy_their_source_build_and_names_follow_template_rules);

#[tokio::test]
async fn a_failed_snapshot_leaves_nothing_behind() {
    let s = Server::start().await;
    let src = s.create(json!({"templateID": "base"})).await;
    s.node
        .fail_next_snapshot(NodeError::Internal("no space".into()));
    s.call(
        "POST",
        &format!("/sandboxes/{src}/snapshots"),
        Some(json!({"name": "snap"})),
    )
    .await
    .assert_error(500);
    let key = s.key.clone();
    assert!(snapshot_ids(&s, &key, "").await.is_empty());
    s.call("GET", "/templates/snap", None)
        .await
        .assert_error(404);
    let templates = s.call("GET", "/templates", None).await.json();
    assert_eq!(templates.as_array().unwrap().len(), 1, "{templates}");
    // The name is free again.
    snapshot(&s, &src, json!({"name": "snap"})).await;

    // A node short of capacity: 503, nothing left, the first one stays.
    s.node
        .fail_next_snapshot(NodeError::Capacity("busy".into()));
    s.call(
        "POST",
        &format!("/sandboxes/{src}/snapshots"),
        Some(json!({"name": "other"})),
    )
    .await
    .assert_error(503);
    assert_eq!(snapshot_ids(&s, &key, "").await, ["snap:default"]);
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": "snap"})))
        .await
        .assert_status(201);

    // A source the node lost: 404, and its record goes.
    s.node
        .fail_next_snapshot(NodeError::SandboxNotFound(SandboxId::parse(&src).unwrap()));
    s.call("POST", &format!("/sandboxes/{src}/snapshots"), None)
        .await
        .assert_error(404);
    s.call("GET", &format!("/sandboxes/{src}"), None)
        .await
        .assert_error(404);
}

async fn another_team_cannot_see_use_or_delete_a_snapshot(db: TestDb) {
    let s = Server::on(db).await;
    let src = s.create(json!({"templateID": "base"})).await;
    let v = snapshot(&s, &src, json!({"name": "mine"})).await;
    let id = v["snapshotID"].as_str().unwrap().to_string();
    let unnamed = snapshot(&s, &src, json!({})).await;
    let unnamed = unnamed["snapshotID"].as_str().unwrap().to_string();
    let foreign = other_team(&s).await;

    assert!(snapshot_ids(&s, &foreign, "").await.is_empty());
    assert!(snapshot_ids(&s, &foreign, "?name=mine").await.is_empty());
    assert!(
        snapshot_ids(&s, &foreign, &format!("?sandboxID={src}"))
            .await
            .is_empty()
    );
    for r in [&id, &unnamed] {
        s.call_as(
            &foreign,
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": r})),
        )
        .await
        .assert_error(403);
        s.call_as(&foreign, "DELETE", &format!("/templates/{}", enc(r)), None)
            .await
            .assert_error(403);
    }
    // Nor snapshot or fork the team's sandboxes, nor take the name.
    s.call_as(
        &foreign,
        "POST",
        &format!("/sandboxes/{src}/snapshots"),
        None,
    )
    .await
    .assert_error(404);
    let theirs = {
        let r = s
            .call_as(
                &foreign,
                "POST",
                "/v2/sandboxes",
                Some(json!({"templateID": "base"})),
            )
            .await;
        r.assert_status(201);
        r.json()["sandboxID"].as_str().unwrap().to_string()
    };
    s.call_as(
        &foreign,
        "POST",
        &format!("/sandboxes/{theirs}/snapshots"),
        Some(json!({"name": "mine"})),
    )
    .await
    .assert_error(409);
    let key = s.key.clone();
    assert_eq!(snapshot_ids(&s, &key, "").await.len(), 2);
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": id})))
        .await
        .assert_status(201);
}
on_both_backends!(another_team_cannot_see_use_or_delete_a_snapshot);
