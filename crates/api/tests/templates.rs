//! The template registry (CONTRACT 2.4) over real HTTP against a fake node
//! and a fake builder.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

mod common;

use std::time::Duration;

use arca_proto::build::{BASE_BUILD_ID, BuildBase, BuildSource, RegistryAuth};
use common::{BUILT_ENVD_VERSION, FakeBuilder, Opts, Server, TestDb, on_both_backends, run_steps};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn assert_keys(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v.get(*k).is_some(), "{k} missing in {v}");
    }
}

/// `Template` keys the Python parser requires.
const TEMPLATE_KEYS: [&str; 16] = [
    "templateID",
    "buildID",
    "cpuCount",
    "memoryMB",
    "diskSizeMB",
    "public",
    "aliases",
    "names",
    "createdAt",
    "updatedAt",
    "createdBy",
    "lastSpawnedAt",
    "spawnCount",
    "buildCount",
    "envdVersion",
    "buildStatus",
];

/// A second team with its own key.
async fn other_team(s: &Server) -> String {
    s.api.create_team("other").await.unwrap();
    s.api.create_key("other").await.unwrap()
}

async fn a_build_registers_starts_logs_and_sandboxes_start_from_it(db: TestDb) {
    let s = Server::on(db).await;
    let r = s
        .call(
            "POST",
            "/v3/templates",
            Some(json!({"name": "app", "cpuCount": 4, "memoryMB": 1024})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let v = r.json();
    assert_keys(
        &v,
        &[
            "templateID",
            "buildID",
            "public",
            "names",
            "tags",
            "aliases",
        ],
    );
    let t = v["templateID"].as_str().unwrap().to_string();
    let b = v["buildID"].as_str().unwrap().to_string();
    assert_eq!(t.len(), 20);
    assert!(
        t.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    assert_eq!(b.len(), 36);
    assert_eq!(v["public"], false);
    assert_eq!(v["names"], json!(["app"]));
    assert_eq!(v["aliases"], json!(["app"]));
    assert_eq!(v["tags"], json!(["default"]));

    // Registered, not started.
    let st = s.build_status(&t, &b, "").await;
    assert_eq!(st["status"], "waiting");
    assert_eq!(st["logEntries"], json!([]));
    assert_eq!(st["logs"], json!([]));
    assert_eq!(st["templateID"], t.as_str());
    assert_eq!(st["buildID"], b.as_str());
    assert!(st.get("reason").is_none());
    // Not buildable from yet.
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": "app"})))
        .await
        .assert_error(400);

    let mut start = run_steps(&["apt-get install -y cowsay", "echo hi"]);
    start["startCmd"] = json!("sleep infinity");
    start["readyCmd"] = json!("true");
    start["steps"][0]["forceUpload"] = json!(null);
    start["fromTheFuture"] = json!(1);
    s.start_build(&t, &b, start).await;
    let st = s.wait_build(&t, &b).await;
    assert_eq!(st["status"], "ready", "{st}");
    let entries = st["logEntries"].as_array().unwrap();
    let steps: Vec<&str> = entries
        .iter()
        .map(|e| e["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["base", "1", "2", "finalize"]);
    for e in entries {
        assert_keys(e, &["timestamp", "message", "level"]);
        assert_eq!(e["level"], "info");
    }
    assert_eq!(st["logs"].as_array().unwrap().len(), 4);
    assert!(
        st["logs"][1]
            .as_str()
            .unwrap()
            .contains("] step 1: RUN apt-get")
    );

    let spec = s.builder.spec(&b);
    assert_eq!(spec.template_id, t);
    assert_eq!(spec.team_id.len(), 36);
    assert_eq!(
        (spec.cpu_count, spec.memory_mb, spec.disk_size_mb),
        (4, 1024, 1024)
    );
    assert_eq!(spec.start_cmd.as_deref(), Some("sleep infinity"));
    assert_eq!(spec.ready_cmd.as_deref(), Some("true"));
    let BuildSource::Steps { base, steps } = &spec.source else {
        panic!("{spec:?}");
    };
    assert_eq!(
        *base,
        BuildBase::Template {
            template_id: "base".into(),
            build_id: BASE_BUILD_ID.into()
        }
    );
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[1].args, ["echo hi"]);

    // Sandboxes start from it, by name, tag, namespace or id.
    for reference in [
        "app",
        "APP:default",
        "default/app",
        "default/app:default",
        t.as_str(),
    ] {
        let r = s
            .call(
                "POST",
                "/v2/sandboxes",
                Some(json!({"templateID": reference})),
            )
            .await;
        assert_eq!(r.status, 201, "{reference}: {:?}", r.body);
        let v = r.json();
        assert_eq!(v["templateID"], t.as_str());
        assert_eq!(v["alias"], "app");
        let spec = s.node.specs.lock().unwrap().last().cloned().unwrap();
        assert_eq!(spec.build_id, b);
        assert_eq!((spec.cpu_count, spec.memory_mb), (4, 1024));
    }
    // Percent-encoded references in paths work too.
    let r = s
        .call("GET", "/templates/aliases/default%2Fapp%3Adefault", None)
        .await;
    assert_eq!(r.status, 200);
    s.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "someone/app"})),
    )
    .await
    .assert_error(404);
    s.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "app:v7"})),
    )
    .await
    .assert_error(404);
    s.call("POST", "/v2/sandboxes", Some(json!({"templateID": "a b"})))
        .await
        .assert_error(400);

    // Counters and the list.
    let r = s.call("GET", "/templates", None).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    for item in list {
        assert_keys(item, &TEMPLATE_KEYS);
    }
    let app = list.iter().find(|i| i["templateID"] == t.as_str()).unwrap();
    assert_eq!(app["spawnCount"], 5);
    assert_eq!(app["buildCount"], 1);
    assert!(app["lastSpawnedAt"].is_string());
    assert_eq!(app["createdBy"], Value::Null);
    assert_eq!(app["buildStatus"], "ready");
    assert_eq!(app["buildID"], b.as_str());
    assert_eq!(app["envdVersion"], BUILT_ENVD_VERSION);
    assert_eq!(
        (app["cpuCount"].as_u64(), app["memoryMB"].as_u64()),
        (Some(4), Some(1024))
    );
    let base = list.iter().find(|i| i["templateID"] == "base").unwrap();
    assert_eq!(base["public"], true);
    assert_eq!(base["lastSpawnedAt"], Value::Null);
    assert_eq!(base["buildID"], BASE_BUILD_ID);
}
on_both_backends!(a_build_registers_starts_logs_and_sandboxes_start_from_it);

