//! podwire's lab, apart from the daemon: the `podwire-lab` binary builds clusters in network
//! namespaces that run the `podwire` daemon binary, measures them, and renders the figures the
//! documents publish.
//!
//! - [`cluster`]: `podwire-lab lab`, the netns cluster (topology, processes, traffic, checks),
//!   and [`cluster::bench`], `podwire-lab bench`, the end-to-end bench over the same clusters.
//! - [`daemon_binary`]: which `podwire` binary the lab runs.
//! - [`figures`], [`run_record`]: `podwire-lab figures`, README's and docs/' figures rendered
//!   from committed run files, and where a run came from.
//! - [`etcd_server`]: a private etcd for `lab --store etcd` and the etcd tests.

pub mod cluster;
pub mod daemon_binary;
pub mod etcd_server;
pub mod figures;
pub mod perf_split;
pub mod perf_syscalls;
pub mod run_record;
