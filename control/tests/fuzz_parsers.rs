//! Property-based fuzzing of what the control plane parses (proptest, stable Rust): the
//! cluster file, net-conf.json, the services file and etcd service objects, and `podwire ctl`
//! requests. Arbitrary text, and valid documents with bytes changed or cut short, must give a
//! value or an error, never a panic; a ctl request always gets a JSON answer.
//!
//! Longer run: `PROPTEST_CASES=100000 cargo test --release -p podwire --test fuzz_parsers`.

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use arc_swap::ArcSwap;
use podwire::config::parse_net_conf;
use podwire::ctl::{handle, CtlState};
use podwire::health::Health;
use podwire::services::{parse_etcd, parse_file, parse_one};
use podwire::store::parse_cluster;
use podwire_dataplane::capture::Capture;
use podwire_dataplane::pipeline::Flows;
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

const CLUSTER: &str = r#"{"config": {"Network": "10.244.0.0/16", "SubnetLen": 24,
  "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472, "DirectRouting": false}},
 "subnets": {"10.244.1.0-24": {"PublicIP": "192.168.99.11", "PublicIPv6": null,
   "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "0e:70:c0:a8:63:0b"}},
  "10.244.2.0-24": {"PublicIP": "192.168.99.12", "PublicIPv6": null}}}"#;

const SERVICES: &str = r#"{"services": [{"name": "default/web", "clusterIP": "10.96.0.10",
  "protocol": "TCP", "port": 80, "endpoints": [{"ip": "10.244.2.2", "port": 8080},
  {"ip": "10.244.3.2", "port": 8080}], "sessionAffinity": "ClientIP",
  "sessionAffinityTimeoutSeconds": 10800, "nodePort": 30080},
  {"name": "kube-system/dns", "clusterIP": "10.96.0.53", "protocol": "UDP", "port": 53,
  "endpoints": []}]}"#;

/// A valid document with up to 8 bytes changed and maybe cut short, or arbitrary text.
fn text(valid: &'static str) -> impl Strategy<Value = String> {
    let mutated = (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(move |(flips, cut)| {
            let mut b = valid.as_bytes().to_vec();
            for (at, v) in flips {
                let i = at.index(b.len());
                b[i] = v;
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len() + 1));
            }
            String::from_utf8_lossy(&b).into_owned()
        });
    prop_oneof![mutated.clone(), mutated, ".{0,400}"]
}

fn ctl_state() -> &'static CtlState {
    static STATE: OnceLock<CtlState> = OnceLock::new();
    STATE.get_or_init(|| {
        let view = parse_cluster(CLUSTER).expect("cluster");
        let tables =
            podwire::tables::build(&view, "192.168.99.11".parse().unwrap(), None).expect("tables");
        CtlState::new(
            Arc::new(ArcSwap::from_pointee(tables)),
            Some(Arc::new(Flows::new(Default::default()))),
            Arc::new(Capture::default()),
            Vec::new(),
            Arc::new(Health::default()),
        )
    })
}

/// A ctl request: a known command (capture left out: it writes files and waits) with fields
/// of random types, or any JSON.
fn request() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,20}".prop_map(serde_json::Value::from),
        "10\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}".prop_map(serde_json::Value::from),
    ];
    let cmd = prop_oneof![
        Just("subnets"),
        Just("conntrack"),
        Just("services"),
        Just("stats"),
        Just("fdb"),
        Just("attach"),
        Just("detach"),
        Just("nonsense"),
    ];
    let field = prop_oneof![
        Just("addr"),
        Just("port"),
        Just("state"),
        Just("proto"),
        Just("netns"),
        Just("ip"),
        Just("mac"),
    ];
    (cmd, prop::collection::vec((field, leaf), 0..5)).prop_map(|(cmd, fields)| {
        let mut m = serde_json::Map::new();
        m.insert("cmd".into(), cmd.into());
        for (k, v) in fields {
            m.insert(k.into(), v);
        }
        serde_json::Value::Object(m)
    })
}

/// Cases per target: `PROPTEST_CASES` when set (a long run), else the CI default. proptest reads
/// the variable only into its own default, which an explicit `cases` would override.
fn cases(ci_default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(3000), ..ProptestConfig::default() })]

    #[test]
    fn cluster_file_and_net_conf_never_panic(t in text(CLUSTER), n in text(r#"{"Network": "10.244.0.0/16", "SubnetLen": 24, "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.200.0", "Backend": {"Type": "udp", "Port": 8285}}"#)) {
        if let Ok(view) = parse_cluster(&t) {
            // Whatever validates also builds tables for any node of it.
            for l in &view.leases {
                let _ = podwire::tables::build(&view, l.attrs.public_ip, Some(l.subnet));
            }
        }
        let _ = parse_net_conf(&n);
    }

    #[test]
    fn services_never_panic(t in text(SERVICES), key in ".{0,40}") {
        let _ = parse_file(&t, "fuzz");
        let _ = parse_one(t.as_bytes(), &key);
        let _ = parse_etcd(&[(key, t.into_bytes())]);
    }

    #[test]
    fn ctl_requests_always_get_an_answer(req in request()) {
        // What does not parse as a request is refused as a bad request; what does gets an
        // answer (a JSON object) or a refusal.
        if let Ok(req) = serde_json::from_value::<podwire::ctl::Request>(req) {
            if let Ok(answer) = handle(&req, ctl_state()) {
                let v = serde_json::to_value(&answer).unwrap();
                prop_assert!(v.is_object(), "{v}");
                let _ = podwire::ctl::render(&answer);
            }
        }
    }
}
