//! The stand-in's protocol seen on the wire, through a raw HTTP/1.1 client: authentication and
//! the two roles, Status errors, lists and selectors, the three PATCH formats, conflicts,
//! watches (order, synthetic ADDED, 410 after compaction, bookmarks, timeouts, selectors,
//! broken streams), injected failures and restarts.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::time::{Duration, Instant};

use common::{call, node, service, start, summary, Next, Req, Watch, READER};
use podwire_apiserver_standin::kinds::KindTag;
use podwire_apiserver_standin::verb::Verb;
use podwire_apiserver_standin::Config;
use serde_json::{json, Value};

const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

fn assert_status(reply: &common::Reply, code: u16, reason: &str) {
    assert_eq!(reply.status, code, "{:?}", reply.body);
    assert_eq!(reply.body["kind"], "Status");
    assert_eq!(reply.body["apiVersion"], "v1");
    assert_eq!(reply.body["status"], "Failure");
    assert_eq!(reply.body["code"], code);
    assert_eq!(reply.body["reason"], reason, "{:?}", reply.body);
    assert!(reply.body["message"]
        .as_str()
        .is_some_and(|message| !message.is_empty()));
}

#[test]
fn unauthenticated_requests_get_401() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    assert_status(
        &call(standin.addr(), Req::get("/api/v1/nodes").token(None)),
        401,
        "Unauthorized",
    );
    assert_status(
        &call(
            standin.addr(),
            Req::get("/api/v1/nodes").token(Some("wrong")),
        ),
        401,
        "Unauthorized",
    );
    // Before routing: an unknown path is 401 too without a token.
    assert_status(
        &call(standin.addr(), Req::get("/api/v1/pods").token(None)),
        401,
        "Unauthorized",
    );
    assert_eq!(call(standin.addr(), Req::get("/api/v1/nodes")).status, 200);
}

