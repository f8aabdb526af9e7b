//! podwire's control side: everything but packets.
//!
//! - [`config`], [`lease`], [`store`]: flannel's net-conf.json, lease values and keyspace.
//! - [`etcd`], [`kube_store`]: the two cluster stores flanneld uses (etcd, the Kubernetes API);
//!   [`kube_services`]: Services and EndpointSlices as the service NAT's records.
//! - [`subnet_key`]: flannel's form of a subnet in store keys (`10.244.1.0-24`).
//! - [`tables`]: a cluster view turned into the dataplane's tables.
//! - [`netdev`], [`subnet_env`]: host setup as flanneld does it.
//! - [`report`]: worker counters as JSON.
//! - [`sd_notify`]: readiness and stopping to systemd (`Type=notify`).
//!
//! The binary adds `podwire run` (the daemon), `podwire ctl` and `podwire replay`. The lab, the
//! end-to-end bench and the figures live in their own crate and binary, `podwire-lab` (lab/).

pub mod allocate;
pub mod atomic_file;
pub mod config;
pub mod ctl;
pub mod dir_watch;
pub mod etcd;
pub mod ethtool;
pub mod forward;
pub mod health;
pub mod kube_services;
pub mod kube_store;
pub mod l2;
pub mod lease;
pub mod masq;
pub mod netdev;
pub mod nft;
pub mod node;
pub mod node_lock;
pub mod privs;
pub mod report;
pub mod rtnl;
pub mod sd_notify;
pub mod secret;
pub mod service_health;
pub mod services;
mod services_split;
pub mod store;
pub mod subnet_env;
pub mod subnet_key;
pub mod tables;
