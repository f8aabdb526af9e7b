//! kube-proxy's service health server (pkg/proxy/healthcheck/service_health.go): for each
//! Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`, the node answers
//! HTTP on that port, any path, with its count of local endpoints: 200 while it has some (and
//! podwire is ready), 503 without, so that a cloud load balancer sends the Service's traffic only
//! to nodes that can serve it without a second hop. The body is kube-proxy's:
//! `{"service": {"namespace": ..., "name": ...}, "localEndpoints": N, "serviceProxyHealthy": B}`,
//! with its headers (`X-Load-Balancing-Endpoint-Weight: N`).
//!
//! The ports follow the services snapshots: a port is bound (on every address, as kube-proxy
//! with no `--nodeport-addresses`) when a Service gains it and closed when none has it. The
//! server is hyper on a one-thread tokio runtime of its own, within [`HttpLimits`], as the
//! daemon's own endpoint.

use crate::health::{accept_loop, server_runtime, Health, HttpLimits};
use podwire_dataplane::nat::HealthCheck;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::sync::watch;

/// The health checks served now; dropping it stops the server.
pub struct ServiceHealth {
    checks: watch::Sender<Vec<HealthCheck>>,
}

impl ServiceHealth {
    /// Starts the server's thread, serving nothing until [`ServiceHealth::update`]; `address`
    /// is where the ports are bound (0.0.0.0 in the daemon).
    pub fn start(address: Ipv4Addr, health: Arc<Health>) -> std::io::Result<ServiceHealth> {
        // It binds ports of the NodePort range, which needs no capability (a range configured
        // below 1024 makes those binds fail: logged, retried).
        let (checks, rx) = watch::channel(Vec::new());
        let server = follow(address, rx, health, HttpLimits::default());
        crate::health::spawn_server_thread("podwire-svc-health", server_runtime()?, server)?;
        Ok(ServiceHealth { checks })
    }

    /// Serves `checks` from now on (a snapshot's [`podwire_dataplane::nat::Services::health_checks`]).
    pub fn update(&self, checks: &[HealthCheck]) {
        self.checks.send_if_modified(|now| {
            let changed = now.as_slice() != checks;
            if changed {
                *now = checks.to_vec();
            }
            changed
        });
    }
}

/// How long a port that could not be bound waits for its next try.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens and closes the ports as the checks change, until the sender is dropped; a port that
/// cannot be bound (another process holds it) is tried again every [`BIND_RETRY`].
async fn follow(
    address: Ipv4Addr,
    mut rx: watch::Receiver<Vec<HealthCheck>>,
    health: Arc<Health>,
    limits: HttpLimits,
) {
    let mut open: BTreeMap<u16, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        let mut unbound = false;
        let wanted: Vec<u16> = rx.borrow_and_update().iter().map(|c| c.port).collect();
        open.retain(|port, task| {
            let keep = wanted.contains(port);
            if !keep {
                task.abort(); // drops the listener: the port closes
            }
            keep
        });
        for port in wanted {
            if open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::from((address, port));
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let served = Served {
                        port,
                        checks: rx.clone(),
                        health: Arc::clone(&health),
                    };
                    let answer = move |_: &_| respond(&served);
                    open.insert(port, tokio::spawn(accept_loop(listener, limits, answer)));
                }
                Err(e) => {
                    unbound = true;
                    tracing::warn!(%addr, error = %e, "cannot serve a health check port; retrying")
                }
            }
        }
        let retry = async {
            match unbound {
                true => tokio::time::sleep(BIND_RETRY).await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = retry => {}
        }
    }
}

/// What one port's connections read their answer from.
#[derive(Clone)]
struct Served {
    port: u16,
    checks: watch::Receiver<Vec<HealthCheck>>,
    health: Arc<Health>,
}

/// kube-proxy's answer for the Service on `served.port`, whatever the method and path.
fn respond(served: &Served) -> hyper::Response<String> {
    use hyper::header::{HeaderValue, CONTENT_TYPE};
    let (service, count) = served
        .checks
        .borrow()
        .iter()
        .find(|c| c.port == served.port)
        .map_or((String::new(), 0), |c| {
            (c.service.clone(), c.local_endpoints)
        });
    let healthy = served.health.not_ready().is_empty();
    let (namespace, name) = service.split_once('/').unwrap_or(("", &service));
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": count,
        "serviceProxyHealthy": healthy,
    });
    let mut answer = hyper::Response::new(format!("{body:#}"));
    *answer.status_mut() = if count != 0 && healthy {
        hyper::StatusCode::OK
    } else {
        hyper::StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = answer.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("X-Load-Balancing-Endpoint-Weight", HeaderValue::from(count));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    fn get(port: u16) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /any HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// Waits until `port` answers as `want` says (the server follows updates asynchronously).
    fn until(
        port: u16,
        want: impl Fn(&std::io::Result<String>) -> bool,
    ) -> std::io::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = get(port);
            if want(&got) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn test_ports_follow_the_checks_and_answer_as_kube_proxy() {
        let health = Arc::new(Health::default());
        for ready in [
            &health.lease_held,
            &health.map_loaded,
            &health.subnet_env_written,
        ] {
            ready.store(true, Ordering::Relaxed);
        }
        let server = ServiceHealth::start(Ipv4Addr::LOCALHOST, Arc::clone(&health)).unwrap();
        let (a, b) = (free_port(), free_port());
        let check = |port, local_endpoints| HealthCheck {
            port,
            service: "shop/cart".into(),
            local_endpoints,
        };
        server.update(&[check(a, 2), check(b, 0)]);
        let ok = until(a, |r| r.is_ok()).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("x-load-balancing-endpoint-weight: 2"), "{ok}");
        assert!(ok.contains("\"localEndpoints\": 2"), "{ok}");
        assert!(ok.contains("\"namespace\": \"shop\""), "{ok}");
        let none = until(b, |r| r.is_ok()).unwrap();
        assert!(none.starts_with("HTTP/1.1 503"), "{none}");
        // Endpoints come and go; a port no Service has any more is closed.
        server.update(&[check(b, 1)]);
        let now = until(b, |r| {
            r.as_ref().is_ok_and(|t| t.starts_with("HTTP/1.1 200"))
        })
        .unwrap();
        assert!(now.contains("\"localEndpoints\": 1"), "{now}");
        let gone = until(a, |r| r.is_err());
        assert!(gone.is_err(), "port {a} still open: {gone:?}");
        // Not ready: 503 whatever the count.
        health.map_loaded.store(false, Ordering::Relaxed);
        let unready = get(b).unwrap();
        assert!(unready.starts_with("HTTP/1.1 503"), "{unready}");
        assert!(
            unready.contains("\"serviceProxyHealthy\": false"),
            "{unready}"
        );
    }

    /// A port another process holds is served once it lets go.
    #[test]
    fn test_a_port_held_elsewhere_is_bound_when_freed() {
        let health = Arc::new(Health::default());
        let server = ServiceHealth::start(Ipv4Addr::LOCALHOST, health).unwrap();
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        server.update(&[HealthCheck {
            port,
            service: "shop/cart".into(),
            local_endpoints: 1,
        }]);
        std::thread::sleep(Duration::from_millis(300));
        drop(holder);
        let deadline = Instant::now() + BIND_RETRY * 2;
        let answer = loop {
            match get(port) {
                Ok(text) => break text,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("port {port} never served: {e}"),
            }
        };
        assert!(answer.contains("\"localEndpoints\": 1"), "{answer}");
    }
}