async fn build_status_pages_logs_by_offset_limit_and_level(db: TestDb) {
    let s = Server::on(db).await;
    let (t, b, st) = s.build("logs", run_steps(&["spam LOGS:150"])).await;
    assert_eq!(st["status"], "ready");
    // base + step + 150 extra + finalize, at most 100 per answer.
    assert_eq!(st["logEntries"].as_array().unwrap().len(), 100);
    let rest = s.build_status(&t, &b, "?logsOffset=100").await;
    assert_eq!(rest["logEntries"].as_array().unwrap().len(), 53);
    assert_eq!(rest["logEntries"][52]["step"], "finalize");
    assert_eq!(rest["logEntries"][0]["message"], "extra line 98");
    let end = s.build_status(&t, &b, "?logsOffset=153").await;
    assert_eq!(end["logEntries"], json!([]));
    let few = s.build_status(&t, &b, "?logsOffset=2&limit=3").await;
    let msgs: Vec<&str> = few["logEntries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(msgs, ["extra line 0", "extra line 1", "extra line 2"]);
    let huge = s.build_status(&t, &b, "?limit=100000").await;
    assert_eq!(huge["logEntries"].as_array().unwrap().len(), 100);
    let warn = s.build_status(&t, &b, "?level=warn").await;
    let warns = warn["logEntries"].as_array().unwrap();
    assert_eq!(warns.len(), 75);
    assert!(warns.iter().all(|e| e["level"] == "warn"));
    let warn2 = s.build_status(&t, &b, "?level=warn&logsOffset=74").await;
    assert_eq!(warn2["logEntries"][0]["message"], "extra line 149");
    for bad in [
        "?logsOffset=-1",
        "?logsOffset=x",
        "?level=loud",
        "?limit=-2",
    ] {
        s.call(
            "GET",
            &format!("/templates/{t}/builds/{b}/status{bad}"),
            None,
        )
        .await
        .assert_error(400);
    }
    s.call(
        "GET",
        &format!("/templates/{t}/builds/00000000-0000-4000-8000-00000000dead/status"),
        None,
    )
    .await
    .assert_error(404);
    s.call("GET", &format!("/templates/nope/builds/{b}/status"), None)
        .await
        .assert_error(404);
    // Another template's build is not found under this one.
    s.call("GET", &format!("/templates/base/builds/{b}/status"), None)
        .await
        .assert_error(404);

    // The /logs endpoint: time cursor, direction, level, source.
    let logs = |q: &'static str| {
        let (t, b) = (t.clone(), b.clone());
        let s = &s;
        async move {
            let r = s
                .call("GET", &format!("/templates/{t}/builds/{b}/logs{q}"), None)
                .await;
            assert_eq!(r.status, 200, "{q}: {:?}", r.body);
            r.json()["logs"].as_array().unwrap().clone()
        }
    };
    let first = logs("").await;
    assert_eq!(first.len(), 100);
    assert_eq!(first[0]["step"], "base");
    let last = logs("?direction=backward&limit=2").await;
    assert_eq!(last[0]["step"], "finalize");
    assert_eq!(last[1]["message"], "extra line 149");
    let errors = logs("?level=error&source=temporary").await;
    assert!(errors.is_empty());
    let far = logs("?cursor=99999999999999").await;
    assert!(far.is_empty());
    let all_before = logs("?cursor=99999999999999&direction=backward&limit=1").await;
    assert_eq!(all_before.len(), 1);
    for bad in ["?direction=up", "?source=cold", "?level=x", "?cursor=x"] {
        s.call("GET", &format!("/templates/{t}/builds/{b}/logs{bad}"), None)
            .await
            .assert_error(400);
    }
}
on_both_backends!(build_status_pages_logs_by_offset_limit_and_level);

