//! The `podwire` binary.

mod daemon;
mod flanneld_args;
mod run_args;
mod services_sync;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use podwire_dataplane::pipeline::Direction;
use run_args::{LogFormat, LogLevel, RunArgs};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// podwire: a userspace pod-network dataplane, a drop-in for flanneld's udp backend.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node daemon: join the cluster from the store and forward pod traffic.
    Run(Box<RunArgs>),
    /// Run a capture through the pipeline offline (no devices, no root) and write what would leave.
    Replay(ReplayArgs),
    /// Ask the running daemon (over its ctl socket): the subnet map, the connection table
    /// (like `conntrack -L`), services (like `ipvsadm -Ln`), worker counters and rates.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The daemon's ctl socket (`podwire run --ctl-socket`); before or after the subcommand.
    #[arg(long, global = true, default_value = podwire::ctl::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the answer as JSON, for scripts; before or after the subcommand.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: CtlWhat,
}

#[derive(Subcommand)]
enum CtlWhat {
    /// The live subnet map and our lease's expiry.
    Subnets,
    /// Tracked connections, like `conntrack -L`.
    Conntrack {
        /// Only connections with this address in either direction.
        #[arg(long)]
        addr: Option<Ipv4Addr>,
        /// Only connections with this port in either direction.
        #[arg(long)]
        port: Option<u16>,
        /// Only TCP connections in this state (ESTABLISHED, TIME_WAIT, ...).
        #[arg(long)]
        state: Option<String>,
        /// tcp, udp or icmp.
        #[arg(long, value_enum)]
        proto: Option<podwire::ctl::protocol::Proto>,
    },
    /// Services and their endpoints with active and inactive connections, like `ipvsadm -Ln`.
    Services,
    /// Per-worker counters and drops by reason, with rates since the previous `stats`.
    Stats,
    /// L2 mode: the bridge's forwarding database, like `bridge fdb show` (the pods' static
    /// entries, learned stations with their idle time, remote ones with their VTEP, and the
    /// all-zero default entries of head-end replication).
    Fdb,
    /// L2 mode: give a pod an interface on the bridge: a TAP device moved into its network
    /// namespace and configured there (address, MTU, default route via the node's gateway).
    Attach {
        /// The pod's network namespace (as `ip netns` names it).
        #[arg(long)]
        netns: String,
        /// The pod's address with the prefix that is on-link (the cluster network's, for one
        /// L2 domain across nodes), e.g. 10.244.1.10/16.
        #[arg(long)]
        ip: String,
        /// The interface's MAC (default: random).
        #[arg(long)]
        mac: Option<String>,
        /// The interface's name in the pod.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Default gateway (default: the node's gateway, the host port's address).
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
    },
    /// L2 mode: remove a pod's interface (the TAP device) and its FDB entries.
    Detach {
        /// The pod's network namespace (as given to `attach`).
        #[arg(long)]
        netns: String,
    },
    /// Test a supervisor: make worker N panic (the daemon then exits non-zero). Needs a daemon
    /// started with --fault-injection.
    Fault {
        /// What to do to the worker.
        #[arg(value_enum)]
        kind: podwire::ctl::protocol::FaultKind,
        /// The worker to fail.
        #[arg(long, default_value_t = 0)]
        worker: usize,
    },
    /// Capture what a port receives into a pcap file (Wireshark/tshark): `tun` (the pods'
    /// packets) or `underlay` (the encapsulated datagrams, with their outer headers).
    Capture {
        /// Which port's receives to capture.
        #[arg(long, value_enum)]
        port: podwire::ctl::protocol::CapturePort,
        /// Packets to capture (at most 100000).
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Stop after this many seconds even if fewer packets came.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// The pcap file to write (by this command, as the user running it: the daemon
        /// sends the packets over the ctl socket). Created mode 0600 less the umask.
        #[arg(short = 'w', long = "write")]
        write: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Side {
    /// Raw inner IPv4 packets, as the TUN device sees them.
    Tun,
    /// Outer IPv4/UDP datagrams, as the underlay sees them.
    Underlay,
    /// Both interleaved: datagrams to our port came from the underlay, the rest from the TUN.
    Both,
    /// L2 mode (with --bridge-port): Ethernet frames from bridge port --in-port.
    Port,
}

/// `MAC` or `MAC,host`: a bridge port of an L2 replay.
fn parse_bridge_port(s: &str) -> Result<podwire_dataplane::replay::BridgePort, String> {
    let (mac, host) = match s.split_once(',') {
        Some((mac, "host")) => (mac, true),
        Some((_, other)) => return Err(format!("{other}: want MAC or MAC,host")),
        None => (s, false),
    };
    let mac = mac.parse().map_err(|e| format!("{mac}: {e}"))?;
    Ok(podwire_dataplane::replay::BridgePort { mac, host })
}

#[derive(Args)]
struct ReplayArgs {
    /// Cluster store (`file:PATH`).
    #[arg(long)]
    store: String,
    /// The node to be: its lease is the one with this PublicIP.
    #[arg(long)]
    public_ip: Ipv4Addr,
    /// Where the input was captured.
    #[arg(long, value_enum)]
    from: Side,
    /// Input capture (pcap, link type RAW or Ethernet).
    #[arg(long = "in")]
    input: PathBuf,
    /// Output capture (pcap, link type RAW): what would go to the underlay or into the TUN.
    /// In L2 mode a directory: `underlay.pcap` and `port<N>.pcap` (Ethernet) are written there.
    #[arg(long = "out")]
    output: PathBuf,
    /// L2 mode: a port of the bridge (`MAC` or `MAC,host`), its station a static entry; ports
    /// get ids 1, 2, ... in order. The VTEPs and peers' entries come from the store.
    #[arg(long = "bridge-port", value_parser = parse_bridge_port)]
    bridge_ports: Vec<podwire_dataplane::replay::BridgePort>,
    /// L2 mode with `--from port`: the port the frames came in by.
    #[arg(long, default_value_t = 1)]
    in_port: u16,
    /// Replay statefully with connection tracking and these services (`file:PATH`, the format
    /// of `podwire run --services`), timed by the records' capture times.
    #[arg(long)]
    services: Option<String>,
    /// With --services: the cluster's service range.
    #[arg(long, default_value = podwire_dataplane::nat::DEFAULT_SERVICE_CIDR)]
    service_cidr: podwire_dataplane::route::Ipv4Net,
}

fn init_logging(json: bool, level: LogLevel) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| level.directive().into());
    // Colour codes only for a person at a terminal: journald, `kubectl logs` and files get
    // plain text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        // One JSON object per line, fields flattened: for log shippers.
        fmt.json().flatten_event(true).init();
    } else {
        fmt.init();
    }
    // A panic (a worker's, say) goes to the log like everything else, so a JSON log stays JSON
    // and the supervisor's log shows which thread died and where.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("?"), "panicked: {info}");
    }));
}

