//! A stand-in for the Kubernetes API server, for podwire's tests and lab.
//!
//! It serves nodes (with `nodes/{name}/status`), services (with `/status`) and
//! `discovery.k8s.io/v1` endpointslices over plain HTTP/1.1 and JSON, the way kube-apiserver
//! does: bearer tokens with two roles, GET, LIST with label and field selectors, WATCH streams
//! with resourceVersions, bookmarks and `410 Expired`, PATCH (merge, strategic merge, JSON
//! patch), POST, PUT and DELETE, and Status objects for every error. Tests drive it through a
//! [`Handle`]; docs/kube-standin.md says what it covers and what only a real cluster proves.
//!
//! - [`config`]: tokens and roles, bookmark interval, history size.
//! - [`kinds`]: the served object kinds and what the server needs to know about each.
//! - [`store`]: objects, the global revision and each kind's bounded event history.
//! - [`selector`], [`query`], [`route`]: what a request asks for.
//! - [`patch`]: the three PATCH formats.
//! - [`server`], [`handlers`], [`watch`], [`body`], [`status`]: the HTTP side.
//! - [`handle`]: starting, controlling and inspecting a running stand-in.
//! - [`seed`], [`kubeconfig`]: objects to start with, a kubeconfig pointing at the stand-in.

pub mod body;
pub mod config;
pub mod counters;
pub mod handle;
pub mod handlers;
pub mod kinds;
pub mod kubeconfig;
pub mod patch;
pub mod query;
pub mod route;
pub mod seed;
pub mod selector;
pub mod server;
pub mod status;
pub mod store;
pub mod verb;
pub mod watch;

pub use config::{Config, Role};
pub use handle::{Handle, StandIn, StartError};
pub use status::ApiError;