#[tokio::test]
async fn a_failed_build_reports_its_step_and_changes_nothing_for_sandboxes() {
    let s = Server::start().await;
    let (t, b1, st) = s.build("app", run_steps(&["echo one"])).await;
    assert_eq!(st["status"], "ready");

    let (t2, b2) = s.request_build(json!({"name": "app"})).await;
    assert_eq!(t2, t);
    s.start_build(&t, &b2, run_steps(&["echo ok", "make FAIL"]))
        .await;
    let st = s.wait_build(&t, &b2).await;
    assert_eq!(st["status"], "error");
    let reason = &st["reason"];
    assert_eq!(reason["step"], "2");
    assert_eq!(
        reason["message"],
        "step 2 failed: command exited with status 1"
    );
    let step_errors = reason["logEntries"].as_array().unwrap();
    assert_eq!(step_errors.len(), 1);
    assert_eq!(step_errors[0]["level"], "error");
    // The last line the client sees is the failing step's error.
    let last = st["logEntries"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["step"], "2");

    // `app` still starts from the first build.
    s.create(json!({"templateID": "app"})).await;
    let spec = s.node.specs.lock().unwrap().last().cloned().unwrap();
    assert_eq!(spec.build_id, b1);
    let info = s.call("GET", &format!("/templates/{t}"), None).await.json();
    assert_eq!(info["buildID"], b1.as_str());
    assert_eq!(info["buildStatus"], "ready");
    assert_eq!(info["buildCount"], 2);
    let statuses: Vec<&str> = info["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["error", "ready"]);

    // A template that never had a ready build cannot start sandboxes.
    let (_, _, st) = s.build("broken", run_steps(&["FAIL"])).await;
    assert_eq!(st["status"], "error");
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "broken"})),
        )
        .await;
    let v = r.assert_error(400);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("has no finished build yet"),
        "{v}"
    );
    // Nor be built from.
    let (t3, b3) = s.request_build(json!({"name": "child"})).await;
    let r = s
        .call(
            "POST",
            &format!("/v2/templates/{t3}/builds/{b3}"),
            Some(json!({"fromTemplate": "broken", "steps": []})),
        )
        .await;
    r.assert_error(400);
    // A builder that panics fails only its build.
    let (_, _, st) = s.build("panics", run_steps(&["PANIC"])).await;
    assert_eq!(st["status"], "error");
    assert!(
        st["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("Arca server"),
        "{st}"
    );
    let (_, _, st) = s.build("after-panic", run_steps(&["true"])).await;
    assert_eq!(st["status"], "ready");
}

