//! Fault injection: makes one worker panic on request, so the supervisor path (the daemon
//! notices a dead worker, reports it and exits non-zero for systemd or the kubelet to restart
//! it) is tested on the real binary instead of being trusted. The daemon hands the injector to
//! its ctl socket only when started with `--fault-injection`.
//!
//! The cost on the hot path is one relaxed load of a shared, never-written cache line per round.

use mio::Waker;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// No worker is asked to fail.
const NONE: usize = usize::MAX;

/// Where a worker checks, once per round, whether it is asked to fail.
#[derive(Clone)]
pub(crate) struct FaultPoint(Arc<AtomicUsize>);

impl FaultPoint {
    pub(crate) fn new() -> FaultPoint {
        FaultPoint(Arc::new(AtomicUsize::new(NONE)))
    }

    /// Panics if worker `id` was asked to.
    #[inline]
    pub(crate) fn check(&self, id: usize) {
        if self.0.load(Ordering::Relaxed) == id {
            panic!("worker {id}: panic injected on request (podwire ctl fault worker-panic)");
        }
    }
}

/// Asks a worker of a running pool to panic.
#[derive(Clone)]
pub struct FaultInjector {
    point: FaultPoint,
    wakers: Vec<Arc<Waker>>,
}

/// The worker does not exist.
#[derive(Debug, thiserror::Error)]
#[error("no worker {worker}: the pool has {workers}")]
pub struct NoSuchWorker {
    pub worker: usize,
    pub workers: usize,
}

impl FaultInjector {
    pub(crate) fn new(point: FaultPoint, wakers: Vec<Arc<Waker>>) -> FaultInjector {
        FaultInjector { point, wakers }
    }

    /// Makes worker `worker` panic at its next round (it is woken if asleep).
    pub fn panic_worker(&self, worker: usize) -> Result<(), NoSuchWorker> {
        let Some(waker) = self.wakers.get(worker) else {
            return Err(NoSuchWorker {
                worker,
                workers: self.wakers.len(),
            });
        };
        self.point.0.store(worker, Ordering::Relaxed);
        let _ = waker.wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_worker_fails() {
        let point = FaultPoint::new();
        let injector = FaultInjector::new(point.clone(), Vec::new());
        point.check(0);
        assert!(injector.panic_worker(0).is_err(), "no such worker");
        point.0.store(1, Ordering::Relaxed);
        point.check(0);
        let hit = std::panic::catch_unwind(|| point.check(1));
        assert!(hit.is_err());
    }
}
