//! A private etcd server (Debian's `etcd-server`) for the lab and the tests: started in a
//! network namespace or the current one, on the address and ports given, with its own data
//! directory; stopped by pid and its directory removed when dropped. `etcdctl` (Debian's
//! `etcd-client`) talks to it as an independent client.

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Why the server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error("cannot start {program}: {source} (install Debian's etcd-server and etcd-client)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("etcd did not answer on {addr} within {secs} s; its log:\n{log}")]
    NotReady {
        addr: String,
        secs: u64,
        log: String,
    },
    #[error("etcdctl {args}: {stderr}")]
    Ctl { args: String, stderr: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// PEM files for an etcd that speaks only TLS and wants client certificates.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed the server's and the clients' certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// What etcdctl presents.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// One running etcd.
pub struct EtcdServer {
    child: Option<Child>,
    tls: Option<EtcdTls>,
    netns: Option<String>,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

impl EtcdServer {
    /// Starts etcd listening on `ip:client_port` (and `ip:peer_port` for its peer URL), inside
    /// `netns` if given, keeping its data and log under `dir` (created, removed on drop).
    pub fn start(
        netns: Option<&str>,
        ip: Ipv4Addr,
        client_port: u16,
        peer_port: u16,
        dir: &Path,
    ) -> Result<EtcdServer, EtcdServerError> {
        Self::start_with(netns, ip, client_port, peer_port, dir, None)
    }

    /// As `start`, with TLS and client-certificate authentication on the client port.
    pub fn start_with(
        netns: Option<&str>,
        ip: Ipv4Addr,
        client_port: u16,
        peer_port: u16,
        dir: &Path,
        tls: Option<EtcdTls>,
    ) -> Result<EtcdServer, EtcdServerError> {
        std::fs::create_dir_all(dir)?;
        let mut server = EtcdServer {
            child: None,
            tls,
            netns: netns.map(str::to_string),
            ip,
            client_port,
            peer_port,
            dir: dir.to_path_buf(),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), EtcdServerError> {
        let client = self.endpoint();
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let mut cmd = self.command("etcd");
        cmd.args(["--name", "podwire", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("podwire={peer}")]);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(|source| EtcdServerError::Spawn {
            program: "etcd".into(),
            source,
        })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// The client URL (`http://ip:port`, or https with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), EtcdServerError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(out) = self.ctl_output(&["endpoint", "health"]) {
                if out.status.success() {
                    return Ok(());
                }
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.kill();
                return Err(EtcdServerError::NotReady {
                    addr: self.endpoint(),
                    secs: limit.as_secs(),
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctl_output(&self, args: &[&str]) -> std::io::Result<Output> {
        let mut cmd = self.command("etcdctl");
        cmd.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.endpoint(),
            "--command-timeout",
            "5s",
        ]);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        cmd.args(args).stdin(Stdio::null()).output()
    }

    /// Runs `etcdctl` against this server; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, EtcdServerError> {
        let out = self
            .ctl_output(args)
            .map_err(|source| EtcdServerError::Spawn {
                program: "etcdctl".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(EtcdServerError::Ctl {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `etcdctl put KEY VALUE`.
    pub fn put(&self, key: &str, value: &str) -> Result<(), EtcdServerError> {
        self.ctl(&["put", key, value]).map(|_| ())
    }

    /// `etcdctl put KEY VALUE` under a fresh etcd lease of `ttl` (as flanneld writes leases).
    pub fn put_with_ttl(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), EtcdServerError> {
        let out = self.ctl(&["lease", "grant", &ttl.as_secs().max(1).to_string()])?;
        // "lease 694d7f1a2b3c4d5e granted with TTL(86400s)"
        let id = out
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| EtcdServerError::Ctl {
                args: "lease grant".into(),
                stderr: format!("unexpected answer {out:?}"),
            })?
            .to_string();
        self.ctl(&["put", "--lease", &id, key, value]).map(|_| ())
    }

    /// `etcdctl del KEY`.
    pub fn delete(&self, key: &str) -> Result<(), EtcdServerError> {
        self.ctl(&["del", key]).map(|_| ())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Result<Option<String>, EtcdServerError> {
        let out = self.ctl(&["get", "--print-value-only", key])?;
        let v = out.trim_end_matches('\n');
        Ok((!v.is_empty()).then(|| v.to_string()))
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, EtcdServerError> {
        let out = self.ctl(&["get", "--prefix", "--keys-only", prefix])?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Stops the server (SIGKILL by pid), keeping its data for `restart`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data (after `kill`).
    pub fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.kill();
        self.spawn()
    }

    /// True while something accepts connections on the client port (from this namespace).
    pub fn port_open(&self) -> bool {
        TcpStream::connect_timeout(
            &(self.ip, self.client_port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        let _ = std::fs::remove_file(self.dir.join("etcd.log"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}
