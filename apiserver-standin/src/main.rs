//! `podwire-apiserver-standin`: serves the stand-in Kubernetes API until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use podwire_apiserver_standin::{seed, Config, Role, StandIn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// A Kubernetes API server stand-in: nodes, services and endpointslices over plain HTTP.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// A bearer token, optionally with its role (admin or reader; admin when left out).
    /// Repeatable.
    #[arg(long = "token", value_name = "TOKEN[:ROLE]")]
    tokens: Vec<String>,
    /// A JSON List of Node, Service and EndpointSlice objects to start with.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
    /// Events each kind's history keeps.
    #[arg(long, default_value_t = 1000)]
    history_size: usize,
}

fn config(args: &Args) -> anyhow::Result<Config> {
    let mut config = Config {
        bookmark_interval: std::time::Duration::from_secs(args.bookmark_interval),
        history_size: args.history_size,
        ..Config::default()
    };
    for token in &args.tokens {
        let (token, role) = match token.rsplit_once(':') {
            Some((token, role)) => (token, role.parse::<Role>()?),
            None => (token.as_str(), Role::Admin),
        };
        if token.is_empty() {
            bail!("--token: empty token");
        }
        config = config.with_token(token, role);
    }
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = config(&args)?;
    if config.tokens.is_empty() {
        bail!("no --token given: every request would be refused");
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot handle signals")?;
    let handle = StandIn::start(args.listen, config)?;
    if let Some(path) = &args.seed {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        handle.apply_seed(seed::parse(&text)?)?;
    }
    eprintln!(
        "podwire-apiserver-standin: serving {} (revision {})",
        handle.url(),
        handle.revision()
    );
    let signal = signals.forever().next();
    eprintln!("podwire-apiserver-standin: signal {signal:?}, stopping");
    Ok(())
}
