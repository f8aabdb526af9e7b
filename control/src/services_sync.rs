//! The services the routed node translates, kept in step with their sources: the services
//! file (watched by its own thread, so an update applies as soon as the file is written) and
//! the store's services (read by the control loop, which wakes on the store's changes).
//! Either source's change rebuilds one snapshot of both, reusing what the last one built for
//! services whose endpoints did not change, and swaps it into the live tables.

use arc_swap::ArcSwap;
use podwire::health::Health;
use podwire::service_health::ServiceHealth;
use podwire::services::{self, ServicesFile};
use podwire_dataplane::nat::{Admission, ServiceOptions, Services};
use podwire_dataplane::pipeline::Tables;
use podwire_dataplane::worker::WorkerPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What each source holds, how services are checked, and the snapshot live now.
pub struct ServiceSources {
    /// Services are also read from the store (etcd's `<prefix>/services/`).
    pub from_store: bool,
    pub file_services: services::Parsed,
    pub store_services: services::Parsed,
    /// What the last read of the store's services made of each object.
    pub store_cache: services::ParseCache,
    pub options: ServiceOptions,
    /// What services are checked against on this node.
    pub admission: Admission,
    /// The last snapshot built (what the next one may reuse).
    pub current: Arc<Services>,
    /// Where the snapshot's health check ports are served (a node that serves services).
    pub health_checks: Option<ServiceHealth>,
}

/// Where a new snapshot goes.
pub struct ServicesSink<'a> {
    pub live: &'a ArcSwap<Tables>,
    pub pool: &'a WorkerPool,
    pub health: &'a Health,
}

impl ServiceSources {
    /// A snapshot of what the sources hold now: logged, counted in /metrics, and returned.
    pub fn snapshot(&mut self, health: &Health) -> Arc<Services> {
        let snap = services::snapshot(
            Some(&self.current),
            self.options,
            &self.admission,
            &[&self.file_services, &self.store_services],
        );
        publish(health, &snap);
        tracing::info!(
            services = snap.services.len(),
            rejected = snap.rejected_services(),
            endpoints_rejected = snap.report.endpoints_removed.len(),
            node_ports_rejected = snap.report.node_ports_refused.len(),
            external_ips_rejected = snap.report.external_ips_refused.len(),
            "services updated"
        );
        if let Some(server) = &self.health_checks {
            server.update(snap.services.health_checks());
        }
        self.current = Arc::new(snap.services);
        Arc::clone(&self.current)
    }

    /// Rebuilds the snapshot after a source changed (`since`: when the change was read) and
    /// swaps it into the live tables, whatever else another thread swaps in meanwhile.
    pub fn apply(&mut self, sink: &ServicesSink, since: Instant) {
        let services = self.snapshot(sink.health);
        sink.live.rcu(|old| {
            Arc::new(Tables {
                services: Arc::clone(&services),
                ..Tables::clone(old)
            })
        });
        sink.pool.wake_all();
        sink.health.service_updates.fetch_add(1, Ordering::Relaxed);
        sink.health.service_update_latency.observe(since.elapsed());
    }
}

/// Hands a services snapshot's counts to /metrics.
fn publish(health: &Health, snap: &services::Snapshot) {
    let n = |v: usize| v as u64;
    health
        .services
        .store(n(snap.services.len()), Ordering::Relaxed);
    health
        .services_rejected
        .store(n(snap.rejected_services()), Ordering::Relaxed);
    health
        .service_endpoints_rejected
        .store(n(snap.report.endpoints_removed.len()), Ordering::Relaxed);
    health
        .service_node_ports_rejected
        .store(n(snap.report.node_ports_refused.len()), Ordering::Relaxed);
    health
        .service_external_ips_rejected
        .store(n(snap.report.external_ips_refused.len()), Ordering::Relaxed);
}

/// Locks the sources; a thread that panicked holding them left them whole (every field is
/// replaced at once), so the lock is taken anyway.
pub fn lock(sources: &Mutex<ServiceSources>) -> std::sync::MutexGuard<'_, ServiceSources> {
    sources.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The services file's thread: waits for a change where the file is (at most `poll`, which
/// also catches what inotify cannot see), and applies the file's services when it changed.
/// A file that is not a services file at all keeps the last good snapshot; within one, each
/// bad service, endpoint or NodePort is left out (logged, counted) and the rest applied.
/// `reread` (SIGHUP) makes it read the file changed or not; it returns once `stop` is set.
pub fn watch_file(
    mut file: ServicesFile,
    sources: &Mutex<ServiceSources>,
    sink: &ServicesSink,
    poll: Duration,
    reread: &AtomicBool,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        file.wait(poll);
        if reread.swap(false, Ordering::Relaxed) {
            file.forget();
        }
        let since = Instant::now();
        match file.poll() {
            Ok(Some(parsed)) => {
                let mut s = lock(sources);
                s.file_services = parsed;
                s.apply(sink, since);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "services file rejected; keeping the last good services")
            }
        }
    }
}
