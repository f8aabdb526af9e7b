//! The only place in the dataplane with `unsafe` code and raw syscalls.
//!
//! One function per syscall, each returning `io::Result`; every `unsafe` block says why it is
//! sound in a `// SAFETY:` comment. Callers above this module see file descriptors as `OwnedFd` /
//! `BorrowedFd` and buffers as slices.

pub mod affinity;
pub mod bpf;
pub mod fdio;
pub mod gro;
pub mod mmsg;
pub mod sockopt;
pub mod tun;
pub mod xsk;
