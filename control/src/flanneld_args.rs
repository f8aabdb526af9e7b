//! flanneld's command line, accepted as flanneld's users type it.
//!
//! flanneld parses flags with Go's `flag` package, which takes `-name value`, `-name=value`
//! and `--name` alike, and `-name=true|false` for booleans. Before clap sees the arguments,
//! `podwire run`'s are rewritten to clap's `--name` form; flanneld flags podwire does not
//! implement get a message saying so instead of clap's "unexpected argument".

use crate::run_args::{parse_go_bool, LogLevel};
use clap::ValueEnum;
use std::ffi::OsString;

/// Boolean flags of `podwire run` (Go lets them take `=true` / `=false`).
const BOOL_FLAGS: &[&str] = &["ip-masq", "no-pin", "exit-with-parent", "kube-subnet-mgr"];
/// Boolean flags that are on unless turned off: their value is passed on, as clap's `=BOOL`.
const ON_BY_DEFAULT: &[&str] = &["iptables-forward-rules"];

/// flanneld flags podwire does not implement, and why.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("iface-regex", "give --iface a name or an address"),
    ("iface-can-reach", "give --iface a name or an address"),
    ("public-ipv6", "podwire's pod network is IPv4 only"),
    (
        "ip-masq-fully-random-disable",
        "podwire's masquerade always picks ports fully at random (flanneld's default)",
    ),
    (
        "iptables-resync",
        "podwire checks its FORWARD accept rules every 5 s (flanneld's default) and keeps its \
         masquerade rules in an nftables table of its own",
    ),
];