async fn tags_point_at_builds_and_move(db: TestDb) {
    let s = Server::on(db).await;
    let (t, b1) = s.request_build(json!({"name": "app:v1"})).await;
    s.start_build(&t, &b1, run_steps(&["one"])).await;
    assert_eq!(s.wait_build(&t, &b1).await["status"], "ready");
    // A later tagged build leaves `default` alone (the first ready build
    // took it).
    let r = s
        .call(
            "POST",
            "/v3/templates",
            Some(json!({"name": "app:V2", "tags": ["beta", "v2"]})),
        )
        .await;
    assert_eq!(r.status, 202);
    let v = r.json();
    assert_eq!(v["tags"], json!(["beta", "v2"]));
    let b2 = v["buildID"].as_str().unwrap().to_string();
    s.start_build(&t, &b2, run_steps(&["two"])).await;
    assert_eq!(s.wait_build(&t, &b2).await["status"], "ready");

    let build_of = async |reference: &str| {
        let r = s
            .call(
                "POST",
                "/v2/sandboxes",
                Some(json!({"templateID": reference})),
            )
            .await;
        assert_eq!(r.status, 201, "{reference}: {:?}", r.body);
        s.node
            .specs
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .build_id
            .clone()
    };
    assert_eq!(build_of("app").await, b1);
    assert_eq!(build_of("app:v1").await, b1);
    assert_eq!(build_of("app:v2").await, b2);
    assert_eq!(build_of("app:beta").await, b2);
    s.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "app:v3"})),
    )
    .await
    .assert_error(404);

    // Assign: default and prod move to v2's build.
    let r = s
        .call(
            "POST",
            "/templates/tags",
            Some(json!({"target": "app:v2", "tags": ["prod", "default", "prod"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        r.json(),
        json!({"tags": ["default", "prod"], "buildID": b2})
    );
    assert_eq!(build_of("app").await, b2);
    let tags = s.call("GET", &format!("/templates/{t}/tags"), None).await;
    assert_eq!(tags.status, 200);
    let tags = tags.json();
    let pairs: Vec<(String, String)> = tags
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            assert_keys(x, &["tag", "buildID", "createdAt"]);
            (
                x["tag"].as_str().unwrap().into(),
                x["buildID"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expect = [
        ("beta", &b2),
        ("default", &b2),
        ("prod", &b2),
        ("v1", &b1),
        ("v2", &b2),
    ];
    assert_eq!(
        pairs,
        expect.map(|(a, b)| (a.to_string(), b.clone())).to_vec()
    );
    // By name works as well as by id.
    assert_eq!(
        s.call("GET", "/templates/app/tags", None).await.json(),
        tags
    );

    // Remove.
    let r = s
        .call(
            "DELETE",
            "/templates/tags",
            Some(json!({"name": "app", "tags": ["prod", "beta"]})),
        )
        .await;
    assert_eq!(r.status, 204);
    s.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "app:prod"})),
    )
    .await
    .assert_error(404);
    // Removing a missing tag is fine.
    let r = s
        .call(
            "DELETE",
            "/templates/tags",
            Some(json!({"name": "app", "tags": ["nope"]})),
        )
        .await;
    assert_eq!(r.status, 204);

    // Errors.
    for body in [
        json!({"name": "app", "tags": ["default"]}),
        json!({"name": "app:v1", "tags": ["v1"]}),
        json!({"name": "app", "tags": []}),
        json!({"name": "app", "tags": ["a b"]}),
        json!({"name": "app"}),
    ] {
        s.call("DELETE", "/templates/tags", Some(body.clone()))
            .await
            .assert_error(400);
    }
    s.call(
        "DELETE",
        "/templates/tags",
        Some(json!({"name": "nope", "tags": ["x"]})),
    )
    .await
    .assert_error(404);
    for body in [
        json!({"target": "app:v1", "tags": []}),
        json!({"target": "app:v1", "tags": ["00000000-0000-4000-8000-000000000001"]}),
        json!({"target": "app:v1", "tags": ["no/slash"]}),
        json!({"target": "app v1", "tags": ["x"]}),
    ] {
        s.call("POST", "/templates/tags", Some(body.clone()))
            .await
            .assert_error(400);
    }
    s.call(
        "POST",
        "/templates/tags",
        Some(json!({"target": "app:v9", "tags": ["x"]})),
    )
    .await
    .assert_error(404);
    s.call(
        "POST",
        "/templates/tags",
        Some(json!({"target": "base", "tags": ["x"]})),
    )
    .await
    .assert_error(403);
    s.call("GET", "/templates/nope/tags", None)
        .await
        .assert_error(404);
    let base_tags = s.call("GET", "/templates/base/tags", None).await.json();
    assert_eq!(base_tags[0]["tag"], "default");
    assert_eq!(base_tags[0]["buildID"], BASE_BUILD_ID);
}
on_both_backends!(tags_point_at_builds_and_move);

async fn teams_see_their_own_templates_and_public_ones(db: TestDb) {
    let s = Server::on(db).await;
    let other = other_team(&s).await;
    let (t, _, _) = s.build("private-app", run_steps(&["x"])).await;

    // Another team: exists (403) but not usable.
    let r = s
        .call_as(
            &other,
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "private-app"})),
        )
        .await;
    r.assert_error(403);
    s.call_as(
        &other,
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": t})),
    )
    .await
    .assert_error(403);
    s.call_as(&other, "GET", "/templates/aliases/private-app", None)
        .await
        .assert_error(403);
    s.call_as(&other, "GET", "/templates/aliases/nothing-here", None)
        .await
        .assert_error(404);
    let r = s
        .call_as(
            &other,
            "POST",
            "/v3/templates",
            Some(json!({"name": "private-app"})),
        )
        .await;
    let v = r.assert_error(409);
    assert!(
        v["message"].as_str().unwrap().contains("another team"),
        "{v}"
    );
    s.call_as(
        &other,
        "POST",
        "/v3/templates",
        Some(json!({"name": "base"})),
    )
    .await
    .assert_error(409);
    for (method, path) in [
        ("DELETE", format!("/templates/{t}")),
        ("GET", format!("/templates/{t}")),
        ("GET", format!("/templates/{t}/tags")),
        ("GET", format!("/templates/{t}/files/{HASH}")),
        ("PATCH", format!("/v2/templates/{t}")),
    ] {
        let body = (method == "PATCH").then(|| json!({"public": true}));
        s.call_as(&other, method, &path, body)
            .await
            .assert_error(403);
    }
    let list = s.call_as(&other, "GET", "/templates", None).await.json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base"]);
    let mine = s.call("GET", "/templates", None).await.json();
    assert_eq!(mine.as_array().unwrap().len(), 2);
    s.call("GET", "/templates?teamID=someone-else", None)
        .await
        .assert_error(403);
    s.call(
        "POST",
        "/v3/templates",
        Some(json!({"name": "x", "teamID": "someone-else"})),
    )
    .await
    .assert_error(403);

    // Published: others may start sandboxes from it and read its tags, not
    // change or build it.
    let r = s
        .call(
            "PATCH",
            &format!("/v2/templates/{t}"),
            Some(json!({"public": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), json!({"names": ["private-app"]}));
    let r = s
        .call_as(
            &other,
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "private-app"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = s
        .call_as(&other, "GET", "/templates/aliases/private-app", None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"templateID": t, "public": true}));
    assert_eq!(
        s.call_as(&other, "GET", &format!("/templates/{t}/tags"), None)
            .await
            .status,
        200
    );
    s.call_as(&other, "DELETE", &format!("/templates/{t}"), None)
        .await
        .assert_error(403);
    s.call_as(
        &other,
        "POST",
        "/v3/templates",
        Some(json!({"name": "private-app"})),
    )
    .await
    .assert_error(409);
    s.call_as(
        &other,
        "POST",
        "/templates/tags",
        Some(json!({"target": "private-app", "tags": ["mine"]})),
    )
    .await
    .assert_error(403);
    // v1 PATCH makes it private again.
    let r = s
        .call(
            "PATCH",
            &format!("/templates/{t}"),
            Some(json!({"public": false})),
        )
        .await;
    assert_eq!(r.status, 200);
    s.call_as(
        &other,
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "private-app"})),
    )
    .await
    .assert_error(403);
    // The owner sees its alias.
    let r = s.call("GET", "/templates/aliases/private-app", None).await;
    assert_eq!(r.json(), json!({"templateID": t, "public": false}));
    s.call("GET", "/templates/aliases/private-app:v5", None)
        .await
        .assert_error(404);
    s.call("GET", "/templates/aliases/bad%20name", None)
        .await
        .assert_error(400);
    let r = s.call("GET", "/templates/aliases/base", None).await;
    assert_eq!(r.json(), json!({"templateID": "base", "public": true}));
    // The built-in template cannot be changed.
    s.call(
        "PATCH",
        "/v2/templates/base",
        Some(json!({"public": false})),
    )
    .await
    .assert_error(403);
    // Without a key, nothing.
    s.raw("GET", "/templates", &[], None)
        .await
        .assert_error(401);
    s.raw("POST", "/v3/templates", &[], None)
        .await
        .assert_error(401);
}
on_both_backends!(teams_see_their_own_templates_and_public_ones);

