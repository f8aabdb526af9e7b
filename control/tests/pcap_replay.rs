//! pcap replay: every case under fixtures/pcap runs through the pipeline offline and must produce
//! exactly the expected frames (built independently with etherparse) and exactly the expected
//! drops by reason, in routed mode or (`"mode": "l2"`) through the bridge's decisions. Where
//! tshark is installed it decodes our output as an independent check.

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use podwire_dataplane::bridge::PortId;
use podwire_dataplane::nat::{ServiceOptions, Services, DEFAULT_SERVICE_CIDR};
use podwire_dataplane::pipeline::{BridgeIngress, Direction, DropReason, Flows};
use podwire_dataplane::replay::{replay_bridged, replay_with, BridgePort};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pcap")
}

fn records(path: &Path) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = pcap_file::pcap::PcapReader::new(file).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

fn out_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("podwire-replay-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn case_dirs() -> Vec<PathBuf> {
    // Cases, and groups of cases (malformed/) one level down.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .flat_map(|p| {
            if p.join("case.json").exists() {
                vec![p]
            } else {
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .map(|e| e.unwrap().path())
                    .filter(|c| c.join("case.json").exists())
                    .collect()
            }
        })
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 6,
        "replay cases missing under {}",
        fixtures().display()
    );
    dirs
}

fn tshark_available() -> bool {
    Command::new("tshark")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// tshark's verdict on every frame: checksums of IP, UDP and ICMP validated, no malformed packet.
fn tshark_check(path: &Path) {
    let out = Command::new("tshark")
        .args([
            "-r",
            path.to_str().unwrap(),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
        ])
        .args([
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "ip.checksum.status",
            "-e",
            "udp.checksum.status",
            "-e",
            "icmp.checksum.status",
        ])
        .args(["-e", "_ws.malformed", "-e", "_ws.expert.message"])
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('|').collect();
        // status: 0 bad, 1 good, 2 unverified (the quote inside an ICMP error may be cut short).
        assert!(
            f[0].split(',').all(|s| s != "0"),
            "{}: bad IP checksum: {line}",
            path.display()
        );
        assert!(
            f[1].split(',').all(|s| s != "0"),
            "{}: bad UDP checksum: {line}",
            path.display()
        );
        assert!(
            f[2].split(',').all(|s| s != "0"),
            "{}: bad ICMP checksum: {line}",
            path.display()
        );
        assert!(f[3].is_empty(), "{}: malformed: {line}", path.display());
    }
}

/// For a VXLAN frame we emitted: checks the outer UDP checksum (non-zero and valid, by
/// etherparse) and the source port (in the kernel's range), then zeroes both, since expected
/// files cannot know podwire's flow hash.
fn mask_vxlan_source_port(case: &str, frame: &mut [u8]) {
    let Ok((ip, rest)) = etherparse::Ipv4Header::from_slice(frame) else {
        return;
    };
    if ip.protocol != etherparse::IpNumber::UDP {
        return;
    }
    let (udp, payload) = etherparse::UdpHeader::from_slice(rest).unwrap();
    if udp.destination_port != 8472 {
        return;
    }
    assert_ne!(udp.checksum, 0, "{case}: outer UDP checksum must be filled");
    assert_eq!(
        udp.checksum,
        udp.calc_checksum_ipv4(&ip, payload).unwrap(),
        "{case}: outer UDP checksum"
    );
    assert!(
        (32768..=60999).contains(&udp.source_port),
        "{case}: source port {}",
        udp.source_port
    );
    let at = ip.header_len();
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    frame[at + 6..at + 8].copy_from_slice(&[0, 0]);
}