#[test]
fn a_reader_reads_but_cannot_write() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    let reader = |request: Req<'_>| call(standin.addr(), request.token(Some(READER)));
    assert_eq!(reader(Req::get("/api/v1/nodes/n1")).status, 200);
    assert_eq!(reader(Req::get("/api/v1/nodes")).status, 200);
    let forbidden = reader(Req::patch(
        "/api/v1/nodes/n1/status",
        MERGE,
        r#"{"metadata":{"annotations":{"a":"1"}}}"#,
    ));
    assert_status(&forbidden, 403, "Forbidden");
    assert_eq!(
        forbidden.body["message"],
        r#"nodes "n1" is forbidden: User "reader" cannot patch resource "nodes" in API group """#
    );
    assert_status(
        &reader(Req::get("/api/v1/nodes/n1").with("DELETE", "")),
        403,
        "Forbidden",
    );
    assert_status(
        &reader(Req::get("/api/v1/nodes").with("POST", r#"{"metadata":{"name":"n2"}}"#)),
        403,
        "Forbidden",
    );
    assert!(standin
        .node("n1")
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
        .is_empty());
    assert!(standin.node("n2").is_none());
}

#[test]
fn missing_objects_and_paths_are_404_status() {
    let standin = start(Config::default());
    let missing = call(standin.addr(), Req::get("/api/v1/nodes/nope"));
    assert_status(&missing, 404, "NotFound");
    assert_eq!(missing.body["message"], r#"nodes "nope" not found"#);
    assert_eq!(
        missing.body["details"],
        json!({"name": "nope", "kind": "nodes"})
    );
    assert_status(
        &call(
            standin.addr(),
            Req::get("/api/v1/namespaces/default/services/nope"),
        ),
        404,
        "NotFound",
    );
    assert_status(
        &call(
            standin.addr(),
            Req::patch("/api/v1/nodes/nope", MERGE, "{}"),
        ),
        404,
        "NotFound",
    );
    assert_status(
        &call(standin.addr(), Req::get("/api/v1/pods")),
        404,
        "NotFound",
    );
    assert_status(
        &call(
            standin.addr(),
            Req::get("/apis/discovery.k8s.io/v1/endpointslices/x"),
        ),
        404,
        "NotFound",
    );
    assert_eq!(
        call(standin.addr(), Req::get("/version")).body["major"],
        "1"
    );
}

#[test]
fn list_carries_the_current_revision_and_stamped_objects() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    standin.apply_node(node("n2", &[])).unwrap();
    standin
        .apply_service(service("default", "web", &[]))
        .unwrap();
    let list = call(
        standin.addr(),
        Req::get("/api/v1/nodes?limit=500&resourceVersion=0"),
    )
    .body;
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        standin.revision().to_string()
    );
    assert_eq!(standin.revision(), 3);
    assert!(list["metadata"].get("continue").is_none());
    let items = list["items"].as_array().unwrap();
    assert_eq!(
        items
            .iter()
            .map(|item| item["metadata"]["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    assert_eq!(items[1]["metadata"]["resourceVersion"], "2");
    assert_eq!(items[1]["kind"], "Node");
    assert!(
        items[1]["metadata"]["uid"].is_string()
            && items[1]["metadata"]["creationTimestamp"].is_string()
    );
    assert_eq!(items[1]["metadata"]["generation"], 1);
    let slices = call(
        standin.addr(),
        Req::get("/apis/discovery.k8s.io/v1/endpointslices"),
    )
    .body;
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(slices["apiVersion"], "discovery.k8s.io/v1");
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn label_and_field_selectors() {
    let standin = start(Config::default());
    standin
        .apply_service(service("default", "plain", &[("app", "web")]))
        .unwrap();
    standin
        .apply_service(service(
            "default",
            "headless",
            &[("service.kubernetes.io/headless", "")],
        ))
        .unwrap();
    standin
        .apply_service(service(
            "kube-system",
            "other-proxy",
            &[
                ("service.kubernetes.io/service-proxy-name", "x"),
                ("app", "dns"),
            ],
        ))
        .unwrap();
    let list = |path: &str| names(&call(standin.addr(), Req::get(path)).body);
    let kube_proxy = "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
    assert_eq!(list(kube_proxy), ["plain"]);
    assert_eq!(list("/api/v1/services?labelSelector=app%3Dweb"), ["plain"]);
    assert_eq!(
        list("/api/v1/services?labelSelector=app!%3Dweb"),
        ["headless", "other-proxy"]
    );
    assert_eq!(
        list("/api/v1/services?labelSelector=app"),
        ["plain", "other-proxy"]
    );
    assert_eq!(
        list("/api/v1/services?labelSelector=app+in+(dns,db)"),
        ["other-proxy"]
    );
    assert_eq!(
        list("/api/v1/services?fieldSelector=metadata.name%3Dheadless"),
        ["headless"]
    );
    assert_eq!(
        list("/api/v1/services?fieldSelector=metadata.namespace%3Dkube-system"),
        ["other-proxy"]
    );
    assert_eq!(
        list("/api/v1/namespaces/default/services"),
        ["headless", "plain"]
    );
    assert_eq!(
        list("/api/v1/namespaces/default/services?labelSelector=app,app%3Ddns"),
        Vec::<String>::new()
    );
    assert_status(
        &call(
            standin.addr(),
            Req::get("/api/v1/services?fieldSelector=spec.type%3DNodePort"),
        ),
        400,
        "BadRequest",
    );
    assert_status(
        &call(
            standin.addr(),
            Req::get("/api/v1/services?labelSelector=a+b"),
        ),
        400,
        "BadRequest",
    );
}

#[test]
fn merge_patch_of_annotations_through_status_and_object() {
    let standin = start(Config::default());
    standin
        .apply_node(node("n1", &[("keep", "1"), ("drop", "1")]))
        .unwrap();
    let patch = r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"192.0.2.1","drop":null}},"spec":{"podCIDR":"10.0.0.0/8"}}"#;
    let reply = call(
        standin.addr(),
        Req::patch("/api/v1/nodes/n1/status", MERGE, patch),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["metadata"]["resourceVersion"], "2");
    let stored = standin.node("n1").unwrap();
    let annotations = stored.metadata.annotations.unwrap();
    assert_eq!(
        annotations
            .get("flannel.alpha.coreos.com/public-ip")
            .map(String::as_str),
        Some("192.0.2.1")
    );
    assert_eq!(annotations.get("keep").map(String::as_str), Some("1"));
    assert!(!annotations.contains_key("drop"));
    // The status subresource leaves spec alone; the object endpoint leaves status alone.
    assert_eq!(stored.spec.unwrap_or_default().pod_cidr, None);
    let reply = call(
        standin.addr(),
        Req::patch(
            "/api/v1/nodes/n1",
            MERGE,
            r#"{"spec":{"podCIDR":"10.244.1.0/24"},"status":{"phase":"Running"}}"#,
        ),
    );
    assert_eq!(reply.status, 200);
    let stored = standin.node("n1").unwrap();
    assert_eq!(
        stored.spec.unwrap().pod_cidr.as_deref(),
        Some("10.244.1.0/24")
    );
    assert_eq!(stored.status.and_then(|status| status.phase), None);
    assert_eq!(stored.metadata.generation, Some(2));
}

#[test]
fn strategic_merge_patch_merges_conditions_by_type() {
    let standin = start(Config::default());
    let mut n1 = node("n1", &[("a", "1")]);
    n1.status = Some(
        serde_json::from_value(json!({"conditions": [
            {"type": "Ready", "status": "True"}, {"type": "NetworkUnavailable", "status": "True"}
        ]}))
        .unwrap(),
    );
    standin.apply_node(n1).unwrap();
    let patch = r#"{"metadata":{"annotations":{"b":"2"}},"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}]}}"#;
    let reply = call(
        standin.addr(),
        Req::patch("/api/v1/nodes/n1/status", STRATEGIC, patch),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let stored = serde_json::to_value(standin.node("n1").unwrap()).unwrap();
    assert_eq!(
        stored["metadata"]["annotations"],
        json!({"a": "1", "b": "2"})
    );
    let conditions = &stored["status"]["conditions"];
    assert_eq!(conditions.as_array().unwrap().len(), 2);
    assert_eq!(conditions[0], json!({"type": "Ready", "status": "True"}));
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["reason"], "FlannelIsUp");
}

#[test]
fn json_patch_applies_or_fails_whole() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[("a", "1")])).unwrap();
    let patch = r#"[{"op":"test","path":"/metadata/annotations/a","value":"1"},{"op":"replace","path":"/metadata/annotations/a","value":"2"},{"op":"add","path":"/metadata/labels","value":{"x":"y"}}]"#;
    let reply = call(
        standin.addr(),
        Req::patch("/api/v1/nodes/n1", JSON_PATCH, patch),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["metadata"]["annotations"]["a"], "2");
    assert_eq!(reply.body["metadata"]["labels"]["x"], "y");
    let failing = r#"[{"op":"add","path":"/metadata/annotations/b","value":"3"},{"op":"test","path":"/metadata/annotations/a","value":"1"}]"#;
    let revision = standin.revision();
    assert_status(
        &call(
            standin.addr(),
            Req::patch("/api/v1/nodes/n1", JSON_PATCH, failing),
        ),
        422,
        "Invalid",
    );
    assert_eq!(standin.revision(), revision);
    assert!(!standin
        .node("n1")
        .unwrap()
        .metadata
        .annotations
        .unwrap()
        .contains_key("b"));
    assert_status(
        &call(
            standin.addr(),
            Req::patch("/api/v1/nodes/n1", JSON_PATCH, r#"{"op":"add"}"#),
        ),
        400,
        "BadRequest",
    );
}

