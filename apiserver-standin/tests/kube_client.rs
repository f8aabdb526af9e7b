//! The real kube-rs client and watcher against the stand-in: list, get, merge and strategic
//! patches (as flanneld writes its annotations), and a watcher that follows changes, relists
//! after a 410, and recovers from a restarted server.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{node, start, ADMIN, READER};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config};
use podwire_apiserver_standin::kinds::KindTag;
use podwire_apiserver_standin::kubeconfig::write_kubeconfig;
use podwire_apiserver_standin::verb::Verb;
use podwire_apiserver_standin::Handle;
use serde_json::json;

/// A kube client configured the way a daemon given `--kubeconfig-file` would be.
async fn client(standin: &Handle, token: &str) -> Client {
    let dir = std::env::temp_dir().join(format!(
        "standin-kubeconfig-{}-{token}-{}",
        std::process::id(),
        standin.addr().port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    write_kubeconfig(&path, &standin.url(), token).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn annotation(node: &Node, key: &str) -> Option<String> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(key).cloned())
}

#[tokio::test]
async fn list_get_and_patch_annotations() {
    let standin = start(Default::default());
    standin.apply_node(node("n1", &[("keep", "1")])).unwrap();
    standin.apply_node(node("n2", &[])).unwrap();
    let nodes: Api<Node> = Api::all(client(&standin, ADMIN).await);

    let list = nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.items
            .iter()
            .filter_map(|node| node.metadata.name.clone())
            .collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    assert_eq!(
        list.metadata.resource_version,
        Some(standin.revision().to_string())
    );
    assert_eq!(
        nodes
            .get("n1")
            .await
            .unwrap()
            .metadata
            .resource_version
            .as_deref(),
        Some("1")
    );
    assert_eq!(nodes.get_opt("nope").await.unwrap(), None);

    let merge =
        json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.0.2.1"}}});
    let patched = nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap();
    assert_eq!(
        annotation(&patched, "flannel.alpha.coreos.com/public-ip").as_deref(),
        Some("192.0.2.1")
    );
    // flanneld's way: a strategic merge patch of annotations through nodes/status.
    let strategic =
        json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/backend-type": "vxlan"}}});
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Strategic(&strategic))
        .await
        .unwrap();
    let stored = standin.node("n1").unwrap();
    assert_eq!(
        annotation(&stored, "flannel.alpha.coreos.com/public-ip").as_deref(),
        Some("192.0.2.1")
    );
    assert_eq!(
        annotation(&stored, "flannel.alpha.coreos.com/backend-type").as_deref(),
        Some("vxlan")
    );
    assert_eq!(annotation(&stored, "keep").as_deref(), Some("1"));
    assert_eq!(standin.requests(Verb::Patch, KindTag::Nodes), 2);

    let reader: Api<Node> = Api::all(client(&standin, READER).await);
    let refused = reader
        .patch("n1", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, kube::Error::Api(ref status) if status.code == 403),
        "{refused:?}"
    );
    let stale = json!({"metadata": {"resourceVersion": "1", "annotations": {"x": "1"}}});
    let conflict = nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert!(
        matches!(conflict, kube::Error::Api(ref status) if status.code == 409 && status.reason == "Conflict"),
        "{conflict:?}"
    );
}

/// What a watcher has seen.
#[derive(Debug, Default)]
struct View {
    /// Name -> annotations, as the watcher's events build it.
    objects: BTreeMap<String, BTreeMap<String, String>>,
    buffer: BTreeMap<String, BTreeMap<String, String>>,
    inits: usize,
    expired: usize,
    errors: Vec<String>,
    deleted: Vec<String>,
}

impl View {
    fn names(&self) -> BTreeSet<String> {
        self.objects.keys().cloned().collect()
    }
}

fn entry(node: &Node) -> (String, BTreeMap<String, String>) {
    (
        node.metadata.name.clone().unwrap_or_default(),
        node.metadata.annotations.clone().unwrap_or_default(),
    )
}

fn spawn_watcher(client: Client) -> Arc<Mutex<View>> {
    let view = Arc::new(Mutex::new(View::default()));
    let shared = Arc::clone(&view);
    tokio::spawn(async move {
        let mut events = Box::pin(
            watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff(),
        );
        while let Some(event) = events.next().await {
            let mut view = shared.lock().unwrap();
            match event {
                Ok(Event::Init) => {
                    view.inits += 1;
                    view.buffer.clear();
                }
                Ok(Event::InitApply(node)) => {
                    drop(view.buffer.insert(entry(&node).0, entry(&node).1))
                }
                Ok(Event::InitDone) => view.objects = std::mem::take(&mut view.buffer),
                Ok(Event::Apply(node)) => drop(view.objects.insert(entry(&node).0, entry(&node).1)),
                Ok(Event::Delete(node)) => {
                    let name = entry(&node).0;
                    view.objects.remove(&name);
                    view.deleted.push(name);
                }
                Err(error) => {
                    if matches!(&error, watcher::Error::WatchError(status) if status.code == 410) {
                        view.expired += 1;
                    }
                    view.errors.push(error.to_string());
                }
            }
        }
    });
    view
}

