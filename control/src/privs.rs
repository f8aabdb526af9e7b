//! Privileges after node setup: `podwire run` keeps only the capabilities the running daemon
//! still uses, and sets no_new_privs.
//!
//! Node setup (TUN/TAP devices, addresses, routes, policy rules, nftables, XDP programs,
//! AF_XDP sockets, the underlay sockets and the healthz port) is done with the privileges
//! podwire was started with. Then, before the workers start, the daemon drops every other
//! capability from its bounding, permitted, effective, inheritable and ambient sets and sets
//! `PR_SET_NO_NEW_PRIVS`, so neither it nor a program it might run can get one back, and
//! checks that no thread of the process holds more. Teardown (see [`crate::node`]) runs after
//! the drop, on the main thread, through netlink: it needs only `CAP_NET_ADMIN`.
//!
//! What the running daemon still does, and so keeps:
//!
//! | mode | kept | what for, at run time |
//! |---|---|---|
//! | every mode | `CAP_NET_ADMIN` | rtnetlink for DirectRouting's routes as leases change; the FORWARD accept rules kept every 5 s (nf_tables netlink); at exit (or a setup step failing after the drop): the service route, the masquerade table and the FORWARD accept rules (nf_tables netlink), the policy rules, XDP detach; `SO_*BUFFORCE` |
//! | every mode | `CAP_NET_RAW` | raw and AF_XDP sockets (the kernel checks at creation; kept so a socket opened later, and the children, keep working) |
//! | routed, `--peer-queues on`, a backend `Port` below 1024 | + `CAP_NET_BIND_SERVICE` | a worker binds a socket per new peer to the backend's port as the subnet map changes (flannel's 8285 and VXLAN's 8472/4789 need nothing) |
//! | routed, `--io xdp` or `--pod-ports` | + `CAP_BPF` | NodePort map updates as services change: before Linux 6.5, with `kernel.unprivileged_bpf_disabled` set (Debian's default), every `bpf()` call needs it, even on a map podwire holds |
//! | `--mode l2` | + `CAP_SYS_ADMIN` | `podwire ctl attach` configures the pod's interface inside the pod's namespace through rtnetlink, from a thread that `setns`es there (which needs it) |
//! | `--mode l2 --io xdp` | + `CAP_BPF` | as routed `--io xdp` |
//! | `--mode l2 --l2-pods xdp` | + `CAP_BPF`, `CAP_PERFMON`, `CAP_IPC_LOCK` | `attach` loads the bridge-port XDP program and its maps (`CAP_BPF`; `CAP_PERFMON` for the verifier's pointer rules), and binds an AF_XDP socket whose UMEM would otherwise be charged to `RLIMIT_MEMLOCK` (`CAP_IPC_LOCK`) |
//!
//! Dropped in every mode, among others: `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH` (files
//! the daemon reads or writes at run time, such as the store and services files, subnet.env
//! and the stats file, must be root's or world-readable), `CAP_NET_BIND_SERVICE` but for the
//! case above (the healthz port is bound at start), `CAP_SYS_MODULE`, `CAP_SYS_PTRACE`, `CAP_SETUID`/`CAP_SETGID`,
//! `CAP_SETPCAP`, `CAP_CHOWN`, `CAP_FOWNER`. The daemon still runs as uid 0, so files owned by
//! root remain writable through their owner bits: capabilities limit what root can do beyond
//! them, not that.
//!
//! Capabilities are per thread in Linux, and a thread gets its creator's. The drop is done on
//! the main thread before the workers and the ctl thread start; threads started earlier (the
//! healthz server, tokio's blocking pool) drop everything themselves ([`drop_all`]);
//! [`privileged_threads`] finds any thread that still holds more than the main thread.

use caps::{CapSet, Capability, CapsHashSet};

/// What the running daemon will still do, from `podwire run`'s options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeNeeds {
    /// XDP programs attached at start whose maps are updated later (`--io xdp`, `--pod-ports`).
    pub bpf_maps: bool,
    /// L2 mode: pods are configured inside their network namespaces (`ctl attach`).
    pub pod_netns: bool,
    /// L2 mode with `--l2-pods xdp`: XDP programs, maps and AF_XDP sockets made at run time.
    pub xdp_at_run_time: bool,
    /// Sockets bound to a port below 1024 at run time (per-peer queues on such a backend port).
    pub low_port_binds: bool,
}

