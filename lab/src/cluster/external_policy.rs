//! `externalTrafficPolicy: Local` on node 1's NodePorts, from the outside host (Kubernetes'
//! e2e "should only target nodes with endpoints" and "should work for type=LoadBalancer" with
//! the Local policy, and kube-proxy's service health server):
//! - a Service with endpoints on nodes 1 and 2: every connection reaches node 1's endpoint,
//!   which sees the client's own address (with `--ip-masq`, where node 1 steers its pods'
//!   answers to outside into podwire; without it the hairpin address);
//! - a Service with endpoints on nodes 2 and 3 only: the connection is dropped, neither
//!   served nor refused;
//! - their health check ports answer 200 with one local endpoint, and 503 with none (podwire
//!   only: kube-proxy's health server is its Go process, not part of the kernel baseline).

use super::netns;
use super::services_lab::{
    connect_to, pod, request, NodePorts, ETP_ELSEWHERE_HEALTH_PORT, ETP_ELSEWHERE_NODE_PORT,
    ETP_LOCAL_HEALTH_PORT, ETP_LOCAL_NODE_PORT,
};
use super::{Check, Names};
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

/// Connections to the Local Service's NodePort.
const CONNECTIONS: u64 = 20;

pub(super) fn checks(r: &Names, hairpin_ip: Ipv4Addr, np: NodePorts) -> Vec<Check> {
    let outside = r.ns(np.outside);
    let seen_as = if np.clients_kept {
        np.outside_ip
    } else {
        hairpin_ip
    };
    let mut checks = vec![
        outcome(
            &format!(
                "externalTrafficPolicy Local: {CONNECTIONS} connections from outside to NodePort \
                 {ETP_LOCAL_NODE_PORT} reach node 1's endpoint only, which sees {seen_as}"
            ),
            served_locally(&outside, np, seen_as),
        ),
        outcome(
            &format!(
                "externalTrafficPolicy Local without an endpoint on node 1: NodePort \
                 {ETP_ELSEWHERE_NODE_PORT} drops the connection (not served, not refused)"
            ),
            dropped(&outside, np.node),
        ),
    ];
    if np.health_server {
        checks.push(outcome(
            "the health check node ports answer 200 with 1 local endpoint, 503 with none",
            health_checks(&outside, np.node),
        ));
    }
    checks
}

fn outcome(name: &str, r: Result<(bool, String)>) -> Check {
    let (ok, detail) = r.unwrap_or_else(|e| (false, format!("{e:#}")));
    Check {
        name: name.into(),
        ok,
        detail,
    }
}

fn served_locally(outside: &str, np: NodePorts, seen_as: Ipv4Addr) -> Result<(bool, String)> {
    let answers = netns::run_in(outside, move || {
        (0..CONNECTIONS)
            .map(|i| {
                let mut s = connect_to(SocketAddrV4::new(np.node, ETP_LOCAL_NODE_PORT))?;
                request(&mut s, 3000, 7000 + i)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let served: BTreeSet<Ipv4Addr> = answers.iter().map(|a| a.served_on).collect();
    let seen: BTreeSet<Ipv4Addr> = answers.iter().map(|a| *a.peer.ip()).collect();
    Ok((
        served == BTreeSet::from([pod(1)]) && seen == BTreeSet::from([seen_as]),
        format!(
            "{} answered by {served:?}; the backend saw {seen:?}",
            answers.len()
        ),
    ))
}

/// A connection attempt that gets neither an answer nor a refusal within 2 s.
fn dropped(outside: &str, node: Ipv4Addr) -> Result<(bool, String)> {
    let to = SocketAddrV4::new(node, ETP_ELSEWHERE_NODE_PORT);
    let got = netns::run_in(outside, move || {
        Ok(TcpStream::connect_timeout(&to.into(), Duration::from_secs(2)).map_err(|e| e.kind()))
    })?;
    Ok((
        matches!(got, Err(std::io::ErrorKind::TimedOut)),
        format!("connecting to {to}: {got:?}"),
    ))
}

/// GET on each health check port: (status line, body).
fn health_checks(outside: &str, node: Ipv4Addr) -> Result<(bool, String)> {
    let mut ok = true;
    let mut detail = Vec::new();
    for (port, status, count) in [
        (ETP_LOCAL_HEALTH_PORT, "200", 1),
        (ETP_ELSEWHERE_HEALTH_PORT, "503", 0),
    ] {
        let text = netns::run_in(outside, move || get(SocketAddrV4::new(node, port)))?;
        let status_line = text.lines().next().unwrap_or_default().to_string();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body)
            .with_context(|| format!("health check {port}: body {body:?}"))?;
        let right = status_line.split(' ').nth(1) == Some(status)
            && v["localEndpoints"] == count
            && v["serviceProxyHealthy"] == true;
        ok &= right;
        detail.push(format!(
            "{port}: {status_line}, localEndpoints {}",
            v["localEndpoints"]
        ));
    }
    Ok((ok, detail.join("; ")))
}

fn get(to: SocketAddrV4) -> Result<String> {
    let mut s = connect_to(to)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading {to}"))?;
    Ok(text)
}