async fn wait_for(view: &Mutex<View>, what: &str, done: impl Fn(&View) -> bool) {
    for _ in 0..500 {
        if done(&view.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}: {:?}", view.lock().unwrap());
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    let standin = start(Default::default());
    standin.apply_node(node("n1", &[])).unwrap();
    let view = spawn_watcher(client(&standin, READER).await);
    wait_for(&view, "the initial list", |view| {
        view.inits == 1 && view.names() == set(&["n1"])
    })
    .await;
    wait_for(&view, "an open watch", |_| standin.watches_open() == 1).await;

    standin.apply_node(node("n2", &[])).unwrap();
    wait_for(&view, "n2 added", |view| view.names() == set(&["n1", "n2"])).await;
    standin
        .apply_node(node(
            "n1",
            &[("flannel.alpha.coreos.com/public-ip", "192.0.2.7")],
        ))
        .unwrap();
    wait_for(&view, "n1 modified", |view| {
        view.objects["n1"]
            .get("flannel.alpha.coreos.com/public-ip")
            .map(String::as_str)
            == Some("192.0.2.7")
    })
    .await;
    standin.delete_node("n2");
    wait_for(&view, "n2 deleted", |view| {
        view.names() == set(&["n1"]) && view.deleted == ["n2"]
    })
    .await;
    let view = view.lock().unwrap();
    assert_eq!((view.inits, view.expired), (1, 0), "{view:?}");
    assert_eq!(standin.requests(Verb::List, KindTag::Nodes), 1);
}

#[tokio::test]
async fn watcher_relists_after_410_and_converges() {
    let standin = start(Default::default());
    standin.apply_node(node("n1", &[])).unwrap();
    standin.apply_node(node("n2", &[])).unwrap();
    let view = spawn_watcher(client(&standin, READER).await);
    wait_for(&view, "the initial list", |view| {
        view.names() == set(&["n1", "n2"])
    })
    .await;
    wait_for(&view, "an open watch", |_| standin.watches_open() == 1).await;

    // The watch breaks and the next attempts fail (the watcher backs off), while the nodes
    // change and the history is compacted: the resumed watch is from a forgotten revision.
    standin.fail_next(2, 503);
    standin.break_watches();
    standin.delete_node("n1");
    standin.apply_node(node("n3", &[])).unwrap();
    standin
        .apply_node(node("n2", &[("changed", "yes")]))
        .unwrap();
    standin.compact();

    wait_for(&view, "the relisted set", |view| {
        view.names() == set(&["n2", "n3"]) && view.objects["n2"].contains_key("changed")
    })
    .await;
    {
        let seen = view.lock().unwrap();
        assert!(seen.expired >= 1 && seen.inits == 2, "{seen:?}");
        assert!(standin.watches_expired() >= 1);
        assert_eq!(standin.requests(Verb::List, KindTag::Nodes), 2);
    }
    // And it keeps following.
    standin.apply_node(node("n4", &[])).unwrap();
    wait_for(&view, "n4 after the relist", |view| {
        view.names() == set(&["n2", "n3", "n4"])
    })
    .await;
}

#[tokio::test]
async fn watcher_recovers_after_a_restart() {
    let standin = start(Default::default());
    standin.apply_node(node("n1", &[])).unwrap();
    let view = spawn_watcher(client(&standin, ADMIN).await);
    wait_for(&view, "the initial list", |view| {
        view.names() == set(&["n1"])
    })
    .await;
    wait_for(&view, "an open watch", |_| standin.watches_open() == 1).await;

    standin.stop().unwrap();
    standin.apply_node(node("n2", &[])).unwrap();
    standin.delete_node("n1");
    wait_for(&view, "an error while down", |view| !view.errors.is_empty()).await;
    standin.serve_again().unwrap();

    wait_for(&view, "the changes made while down", |view| {
        view.names() == set(&["n2"])
    })
    .await;
    standin.apply_node(node("n3", &[])).unwrap();
    wait_for(&view, "n3 after the restart", |view| {
        view.names() == set(&["n2", "n3"])
    })
    .await;
    // The history was kept: the watcher resumed without relisting.
    assert_eq!(view.lock().unwrap().inits, 1);
}

#[tokio::test]
async fn services_and_endpointslices_through_kube() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{DeleteParams, PostParams};

    let standin = start(Default::default());
    standin
        .apply_service(common::service(
            "default",
            "headless",
            &[("service.kubernetes.io/headless", "")],
        ))
        .unwrap();
    let client = client(&standin, ADMIN).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = services
        .create(
            &PostParams::default(),
            &common::service("default", "web", &[("app", "web")]),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let mut replaced = created.clone();
    replaced.spec = Some(serde_json::from_value(json!({"clusterIP": "10.96.0.10"})).unwrap());
    let replaced = services
        .replace("web", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(
        standin
            .service("default", "web")
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("10.96.0.10")
    );
    let stale = services
        .replace("web", &PostParams::default(), &created)
        .await
        .unwrap_err();
    assert!(
        matches!(stale, kube::Error::Api(ref status) if status.code == 409),
        "{stale:?}"
    );

    let kube_proxy = ListParams::default()
        .labels("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless");
    let all: Api<Service> = Api::all(client.clone());
    let listed = all.list(&kube_proxy).await.unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .filter_map(|service| service.metadata.name.clone())
            .collect::<Vec<_>>(),
        ["web"]
    );

    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"]}],
    }))
    .unwrap();
    standin.apply_endpoint_slice(slice).unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let by_service = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(by_service.items.len(), 1);
    assert_eq!(
        by_service.items[0].endpoints.as_ref().unwrap()[0].addresses,
        ["10.244.1.5"]
    );

    let deleted = services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.left().is_some_and(
        |service| service.metadata.resource_version != replaced.metadata.resource_version
    ));
    assert!(standin.service("default", "web").is_none());
}