/// The capabilities kept for `needs` (see the table above).
pub fn runtime_caps(needs: RuntimeNeeds) -> CapsHashSet {
    let mut keep = CapsHashSet::from_iter([Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW]);
    if needs.bpf_maps {
        keep.insert(Capability::CAP_BPF);
    }
    if needs.pod_netns {
        keep.insert(Capability::CAP_SYS_ADMIN);
    }
    if needs.low_port_binds {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    if needs.xdp_at_run_time {
        keep.extend([
            Capability::CAP_BPF,
            Capability::CAP_PERFMON,
            Capability::CAP_IPC_LOCK,
        ]);
    }
    keep
}

#[derive(Debug, thiserror::Error)]
pub enum PrivsError {
    #[error("{what}: {source}")]
    Caps {
        what: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::Error),
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    #[error("still holding {held} after the drop")]
    NotDropped { held: String },
}

/// What [`drop_to`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The capabilities the thread holds now (those asked for that it had).
    pub kept: CapsHashSet,
    /// Asked for but not held to begin with (a daemon started without them).
    pub missing: CapsHashSet,
    /// The bounding set could not be narrowed (no `CAP_SETPCAP`, as when podwire runs as
    /// another user with ambient capabilities): no_new_privs still keeps children from gaining.
    pub bounding_left: bool,
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivsError {
    move |source| PrivsError::Caps { what, source }
}

/// Names, sorted, for logs: `CAP_BPF,CAP_NET_ADMIN`.
pub fn names(set: &CapsHashSet) -> String {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v.join(",")
}

/// Bits of a set, as /proc shows them.
pub fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// Narrows the calling thread (and every thread and process it starts later) to `keep`: sets
/// no_new_privs, then takes everything else out of the bounding, ambient, inheritable,
/// effective and permitted sets, and reads them back.
pub fn drop_to(keep: &CapsHashSet) -> Result<Dropped, PrivsError> {
    nix::sys::prctl::set_no_new_privs().map_err(PrivsError::NoNewPrivs)?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("reading CapPrm"))?;
    let kept: CapsHashSet = keep.intersection(&permitted).copied().collect();
    let missing: CapsHashSet = keep.difference(&permitted).copied().collect();
    // The bounding set first: narrowing it needs CAP_SETPCAP, which goes with the rest.
    let bounding = caps::read(None, CapSet::Bounding).map_err(caps_err("reading CapBnd"))?;
    let extra: Vec<Capability> = bounding.difference(keep).copied().collect();
    let can_setpcap = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(caps_err("reading CapEff"))?;
    let bounding_left = !extra.is_empty() && !can_setpcap;
    if can_setpcap {
        for cap in extra {
            caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("PR_CAPBSET_DROP"))?;
        }
    }
    for (set, what) in [
        (CapSet::Ambient, "PR_CAP_AMBIENT"),
        (CapSet::Inheritable, "capset(inheritable)"),
    ] {
        let now = caps::read(None, set).map_err(caps_err(what))?;
        let narrowed: CapsHashSet = now.intersection(keep).copied().collect();
        if narrowed != now {
            caps::set(None, set, &narrowed).map_err(caps_err(what))?;
        }
    }
    // Effective before permitted: the effective set must stay within the permitted one.
    caps::set(None, CapSet::Effective, &kept).map_err(caps_err("capset(effective)"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(caps_err("capset(permitted)"))?;
    let status = ThreadCaps::read("/proc/thread-self/status")?;
    let allowed = mask(keep);
    let held = (status.permitted | status.effective | status.inheritable) & !allowed;
    if held != 0 || !status.no_new_privs {
        return Err(PrivsError::NotDropped {
            held: format!("{held:#x} (no_new_privs {})", status.no_new_privs),
        });
    }
    Ok(Dropped {
        kept,
        missing,
        bounding_left,
    })
}

/// Drops every capability of the calling thread (threads that need none: the healthz server,
/// tokio's blocking pool). Where the bounding set cannot be narrowed (no `CAP_SETPCAP`), the
/// rest is still dropped.
pub fn drop_all() -> Result<(), PrivsError> {
    drop_to(&CapsHashSet::new()).map(|_| ())
}

/// A thread's capability sets and no_new_privs, as its /proc status shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCaps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl ThreadCaps {
    /// Parses a `/proc/.../status` text.
    pub fn parse(status: &str) -> ThreadCaps {
        let mut t = ThreadCaps::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let hex = || u64::from_str_radix(value, 16).unwrap_or(u64::MAX);
            match key {
                "CapInh" => t.inheritable = hex(),
                "CapPrm" => t.permitted = hex(),
                "CapEff" => t.effective = hex(),
                "CapBnd" => t.bounding = hex(),
                "CapAmb" => t.ambient = hex(),
                "NoNewPrivs" => t.no_new_privs = value == "1",
                _ => {}
            }
        }
        t
    }

    pub fn read(path: &str) -> Result<ThreadCaps, PrivsError> {
        std::fs::read_to_string(path)
            .map(|s| ThreadCaps::parse(&s))
            .map_err(|source| PrivsError::Proc {
                path: path.to_string(),
                source,
            })
    }
}

