#![allow(clippy::tests_outside_test_module)]
//! The deploy files (deploy/systemd, deploy/kubernetes) against the real `podwire` binary:
//! every flag they pass parses, every variable they set is one `podwire run` reads, and the
//! pieces that must agree (workers and CPUs, the seed container's prefix and the daemon's,
//! optional TLS) do.

use serde_yaml::Value;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- systemd -------------------------------------------------------------------------------

/// A unit file's assignments as (section, key, value), in order; comments and blank lines
/// skipped, backslash continuations joined.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        if let Some(name) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = full.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        } else {
            panic!("not an assignment: {full:?}");
        }
    }
    out
}

/// The values of `key` in `[section]`, in order.
fn values<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// The one value of `key` in `[section]`.
fn value<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> &'a str {
    match values(unit, section, key).as_slice() {
        [v] => v,
        other => panic!("[{section}] {key}: expected one value, got {other:?}"),
    }
}

const UNIT: &str = "deploy/systemd/podwire.service";
const DROP_INS: [&str; 2] = [
    "deploy/systemd/podwire.service.d/xdp.conf",
    "deploy/systemd/podwire.service.d/l2.conf",
];

/// The `podwire run` flags of a unit's (or drop-in's) non-empty ExecStart lines.
fn exec_start_flags(file: &str) -> Vec<Vec<String>> {
    let unit = parse_unit(&read(file));
    values(&unit, "Service", "ExecStart")
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(|v| {
            let words: Vec<String> = v.split_whitespace().map(str::to_string).collect();
            assert_eq!(words[0], "/usr/local/bin/podwire", "{file}: {v}");
            assert_eq!(words[1], "run", "{file}: {v}");
            words[2..].to_vec()
        })
        .collect()
}

// ---- the binary ----------------------------------------------------------------------------

fn podwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podwire"))
}

fn run_help() -> String {
    let out = podwire().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `podwire run FLAGS --help` parses: clap reads every flag and value before it acts
/// on --help, so an unknown flag or a bad value fails here as it would at start.
fn assert_run_accepts(what: &str, flags: &[String]) {
    assert!(!flags.is_empty(), "{what}: no flags");
    let help = run_help();
    for flag in flags {
        let name = flag.split('=').next().unwrap();
        assert!(
            name.starts_with("--"),
            "{what}: {flag:?} is not a long flag"
        );
        assert!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
            "{what}: {name} is not in `podwire run --help`"
        );
    }
    let out = podwire()
        .arg("run")
        .args(flags)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: `podwire run {}` is refused: {}",
        flags.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The environment variables `podwire run` reads, from its help (`[env: NAME=...]`).
fn env_names() -> Vec<String> {
    run_help()
        .split("[env: ")
        .skip(1)
        .map(|s| s.split(['=', ']']).next().unwrap().to_string())
        .collect()
}

#[test]
fn unit_is_type_notify_and_ordered_before_the_kubelet() {
    let unit = parse_unit(&read(UNIT));
    assert_eq!(value(&unit, "Service", "Type"), "notify");
    assert_eq!(value(&unit, "Service", "NotifyAccess"), "main");
    assert_eq!(value(&unit, "Service", "Restart"), "on-failure");
    assert!(!value(&unit, "Service", "TimeoutStartSec").is_empty());
    assert!(value(&unit, "Unit", "Before").contains("kubelet.service"));
    assert!(value(&unit, "Unit", "After").contains("network-online.target"));
}

#[test]
fn unit_and_drop_in_flags_are_accepted_by_podwire_run() {
    for file in std::iter::once(UNIT).chain(DROP_INS) {
        let lines = exec_start_flags(file);
        assert_eq!(lines.len(), 1, "{file}: one ExecStart");
        assert_run_accepts(file, &lines[0]);
    }
}

#[test]
fn unit_and_drop_ins_grant_each_mode_its_capabilities() {
    let caps = |file: &str, key: &str| -> Vec<String> {
        let unit = parse_unit(&read(file));
        values(&unit, "Service", key)
            .into_iter()
            .flat_map(str::split_whitespace)
            .map(str::to_string)
            .collect()
    };
    let has = |file: &str, want: &[&str]| {
        for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
            let got = caps(file, key);
            for cap in want {
                assert!(got.iter().any(|c| c == cap), "{file}: {key} lacks {cap}");
            }
        }
    };
    has(UNIT, &["CAP_NET_ADMIN", "CAP_NET_RAW"]);
    has(DROP_INS[0], &["CAP_BPF", "CAP_PERFMON", "CAP_IPC_LOCK"]);
    has(DROP_INS[1], &["CAP_SYS_ADMIN"]);
    assert!(exec_start_flags(DROP_INS[0])[0].contains(&"--io=xdp".to_string()));
    assert!(exec_start_flags(DROP_INS[1])[0].contains(&"--mode=l2".to_string()));
}