#[test]
fn other_patch_content_types_are_415() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    for content_type in [
        "application/json",
        "application/apply-patch+yaml",
        "text/plain",
    ] {
        assert_status(
            &call(
                standin.addr(),
                Req::patch("/api/v1/nodes/n1", content_type, "{}"),
            ),
            415,
            "UnsupportedMediaType",
        );
    }
    assert_eq!(
        call(
            standin.addr(),
            Req::patch(
                "/api/v1/nodes/n1",
                "application/merge-patch+json; charset=utf-8",
                "{}"
            )
        )
        .status,
        200
    );
}

#[test]
fn a_stale_resource_version_is_409_conflict() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    standin
        .apply_node(node("n1", &[("changed", "yes")]))
        .unwrap();
    assert_eq!(standin.revision(), 2);
    let stale = r#"{"metadata":{"resourceVersion":"1","annotations":{"x":"1"}}}"#;
    let reply = call(standin.addr(), Req::patch("/api/v1/nodes/n1", MERGE, stale));
    assert_status(&reply, 409, "Conflict");
    assert!(reply.body["message"]
        .as_str()
        .unwrap()
        .contains("the object has been modified"));
    let current = r#"{"metadata":{"resourceVersion":"2","annotations":{"x":"1"}}}"#;
    assert_eq!(
        call(
            standin.addr(),
            Req::patch("/api/v1/nodes/n1", MERGE, current)
        )
        .status,
        200
    );
    // PUT with a stale version too.
    let put = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","resourceVersion":"2"}}"#;
    assert_status(
        &call(
            standin.addr(),
            Req::get("/api/v1/nodes/n1").with("PUT", put),
        ),
        409,
        "Conflict",
    );
}