/// A thread that holds more than it should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivilegedThread {
    pub tid: u32,
    pub name: String,
    pub caps: ThreadCaps,
}

impl std::fmt::Display for PrivilegedThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "thread {} ({}): CapPrm {:#x} CapEff {:#x} CapBnd {:#x} NoNewPrivs {}",
            self.tid,
            self.name,
            self.caps.permitted,
            self.caps.effective,
            self.caps.bounding,
            u8::from(self.caps.no_new_privs)
        )
    }
}

/// The threads of this process holding a capability outside `keep` (in their permitted,
/// effective, inheritable or ambient set), a bounding set wider than the calling thread's, or
/// no no_new_privs. Threads that exit meanwhile are skipped.
pub fn privileged_threads(keep: &CapsHashSet) -> Result<Vec<PrivilegedThread>, PrivsError> {
    let allowed = mask(keep);
    let own = ThreadCaps::read("/proc/thread-self/status")?;
    let dir = "/proc/self/task";
    let entries = std::fs::read_dir(dir).map_err(|source| PrivsError::Proc {
        path: dir.into(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let caps = ThreadCaps::parse(&status);
        let too_much =
            (caps.permitted | caps.effective | caps.inheritable | caps.ambient) & !allowed != 0
                || caps.bounding & !own.bounding != 0
                || !caps.no_new_privs;
        if too_much {
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .unwrap_or("?")
                .trim()
                .to_string();
            out.push(PrivilegedThread { tid, name, caps });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn test_the_table() {
        let routed = runtime_caps(RuntimeNeeds::default());
        assert_eq!(names(&routed), "CAP_NET_ADMIN,CAP_NET_RAW");
        let xdp = runtime_caps(RuntimeNeeds {
            bpf_maps: true,
            ..Default::default()
        });
        assert_eq!(names(&xdp), "CAP_BPF,CAP_NET_ADMIN,CAP_NET_RAW");
        let l2 = runtime_caps(RuntimeNeeds {
            pod_netns: true,
            ..Default::default()
        });
        assert_eq!(names(&l2), "CAP_NET_ADMIN,CAP_NET_RAW,CAP_SYS_ADMIN");
        let l2_xdp = runtime_caps(RuntimeNeeds {
            pod_netns: true,
            xdp_at_run_time: true,
            ..Default::default()
        });
        assert_eq!(
            names(&l2_xdp),
            "CAP_BPF,CAP_IPC_LOCK,CAP_NET_ADMIN,CAP_NET_RAW,CAP_PERFMON,CAP_SYS_ADMIN"
        );
        let low_port = runtime_caps(RuntimeNeeds {
            low_port_binds: true,
            ..Default::default()
        });
        assert_eq!(
            names(&low_port),
            "CAP_NET_ADMIN,CAP_NET_BIND_SERVICE,CAP_NET_RAW"
        );
    }

    #[test]
    fn test_status_parsing() {
        let t = ThreadCaps::parse(
            "Name:\tpodwire-w0\nCapInh:\t0000000000000000\nCapPrm:\t0000000000003000\n\
             CapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
             NoNewPrivs:\t1\n",
        );
        assert_eq!(t.permitted, 0x3000);
        assert_eq!(t.effective, 0x3000);
        assert_eq!(t.bounding, 0x1ff_ffff_ffff);
        assert!(t.no_new_privs);
        let routed = runtime_caps(RuntimeNeeds::default());
        assert_eq!(
            mask(&routed),
            0x3000,
            "CAP_NET_ADMIN (12) and CAP_NET_RAW (13)"
        );
    }

    /// Runs `f` on a thread of its own: capabilities are per thread, so the test process's
    /// other threads keep theirs.
    fn on_a_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn test_the_drop_keeps_net_admin_and_takes_sys_admin() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let (before, after, dropped, child, grandchild) = on_a_thread(|| {
            let before = ThreadCaps::read("/proc/thread-self/status").unwrap();
            let dropped = drop_to(&runtime_caps(RuntimeNeeds::default())).unwrap();
            let after = ThreadCaps::read("/proc/thread-self/status").unwrap();
            // What a program run from now on would get: root's usual
            // full set is cut down to the bounding set, and no_new_privs is inherited.
            let out = std::process::Command::new("cat")
                .arg("/proc/self/status")
                .output()
                .unwrap();
            let child = ThreadCaps::parse(&String::from_utf8_lossy(&out.stdout));
            // A thread started from here inherits the drop.
            let grandchild =
                std::thread::spawn(|| ThreadCaps::read("/proc/thread-self/status").unwrap())
                    .join()
                    .unwrap();
            (before, after, dropped, child, grandchild)
        });
        let net_admin = Capability::CAP_NET_ADMIN.bitmask();
        let net_raw = Capability::CAP_NET_RAW.bitmask();
        let sys_admin = Capability::CAP_SYS_ADMIN.bitmask();
        assert!(
            before.effective & sys_admin != 0,
            "root starts with CAP_SYS_ADMIN"
        );
        assert!(!dropped.bounding_left && dropped.missing.is_empty());
        for (who, t) in [
            ("thread", after),
            ("child process", child),
            ("thread started after", grandchild),
        ] {
            assert_eq!(t.effective, net_admin | net_raw, "{who}: CapEff {t:?}");
            assert_eq!(t.permitted, net_admin | net_raw, "{who}: CapPrm {t:?}");
            assert_eq!(t.bounding, net_admin | net_raw, "{who}: CapBnd {t:?}");
            assert_eq!(t.inheritable, 0, "{who}: CapInh {t:?}");
            assert_eq!(t.ambient, 0, "{who}: CapAmb {t:?}");
            assert!(t.no_new_privs, "{who}: no_new_privs");
        }
        // This thread (the test's) was not touched.
        let here = ThreadCaps::read("/proc/thread-self/status").unwrap();
        assert!(here.effective & sys_admin != 0);
    }

    #[test]
    fn test_privileged_threads_are_found() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let keep = runtime_caps(RuntimeNeeds::default());
        let (found_before, found_after, me) = on_a_thread(move || {
            let me: u32 = nix::unistd::gettid().as_raw() as u32;
            let before = privileged_threads(&keep).unwrap();
            drop_to(&keep).unwrap();
            let after = privileged_threads(&keep).unwrap();
            (before, after, me)
        });
        // Before its drop this thread is one of them; after, the test harness's other
        // threads (full root) still are, this one is not.
        assert!(found_before.iter().any(|t| t.tid == me), "{found_before:?}");
        assert!(!found_after.iter().any(|t| t.tid == me), "{found_after:?}");
        assert!(
            !found_after.is_empty(),
            "the harness's threads are still root"
        );
        // drop_all leaves nothing.
        let t = on_a_thread(|| {
            drop_all().unwrap();
            ThreadCaps::read("/proc/thread-self/status").unwrap()
        });
        assert_eq!((t.permitted, t.effective, t.bounding), (0, 0, 0));
        assert!(t.no_new_privs);
    }
}
