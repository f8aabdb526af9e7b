//! `podwire ctl`: the running daemon, inspected over a unix socket (mode 0600, root's).
//!
//! One request per connection: a JSON object on one line (`{"cmd": "conntrack", "port": 80}`),
//! answered with one JSON document. `podwire ctl` renders it as the tools an operator knows
//! would (`conntrack -L`, `ipvsadm -Ln`), or prints it with `--json`.
//!
//! - [`protocol`]: the typed [`Request`] and [`Response`] (the JSON on the socket) and the
//!   daemon's [`Refusal`]s;
//! - `server`: the socket and the answer to each request; `capture`: the one streamed answer;
//! - `client`: `podwire ctl`'s side ([`call`], and [`request`] for JSON as scripts read it);
//! - [`render`]: answers as text.
//!
//! Commands: `subnets` (the live map, our lease's expiry), `conntrack` (filters: `addr`,
//! `port`, `state`, `proto`), `services` (endpoints with active and inactive connections),
//! `stats` (per worker counters and drops, with rates since the previous `stats`), `capture`
//! (a pcap of what the TUN or the underlay socket receives), and in L2 mode `fdb` (like `bridge
//! fdb show`), `attach` and `detach` (a pod's TAP interface).
//!
//! `capture` is the one answer that is not only JSON: a thread of its own (one capture at a
//! time) waits for the packets while the ctl thread goes on answering, then sends a JSON line
//! `{"captured", "wanted", "pcap_bytes"}` followed by that many bytes of pcap. The client
//! ([`capture_to_file`]) writes the file, as whoever runs `podwire ctl`: the daemon writes no
//! file where a request says.

mod capture;
mod client;
pub mod protocol;
pub mod render;
mod server;

pub use client::{call, capture, capture_to_file, request};
pub use protocol::{Refusal, Request, Response};
pub use render::render;
pub use server::{handle, serve, CtlState, L2Ctl};

use std::path::PathBuf;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/podwire/ctl.sock";

/// Most packets one capture may take.
pub const MAX_CAPTURE: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("ctl socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to podwire at {path}: {source} (is `podwire run` up, and are you root?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The request could not be written as JSON.
    #[error("cannot write the request: {0}")]
    Request(String),
    /// The answer could not be read (not JSON, a capture cut short): a fault on either side.
    #[error("podwire answered garbage: {0}")]
    Answer(String),
    /// The daemon understood the request and refused it, saying why (e.g. `fdb` on a routed
    /// node).
    #[error("podwire refused: {0}")]
    Refused(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
