//! flanneld's command line, accepted as flanneld's users type it.
//!
//! flanneld parses flags with Go's `flag` package, which takes `-name value`, `-name=value`
//! and `--name` alike, and `-name=true|false` for booleans. Before clap sees the arguments,
//! `podwire run`'s are rewritten to clap's `--name` form; flanneld flags podwire does not
//! implement get a message saying so instead of clap's "unexpected argument".

use std::ffi::OsString;

/// Boolean flags of `podwire run` (Go lets them take `=true` / `=false`).
const BOOL_FLAGS: &[&str] = &["ip-masq", "no-pin", "exit-with-parent"];

/// flanneld flags podwire does not implement, and why.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    (
        "kube-subnet-mgr",
        "podwire reads leases from etcd (or a file), not from the Kubernetes API",
    ),
    (
        "kube-api-url",
        "podwire does not talk to the Kubernetes API",
    ),
    (
        "kubeconfig-file",
        "podwire does not talk to the Kubernetes API",
    ),
    (
        "kube-annotation-prefix",
        "podwire does not talk to the Kubernetes API",
    ),
    ("iface-regex", "give --iface a name or an address"),
    ("iface-can-reach", "give --iface a name or an address"),
    ("public-ipv6", "podwire's pod network is IPv4 only"),
    (
        "ip-masq-fully-random-disable",
        "podwire does not masquerade yet",
    ),
    ("iptables-resync", "podwire installs no iptables rules"),
    (
        "iptables-forward-rules",
        "podwire installs no iptables rules",
    ),
    (
        "net-config-path",
        "the network config is read from the store",
    ),
];

/// Why the command line was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub flag: String,
    pub why: &'static str,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "flanneld flag -{} is not supported by podwire: {}",
            self.flag, self.why
        )
    }
}

impl std::error::Error for Unsupported {}

/// Rewrites the arguments after `run` from Go's flag syntax to clap's; others pass unchanged.
pub fn rewrite(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>, Unsupported> {
    let mut out = Vec::new();
    let mut in_run = false;
    for arg in args {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if !in_run {
            in_run = s == "run";
            out.push(arg);
            continue;
        }
        let Some(body) = s.strip_prefix("--").or_else(|| s.strip_prefix('-')) else {
            out.push(arg);
            continue;
        };
        // A lone `-x` is a short flag, `-` and `--` are not flags at all.
        if body.len() < 2 || !body.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(arg);
            continue;
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        if let Some((_, why)) = NOT_IMPLEMENTED.iter().find(|(n, _)| *n == name) {
            return Err(Unsupported {
                flag: name.to_string(),
                why,
            });
        }
        if BOOL_FLAGS.contains(&name) {
            match value {
                Some("false") | Some("0") => {}
                _ => out.push(format!("--{name}").into()),
            }
            continue;
        }
        out.push(match value {
            Some(v) => format!("--{name}={v}").into(),
            None => format!("--{name}").into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn test_go_flag_syntax_becomes_clap_syntax() {
        let got = rewrite(strs(&[
            "podwire",
            "run",
            "-etcd-endpoints=http://10.0.0.5:2379",
            "-iface",
            "eth0",
            "--etcd-prefix",
            "/x",
            "-ip-masq=true",
            "-no-pin=false",
            "-h",
        ]))
        .unwrap();
        assert_eq!(
            got,
            strs(&[
                "podwire",
                "run",
                "--etcd-endpoints=http://10.0.0.5:2379",
                "--iface",
                "eth0",
                "--etcd-prefix",
                "/x",
                "--ip-masq",
                "-h",
            ])
        );
        // Other subcommands are left alone.
        assert_eq!(
            rewrite(strs(&["podwire", "lab", "-nodes"])).unwrap(),
            strs(&["podwire", "lab", "-nodes"])
        );
    }

    #[test]
    fn test_unimplemented_flanneld_flags_are_named() {
        let e = rewrite(strs(&["podwire", "run", "-kube-subnet-mgr"])).unwrap_err();
        assert_eq!(e.flag, "kube-subnet-mgr");
        assert!(e.to_string().contains("not supported by podwire"));
    }
}