#[test]
fn every_case_replays_to_its_expected_output() {
    let tshark = tshark_available();
    if !tshark {
        eprintln!("tshark not installed: skipping the independent decode");
    }
    let out = out_dir();
    for dir in case_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let view = podwire::store::parse_cluster(
            &std::fs::read_to_string(dir.join("cluster.json")).unwrap(),
        )
        .unwrap();
        let public_ip: Ipv4Addr = case["public_ip"].as_str().unwrap().parse().unwrap();
        let mut tables = podwire::tables::build(&view, public_ip, None).unwrap();
        if case["mode"].as_str() == Some("l2") {
            check_l2_case(&name, &dir, &case, &tables, &out, tshark);
            continue;
        }
        let from = match case["from"].as_str().unwrap() {
            "tun" => Some(Direction::FromTun),
            "underlay" => Some(Direction::FromUnderlay),
            "both" => None,
            other => panic!("{name}: bad from {other}"),
        };
        // A case with services replays statefully: conntrack and service NAT.
        let services = dir.join("services.json");
        let flows = services.exists().then(|| {
            let parsed =
                podwire::services::parse_file(&std::fs::read_to_string(&services).unwrap(), &name)
                    .unwrap();
            assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
            let specs = parsed.specs;
            let options = ServiceOptions::new(DEFAULT_SERVICE_CIDR.parse().unwrap());
            tables.services = Arc::new(Services::build(options, specs).unwrap());
            Flows::new(Default::default())
        });
        let out_path = out.join(format!("{name}.pcap"));
        let report = replay_with(
            &tables,
            flows.as_ref(),
            from,
            &dir.join("in.pcap"),
            &out_path,
        )
        .unwrap();

        let mut got = records(&out_path);
        let want = records(&dir.join("expected.pcap"));
        if case["mask_outer_udp_src_port"].as_bool().unwrap_or(false) {
            for frame in &mut got {
                mask_vxlan_source_port(&name, frame);
            }
        }
        assert_eq!(got.len(), want.len(), "{name}: frame count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "{name}: frame {i} differs\n got  {g:02x?}\n want {w:02x?}"
            );
        }
        for r in DropReason::ALL {
            let want = case["drops"]
                .get(r.as_str())
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            assert_eq!(report.stats.drops(r), want, "{name}: drops[{r}]");
        }
        assert_eq!(
            report.skipped,
            case["skipped"].as_u64().unwrap(),
            "{name}: skipped"
        );
        if tshark && !got.is_empty() {
            tshark_check(&out_path);
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// An L2 case (`"mode": "l2"`): the frames from one port or the datagrams from the underlay
/// through the bridge's decisions; what went into the tunnel must be `expected.pcap`, what left
/// by port N `expected-port<N>.pcap`, and the drops by reason the case's.
fn check_l2_case(
    name: &str,
    dir: &Path,
    case: &serde_json::Value,
    tables: &podwire_dataplane::pipeline::Tables,
    out: &Path,
    tshark: bool,
) {
    let ports: Vec<BridgePort> = case["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| BridgePort {
            mac: p["mac"].as_str().unwrap().parse().unwrap(),
            host: p["host"].as_bool().unwrap(),
        })
        .collect();
    let from = match case["from"].as_str().unwrap() {
        "port" => BridgeIngress::Port(PortId(case["in_port"].as_u64().unwrap() as u16)),
        "underlay" => BridgeIngress::Underlay,
        other => panic!("{name}: bad from {other}"),
    };
    let out_dir = out.join(name);
    std::fs::create_dir_all(&out_dir).unwrap();
    let report = replay_bridged(tables, &ports, from, &dir.join("in.pcap"), &out_dir).unwrap();
    let mut outputs = vec![("expected.pcap".to_string(), out_dir.join("underlay.pcap"))];
    for id in 1..=ports.len() {
        outputs.push((
            format!("expected-port{id}.pcap"),
            out_dir.join(format!("port{id}.pcap")),
        ));
    }
    for (expected, got_path) in outputs {
        let got = records(&got_path);
        let want = records(&dir.join(&expected));
        assert_eq!(got.len(), want.len(), "{name}: {expected}: frame count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "{name}: {expected}: frame {i} differs\n got  {g:02x?}\n want {w:02x?}"
            );
        }
        if tshark && !got.is_empty() {
            tshark_check(&got_path);
        }
    }
    for r in DropReason::ALL {
        let want = case["drops"]
            .get(r.as_str())
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        assert_eq!(report.stats.drops(r), want, "{name}: drops[{r}]");
    }
    assert_eq!(report.skipped, 0, "{name}: skipped");
}

#[test]
fn podwire_replay_cli_writes_the_same_frames() {
    let dir = fixtures().join("encap");
    let out = out_dir().join("cli-encap.pcap");
    let status = Command::new(env!("CARGO_BIN_EXE_podwire"))
        .args([
            "replay",
            "--store",
            &format!("file:{}", dir.join("cluster.json").display()),
        ])
        .args(["--public-ip", "192.168.100.1", "--from", "tun"])
        .args([
            "--in",
            dir.join("in.pcap").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("records written: 4"));
    assert_eq!(records(&out), records(&dir.join("expected.pcap")));
    let _ = std::fs::remove_file(&out);
}

#[test]
fn podwire_replay_cli_replays_an_l2_case() {
    let dir = fixtures().join("l2-flood");
    let out = out_dir().join("cli-l2-flood");
    let status = Command::new(env!("CARGO_BIN_EXE_podwire"))
        .args([
            "replay",
            "--store",
            &format!("file:{}", dir.join("cluster.json").display()),
        ])
        .args([
            "--public-ip",
            "192.168.100.1",
            "--from",
            "port",
            "--in-port",
            "2",
        ])
        .args(["--bridge-port", "0e:70:77:00:00:01,host"])
        .args(["--bridge-port", "02:00:00:00:01:02"])
        .args(["--bridge-port", "02:00:00:00:01:03"])
        .args([
            "--in",
            dir.join("in.pcap").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // Two frames: a broadcast (ports 1 and 3, node 2) and an unknown unicast (port 3, node 2).
    assert!(String::from_utf8_lossy(&status.stdout).contains("records written: 5"));
    assert_eq!(
        records(&out.join("underlay.pcap")),
        records(&dir.join("expected.pcap"))
    );
    for p in 1..=3 {
        assert_eq!(
            records(&out.join(format!("port{p}.pcap"))),
            records(&dir.join(format!("expected-port{p}.pcap"))),
            "port {p}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_malformed_cluster_file_names_the_key() {
    let dir = out_dir();
    let bad = dir.join("bad-cluster.json");
    std::fs::write(&bad, r#"{"config": {"Network": "10.244.0.0/16"}, "subnets": {"10.244.1.0-24": {"PublicIP": "not-an-ip"}}}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_podwire"))
        .args([
            "replay",
            "--store",
            &format!("file:{}", bad.display()),
            "--public-ip",
            "192.168.100.1",
        ])
        .args(["--from", "tun", "--in", "/dev/null", "--out", "/dev/null"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("subnets.10.244.1.0-24.PublicIP"), "{err}");
    let _ = std::fs::remove_file(&bad);
}