/// A raw HTTP/1.1 exchange (for requests hyper's client will not send).
async fn raw_http(base: &str, request: String) -> u16 {
    let addr = base.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn copy_archives_are_uploaded_through_token_links(db: TestDb) {
    let s = Server::start_opts(Opts {
        max_upload: 64,
        db: Some(db),
        ..Opts::new()
    })
    .await;
    let other = other_team(&s).await;
    let (t, _) = s.request_build(json!({"name": "files"})).await;
    let (t_other, _) = {
        let r = s
            .call_as(
                &other,
                "POST",
                "/v3/templates",
                Some(json!({"name": "theirs"})),
            )
            .await;
        assert_eq!(r.status, 202);
        let v = r.json();
        (v["templateID"].as_str().unwrap().to_string(), ())
    };

    s.call("GET", &format!("/templates/{t}/files/xyz"), None)
        .await
        .assert_error(400);
    s.call("GET", &format!("/templates/nope/files/{HASH}"), None)
        .await
        .assert_error(404);
    s.call("GET", &format!("/templates/base/files/{HASH}"), None)
        .await
        .assert_error(403);
    let r = s
        .call("GET", &format!("/templates/{t}/files/{HASH}"), None)
        .await;
    assert_eq!(r.status, 201);
    let v = r.json();
    assert_eq!(v["present"], false);
    let url = v["url"].as_str().unwrap().to_string();
    let prefix = format!("{}/uploads/{t}/{HASH}?token=", s.base);
    assert!(url.starts_with(&prefix), "{url}");
    let path = url.strip_prefix(&s.base).unwrap().to_string();
    let token = url.strip_prefix(&prefix).unwrap().to_string();
    assert_eq!(token.len(), 64);

    // The token is the authorization, and only for its template and hash.
    let put = |path: String, body: &'static [u8]| {
        let s = &s;
        async move { s.raw("PUT", &path, &[], Some(body.to_vec())).await }
    };
    put(format!("/uploads/{t}/{HASH}"), b"x")
        .await
        .assert_error(403);
    put(format!("/uploads/{t}/{HASH}?token=00{}", &token[2..]), b"x")
        .await
        .assert_error(403);
    put(format!("/uploads/{t_other}/{HASH}?token={token}"), b"x")
        .await
        .assert_error(403);
    let other_hash = "f".repeat(64);
    put(format!("/uploads/{t}/{other_hash}?token={token}"), b"x")
        .await
        .assert_error(403);
    put(format!("/uploads/{t}/nothex?token={token}"), b"x")
        .await
        .assert_error(400);
    put(path.clone(), &[7u8; 65]).await.assert_error(413);
    // No Content-Length (chunked): 411.
    let status = raw_http(
        &s.base,
        format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\na\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 411);
    assert!(find_upload(&s.uploads).is_none());

    let r = put(path.clone(), b"tar bytes").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let stored = find_upload(&s.uploads).unwrap();
    assert_eq!(std::fs::read(&stored).unwrap(), b"tar bytes");
    // In the team's own directory, root only; no temporary files left.
    let team_dir = stored.parent().unwrap().to_path_buf();
    assert_ne!(team_dir, s.uploads);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&team_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let names: Vec<String> = std::fs::read_dir(&team_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [HASH]);

    // Present now for this team; another team uploads its own copy.
    let r = s
        .call("GET", &format!("/templates/{t}/files/{HASH}"), None)
        .await;
    assert_eq!(r.json(), json!({"present": true}));
    let r = s
        .call_as(
            &other,
            "GET",
            &format!("/templates/{t_other}/files/{HASH}"),
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["present"], false);
    assert!(r.json()["url"].is_string());
    // A file that disappeared from the directory must be uploaded again.
    std::fs::remove_file(&stored).unwrap();
    let r = s
        .call("GET", &format!("/templates/{t}/files/{HASH}"), None)
        .await;
    assert_eq!(r.json()["present"], false);
}
on_both_backends!(copy_archives_are_uploaded_through_token_links);

