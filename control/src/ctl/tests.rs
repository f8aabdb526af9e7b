//! ctl end to end: a served socket, typed requests and answers, captures, renderings.
use super::protocol::ConntrackFilter;
use super::*;
use arc_swap::ArcSwap;
use podwire_dataplane::capture::{Capture, CapturePoint};
use podwire_dataplane::conntrack::tcp::TcpState;
use podwire_dataplane::conntrack::{EntryView, ServiceBinding, Tuple, PROTO_TCP};
use podwire_dataplane::stats::SharedStats;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn entry(sport: u16, state: TcpState) -> EntryView {
    let o = Tuple::new(
        Ipv4Addr::new(10, 244, 1, 2),
        sport,
        Ipv4Addr::new(10, 96, 0, 10),
        80,
        PROTO_TCP,
    );
    EntryView {
        original: o,
        reply: Tuple::new(Ipv4Addr::new(10, 244, 2, 2), 8080, o.src, sport, PROTO_TCP),
        tcp_state: Some(state),
        seen_reply: true,
        assured: true,
        retired: false,
        expires_in: 100,
        service: Some(ServiceBinding {
            vip: o.dst,
            port: 80,
            proto: PROTO_TCP,
            backend: Ipv4Addr::new(10, 244, 2, 2),
            backend_port: 8080,
        }),
        packets: [3, 2],
        bytes: [180, 120],
    }
}

/// A daemon's ctl state over a one-lease map, no workers.
fn test_state() -> Arc<CtlState> {
    state_with_workers(Vec::new())
}