// ---- Kubernetes ----------------------------------------------------------------------------

const MANIFEST: &str = "deploy/kubernetes/podwire.yaml";

fn documents() -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(MANIFEST))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn of_kind(kind: &str) -> Value {
    let mut found: Vec<Value> = documents()
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found.remove(0)
}

fn pod_spec() -> Value {
    of_kind("DaemonSet")["spec"]["template"]["spec"].clone()
}

fn container(list: &str, name: &str) -> Value {
    pod_spec()[list]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
        .clone()
}

fn daemon() -> Value {
    container("containers", "podwire")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A container's variable `name`.
fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{}: no variable {name}", c["name"].as_str().unwrap()))
}

/// `--workers=N` (or `--workers N`) from the args.
fn workers(args: &[String]) -> String {
    let i = args
        .iter()
        .position(|a| a == "--workers" || a.starts_with("--workers="))
        .expect("--workers in the daemon's args");
    match args[i].split_once('=') {
        Some((_, n)) => n.to_string(),
        None => args[i + 1].clone(),
    }
}

#[test]
fn manifest_args_are_accepted_by_podwire_run() {
    let args = strings(&daemon()["args"]);
    assert_eq!(args[0], "run");
    assert_run_accepts(MANIFEST, &args[1..]);
}

#[test]
fn manifest_env_names_are_ones_podwire_run_reads() {
    let known = env_names();
    assert!(
        known.iter().any(|n| n == "FLANNELD_ETCD_PREFIX"),
        "{known:?}"
    );
    for e in daemon()["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            known.iter().any(|n| n == name),
            "{name} is not read by podwire run ({known:?})"
        );
    }
}

#[test]
fn workers_match_the_cpu_request_and_limit() {
    let c = daemon();
    let n = workers(&strings(&c["args"]));
    let cpu = |which: &str| {
        let v = &c["resources"][which]["cpu"];
        v.as_str()
            .map(str::to_string)
            .or_else(|| v.as_u64().map(|n| n.to_string()))
            .unwrap_or_else(|| panic!("resources.{which}.cpu"))
    };
    assert_eq!(cpu("requests"), n, "--workers={n} against the cpu request");
    assert_eq!(cpu("limits"), n, "--workers={n} against the cpu limit");
}

#[test]
fn seed_writes_under_the_prefix_the_daemon_reads() {
    let seed = container("initContainers", "seed-net-conf");
    let args = strings(&seed["args"]);
    assert_eq!(args[0], "put");
    let var = args[1]
        .strip_prefix("$(")
        .and_then(|s| s.strip_suffix(")/config"))
        .unwrap_or_else(|| panic!("seed key {:?} is not $(VAR)/config", args[1]));
    let seed_ref = &env(&seed, var)["valueFrom"]["configMapKeyRef"];
    let daemon = daemon();
    let daemon_ref = &env(&daemon, "FLANNELD_ETCD_PREFIX")["valueFrom"]["configMapKeyRef"];
    assert!(
        daemon_ref.is_mapping(),
        "FLANNELD_ETCD_PREFIX from the ConfigMap"
    );
    assert_eq!(seed_ref["name"], daemon_ref["name"]);
    assert_eq!(seed_ref["key"], daemon_ref["key"]);
    let key = daemon_ref["key"].as_str().unwrap();
    let prefix = &of_kind("ConfigMap")["data"][key];
    assert!(
        prefix.as_str().is_some_and(|p| p.starts_with('/')),
        "ConfigMap {key}: {prefix:?}"
    );
}