#[tokio::test]
async fn build_requests_and_starts_are_validated() {
    let s = Server::start().await;
    let other = other_team(&s).await;
    for (body, status) in [
        (json!({}), 400),
        (json!({"name": " "}), 400),
        (json!({"name": "My App"}), 400),
        (json!({"name": "a.b"}), 400),
        (json!({"name": "x".repeat(129)}), 400),
        (json!({"name": "app:a b"}), 400),
        (
            json!({"name": "app", "tags": ["00000000-0000-4000-8000-000000000001"]}),
            400,
        ),
        (json!({"name": "app", "cpuCount": 0}), 400),
        (json!({"name": "app", "cpuCount": 99}), 400),
        (json!({"name": "app", "memoryMB": 100}), 400),
        (json!({"name": "app", "memoryMB": 513}), 400),
        (json!({"name": "app", "memoryMB": 1 << 20}), 400),
        (json!({"name": "app", "minFreeDiskMb": -1}), 400),
        (json!({"name": "app", "cpuCount": "two"}), 400),
        (json!({"name": "someone/app"}), 400),
        (json!({"name": "base"}), 409),
    ] {
        s.call("POST", "/v3/templates", Some(body.clone()))
            .await
            .assert_error(status);
    }
    let r = s
        .raw(
            "POST",
            "/v3/templates",
            &[("X-API-Key", &s.key), ("Content-Type", "application/json")],
            Some(b"{\"name\":".to_vec()),
        )
        .await;
    r.assert_error(400);
    // The deprecated alias works, and so does the team's namespace.
    let r = s
        .call("POST", "/v3/templates", Some(json!({"alias": "old-style"})))
        .await;
    assert_eq!(r.status, 202);
    let r = s
        .call(
            "POST",
            "/v3/templates",
            Some(json!({"name": "default/spaced", "minFreeDiskMb": 4096})),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["names"], json!(["spaced"]));

    let (t, b) = s.request_build(json!({"name": "app"})).await;
    let start = |body: Value| {
        let (t, b) = (t.clone(), b.clone());
        let s = &s;
        async move {
            s.call("POST", &format!("/v2/templates/{t}/builds/{b}"), Some(body))
                .await
        }
    };
    for body in [
        json!({"fromImage": "a", "fromTemplate": "base"}),
        json!({"fromImage": " "}),
        json!({"fromTemplate": "base", "fromImageRegistry": {"type": "registry", "username": "u", "password": "p"}}),
        json!({"fromImageRegistry": {"type": "registry", "username": "u", "password": "p"}}),
        json!({"fromImage": "a", "fromImageRegistry": {"type": "ftp"}}),
        json!({"steps": [{"args": ["x"]}]}),
        json!({"steps": [{"type": " "}]}),
        json!({"steps": [{"type": "COPY", "args": ["a", "b"], "filesHash": "../../etc/passwd"}]}),
        json!({"steps": "RUN x"}),
        json!({"dockerfile": "FROM x", "steps": [{"type": "RUN", "args": ["y"]}]}),
        json!({"dockerfile": "FROM x", "fromImage": "y"}),
        json!({"dockerfile": " "}),
        json!({"dockerfile": "FROM x", "contextHash": "abc"}),
        json!({"contextHash": HASH}),
        json!({"fromTemplate": "Not Valid"}),
    ] {
        start(body.clone()).await.assert_error(400);
    }
    start(json!({"fromTemplate": "missing"}))
        .await
        .assert_error(404);
    s.call(
        "POST",
        &format!("/v2/templates/{t}/builds/00000000-0000-4000-8000-00000000beef"),
        Some(json!({})),
    )
    .await
    .assert_error(404);
    s.call_as(
        &other,
        "POST",
        &format!("/v2/templates/{t}/builds/{b}"),
        Some(json!({})),
    )
    .await
    .assert_error(403);

    // Valid forms reach the builder as the right source.
    let r = start(json!({
        "fromImage": "python:3.12",
        "fromImageRegistry": {"type": "registry", "username": "u", "password": "p"},
        "steps": [{"type": "COPY", "args": ["src", "/app", "", ""], "filesHash": HASH.to_uppercase(), "force": true, "forceUpload": true}],
        "force": true,
    }))
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    // Started once only.
    start(json!({})).await.assert_error(409);
    assert_eq!(s.wait_build(&t, &b).await["status"], "ready");
    let spec = s.builder.spec(&b);
    assert!(spec.force);
    let BuildSource::Steps { base, steps } = spec.source else {
        panic!()
    };
    assert_eq!(
        base,
        BuildBase::Image {
            reference: "python:3.12".into(),
            auth: Some(RegistryAuth::Registry {
                username: "u".into(),
                password: "p".into()
            })
        }
    );
    assert_eq!(steps[0].files_hash.as_deref(), Some(HASH));
    assert!(steps[0].force);

    let cases = [
        (json!({"fromImage": "e2bdev/base"}), "base"),
        (json!({}), "base"),
        (json!({"fromTemplate": "app"}), "app"),
    ];
    for (body, from) in cases {
        let (t2, b2) = s.request_build(json!({"name": "derived"})).await;
        s.start_build(&t2, &b2, body).await;
        assert_eq!(s.wait_build(&t2, &b2).await["status"], "ready");
        let BuildSource::Steps { base, steps } = s.builder.spec(&b2).source else {
            panic!()
        };
        assert!(steps.is_empty());
        let BuildBase::Template {
            template_id,
            build_id,
        } = base
        else {
            panic!("{base:?}")
        };
        if from == "base" {
            assert_eq!(
                (template_id.as_str(), build_id.as_str()),
                ("base", BASE_BUILD_ID)
            );
        } else {
            assert_eq!((template_id, build_id), (t.clone(), b.clone()));
        }
    }
    let (t3, b3) = s.request_build(json!({"name": "docker"})).await;
    s.start_build(
        &t3,
        &b3,
        json!({"dockerfile": "FROM debian\nRUN true", "contextHash": HASH, "buildArgs": {"A": "1"}}),
    )
    .await;
    assert_eq!(s.wait_build(&t3, &b3).await["status"], "ready");
    assert_eq!(
        s.builder.spec(&b3).source,
        BuildSource::Dockerfile {
            dockerfile: "FROM debian\nRUN true".into(),
            context_hash: Some(HASH.into()),
            build_args: [("A".to_string(), "1".to_string())].into(),
        }
    );
}