/// Why the command line (or flanneld's environment) was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("flanneld flag -{flag} is not supported by podwire: {why}")]
    Unsupported { flag: String, why: &'static str },
    #[error("flanneld setting {var} is not supported by podwire: {why}")]
    UnsupportedEnv { var: String, why: &'static str },
    #[error("flanneld flag -{flag}: {why}")]
    BadValue { flag: String, why: String },
}

/// flanneld's environment variable for a flag: `FLANNELD_` and the name in capitals.
fn env_name(flag: &str) -> String {
    format!("FLANNELD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// The unsupported flags refused in the environment as on the command line; a boolean one
/// set false (as Go reads it) asks for nothing and passes.
fn check_env(env: &impl Fn(&str) -> Option<String>) -> Result<(), Refused> {
    for (flag, why) in NOT_IMPLEMENTED {
        let var = env_name(flag);
        match env(&var) {
            Some(v) if !v.is_empty() && parse_go_bool(&v) != Ok(false) => {
                return Err(Refused::UnsupportedEnv { var, why });
            }
            _ => {}
        }
    }
    Ok(())
}

/// A boolean flag's value as Go reads it: `-name` alone is true.
fn go_bool_flag(name: &str, value: Option<&str>) -> Result<bool, Refused> {
    value.map_or(Ok(true), |v| {
        parse_go_bool(v).map_err(|why| Refused::BadValue {
            flag: name.to_string(),
            why,
        })
    })
}

/// Removes flanneld's variables that are set but empty: flanneld reads a `FLANNELD_*` variable
/// only when it holds something, so `FLANNELD_IP_MASQ=` is no setting, where clap would
/// refuse the empty value. Called first thing in `main`, before any thread starts.
pub fn forget_empty_env() {
    for (key, value) in std::env::vars_os() {
        if value.is_empty() && key.to_str().is_some_and(|k| k.starts_with("FLANNELD_")) {
            std::env::remove_var(key);
        }
    }
}

/// Rewrites the arguments after `run` from Go's flag syntax to clap's; others pass unchanged.
/// `env` looks up flanneld's environment variables.
pub fn rewrite(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<OsString>, Refused> {
    let mut out = Vec::new();
    let mut in_run = false;
    // `-v N`: the next argument is the verbosity.
    let mut verbosity_next = false;
    for arg in args {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if !in_run {
            in_run = s == "run";
            if in_run {
                check_env(&env)?;
            }
            out.push(arg);
            continue;
        }
        if std::mem::take(&mut verbosity_next) {
            out.push(log_level(s)?);
            continue;
        }
        let Some(body) = s.strip_prefix("--").or_else(|| s.strip_prefix('-')) else {
            out.push(arg);
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        if name == "v" {
            match value {
                Some(v) => out.push(log_level(v)?),
                None => verbosity_next = true,
            }
            continue;
        }
        // A lone `-x` is a short flag, `-` and `--` are not flags at all.
        if body.len() < 2 || !body.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(arg);
            continue;
        }
        if let Some((_, why)) = NOT_IMPLEMENTED.iter().find(|(n, _)| *n == name) {
            return Err(Refused::Unsupported {
                flag: name.to_string(),
                why,
            });
        }
        if ON_BY_DEFAULT.contains(&name) {
            let on = go_bool_flag(name, value)?;
            out.push(format!("--{name}={on}").into());
            continue;
        }
        if BOOL_FLAGS.contains(&name) {
            let on = go_bool_flag(name, value)?;
            if on {
                out.push(format!("--{name}").into());
            }
            continue;
        }
        out.push(match value {
            Some(v) => format!("--{name}={v}").into(),
            None => format!("--{name}").into(),
        });
    }
    if verbosity_next {
        return Err(Refused::BadValue {
            flag: "v".into(),
            why: "needs a level (-v=2)".into(),
        });
    }
    Ok(out)
}

/// flanneld's `-v=N` as `--log-level`.
fn log_level(v: &str) -> Result<OsString, Refused> {
    let n: u32 = v.parse().map_err(|_| Refused::BadValue {
        flag: "v".into(),
        why: format!("{v:?} is not a log level number (flanneld's -v=0, 1, 2, ...)"),
    })?;
    let level = LogLevel::from_klog_verbosity(n).to_possible_value();
    let name = level.as_ref().map_or("info", |p| p.get_name());
    Ok(format!("--log-level={name}").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn rewrite_no_env(args: Vec<OsString>) -> Result<Vec<OsString>, Refused> {
        rewrite(args, |_| None)
    }

    #[test]
    fn test_go_booleans_and_klog_verbosity() {
        for (arg, want) in [
            ("-ip-masq=1", Some("--ip-masq")),
            ("-ip-masq=T", Some("--ip-masq")),
            ("-ip-masq=True", Some("--ip-masq")),
            ("-ip-masq=f", None),
            ("-ip-masq=FALSE", None),
            (
                "-iptables-forward-rules",
                Some("--iptables-forward-rules=true"),
            ),
            (
                "-iptables-forward-rules=0",
                Some("--iptables-forward-rules=false"),
            ),
            (
                "--iptables-forward-rules=F",
                Some("--iptables-forward-rules=false"),
            ),
            ("-v=0", Some("--log-level=info")),
            ("-v=2", Some("--log-level=debug")),
            ("--v=9", Some("--log-level=trace")),
        ] {
            let got = rewrite_no_env(strs(&["podwire", "run", arg])).unwrap();
            let want: Vec<OsString> = ["podwire", "run"]
                .into_iter()
                .chain(want)
                .map(OsString::from)
                .collect();
            assert_eq!(got, want, "{arg}");
        }
        let spaced = rewrite_no_env(strs(&["podwire", "run", "-v", "3", "-iface", "eth0"]));
        assert_eq!(
            spaced.unwrap(),
            strs(&["podwire", "run", "--log-level=debug", "--iface", "eth0"])
        );
        for bad in ["-ip-masq=yes", "-iptables-forward-rules=no", "-v=high"] {
            let e = rewrite_no_env(strs(&["podwire", "run", bad])).unwrap_err();
            assert!(matches!(e, Refused::BadValue { .. }), "{bad}: {e}");
        }
        assert!(rewrite_no_env(strs(&["podwire", "run", "-v"])).is_err());
    }

    #[test]
    fn test_unsupported_flags_are_refused_in_the_environment_too() {
        let env = |set: &'static str, value: &'static str| {
            move |k: &str| (k == set).then(|| value.to_string())
        };
        let e = rewrite(
            strs(&["podwire", "run"]),
            env("FLANNELD_IFACE_REGEX", "eth.*"),
        )
        .unwrap_err();
        assert_eq!(
            e,
            Refused::UnsupportedEnv {
                var: "FLANNELD_IFACE_REGEX".into(),
                why: NOT_IMPLEMENTED[0].1
            }
        );
        assert!(rewrite(
            strs(&["podwire", "run"]),
            env("FLANNELD_KUBE_SUBNET_MGR", "true")
        )
        .is_ok());
        assert!(rewrite(
            strs(&["podwire", "run"]),
            env("FLANNELD_PUBLIC_IPV6", "fd00::1")
        )
        .is_err());
        // Only `run` reads flanneld's environment.
        assert!(rewrite(
            strs(&["podwire", "ctl", "stats"]),
            env("FLANNELD_IFACE_REGEX", "x")
        )
        .is_ok());
    }

    #[test]
    fn test_go_flag_syntax_becomes_clap_syntax() {
        let got = rewrite_no_env(strs(&[
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
            rewrite_no_env(strs(&["podwire", "lab", "-nodes"])).unwrap(),
            strs(&["podwire", "lab", "-nodes"])
        );
    }

    #[test]
    fn test_unimplemented_flanneld_flags_are_named() {
        let e = rewrite_no_env(strs(&["podwire", "run", "-iface-regex=eth.*"])).unwrap_err();
        assert!(matches!(&e, Refused::Unsupported { flag, .. } if flag == "iface-regex"));
        assert!(e.to_string().contains("not supported by podwire"));
        // kube-subnet-mgr is a Go boolean flag like the others.
        assert_eq!(
            rewrite_no_env(strs(&[
                "podwire",
                "run",
                "-kube-subnet-mgr",
                "-kube-api-url=http://k"
            ]))
            .unwrap(),
            strs(&[
                "podwire",
                "run",
                "--kube-subnet-mgr",
                "--kube-api-url=http://k"
            ])
        );
    }
}