fn main() -> Result<()> {
    flanneld_args::forget_empty_env();
    let args = match flanneld_args::rewrite(std::env::args_os(), |k| std::env::var(k).ok()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(args);
    match cli.command {
        Cmd::Run(a) => run(*a),
        Cmd::Replay(a) => replay(a),
        Cmd::Ctl(a) => ctl(a),
    }
}

/// `podwire run`: the flags checked and turned into the daemon's options, then the daemon.
fn run(a: RunArgs) -> Result<()> {
    init_logging(a.log_format == LogFormat::Json, a.log_level);
    if a.exit_with_parent {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
            .context("prctl(PR_SET_PDEATHSIG)")?;
    }
    if a.store.is_none() && a.etcd_endpoints == podwire::etcd::DEFAULT_ENDPOINTS {
        tracing::warn!(
            endpoints = podwire::etcd::DEFAULT_ENDPOINTS,
            "no --store or --etcd-endpoints given: trying flanneld's default etcd endpoints \
             (give --etcd-endpoints URL,... or --store file:PATH)"
        );
    }
    match a.into_options() {
        Ok(opts) => daemon::run(opts),
        Err(e) if e.is_usage() => {
            // As clap's own usage errors: exit 2.
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        Err(e) => Err(e.into()),
    }
}

fn ctl(a: CtlArgs) -> Result<()> {
    use podwire::ctl::protocol::{AttachRequest, CaptureRequest, ConntrackFilter};
    use podwire::ctl::{Request, Response};
    let req = match a.what {
        CtlWhat::Subnets => Request::Subnets,
        CtlWhat::Conntrack {
            addr,
            port,
            state,
            proto,
        } => Request::Conntrack(ConntrackFilter {
            addr,
            port,
            state,
            proto,
        }),
        CtlWhat::Services => Request::Services,
        CtlWhat::Stats => Request::Stats,
        CtlWhat::Fdb => Request::Fdb,
        CtlWhat::Attach {
            netns,
            ip,
            mac,
            ifname,
            gateway,
        } => Request::Attach(AttachRequest {
            netns,
            ip,
            mac,
            ifname,
            gateway,
        }),
        CtlWhat::Detach { netns } => Request::Detach { netns },
        CtlWhat::Fault { kind, worker } => Request::Fault { kind, worker },
        CtlWhat::Capture {
            port,
            count,
            timeout,
            write,
        } => {
            // The daemon sends the pcap; this process (its user, its umask) writes the file.
            let req = CaptureRequest {
                port,
                count,
                timeout_ms: timeout.saturating_mul(1000),
            };
            let answer = podwire::ctl::capture(&a.socket, &req, &write)?;
            print_answer(&Response::Captured(answer), a.json)?;
            return Ok(());
        }
    };
    print_answer(&podwire::ctl::call(&a.socket, &req)?, a.json)
}

/// A ctl answer as JSON (`--json`) or as the familiar tools print it.
fn print_answer(answer: &podwire::ctl::Response, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        print!("{}", podwire::ctl::render(answer));
    }
    Ok(())
}

fn replay(a: ReplayArgs) -> Result<()> {
    let view = podwire::store::FileStore::new(
        a.store
            .strip_prefix("file:")
            .context("replay reads a file store: --store file:PATH")?,
    )
    .load()?;
    let mut tables = podwire::tables::build(&view, a.public_ip, None)?;
    if !a.bridge_ports.is_empty() {
        return replay_bridged(&a, &tables);
    }
    let from = match a.from {
        Side::Tun => Some(Direction::FromTun),
        Side::Underlay => Some(Direction::FromUnderlay),
        Side::Both => None,
        Side::Port => {
            anyhow::bail!("--from port is L2 mode: name the bridge's ports (--bridge-port)")
        }
    };
    let flows = match &a.services {
        None => None,
        Some(s) => {
            let path = s.strip_prefix("file:").context("--services file:PATH")?;
            let parsed = podwire::services::parse_file(&std::fs::read_to_string(path)?, path)?;
            // A replay is a test: a service left out is an error, not a warning.
            if let Some(e) = parsed.rejected.into_iter().next() {
                return Err(e.into());
            }
            let specs = parsed.specs;
            let options = podwire_dataplane::nat::ServiceOptions::new(a.service_cidr);
            tables.services =
                std::sync::Arc::new(podwire_dataplane::nat::Services::build(options, specs)?);
            Some(podwire_dataplane::pipeline::Flows::new(Default::default()))
        }
    };
    let report =
        podwire_dataplane::replay::replay_with(&tables, flows.as_ref(), from, &a.input, &a.output)?;
    print_replay(&a, &tables, &report);
    Ok(())
}

/// `podwire replay` in L2 mode (`--bridge-port`): the bridge's decisions.
fn replay_bridged(a: &ReplayArgs, tables: &podwire_dataplane::pipeline::Tables) -> Result<()> {
    use podwire_dataplane::pipeline::BridgeIngress;
    let from = match a.from {
        Side::Port => BridgeIngress::Port(podwire_dataplane::bridge::PortId(a.in_port)),
        Side::Underlay => BridgeIngress::Underlay,
        Side::Tun | Side::Both => {
            anyhow::bail!("an L2 replay reads frames from a port or datagrams from the underlay")
        }
    };
    if a.services.is_some() {
        anyhow::bail!("--services is routed mode's: an L2 replay has no connection tracking");
    }
    std::fs::create_dir_all(&a.output)?;
    let report = podwire_dataplane::replay::replay_bridged(
        tables,
        &a.bridge_ports,
        from,
        &a.input,
        &a.output,
    )?;
    print_replay(a, tables, &report);
    Ok(())
}

fn print_replay(
    a: &ReplayArgs,
    tables: &podwire_dataplane::pipeline::Tables,
    report: &podwire_dataplane::replay::ReplayReport,
) {
    println!("records read:    {}", report.records);
    if report.skipped > 0 {
        println!(
            "not for us:      {} (not IPv4/UDP to {}:{})",
            report.skipped, a.public_ip, tables.peer_port
        );
    }
    println!("records written: {}", report.written);
    let drops = report.drops();
    if drops.is_empty() {
        println!("drops:           none");
    } else {
        for (r, n) in drops {
            println!("drop {r:<18} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand says what it does and every argument of it has help, at every level.
    #[test]
    fn test_every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let here = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(here.clone());
                }
                for arg in sub.get_arguments() {
                    let id = arg.get_id().as_str();
                    if id != "help" && id != "version" && arg.get_help().is_none() {
                        missing.push(format!("{here} {id}"));
                    }
                }
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "podwire", &mut missing);
        assert!(missing.is_empty(), "no help: {missing:?}");
    }

    /// `--json` and `--socket` are taken before or after a ctl subcommand.
    #[test]
    fn test_ctl_flags_go_anywhere() {
        for args in [
            &["podwire", "ctl", "--json", "--socket", "/s", "stats"][..],
            &["podwire", "ctl", "stats", "--json", "--socket", "/s"],
            &[
                "podwire",
                "ctl",
                "--socket",
                "/s",
                "conntrack",
                "--json",
                "--port",
                "80",
            ],
        ] {
            let Cmd::Ctl(a) = Cli::try_parse_from(args).unwrap().command else {
                panic!("{args:?}")
            };
            assert!(a.json, "{args:?}");
            assert_eq!(a.socket, PathBuf::from("/s"), "{args:?}");
        }
    }
}