fn state_with_workers(workers: Vec<Arc<SharedStats>>) -> Arc<CtlState> {
    let config = crate::config::parse_net_conf(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
    let ip = Ipv4Addr::new(192, 168, 0, 1);
    let view = crate::store::ClusterView {
        config,
        leases: vec![crate::store::Lease {
            subnet: "10.244.1.0/24".parse().unwrap(),
            attrs: crate::lease::LeaseAttrs::udp(ip),
        }],
    };
    let tables = crate::tables::build(&view, ip, None).unwrap();
    Arc::new(CtlState::new(
        Arc::new(ArcSwap::from_pointee(tables)),
        None,
        Arc::new(Capture::default()),
        workers,
        Arc::new(crate::health::Health::default()),
    ))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podwire-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn test_the_socket_is_never_seen_with_a_wider_mode_than_0600() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::unix::fs::MetadataExt;
    let dir = temp_dir("ctl-mode");
    let path = dir.join("ctl.sock");
    let inotify = Inotify::init(InitFlags::empty()).unwrap();
    inotify
        .add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .unwrap();
    // Looks at the socket the moment its name appears in the directory, as a local user
    // racing to connect would.
    let watched = path.clone();
    let watcher = std::thread::spawn(move || {
        let mut modes = Vec::new();
        loop {
            for ev in inotify.read_events().unwrap() {
                match ev.name.as_deref().and_then(|n| n.to_str()) {
                    Some("ctl.sock") => {
                        if let Ok(m) = std::fs::symlink_metadata(&watched) {
                            modes.push(m.mode() & 0o777);
                        }
                    }
                    Some("stop") => return modes,
                    _ => {}
                }
            }
        }
    });
    let state = test_state();
    for _ in 0..50 {
        serve(&path, Arc::clone(&state)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::write(dir.join("stop"), "").unwrap();
    let modes = watcher.join().unwrap();
    assert!(!modes.is_empty(), "the watcher saw no socket");
    assert!(
        modes.iter().all(|&m| m == 0o600),
        "the socket was seen with modes {:?}",
        modes
            .iter()
            .filter(|&&m| m != 0o600)
            .map(|m| format!("{m:o}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    // The renamed socket answers, and no private directory is left behind.
    let answer = request(&path, &json!({"cmd": "subnets"})).unwrap();
    assert_eq!(answer["network"], "10.244.0.0/16");
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["ctl.sock", "stop"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_fdb_on_a_routed_node_is_a_clear_refusal() {
    // Before: "podwire answered garbage: no bridge: podwire runs in routed (L3) mode".
    let dir = temp_dir("ctl-fdb-routed");
    let socket = dir.join("ctl.sock");
    serve(&socket, test_state()).unwrap();
    for cmd in ["fdb", "attach", "detach"] {
        let err = request(&socket, &json!({"cmd": cmd, "netns": "pod-a"})).unwrap_err();
        assert!(matches!(err, CtlError::Refused(_)), "{cmd}: {err:?}");
        let text = err.to_string();
        assert!(!text.contains("garbage"), "{text}");
        assert!(
            text.starts_with(&format!(
                "podwire refused: {cmd}: this node runs in routed mode (--mode l3): no bridge, so no FDB"
            )),
            "{text}"
        );
    }
    // An answer that is no JSON at all is still garbage.
    let bad = dir.join("bad.sock");
    let listener = std::os::unix::net::UnixListener::bind(&bad).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        c.write_all(b"not json\n").unwrap();
    });
    let err = request(&bad, &json!({"cmd": "fdb"})).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, CtlError::Answer(_)), "{err:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_the_daemon_writes_no_capture_file() {
    let dir = temp_dir("ctl-capture-file");
    let socket = dir.join("ctl.sock");
    serve(&socket, test_state()).unwrap();
    let target = dir.join("daemon-wrote-this.pcap");
    let req = json!({"cmd": "capture", "port": "tun", "count": 1, "timeout_ms": 100,
                     "path": target.display().to_string()});
    let answer = request(&socket, &req).unwrap();
    assert_eq!(answer["captured"], 0);
    assert!(
        !target.exists(),
        "the daemon (root) wrote a file where the request said"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_stats_carry_the_xdp_programs_counters() {
    let dir = temp_dir("ctl-stats-xdp");
    let socket = dir.join("ctl.sock");
    let state = test_state();
    state
        .health
        .set_xdp_programs(vec![crate::health::XdpProgramCounters::from_fn(
            "eth0",
            || {
                Ok(podwire_dataplane::port::xdp::XdpCounters {
                    redirected: 500,
                    no_socket: 4,
                    ..Default::default()
                })
            },
        )]);
    serve(&socket, Arc::clone(&state)).unwrap();
    let v = request(&socket, &json!({"cmd": "stats"})).unwrap();
    let p = &v["xdp_programs"][0];
    assert_eq!(p["interface"], "eth0", "{v}");
    assert_eq!(p["no_socket"], 4, "{v}");
    assert_eq!(p["redirected"], 500, "{v}");
    let text = render(&Response::decode(&Request::Stats, v.clone()).unwrap());
    assert!(text.contains("XDP program on eth0"), "{text}");
    assert!(text.contains("no_socket"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_a_capture_does_not_hold_up_other_requests() {
    let dir = temp_dir("ctl-capture-busy");
    let socket = dir.join("ctl.sock");
    serve(&socket, test_state()).unwrap();
    let s = socket.clone();
    let capturing = std::thread::spawn(move || {
        let req = json!({"cmd": "capture", "port": "tun", "count": 1, "timeout_ms": 1500,
                         "path": "/dev/null"});
        request(&s, &req)
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    request(&socket, &json!({"cmd": "stats"})).unwrap();
    let took = started.elapsed();
    capturing.join().unwrap().unwrap();
    assert!(
        took < Duration::from_millis(500),
        "stats waited {took:?} behind a capture"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_the_client_writes_the_pcap_the_daemon_streams() {
    use podwire_dataplane::batch::Batch;
    let dir = temp_dir("ctl-capture-client");
    let socket = dir.join("ctl.sock");
    let state = test_state();
    serve(&socket, Arc::clone(&state)).unwrap();
    // A worker's part: three packets read from the TUN once the capture is armed.
    let feeder = std::thread::spawn(move || {
        while !state.capture.wants(CapturePoint::Tun) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut b = Batch::new(3, 256);
        for i in 0..3 {
            b.rx_slot(i)[..4].copy_from_slice(&[0x45, 0, 0, i as u8]);
            b.commit_rx(
                i,
                4,
                std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                false,
            );
        }
        state.capture.record(CapturePoint::Tun, &b);
    });
    let file = dir.join("pods.pcap");
    let req = json!({"cmd": "capture", "port": "tun", "count": 3, "timeout_ms": 5000});
    let got = capture_to_file(&socket, &req, &file).unwrap();
    feeder.join().unwrap();
    assert_eq!(
        (got["captured"].as_u64(), got["wanted"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(got["path"], file.display().to_string());
    let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(&file).unwrap()).unwrap();
    assert_eq!(r.header().datalink, pcap_file::DataLink::RAW);
    let mut n = 0;
    while let Some(p) = r.next_packet() {
        assert_eq!(&*p.unwrap().data, &[0x45, 0, 0, n]);
        n += 1;
    }
    assert_eq!(n, 3);
    // One capture at a time: a second one while the first runs is refused, and the ctl
    // thread answers it at once.
    let s = socket.clone();
    let long = std::thread::spawn(move || {
        let req = json!({"cmd": "capture", "port": "underlay", "count": 1, "timeout_ms": 800});
        request(&s, &req)
    });
    std::thread::sleep(Duration::from_millis(200));
    let second = capture_to_file(&socket, &req, &dir.join("second.pcap")).unwrap_err();
    assert!(second.to_string().contains("running already"), "{second}");
    assert_eq!(long.join().unwrap().unwrap()["captured"], 0);
    // A file the client cannot create is its own error, before the daemon is asked.
    let e = capture_to_file(&socket, &req, &dir.join("no/such/dir.pcap")).unwrap_err();
    assert!(matches!(e, CtlError::File { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_filters_match_either_tuple() {
    let e = entry(40000, TcpState::Established);
    let filter = |req: Value| serde_json::from_value::<ConntrackFilter>(req);
    let f = |req: Value| server::matches(&filter(req).unwrap(), &e);
    assert!(f(json!({})));
    assert!(f(json!({"addr": "10.244.2.2"})), "the reply's source");
    assert!(f(json!({"port": 8080})));
    assert!(f(
        json!({"port": 40000, "state": "established", "proto": "tcp"})
    ));
    assert!(!f(json!({"state": "TIME_WAIT"})));
    assert!(!f(json!({"proto": "udp"})));
    assert!(!f(json!({"addr": "10.244.9.9"})));
    assert!(filter(json!({"addr": "nope"})).is_err());
    assert!(filter(json!({"port": 70000})).is_err());
    assert!(filter(json!({"proto": "sctp"})).is_err());
}

/// The requests as `podwire ctl` sends them are the JSON of before (scripts and the lab
/// send it by hand), and what scripts send parses.
#[test]
fn test_requests_keep_their_json() {
    let conntrack = Request::Conntrack(ConntrackFilter {
        port: Some(80),
        proto: Some(protocol::Proto::Tcp),
        ..Default::default()
    });
    assert_eq!(
        serde_json::to_value(&conntrack).unwrap(),
        json!({"cmd": "conntrack", "addr": null, "port": 80, "state": null, "proto": "tcp"})
    );
    let capture = Request::Capture(protocol::CaptureRequest {
        port: protocol::CapturePort::Underlay,
        count: 10,
        timeout_ms: 4000,
    });
    let by_hand = json!({"cmd": "capture", "port": "underlay", "count": 10, "timeout_ms": 4000});
    assert_eq!(serde_json::to_value(&capture).unwrap(), by_hand);
    assert_eq!(serde_json::from_value::<Request>(by_hand).unwrap(), capture);
    let fault = json!({"cmd": "fault", "kind": "worker-panic", "worker": 1});
    assert_eq!(
        serde_json::from_value::<Request>(fault).unwrap(),
        Request::Fault {
            kind: protocol::FaultKind::WorkerPanic,
            worker: 1
        }
    );
    for bad in [
        json!({"cmd": "reboot"}),
        json!({"cmd": "detach"}),
        json!({}),
    ] {
        assert!(
            serde_json::from_value::<Request>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

/// `podwire ctl --json` prints the typed answer: it carries every field the daemon sent,
/// with the same values, so the JSON keeps its shape.
#[test]
fn test_typed_answers_are_the_json_the_daemon_sends() {
    let dir = temp_dir("ctl-typed");
    let socket = dir.join("ctl.sock");
    let worker = Arc::new(SharedStats::default());
    let mut local = podwire_dataplane::stats::LocalStats::default();
    local.add(podwire_dataplane::stats::Counter::RxTun, 7);
    local.drop(podwire_dataplane::pipeline::DropReason::ALL[0]);
    worker.flush(&mut local);
    serve(&socket, state_with_workers(vec![worker])).unwrap();
    for req in [
        Request::Subnets,
        Request::Services,
        Request::Stats,
        Request::Stats,
    ] {
        let raw = request(&socket, &req).unwrap();
        let typed = Response::decode(&req, raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), raw, "{}", req.name());
    }
    // The keys scripts and the lab read, as they were when answers were built by hand.
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k.join(" ")
    };
    let subnets = request(&socket, &Request::Subnets).unwrap();
    assert_eq!(keys(&subnets), "leases network own");
    assert_eq!(keys(&subnets["own"]), "lease_expiry_unix public_ip subnet");
    assert_eq!(
        keys(&subnets["leases"][0]),
        "backend own public_ip subnet vtep_mac"
    );
    assert_eq!(subnets["own"]["public_ip"], "192.168.0.1");
    let services = request(&socket, &Request::Services).unwrap();
    assert_eq!(keys(&services), "hairpin_ip service_cidr services");
    let stats = request(&socket, &Request::Stats).unwrap();
    assert_eq!(keys(&stats), "since_previous_s workers xdp_programs");
    assert_eq!(
        keys(&stats["workers"][0]),
        "counters drops per_second worker"
    );
    let w = &stats["workers"][0];
    assert_eq!(w["counters"]["rx_tun"], 7, "{stats}");
    assert_eq!(w["drops"].as_object().unwrap().len(), 1, "{stats}");
    assert!(w["per_second"]["rx_tun"].is_number(), "{stats}");
    assert!(stats["since_previous_s"].is_number(), "{stats}");
    let text = render(&call(&socket, &Request::Stats).unwrap());
    assert!(text.contains("worker 0\n  tun\n    rx_tun"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_rendering_looks_like_the_familiar_tools() {
    let v = json!({"count": 1, "total": 1, "entries": [{
        "proto": "tcp", "state": "ESTABLISHED", "expires_in": 431999,
        "original": {"src": "10.244.1.2", "dst": "10.96.0.10", "sport": 40000, "dport": 80},
        "reply": {"src": "10.244.2.2", "dst": "10.244.1.2", "sport": 8080, "dport": 40000},
        "packets": [3, 2], "bytes": [180, 120], "seen_reply": true, "assured": true}],
        "counters": {"entries": 1, "max": 10, "inserted": 1, "expired": 0, "early_drops": 0,
                     "table_full": 0, "invalid": 0}});
    let text = render(&Response::Conntrack(serde_json::from_value(v).unwrap()));
    assert!(text.starts_with("tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=10.96.0.10 sport=40000 dport=80 packets=3 bytes=180 src=10.244.2.2 dst=10.244.1.2 sport=8080 dport=40000 packets=2 bytes=120 [ASSURED]"), "{text}");
    assert!(text.contains("1 flow entries have been shown."));
    let v = json!({"service_cidr": "10.96.0.0/12", "hairpin_ip": "169.254.0.1", "services": [{"name": "default/web", "cluster_ip": "10.96.0.10", "port": 80,
        "proto": "tcp", "scheduler": "mh", "affinity_timeout": null,
        "endpoints": [{"ip": "10.244.2.2", "port": 8080, "active": 5, "inactive": 1}]}]});
    let text = render(&Response::Services(serde_json::from_value(v).unwrap()));
    assert!(text.contains("TCP  10.96.0.10:80 mh"), "{text}");
    assert!(text.contains("  -> 10.244.2.2:8080"), "{text}");
}

/// `stats` shows the counters of what runs (a routed node's: no bridge) and, with several
/// workers, their total.
#[test]
fn test_stats_show_the_running_modes_counters_and_a_total() {
    use podwire_dataplane::stats::{Component, Counter, LocalStats};
    let workers: Vec<Arc<SharedStats>> = (0..2).map(|_| Arc::new(SharedStats::default())).collect();
    for (w, n) in workers.iter().zip([3u64, 4]) {
        let mut local = LocalStats::default();
        local.add(Counter::RxTun, n);
        w.flush(&mut local);
    }
    let dir = temp_dir("ctl-stats-components");
    let socket = dir.join("ctl.sock");
    let state = state_with_workers(workers.clone());
    state.health.set_workers(workers);
    state.health.set_components(vec![
        Component::Tun,
        Component::Underlay,
        Component::Tunnel,
        Component::Worker,
    ]);
    serve(&socket, Arc::clone(&state)).unwrap();
    let v = request(&socket, &json!({"cmd": "stats"})).unwrap();
    let counters = &v["workers"][0]["counters"];
    assert_eq!(counters["rx_tun"], 3, "{v}");
    assert!(
        counters.get("rx_tap").is_none(),
        "a bridge counter on a routed node: {v}"
    );
    let text = render(&Response::decode(&Request::Stats, v.clone()).unwrap());
    assert!(!text.contains("bridge"), "{text}");
    assert!(!text.contains("fdb_learned"), "{text}");
    let total = text.split("total (2 workers)").nth(1).expect(&text);
    assert!(
        total
            .lines()
            .any(|l| l.split_whitespace().eq(["rx_tun", "7"])),
        "{text}"
    );
    // /metrics alike: no bridge families on a routed node.
    let metrics = state.health.render_metrics();
    assert!(
        metrics.contains("podwire_rx_packets_total{worker=\"1\",port=\"tun\"} 4"),
        "{metrics}"
    );
    assert!(!metrics.contains("port=\"tap\""), "{metrics}");
    assert!(!metrics.contains("podwire_fdb_learned_total"), "{metrics}");
    std::fs::remove_dir_all(&dir).unwrap();
}
