//! podwire's dataplane: everything a packet touches.
//!
//! - [`wire`] knows bytes: zero-copy header views with checked constructors.
//! - [`verdict`] says what to do with a packet and why one was dropped: a leaf every layer imports.
//! - [`pipeline`] knows decisions: a sans-I/O `process(tables, direction, batch)`.
//! - [`route`] is the subnet map the decisions read.
//! - [`port`] knows devices: TUN, UDP sockets and pcap files behind batched rx/tx.
//! - [`worker`] runs ports and pipeline to completion, one poll-mode thread per core.
//! - `sys` is the only module with `unsafe` and raw syscalls.
//!
//! Nothing here knows about etcd or the cluster file: the control plane builds [`pipeline::Tables`]
//! and swaps them in.

pub mod batch;
pub mod bridge;
pub mod capture;
pub mod conntrack;
pub mod nat;
pub mod offload;
pub mod pipeline;
pub mod port;
pub mod replay;
pub mod route;
pub mod stats;
#[allow(unsafe_code)]
mod sys;
pub mod verdict;
pub mod wire;
pub mod worker;
