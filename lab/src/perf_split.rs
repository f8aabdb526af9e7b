//! Where a whole-system profile's samples went: `perf script` output (with call chains) split by
//! thread, and podwire's worker samples by where they entered the kernel (the syscall family)
//! or by their userspace symbol.
//!
//! A worker sample is put under the syscall found in its call chain (`__x64_sys_*`): what the
//! kernel does inside it (the receiving pod's TCP, run in softirq under a TUN write, say) is the
//! syscall's cost. Samples with no syscall frame are userspace (the worker's own code, by its
//! leaf symbol) or kernel work the worker was interrupted for.

use serde::Serialize;
use std::collections::BTreeMap;

/// One sample: its thread's name and its call chain, leaf first, as (symbol, object).
struct Sample<'a> {
    comm: &'a str,
    frames: Vec<(&'a str, &'a str)>,
}

/// The split of one profile.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Split {
    /// Samples in the profile.
    pub samples: u64,
    /// Samples by thread group (`podwire workers`, `idle`, the command name otherwise).
    pub threads: BTreeMap<String, u64>,
    /// podwire workers' samples by syscall family, `userspace` and `kernel, no syscall`.
    pub workers: BTreeMap<String, u64>,
    /// podwire workers' userspace samples by leaf symbol.
    pub worker_symbols: BTreeMap<String, u64>,
}

/// Splits `perf script -F comm,tid,ip,sym,dso` output (recorded with `-g`).
pub fn split(perf_script: &str) -> Split {
    let mut out = Split::default();
    for sample in samples(perf_script) {
        out.samples += 1;
        let group = thread_group(sample.comm);
        *out.threads.entry(group.to_string()).or_default() += 1;
        if group != WORKERS {
            continue;
        }
        let family = family(&sample.frames);
        if family == USERSPACE {
            let leaf = sample.frames.first().map_or("?", |(sym, _)| sym);
            *out.worker_symbols.entry(leaf.to_string()).or_default() += 1;
        }
        *out.workers.entry(family).or_default() += 1;
    }
    out
}

const WORKERS: &str = "podwire workers";
const USERSPACE: &str = "userspace";

fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    let mut lines = text.lines().peekable();
    std::iter::from_fn(move || {
        // Skip to the next header: a line that does not start with white space.
        let header = loop {
            let line = lines.next()?;
            if !line.trim().is_empty() && !line.starts_with(char::is_whitespace) {
                break line;
            }
        };
        // The command name may hold spaces; the thread id follows it.
        let comm = header
            .trim_end()
            .rsplit_once(char::is_whitespace)
            .map_or(header.trim(), |(c, _)| c.trim_end());
        let mut frames = Vec::new();
        while let Some(line) = lines.next_if(|l| l.starts_with(char::is_whitespace)) {
            if let Some(frame) = frame(line) {
                frames.push(frame);
            }
        }
        Some(Sample { comm, frames })
    })
}

/// `\taddr symbol (object)` as (symbol, object).
fn frame(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    let (_, rest) = line.split_once(char::is_whitespace)?;
    let (sym, dso) = rest.rsplit_once(" (")?;
    Some((sym.trim(), dso.trim_end_matches(')')))
}

/// Threads grouped: podwire's workers together, idle CPUs, else the name less its numbers.
fn thread_group(comm: &str) -> &str {
    if comm.starts_with("podwire-w") || comm == "podwire-l2" {
        WORKERS
    } else if comm == "swapper" {
        "idle"
    } else {
        comm.split('/')
            .next()
            .unwrap_or(comm)
            .trim_end_matches(|c: char| c.is_ascii_digit())
    }
}

/// Where a worker's sample was: its syscall's family, userspace, or kernel work without one.
fn family(frames: &[(&str, &str)]) -> String {
    let syscall = frames.iter().find_map(|(sym, _)| syscall_of(sym));
    match syscall {
        Some("write" | "writev" | "pwritev" | "pwritev2") => "TUN/TAP write".into(),
        Some("read" | "readv" | "preadv" | "preadv2") => "TUN/TAP read".into(),
        Some("sendmmsg" | "sendmsg" | "sendto") => "UDP send".into(),
        Some("recvmmsg" | "recvmsg" | "recvfrom") => "UDP receive".into(),
        Some("epoll_wait" | "epoll_pwait" | "epoll_pwait2") => "epoll wait".into(),
        Some("") => "syscall, other".into(),
        Some(other) => format!("syscall {other}"),
        None if frames
            .first()
            .is_some_and(|(_, dso)| !dso.contains("kernel")) =>
        {
            USERSPACE.into()
        }
        None => "kernel, no syscall (interrupts, page faults)".into(),
    }
}