#[test]
fn create_replace_delete() {
    let standin = start(Config::default());
    let body = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},"spec":{"clusterIP":"10.96.0.10"}}"#;
    let created = call(
        standin.addr(),
        Req::get("/api/v1/namespaces/default/services").with("POST", body),
    );
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["metadata"]["namespace"], "default");
    assert_status(
        &call(
            standin.addr(),
            Req::get("/api/v1/namespaces/default/services").with("POST", body),
        ),
        409,
        "AlreadyExists",
    );
    let put = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"default","resourceVersion":"1"},"spec":{"clusterIP":"10.96.0.11"}}"#;
    let replaced = call(
        standin.addr(),
        Req::get("/api/v1/namespaces/default/services/web").with("PUT", put),
    );
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);
    assert_eq!(
        standin
            .service("default", "web")
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("10.96.0.11")
    );
    let deleted = call(
        standin.addr(),
        Req::get("/api/v1/namespaces/default/services/web").with("DELETE", ""),
    );
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.body["metadata"]["resourceVersion"], "3");
    assert!(standin.service("default", "web").is_none());
    assert_eq!(standin.requests(Verb::Create, KindTag::Services), 2);
    assert_eq!(standin.requests(Verb::Delete, KindTag::Services), 1);
}

#[test]
fn watch_from_a_revision_replays_what_followed_in_order() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    let from = standin.revision();
    standin.apply_node(node("n2", &[])).unwrap();
    standin.apply_node(node("n1", &[("x", "1")])).unwrap();
    standin.delete_node("n2");
    let mut watch = Watch::open(
        standin.addr(),
        &format!("/api/v1/nodes?watch=true&resourceVersion={from}"),
    );
    assert_eq!(watch.status, 200);
    assert!(watch
        .headers
        .iter()
        .any(|(key, value)| key.eq_ignore_ascii_case("transfer-encoding") && value == "chunked"));
    let events: Vec<Value> = (0..3).map(|_| watch.event()).collect();
    let summaries: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        summaries,
        [
            ("ADDED".into(), "n2".into()),
            ("MODIFIED".into(), "n1".into()),
            ("DELETED".into(), "n2".into())
        ]
    );
    let versions: Vec<&str> = events
        .iter()
        .map(|event| {
            event["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, ["2", "3", "4"]);
    assert_eq!(events[1]["object"]["kind"], "Node");
    // Then live.
    standin.apply_node(node("n3", &[])).unwrap();
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "n3".into()));
    assert_eq!(standin.watches_open(), 1);
}

#[test]
fn watch_from_zero_starts_with_synthetic_added() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    standin.apply_node(node("n2", &[])).unwrap();
    standin.apply_node(node("n1", &[("x", "1")])).unwrap();
    for path in [
        "/api/v1/nodes?watch=1&resourceVersion=0",
        "/api/v1/nodes?watch=true",
    ] {
        let mut watch = Watch::open(standin.addr(), path);
        let first: Vec<_> = (0..2).map(|_| summary(&watch.event())).collect();
        assert_eq!(
            first,
            [("ADDED".into(), "n1".into()), ("ADDED".into(), "n2".into())],
            "{path}"
        );
        standin.delete_node("n2");
        assert_eq!(summary(&watch.event()), ("DELETED".into(), "n2".into()));
        standin.apply_node(node("n2", &[])).unwrap();
    }
}

#[test]
fn watch_from_before_a_compaction_gets_one_410_error_event() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    standin.apply_node(node("n2", &[])).unwrap();
    standin.compact();
    let mut watch = Watch::open(standin.addr(), "/api/v1/nodes?watch=true&resourceVersion=1");
    assert_eq!(watch.status, 200);
    let event = watch.event();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["kind"], "Status");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    assert_eq!(
        event["object"]["message"],
        "too old resource version: 1 (2)"
    );
    assert_eq!(watch.next(), Next::End);
    assert_eq!(standin.watches_expired(), 1);
    // From the compaction's revision on is fine.
    let mut watch = Watch::open(standin.addr(), "/api/v1/nodes?watch=true&resourceVersion=2");
    standin.apply_node(node("n3", &[])).unwrap();
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "n3".into()));
}

