//! Starting a stand-in on its own thread and runtime, and the synchronous control API tests
//! and the lab use: objects, revisions, compaction, broken watches, restarts, injected failures,
//! counters.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::kinds::{KindTag, StoredKind};
use crate::seed::SeedObject;
use crate::server::{serve, Shared};
use crate::status::ApiError;
use crate::store::ObjectKey;
use crate::verb::Verb;

/// Starting a stand-in failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, io::Error),
    #[error("cannot start the stand-in's runtime: {0}")]
    Runtime(io::Error),
    #[error("the stand-in's thread is gone")]
    Gone,
}

enum Command {
    Stop(std_mpsc::Sender<()>),
    Serve(std::net::TcpListener, std_mpsc::Sender<io::Result<()>>),
    Shutdown,
}

/// The stand-in API server.
#[derive(Debug)]
pub struct StandIn;

impl StandIn {
    /// Listens on `listen` (port 0 picks a free port) and serves from a thread of its own,
    /// until the returned handle is dropped.
    pub fn start(listen: SocketAddr, config: Config) -> Result<Handle, StartError> {
        let listener = bind(listen)?;
        let addr = listener
            .local_addr()
            .map_err(|err| StartError::Listen(listen, err))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let shared = Arc::new(Shared::new(config));
        let (commands, receiver) = mpsc::unbounded_channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("apiserver-standin".to_owned())
            .spawn(move || runtime.block_on(control_loop(listener, thread_shared, receiver)))
            .map_err(StartError::Runtime)?;
        Ok(Handle {
            shared,
            addr,
            commands,
            thread: Some(thread),
        })
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|err| StartError::Listen(addr, err))?;
    listener
        .set_nonblocking(true)
        .map_err(|err| StartError::Listen(addr, err))?;
    Ok(listener)
}

fn spawn_serving(
    listener: std::net::TcpListener,
    shared: &Arc<Shared>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::from_std(listener)?;
    Ok(tokio::spawn(serve(listener, Arc::clone(shared))))
}

async fn control_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut serving = spawn_serving(listener, &shared).ok();
    while let Some(command) = commands.recv().await {
        match command {
            Command::Stop(done) => {
                if let Some(task) = serving.take() {
                    task.abort();
                    let _ = task.await;
                }
                let _ = done.send(());
            }
            Command::Serve(listener, done) => {
                if let Some(task) = serving.take() {
                    task.abort();
                }
                let started = spawn_serving(listener, &shared);
                let _ = done.send(started.map(|task| serving = Some(task)));
            }
            Command::Shutdown => break,
        }
    }
}