async fn a_newer_request_cancels_an_unstarted_build_of_the_same_tag(db: TestDb) {
    let s = Server::on(db).await;
    let (t, b1) = s.request_build(json!({"name": "app"})).await;
    let (_, b2) = s.request_build(json!({"name": "app"})).await;
    let st = s.build_status(&t, &b1, "").await;
    assert_eq!(st["status"], "error");
    assert!(
        st["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("newer build"),
        "{st}"
    );
    s.call(
        "POST",
        &format!("/v2/templates/{t}/builds/{b1}"),
        Some(json!({})),
    )
    .await
    .assert_error(409);
    // Another tag does not cancel it.
    let (_, b3) = s.request_build(json!({"name": "app:other"})).await;
    assert_eq!(s.build_status(&t, &b2, "").await["status"], "waiting");
    s.start_build(&t, &b2, json!({})).await;
    s.start_build(&t, &b3, json!({})).await;
    assert_eq!(s.wait_build(&t, &b2).await["status"], "ready");
    assert_eq!(s.wait_build(&t, &b3).await["status"], "ready");
}
on_both_backends!(a_newer_request_cancels_an_unstarted_build_of_the_same_tag);

#[tokio::test]
async fn legacy_v1_requests_build_the_dockerfile_at_once() {
    let s = Server::start().await;
    let r = s
        .call(
            "POST",
            "/templates",
            Some(json!({"dockerfile": "FROM debian\nRUN echo", "alias": "legacy", "startCmd": "run", "cpuCount": 2, "memoryMB": 1024})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let v = r.json();
    assert_keys(
        &v,
        &[
            "templateID",
            "buildID",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "public",
            "aliases",
            "createdAt",
            "updatedAt",
            "createdBy",
            "lastSpawnedAt",
            "spawnCount",
            "buildCount",
            "envdVersion",
        ],
    );
    assert_eq!(v["aliases"], json!(["legacy"]));
    assert_eq!(v["memoryMB"], 1024);
    let t = v["templateID"].as_str().unwrap().to_string();
    let b = v["buildID"].as_str().unwrap().to_string();
    let st = s.wait_build(&t, &b).await;
    assert_eq!(st["status"], "ready");
    // The v1 CLI prints the legacy lines.
    assert!(
        st["logs"][0]
            .as_str()
            .unwrap()
            .ends_with("preparing the base\n")
    );
    let spec = s.builder.spec(&b);
    assert_eq!(spec.start_cmd.as_deref(), Some("run"));
    assert_eq!(
        spec.source,
        BuildSource::Dockerfile {
            dockerfile: "FROM debian\nRUN echo".into(),
            context_hash: None,
            build_args: Default::default(),
        }
    );
    // The trigger after a docker push is a no-op.
    let r = s
        .call("POST", &format!("/templates/{t}/builds/{b}"), None)
        .await;
    assert_eq!(r.status, 202);
    // Rebuild.
    let r = s
        .call(
            "POST",
            &format!("/templates/{t}"),
            Some(json!({"dockerfile": "FROM debian", "alias": "legacy"})),
        )
        .await;
    assert_eq!(r.status, 202);
    let b2 = r.json()["buildID"].as_str().unwrap().to_string();
    assert_ne!(b2, b);
    assert_eq!(s.wait_build(&t, &b2).await["status"], "ready");
    s.call(
        "POST",
        &format!("/templates/{t}"),
        Some(json!({"dockerfile": "FROM debian", "alias": "renamed"})),
    )
    .await
    .assert_error(400);
    // Without alias: a template reachable by id only.
    let r = s
        .call("POST", "/templates", Some(json!({"dockerfile": "FROM x"})))
        .await;
    assert_eq!(r.status, 202);
    let v = r.json();
    assert_eq!(v["aliases"], json!([]));
    let (t4, b4) = (
        v["templateID"].as_str().unwrap(),
        v["buildID"].as_str().unwrap(),
    );
    assert_eq!(s.wait_build(t4, b4).await["status"], "ready");
    assert_eq!(
        s.call("POST", "/v2/sandboxes", Some(json!({"templateID": t4})))
            .await
            .status,
        201
    );
    // A v3-registered build is started through v2, not the v1 trigger.
    let (t5, b5) = s.request_build(json!({"name": "v3"})).await;
    s.call("POST", &format!("/templates/{t5}/builds/{b5}"), None)
        .await
        .assert_error(400);
    for body in [
        json!({}),
        json!({"dockerfile": ""}),
        json!({"dockerfile": "FROM x", "alias": "a:b"}),
        json!({"dockerfile": "FROM x", "memoryMB": 1}),
    ] {
        s.call("POST", "/templates", Some(body.clone()))
            .await
            .assert_error(400);
    }
    // A failing Dockerfile fails in its step.
    let r = s
        .call(
            "POST",
            "/templates",
            Some(json!({"dockerfile": "RUN FAIL"})),
        )
        .await;
    let v = r.json();
    let st = s
        .wait_build(
            v["templateID"].as_str().unwrap(),
            v["buildID"].as_str().unwrap(),
        )
        .await;
    assert_eq!(st["status"], "error");
    assert_eq!(st["reason"]["step"], "1");
}

async fn deleting_a_template_frees_its_builds_and_name(db: TestDb) {
    let s = Server::on(db).await;
    let other = other_team(&s).await;
    let (t, b1, _) = s.build("app", run_steps(&["one"])).await;
    let (_, b2) = s.request_build(json!({"name": "app:v2"})).await;
    let sandbox = s.create(json!({"templateID": "app"})).await;

    s.call("DELETE", "/templates/base", None)
        .await
        .assert_error(400);
    s.call("DELETE", "/templates/nope", None)
        .await
        .assert_error(404);
    s.call("DELETE", "/templates/app:v2", None)
        .await
        .assert_error(400);
    let r = s.call("DELETE", "/templates/app", None).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let mut deleted = s.builder.deleted.lock().unwrap().clone();
    deleted.sort();
    let mut expect = vec![(t.clone(), b1.clone()), (t.clone(), b2.clone())];
    expect.sort();
    assert_eq!(deleted, expect);
    s.call("DELETE", &format!("/templates/{t}"), None)
        .await
        .assert_error(404);
    s.call("GET", &format!("/templates/{t}"), None)
        .await
        .assert_error(404);
    s.call("GET", &format!("/templates/{t}/builds/{b1}/status"), None)
        .await
        .assert_error(404);
    // Its sandboxes keep running.
    assert_eq!(
        s.call("GET", &format!("/sandboxes/{sandbox}"), None)
            .await
            .status,
        200
    );
    assert_eq!(s.node.ids(), [sandbox]);
    // The name is free again, for anyone.
    let r = s
        .call_as(
            &other,
            "POST",
            "/v3/templates",
            Some(json!({"name": "app"})),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_ne!(r.json()["templateID"], t.as_str());
}
on_both_backends!(deleting_a_template_frees_its_builds_and_name);

#[tokio::test]
async fn a_template_deleted_while_building_frees_the_finished_build() {
    let builder = FakeBuilder::gated();
    let s = Server::start_opts(Opts {
        builder: builder.clone(),
        ..Opts::new()
    })
    .await;
    let (t, b) = s.request_build(json!({"name": "app"})).await;
    s.start_build(&t, &b, run_steps(&["x"])).await;
    s.wait_status(&t, &b, "building").await;
    assert_eq!(
        s.call("DELETE", &format!("/templates/{t}"), None)
            .await
            .status,
        204
    );
    builder.release(1);
    for _ in 0..200 {
        if builder.deleted.lock().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        *builder.deleted.lock().unwrap(),
        [(t.clone(), b.clone()), (t, b)]
    );
}

async fn templates_show_their_builds_in_pages(db: TestDb) {
    let s = Server::on(db).await;
    let (t, b1, _) = s.build("app", run_steps(&["1"])).await;
    let (_, b2) = s.request_build(json!({"name": "app:two"})).await;
    s.start_build(&t, &b2, run_steps(&["2"])).await;
    s.wait_build(&t, &b2).await;
    let (_, b3) = s.request_build(json!({"name": "app:three"})).await;

    let r = s.call("GET", "/templates/app?limit=2", None).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_keys(&v, &TEMPLATE_KEYS);
    assert_eq!(v["buildID"], b1.as_str());
    let builds = v["builds"].as_array().unwrap();
    let ids: Vec<&str> = builds
        .iter()
        .map(|b| b["buildID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b3.as_str(), b2.as_str()]);
    for b in builds {
        assert_keys(
            b,
            &[
                "buildID",
                "status",
                "createdAt",
                "updatedAt",
                "cpuCount",
                "memoryMB",
            ],
        );
    }
    assert_eq!(builds[0]["status"], "waiting");
    assert!(builds[0].get("finishedAt").is_none());
    assert!(builds[1]["finishedAt"].is_string());
    assert_eq!(builds[1]["envdVersion"], BUILT_ENVD_VERSION);
    let token = r.headers["x-next-token"].to_str().unwrap().to_string();
    let r = s
        .call(
            "GET",
            &format!("/templates/{t}?limit=2&nextToken={token}"),
            None,
        )
        .await;
    let v = r.json();
    assert_eq!(v["builds"][0]["buildID"], b1.as_str());
    assert_eq!(v["builds"].as_array().unwrap().len(), 1);
    assert!(r.headers.get("x-next-token").is_none());
    for q in ["?limit=0", "?limit=101", "?nextToken=%21"] {
        s.call("GET", &format!("/templates/{t}{q}"), None)
            .await
            .assert_error(400);
    }
    let base = s.call("GET", "/templates/base", None).await.json();
    assert_eq!(base["builds"][0]["buildID"], BASE_BUILD_ID);
}
on_both_backends!(templates_show_their_builds_in_pages);

#[tokio::test]
async fn builds_beyond_the_limit_wait_for_a_slot() {
    let builder = FakeBuilder::gated();
    let s = Server::start_opts(Opts {
        builder: builder.clone(),
        max_builds: 1,
        ..Opts::new()
    })
    .await;
    let (t1, b1) = s.request_build(json!({"name": "one"})).await;
    let (t2, b2) = s.request_build(json!({"name": "two"})).await;
    s.start_build(&t1, &b1, run_steps(&["a"])).await;
    s.wait_status(&t1, &b1, "building").await;
    s.start_build(&t2, &b2, run_steps(&["b"])).await;
    // Sandboxes are not held up by builds.
    s.create(json!({"templateID": "base"})).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let st = s.build_status(&t2, &b2, "").await;
        assert_eq!(st["status"], "waiting");
        if st["logEntries"].as_array().unwrap().len() == 1 {
            assert!(
                st["logEntries"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("waiting for a free build slot"),
                "{st}"
            );
        }
    }
    assert_eq!(builder.started(), 1);
    builder.release(2);
    assert_eq!(s.wait_build(&t1, &b1).await["status"], "ready");
    assert_eq!(s.wait_build(&t2, &b2).await["status"], "ready");
    assert_eq!(
        builder
            .max_running
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(builder.started(), 2);
}

async fn a_restart_ends_unfinished_builds_as_interrupted(db: TestDb) {
    let builder = FakeBuilder::gated();
    let s = Server::start_opts(Opts {
        builder: builder.clone(),
        db: Some(db),
        ..Opts::new()
    })
    .await;
    let (t, ready) = s.request_build(json!({"name": "app"})).await;
    s.start_build(&t, &ready, run_steps(&["a"])).await;
    builder.release(1);
    assert_eq!(s.wait_build(&t, &ready).await["status"], "ready");
    let (_, building) = s.request_build(json!({"name": "app:b"})).await;
    s.start_build(&t, &building, run_steps(&["b"])).await;
    s.wait_status(&t, &building, "building").await;
    let (_, registered) = s.request_build(json!({"name": "app:c"})).await;

    let Server { dir, node, db, .. } = s;
    let s = Server::start_opts(Opts {
        node,
        dir,
        db,
        builder: FakeBuilder::new(),
        ..Opts::new()
    })
    .await;
    let st = s.build_status(&t, &building, "").await;
    assert_eq!(st["status"], "error", "{st}");
    assert_eq!(
        st["reason"]["message"],
        "interrupted by a restart of the api; start the build again"
    );
    // A build that was only requested was never running: the SDK starts it
    // after the restart as it would have before.
    let st = s.build_status(&t, &registered, "").await;
    assert_eq!(st["status"], "waiting", "{st}");
    s.start_build(&t, &registered, run_steps(&["c"])).await;
    assert_eq!(s.wait_build(&t, &registered).await["status"], "ready");
    assert_eq!(s.build_status(&t, &ready, "").await["status"], "ready");
    s.call(
        "POST",
        &format!("/v2/templates/{t}/builds/{registered}"),
        Some(json!({})),
    )
    .await
    .assert_error(409);
    // The template still works, and can be built again.
    s.create(json!({"templateID": "app"})).await;
    let (_, again) = s.request_build(json!({"name": "app:b"})).await;
    s.start_build(&t, &again, run_steps(&["b"])).await;
    assert_eq!(s.wait_build(&t, &again).await["status"], "ready");
}
on_both_backends!(a_restart_ends_unfinished_builds_as_interrupted);

/// The one uploaded archive named [`HASH`] under any team's directory.
fn find_upload(uploads: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(uploads)
        .ok()?
        .flatten()
        .map(|team| team.path().join(HASH))
        .find(|p| p.is_file())
}
