//! Where a measurement came from: commit, date, command line and machine, written into every
//! run file so a published figure can be traced to the run that produced it.

use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cores: usize,
    pub cpu: String,
}

/// Where a run came from.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    /// `git rev-parse HEAD` of the working directory, or "unknown" outside a checkout.
    pub commit: String,
    /// Tracked files differed from the commit.
    pub dirty: bool,
    /// UTC, RFC 3339.
    pub date: String,
    pub command: String,
    pub machine: Machine,
}

impl Provenance {
    /// Reads the commit, the clock, this process's command line and the machine.
    pub fn collect() -> Provenance {
        // The checkout the command runs in, else the one the binary was built in.
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf));
        let in_repo = |dir: Option<&Path>, args: &[&str]| {
            let mut c = Command::new("git");
            if let Some(d) = dir {
                c.arg("-C").arg(d);
            }
            c.args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let repo = if in_repo(None, &["rev-parse", "HEAD"]).is_some() {
            None
        } else {
            exe_dir.as_deref()
        };
        let git = |args: &[&str]| in_repo(repo, args);
        let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_none_or(|s| !s.is_empty());
        Provenance {
            commit,
            dirty,
            date: utc_rfc3339(SystemTime::now()),
            command: std::env::args()
                .map(|a| shell_word(&a))
                .collect::<Vec<_>>()
                .join(" "),
            machine: Machine {
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                cpu: cpu_model(),
            },
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `a` as a shell would need it to run the command again.
fn shell_word(a: &str) -> String {
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:+@".contains(&b))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_utc_dates() {
        assert_eq!(utc_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2026-12-03T15:12:35Z and a leap day.
        let at = |s: u64| utc_rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(1_796_310_755), "2026-12-03T15:12:35Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn test_shell_words() {
        assert_eq!(shell_word("--modes=a,b"), "--modes=a,b");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