/// The syscall a kernel frame belongs to. Kernels that inline `__x64_sys_*` into
/// `do_syscall_64` leave the inner entry points (`ksys_write`, `__sys_sendmmsg`, ...); a bare
/// `do_syscall_64` is some other syscall ("").
fn syscall_of(sym: &str) -> Option<&str> {
    if let Some(name) = sym.strip_prefix("__x64_sys_") {
        return Some(name);
    }
    Some(match sym {
        "ksys_write" | "vfs_write" | "do_writev" | "vfs_writev" => "write",
        "ksys_read" | "vfs_read" | "do_readv" | "vfs_readv" => "read",
        "__sys_sendmmsg" | "__sys_sendmsg" | "___sys_sendmsg" | "__sys_sendto" => "sendmmsg",
        "__sys_recvmmsg" | "do_recvmmsg" | "__sys_recvmsg" | "__sys_recvfrom" => "recvmmsg",
        "do_epoll_wait" | "do_epoll_pwait" => "epoll_wait",
        "do_syscall_64" => "",
        _ => return None,
    })
}

/// Shares in percent of `total`, largest first.
pub fn shares(counts: &BTreeMap<String, u64>, total: u64) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = counts
        .iter()
        .map(|(k, &n)| (k.clone(), n as f64 * 100.0 / total.max(1) as f64))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
podwire-w0 4242 
\tffffffff81e00000 __sys_sendmmsg ([kernel.kallsyms])
\tffffffff81e00010 __x64_sys_sendmmsg ([kernel.kallsyms])
\tffffffff81e00020 do_syscall_64 ([kernel.kallsyms])
\t          123456 sendmmsg (/usr/lib/x86_64-linux-gnu/libc.so.6)

podwire-w1 4243 
\tffffffff81f00000 tcp_v4_rcv ([kernel.kallsyms])
\tffffffff81f00010 tun_get_user ([kernel.kallsyms])
\tffffffff81f00020 __x64_sys_writev ([kernel.kallsyms])
\t          123457 writev (/usr/lib/x86_64-linux-gnu/libc.so.6)

podwire-w1 4243 
\tffffffff81f00000 tcp_v4_rcv ([kernel.kallsyms])
\tffffffff81f00010 tun_chr_write_iter ([kernel.kallsyms])
\tffffffff81f00020 vfs_write ([kernel.kallsyms])
\tffffffff81f00030 ksys_write ([kernel.kallsyms])
\tffffffff81f00040 do_syscall_64 ([kernel.kallsyms])
\t          123457 __GI___libc_write (/usr/lib/x86_64-linux-gnu/libc.so.6)

podwire-w1 4243 
\tffffffff81f00040 do_syscall_64 ([kernel.kallsyms])
\t          123458 getsockopt (/usr/lib/x86_64-linux-gnu/libc.so.6)

podwire-w0 4242 
\t          5555 podwire_dataplane::offload::segment::tcp4 (/work/target/release/podwire)
\t          5556 podwire_dataplane::worker::routed::Routed::read_tun (/work/target/release/podwire)

podwire-w0 4242 
\t          5557 podwire_dataplane::offload::segment::tcp4 (/work/target/release/podwire)

podwire-w0 4242 
\tffffffff81000c82 asm_exc_page_fault ([kernel.kallsyms])

swapper     0 
\tffffffff8225295b pv_native_safe_halt ([kernel.kallsyms])

ksoftirqd/1    24 
\tffffffff81f00000 net_rx_action ([kernel.kallsyms])

podwire-lab worker 900 
\tffffffff81e00000 tcp_sendmsg ([kernel.kallsyms])
";

    #[test]
    fn test_samples_split_by_thread_and_syscall_family() {
        let s = split(SCRIPT);
        assert_eq!(s.samples, 10);
        assert_eq!(s.threads[WORKERS], 7);
        assert_eq!(s.threads["idle"], 1);
        assert_eq!(s.threads["ksoftirqd"], 1);
        assert_eq!(s.threads["podwire-lab worker"], 1);
        assert_eq!(s.workers["UDP send"], 1);
        // The pod's TCP under the TUN write is the write's cost.
        assert_eq!(s.workers["TUN/TAP write"], 2);
        assert_eq!(s.workers["syscall, other"], 1);
        assert_eq!(s.workers[USERSPACE], 2);
        assert_eq!(s.workers["kernel, no syscall (interrupts, page faults)"], 1);
        assert_eq!(
            s.worker_symbols["podwire_dataplane::offload::segment::tcp4"],
            2
        );
        let top = shares(&s.workers, 7);
        assert!((top[0].1 - 200.0 / 7.0).abs() < 1e-9, "{top:?}");
    }
}
