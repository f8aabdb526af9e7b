//! Network namespaces for the lab: create, enter, run, delete.

use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;
use std::process::Command;

/// Runs `ip ARGS` and fails with its stderr. Only the lab runs `ip`: the daemon sets its
/// node up over rtnetlink.
pub fn ip(args: &[&str]) -> Result<()> {
    succeed(Command::new("ip").args(args), || {
        format!("`ip {}`", args.join(" "))
    })
}

/// Runs `cmd` (an `ip` command) and fails with `what` it was and its stderr.
fn succeed(cmd: &mut Command, what: impl FnOnce() -> String) -> Result<()> {
    let out = cmd.output().context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Runs a command inside `ns` and returns its exit status and stdout.
pub fn output_in(ns: &str, cmd: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .context("running ip netns exec")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Runs a command inside `ns` (`ip netns exec`) and fails with its stderr.
pub fn exec_in(ns: &str, cmd: &[&str]) -> Result<()> {
    succeed(
        Command::new("ip").args(["netns", "exec", ns]).args(cmd),
        || format!("`{}` in {ns}", cmd.join(" ")),
    )
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    nix::sched::setns(f, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {ns}"))
}

/// Runs `f` on a new thread inside `ns`; sockets it creates stay in `ns`.
pub fn spawn_in<T, F>(ns: &str, f: F) -> std::thread::JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}

/// Runs `f` inside `ns` and waits for it.
pub fn run_in<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    join(spawn_in(ns, f))
}

/// Joins a lab thread, turning a panic into an error.
pub fn join<T>(h: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a lab thread panicked"))?
}

/// Names of the existing network namespaces.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the processes inside `ns`.
pub fn pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes `ns` (processes left in it must be killed first: they would keep it alive).
pub fn delete(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}