#[test]
fn tls_is_opt_in() {
    let data = of_kind("ConfigMap")["data"].clone();
    let daemon = daemon();
    let seed = container("initContainers", "seed-net-conf");
    for (c, var) in [
        (&daemon, "FLANNELD_ETCD_CAFILE"),
        (&daemon, "FLANNELD_ETCD_CERTFILE"),
        (&daemon, "FLANNELD_ETCD_KEYFILE"),
        (&seed, "ETCDCTL_CACERT"),
        (&seed, "ETCDCTL_CERT"),
        (&seed, "ETCDCTL_KEY"),
    ] {
        let r = &env(c, var)["valueFrom"]["configMapKeyRef"];
        assert_eq!(r["optional"], Value::Bool(true), "{var} must be optional");
        let key = r["key"].as_str().unwrap();
        assert!(
            data.get(key).is_none(),
            "ConfigMap key {key} set: TLS is opt-in"
        );
    }
    let volume = pod_spec()["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "etcd-certs")
        .expect("etcd-certs volume")
        .clone();
    assert_eq!(volume["secret"]["optional"], Value::Bool(true));
}

#[test]
fn etcd_image_is_pinned() {
    let image = container("initContainers", "seed-net-conf")["image"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, tag) = image.rsplit_once(':').expect("a tag");
    assert_ne!(tag, "latest", "{image}");
    let version = tag.strip_prefix('v').unwrap_or(tag);
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{image}: not a release version"
    );
}

#[test]
fn daemon_has_its_capabilities_devices_and_host_network() {
    let c = daemon();
    let caps = strings(&c["securityContext"]["capabilities"]["add"]);
    for cap in ["NET_ADMIN", "NET_RAW"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} in {caps:?}");
    }
    let spec = pod_spec();
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    let host_paths: Vec<&str> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for p in ["/run/flannel", "/dev/net/tun"] {
        assert!(host_paths.contains(&p), "hostPath {p}");
    }
    let image = c["image"].as_str().unwrap();
    assert!(!image.ends_with(":latest"), "{image}");
}

// ---- Kubernetes, --kube-subnet-mgr -----------------------------------------------------------

const KUBE_MANIFEST: &str = "deploy/kubernetes/podwire-kube.yaml";

fn kube_of_kind(kind: &str) -> Value {
    let mut found: Vec<Value> = serde_yaml::Deserializer::from_str(&read(KUBE_MANIFEST))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &Value| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in {KUBE_MANIFEST}");
    found.remove(0)
}

fn kube_daemon() -> Value {
    kube_of_kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0].clone()
}

#[test]
fn kube_manifest_runs_the_kube_subnet_mgr_with_flags_and_env_podwire_reads() {
    let c = kube_daemon();
    assert_eq!(c["name"], "podwire");
    let args = strings(&c["args"]);
    assert_eq!(args[0], "run");
    assert!(args.iter().any(|a| a == "--kube-subnet-mgr"), "{args:?}");
    assert_run_accepts(KUBE_MANIFEST, &args[1..]);
    let known = env_names();
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            known.iter().any(|n| n == name),
            "{name} is not read by podwire run"
        );
    }
    assert_eq!(
        env(&c, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let n = workers(&args);
    assert_eq!(c["resources"]["requests"]["cpu"].as_str(), Some(n.as_str()));
    assert_eq!(c["resources"]["limits"]["cpu"].as_str(), Some(n.as_str()));
}

#[test]
fn kube_manifest_mounts_a_net_conf_podwire_accepts_where_it_looks() {
    let cm = kube_of_kind("ConfigMap");
    let text = cm["data"]["net-conf.json"].as_str().unwrap();
    podwire::config::parse_net_conf(text).expect("net-conf.json in the ConfigMap");
    let c = kube_daemon();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "flannel-cfg")
        .expect("the ConfigMap mounted in the daemon");
    let default = std::path::Path::new(podwire::kube_store::DEFAULT_NET_CONF);
    assert_eq!(
        mount["mountPath"].as_str().map(std::path::Path::new),
        default.parent(),
        "--net-config-path's default directory"
    );
    let volumes = kube_of_kind("DaemonSet")["spec"]["template"]["spec"]["volumes"].clone();
    assert!(volumes
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "flannel-cfg" && v["configMap"]["name"] == cm["metadata"]["name"]));
}

#[test]
fn kube_manifest_grants_exactly_what_the_kube_subnet_mgr_uses() {
    // The store lists and watches Nodes, reads its own, and patches its annotations and
    // NetworkUnavailable condition through nodes/status (control/src/kube_store.rs); it lists
    // and watches Services and EndpointSlices for the service NAT.
    let role = kube_of_kind("ClusterRole");
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    granted.push((g.clone(), r.clone(), v));
                }
            }
        }
    }
    granted.sort();
    let want = [
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "nodes/status", "patch"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    ]
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()));
    assert_eq!(granted, want);
    let binding = kube_of_kind("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let sa = kube_of_kind("ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        kube_of_kind("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
}
