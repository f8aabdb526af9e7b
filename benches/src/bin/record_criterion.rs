//! Writes one criterion run as a dated JSON file that figures can be published from:
//! `./dev bench --record FILE` runs every bench, then this.
//!
//! ```text
//! record_criterion --since STAMP --command CMD --out FILE [--criterion-dir DIR]
//! ```
//!
//! The run's benches are those whose `new/sample.json` was written after the file `STAMP`
//! (which `./dev` touches just before the run): criterion leaves the directories of earlier
//! runs and of benches a filter skipped, and those must not be recorded. A bench's id is its
//! `new/benchmark.json`'s `full_id`; its samples are criterion's, as nanoseconds per iteration
//! (`times[i] / iters[i]`). `DIR` defaults to `$CRITERION_HOME`, else the `criterion` directory
//! of the target directory this binary was built in (where criterion writes).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Serialize)]
struct Run {
    kind: &'static str,
    commit: String,
    dirty: bool,
    date: String,
    command: String,
    machine: Machine,
    benches: BTreeMap<String, Bench>,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cores: usize,
    cpu: String,
}

#[derive(Serialize)]
struct Bench {
    unit: &'static str,
    samples: Vec<f64>,
    min: f64,
    median: f64,
    max: f64,
}

#[derive(Deserialize)]
struct Sample {
    iters: Vec<f64>,
    times: Vec<f64>,
}

#[derive(Deserialize)]
struct BenchmarkId {
    full_id: String,
}

struct Args {
    since: PathBuf,
    command: String,
    out: PathBuf,
    criterion_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut since, mut command, mut out, mut criterion_dir) = (None, None, None, None);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--since" => since = Some(PathBuf::from(value()?)),
            "--command" => command = Some(value()?),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--criterion-dir" => criterion_dir = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(Args {
        since: since.ok_or("--since STAMP is required")?,
        command: command.ok_or("--command CMD is required")?,
        out: out.ok_or("--out FILE is required")?,
        criterion_dir,
    })
}

fn criterion_dir(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(d) = given.or_else(|| std::env::var_os("CRITERION_HOME").map(PathBuf::from)) {
        return Ok(d);
    }
    // <target>/<profile>/record_criterion
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no target directory above this binary")?;
    Ok(target.join("criterion"))
}

/// Every `new/sample.json` under `dir` modified at or after `since`.
fn samples_since(dir: &Path, since: SystemTime, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_dir() {
            samples_since(&path, since, out)?;
        } else if path.ends_with("new/sample.json") {
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if modified >= since {
                out.push(path);
            }
        }
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn bench(sample_json: &Path) -> Result<(String, Bench), String> {
    let dir = sample_json.parent().expect("new/");
    let id: BenchmarkId = read_json(&dir.join("benchmark.json"))?;
    let s: Sample = read_json(sample_json)?;
    if s.iters.len() != s.times.len() || s.iters.is_empty() || s.iters.iter().any(|&i| i <= 0.0) {
        return Err(format!(
            "{}: iters and times do not match",
            sample_json.display()
        ));
    }
    let samples: Vec<f64> = s.times.iter().zip(&s.iters).map(|(t, i)| t / i).collect();
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Ok((
        id.full_id,
        Bench {
            unit: "ns",
            min: sorted[0],
            median,
            max: sorted[n - 1],
            samples,
        },
    ))
}

fn git(args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .output()
        .map_err(|e| format!("git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        kernel,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let started = std::fs::metadata(&args.since)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", args.since.display()))?;
    let dir = criterion_dir(args.criterion_dir)?;
    let mut paths = Vec::new();
    samples_since(&dir, started, &mut paths)?;
    if paths.is_empty() {
        return Err(format!(
            "no bench of this run in {} (no new/sample.json written since {})",
            dir.display(),
            args.since.display()
        ));
    }
    let mut benches = BTreeMap::new();
    for p in &paths {
        let (id, b) = bench(p)?;
        if benches.insert(id.clone(), b).is_some() {
            return Err(format!("bench {id} twice"));
        }
    }
    let run = Run {
        kind: "criterion",
        commit: git(&["rev-parse", "HEAD"])?,
        dirty: !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty(),
        date: rfc3339(started),
        command: args.command,
        machine: machine(),
        benches,
    };
    let mut text = serde_json::to_string_pretty(&run).map_err(|e| e.to_string())?;
    text.push('\n');
    std::fs::write(&args.out, text).map_err(|e| format!("{}: {e}", args.out.display()))?;
    eprintln!(
        "record_criterion: {} benches of the run started {} written to {}",
        run.benches.len(),
        run.date,
        args.out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("record_criterion: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_402_999), "2026-12-04T16:49:59Z");
    }
}