/// A running stand-in. Dropping it stops the server and its thread.
#[derive(Debug)]
pub struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Handle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL (`http://addr`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates `object` or replaces the stored one whole (ADDED or MODIFIED; nothing when
    /// unchanged). Returns the stored object.
    pub fn apply<K: StoredKind>(&self, object: K) -> Result<K, ApiError> {
        self.shared.store.write(|tables| tables.apply(object))
    }

    /// Deletes an object (DELETED); returns its last state, `None` when there was none.
    pub fn delete<K: StoredKind>(&self, namespace: &str, name: &str) -> Option<K> {
        self.shared.store.write(|tables| {
            tables
                .delete::<K>(&ObjectKey::namespaced(namespace, name))
                .ok()
        })
    }

    /// The stored object, if any (namespace `""` for nodes).
    pub fn get<K: StoredKind>(&self, namespace: &str, name: &str) -> Option<K> {
        self.shared.store.read(|tables| {
            tables
                .table::<K>()
                .get(&ObjectKey::namespaced(namespace, name))
                .cloned()
        })
    }

    /// Every stored object of kind `K`.
    pub fn list<K: StoredKind>(&self) -> Vec<K> {
        self.shared
            .store
            .read(|tables| tables.table::<K>().objects().cloned().collect())
    }

    /// Creates or replaces a node.
    pub fn apply_node(&self, node: Node) -> Result<Node, ApiError> {
        self.apply(node)
    }

    /// Deletes a node.
    pub fn delete_node(&self, name: &str) -> Option<Node> {
        self.delete("", name)
    }

    /// The stored node, as clients wrote it.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.get("", name)
    }

    /// Creates or replaces a service (namespace `default` when the object has none).
    pub fn apply_service(&self, mut service: Service) -> Result<Service, ApiError> {
        service
            .metadata
            .namespace
            .get_or_insert_with(|| "default".to_owned());
        self.apply(service)
    }

    /// Deletes a service.
    pub fn delete_service(&self, namespace: &str, name: &str) -> Option<Service> {
        self.delete(namespace, name)
    }

    /// The stored service.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Service> {
        self.get(namespace, name)
    }

    /// Creates or replaces an endpointslice (namespace `default` when the object has none).
    pub fn apply_endpoint_slice(
        &self,
        mut slice: EndpointSlice,
    ) -> Result<EndpointSlice, ApiError> {
        slice
            .metadata
            .namespace
            .get_or_insert_with(|| "default".to_owned());
        self.apply(slice)
    }

    /// Deletes an endpointslice.
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) -> Option<EndpointSlice> {
        self.delete(namespace, name)
    }

    /// The stored endpointslice.
    pub fn endpoint_slice(&self, namespace: &str, name: &str) -> Option<EndpointSlice> {
        self.get(namespace, name)
    }

    /// Applies every seed object in order.
    pub fn apply_seed(&self, objects: Vec<SeedObject>) -> Result<(), ApiError> {
        for object in objects {
            match object {
                SeedObject::Node(node) => drop(self.apply_node(*node)?),
                SeedObject::Service(service) => drop(self.apply_service(*service)?),
                SeedObject::EndpointSlice(slice) => drop(self.apply_endpoint_slice(*slice)?),
            }
        }
        Ok(())
    }

    /// The latest revision (resourceVersion of the last write).
    pub fn revision(&self) -> u64 {
        self.shared.store.revision()
    }

    /// Forgets the event history: watches from any earlier resourceVersion get 410 Expired.
    pub fn compact(&self) {
        self.shared.store.write(crate::store::Tables::compact);
        self.shared.store.wake_watches();
    }

    /// Ends every open watch stream abruptly (the connection drops mid-stream).
    pub fn break_watches(&self) {
        self.shared
            .breaks
            .send_modify(|generation| *generation += 1);
    }

    /// Stops listening and closes every connection; the stored state stays.
    pub fn stop(&self) -> Result<(), StartError> {
        let (done, wait) = std_mpsc::channel();
        self.commands
            .send(Command::Stop(done))
            .map_err(|_| StartError::Gone)?;
        wait.recv().map_err(|_| StartError::Gone)
    }

    /// Listens again on the same address, with the same state: a restarted apiserver.
    pub fn serve_again(&self) -> Result<(), StartError> {
        let listener = bind(self.addr)?;
        let (done, wait) = std_mpsc::channel();
        self.commands
            .send(Command::Serve(listener, done))
            .map_err(|_| StartError::Gone)?;
        wait.recv()
            .map_err(|_| StartError::Gone)?
            .map_err(|err| StartError::Listen(self.addr, err))
    }

    /// Answers the next `count` requests with `code` (a 5xx) as a Status.
    pub fn fail_next(&self, count: u32, code: u16) {
        self.shared.faults.fail_next(count, code);
    }

    /// Authenticated requests so far with `verb` on `kind`.
    pub fn requests(&self, verb: Verb, kind: KindTag) -> u64 {
        self.shared.counters.requests(verb, kind)
    }

    /// Every request count so far, by verb and kind.
    pub fn request_counts(&self) -> BTreeMap<(Verb, KindTag), u64> {
        self.shared.counters.all_requests()
    }

    /// Watch streams open now.
    pub fn watches_open(&self) -> usize {
        self.shared.counters.watches_open()
    }

    /// Watches answered or ended with 410 Expired so far.
    pub fn watches_expired(&self) -> u64 {
        self.shared.counters.watches_expired()
    }
}