#[test]
fn a_bounded_history_expires_old_revisions() {
    let standin = start(Config {
        history_size: 2,
        ..Config::default()
    });
    for name in ["a", "b", "c", "d"] {
        standin.apply_node(node(name, &[])).unwrap();
    }
    assert_eq!(
        Watch::open(standin.addr(), "/api/v1/nodes?watch=true&resourceVersion=1").event()["object"]
            ["code"],
        410
    );
    let mut watch = Watch::open(standin.addr(), "/api/v1/nodes?watch=true&resourceVersion=2");
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "c".into()));
}

#[test]
fn bookmarks_come_at_the_configured_interval() {
    let standin = start(Config {
        bookmark_interval: Duration::from_millis(200),
        ..Config::default()
    });
    standin.apply_node(node("n1", &[])).unwrap();
    standin
        .apply_service(service("default", "web", &[]))
        .unwrap();
    let mut watch = Watch::open(
        standin.addr(),
        "/api/v1/nodes?watch=true&resourceVersion=1&allowWatchBookmarks=true",
    );
    let started = Instant::now();
    let bookmark = watch.event();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(
        bookmark["object"],
        json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "2"}})
    );
    assert_eq!(watch.event()["type"], "BOOKMARK");
    // Without allowWatchBookmarks there are none.
    let mut quiet = Watch::open(standin.addr(), "/api/v1/nodes?watch=true&resourceVersion=1");
    quiet.set_timeout(Duration::from_millis(600));
    assert!(matches!(quiet.next(), Next::Broken(_)));
}

#[test]
fn timeout_seconds_ends_the_stream_cleanly() {
    let standin = start(Config::default());
    let started = Instant::now();
    let mut watch = Watch::open(standin.addr(), "/api/v1/nodes?watch=true&timeoutSeconds=1");
    assert_eq!(watch.next(), Next::End);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
}

#[test]
fn selected_watch_sees_objects_enter_and_leave() {
    let standin = start(Config::default());
    let mut watch = Watch::open(standin.addr(), "/api/v1/namespaces/default/services?watch=true&labelSelector=%21service.kubernetes.io%2Fheadless");
    standin
        .apply_service(service("other", "elsewhere", &[]))
        .unwrap();
    standin
        .apply_service(service("default", "web", &[]))
        .unwrap();
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "web".into()));
    standin
        .apply_service(service(
            "default",
            "web",
            &[("service.kubernetes.io/headless", "")],
        ))
        .unwrap();
    assert_eq!(summary(&watch.event()), ("DELETED".into(), "web".into()));
    standin.delete_service("default", "web");
    standin
        .apply_service(service("default", "back", &[]))
        .unwrap();
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "back".into()));
}

#[test]
fn broken_watches_end_without_the_final_chunk() {
    let standin = start(Config::default());
    let mut watch = Watch::open(standin.addr(), "/api/v1/nodes?watch=true");
    standin.apply_node(node("n1", &[])).unwrap();
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "n1".into()));
    standin.break_watches();
    assert!(matches!(watch.next(), Next::Broken(_)));
}

#[test]
fn injected_failures_then_normal_service() {
    let standin = start(Config::default());
    standin.fail_next(2, 503);
    assert_status(
        &call(standin.addr(), Req::get("/api/v1/nodes")),
        503,
        "ServiceUnavailable",
    );
    assert_status(
        &call(standin.addr(), Req::get("/api/v1/nodes")),
        503,
        "ServiceUnavailable",
    );
    assert_eq!(call(standin.addr(), Req::get("/api/v1/nodes")).status, 200);
}

#[test]
fn stop_and_serve_again_keep_the_state() {
    let standin = start(Config::default());
    standin.apply_node(node("n1", &[])).unwrap();
    let mut watch = Watch::open(standin.addr(), "/api/v1/nodes?watch=true");
    assert_eq!(summary(&watch.event()), ("ADDED".into(), "n1".into()));
    standin.stop().unwrap();
    assert!(matches!(watch.next(), Next::Broken(_)));
    assert!(std::net::TcpStream::connect(standin.addr()).is_err());
    standin.apply_node(node("n2", &[])).unwrap();
    standin.serve_again().unwrap();
    assert_eq!(
        names(&call(standin.addr(), Req::get("/api/v1/nodes")).body),
        ["n1", "n2"]
    );
    assert_eq!(
        call(standin.addr(), Req::get("/api/v1/nodes")).body["metadata"]["resourceVersion"],
        "2"
    );
}
