//! Figures in README.md and docs/ rendered from committed run files, never typed by hand.
//!
//! A figure is written between two markers naming its run file (under `docs/bench/`) and what
//! to take from it:
//!
//! ```text
//! <!-- fig docs/bench/e2e-2026-12-03.json#podwire-vxlan/tcp_1_stream -->4677 Mbit/s<!-- /fig -->
//! ```
//!
//! `podwire-lab figures` rewrites what is between the markers; `podwire-lab figures --check` (and a
//! test) fails when a document differs from what its run files render. A run file must say
//! where it came from (commit, date, command, machine) and come from a clean tree.
//!
//! Keys of an end-to-end run file (`podwire-lab bench --out`): `table` (medians, ratios to kernel
//! VXLAN, min-max), `rate-table` (offered, delivered, loss and no-drop rate, beside the
//! generator's ceiling), `source` (date, commit, command, machine), `MODE/WORKLOAD` (a median
//! and its unit), `MODE/WORKLOAD/ratio`, `af_xdp/MODE/FIELD`. Keys of a criterion run file
//! (`./dev bench --record`): `BENCH-ID` (the median per iteration), `BENCH-ID/range`, either
//! with `/per/N` (an iteration of N operations, as the time of one), `source`. Keys of a
//! profile run file (`podwire-lab profile --out`): `threads` (samples by thread, share of all),
//! `split` (the workers' samples by where they entered the kernel, share of the workers' and of
//! all), `symbols/N` (the workers' N most sampled userspace symbols), `tcp` (the stream's rate
//! while profiled), `syscalls` (the machine's system calls by family, per second and per MB
//! moved), `source`.

use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;

const OPEN: &str = "<!-- fig ";
const OPEN_END: &str = " -->";
const CLOSE: &str = "<!-- /fig -->";
/// Where run files live, relative to the repository root.
pub const RUN_DIR: &str = "docs/bench/";

#[derive(Debug, Error)]
pub enum FigureError {
    #[error("{doc}: a figure marker at byte {at} is not closed with {CLOSE}")]
    Unclosed { doc: String, at: usize },
    #[error("{doc}: marker {marker:?} wants PATH#KEY with PATH under {RUN_DIR}")]
    BadMarker { doc: String, marker: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: no dated source: {what}")]
    Undated { path: String, what: String },
    #[error("{path}: no figure {key:?} in it")]
    UnknownKey { path: String, key: String },
}

/// A figure's value as text: 3 significant figures at most, no trailing noise.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// Run files read so far, by path.
struct RunFiles<'a> {
    root: &'a Path,
    cache: HashMap<String, Value>,
}

impl RunFiles<'_> {
    fn get(&mut self, path: &str) -> Result<&Value, FigureError> {
        if !self.cache.contains_key(path) {
            let full = self.root.join(path);
            let text = std::fs::read(&full).map_err(|source| FigureError::Read {
                path: full.clone(),
                source,
            })?;
            let doc: Value = serde_json::from_slice(&text)
                .map_err(|source| FigureError::Json { path: full, source })?;
            check_source(path, &doc)?;
            self.cache.insert(path.to_string(), doc);
        }
        Ok(&self.cache[path])
    }
}

/// A run file must say what produced it, and from a clean tree.
fn check_source(path: &str, doc: &Value) -> Result<(), FigureError> {
    let undated = |what: &str| FigureError::Undated {
        path: path.to_string(),
        what: what.to_string(),
    };
    let commit = doc["commit"].as_str().unwrap_or("");
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(undated("no commit"));
    }
    if doc["dirty"] != Value::Bool(false) {
        return Err(undated("measured on a tree with uncommitted changes"));
    }
    let date = doc["date"].as_str().unwrap_or("");
    if date.len() < 10
        || !date.as_bytes()[..10]
            .iter()
            .all(|b| b.is_ascii_digit() || *b == b'-')
    {
        return Err(undated("no date"));
    }
    if doc["command"].as_str().is_none_or(str::is_empty) {
        return Err(undated("no command"));
    }
    if doc["machine"]["kernel"].as_str().is_none_or(str::is_empty)
        || doc["machine"]["cores"].as_u64().is_none()
    {
        return Err(undated("no machine"));
    }
    Ok(())
}

/// Renders every marker of `text` (the document `doc_name`) from run files under `root`.
pub fn render(text: &str, doc_name: &str, root: &Path) -> Result<String, FigureError> {
    let mut files = RunFiles {
        root,
        cache: HashMap::new(),
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let at = text.len() - rest.len() + start;
        let unclosed = || FigureError::Unclosed {
            doc: doc_name.to_string(),
            at,
        };
        let head_end = rest[start..].find(OPEN_END).ok_or_else(unclosed)? + start;
        let marker = &rest[start + OPEN.len()..head_end];
        let body_start = head_end + OPEN_END.len();
        let close = rest[body_start..].find(CLOSE).ok_or_else(unclosed)? + body_start;
        let (path, key) = marker
            .split_once('#')
            .filter(|(p, k)| p.starts_with(RUN_DIR) && !p.contains("..") && !k.is_empty())
            .ok_or_else(|| FigureError::BadMarker {
                doc: doc_name.to_string(),
                marker: marker.to_string(),
            })?;
        let run = files.get(path)?;
        let figure = figure(run, key).ok_or_else(|| FigureError::UnknownKey {
            path: path.to_string(),
            key: key.to_string(),
        })?;
        out.push_str(&rest[..body_start]);
        out.push_str(&figure);
        out.push_str(CLOSE);
        rest = &rest[close + CLOSE.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One figure of a run file.
fn figure(run: &Value, key: &str) -> Option<String> {
    if key == "source" {
        return Some(source_line(run));
    }
    match run["kind"].as_str()? {
        "e2e" => e2e_figure(run, key),
        "criterion" => criterion_figure(run, key),
        "profile" => profile_figure(run, key),
        "services" => services_figure(run, key),
        _ => None,
    }
}

/// Keys of a services run file: `table` (connect time, update latency and, where measured,
/// established throughput per side and size), `SIDE/SIZE/FIELD` (`connect_p50_us`,
/// `connect_p99_us`, `update_p50_ms`, `update_p99_ms`, `direct_connect_p50_us`,
/// `direct_connect_p99_us`, `stream_mbit_s`).
fn services_figure(run: &Value, key: &str) -> Option<String> {
    if key == "table" {
        return Some(markdown(&services_table(run)?));
    }
    let mut parts = key.splitn(3, '/');
    let (side, size, field) = (parts.next()?, parts.next()?, parts.next()?);
    let size: u64 = size.parse().ok()?;
    let r = run["results"]
        .as_array()?
        .iter()
        .find(|r| r["side"] == side && r["services"].as_u64() == Some(size))?;
    let unit = match field {
        f if f.ends_with("_us") => "µs",
        f if f.ends_with("_mbit_s") => "Mbit/s",
        _ => "ms",
    };
    Some(format!("{} {unit}", number(r[field].as_f64()?)))
}

fn services_table(run: &Value) -> Option<Table> {
    // Runs before 2026-12-07 measured no stream.
    let streams = run["results"]
        .as_array()?
        .iter()
        .any(|r| r.get("stream_mbit_s").is_some());
    let mut header = vec![
        cell("side"),
        cell("services"),
        cell("connect p50"),
        cell("connect p99"),
        cell("update p50"),
        cell("update p99"),
    ];
    if streams {
        header.push(cell("direct connect p50"));
        header.push(cell("direct connect p99"));
        header.push(cell("stream"));
    }
    let mut rows = vec![header];
    for r in run["results"].as_array()? {
        let f = |k: &str, unit: &str| {
            cell(format!(
                "{} {unit}",
                number(r[k].as_f64().unwrap_or(f64::NAN))
            ))
        };
        rows.push(vec![
            cell(r["side"].as_str()?),
            cell(r["services"].to_string()),
            f("connect_p50_us", "µs"),
            f("connect_p99_us", "µs"),
            f("update_p50_ms", "ms"),
            f("update_p99_ms", "ms"),
        ]);
        if streams {
            let row = rows.last_mut()?;
            row.push(f("direct_connect_p50_us", "µs"));
            row.push(f("direct_connect_p99_us", "µs"));
            row.push(f("stream_mbit_s", "Mbit/s"));
        }
    }
    Some(rows)
}

/// The services table as aligned text, for the terminal.
pub fn services_text(run: &Value) -> Option<String> {
    Some(text(&services_table(run)?))
}

fn profile_figure(run: &Value, key: &str) -> Option<String> {
    let split = &run["split"];
    let all = split["samples"].as_f64().filter(|n| *n > 0.0)?;
    match key.split_once('/') {
        None if key == "tcp" => Some(format!("{} Mbit/s", number(run["tcp_mbps"].as_f64()?))),
        None if key == "threads" => {
            let rows = counts_table("thread", &split["threads"], &[("of all samples", all)])?;
            Some(markdown(&rows))
        }
        None if key == "split" => {
            let workers = split["threads"]["podwire workers"]
                .as_f64()
                .filter(|n| *n > 0.0)?;
            let rows = counts_table(
                "where the workers' time went",
                &split["workers"],
                &[("of the workers'", workers), ("of all samples", all)],
            )?;
            Some(markdown(&rows))
        }
        None if key == "syscalls" => syscalls_table(run).map(|rows| markdown(&rows)),
        Some(("symbols", n)) => {
            let n: usize = n.parse().ok().filter(|n| *n > 0)?;
            let workers = split["threads"]["podwire workers"]
                .as_f64()
                .filter(|n| *n > 0.0)?;
            let mut rows = counts_table(
                "workers' userspace symbol",
                &split["worker_symbols"],
                &[("of the workers'", workers)],
            )?;
            rows.truncate(n + 1);
            for row in rows.iter_mut().skip(1) {
                row[0].0 = format!("`{}`", row[0].0.replace('`', ""));
            }
            Some(markdown(&rows))
        }
        _ => None,
    }
}

/// A profile's system calls on the whole machine by family, most first: per second, and per
/// megabyte the stream moved. Families never called are left out.
fn syscalls_table(run: &Value) -> Option<Table> {
    let seconds = run["seconds"].as_f64().filter(|s| *s > 0.0)?;
    let mb_per_s = run["tcp_mbps"].as_f64().filter(|r| *r > 0.0)? / 8.0;
    let mut entries: Vec<(&String, f64)> = run["syscalls"]
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k, v.as_f64()?)))
        .collect::<Option<_>>()?;
    entries.retain(|(_, n)| *n > 0.0);
    if entries.is_empty() {
        return None;
    }
    entries.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut rows = vec![vec![
        cell("system calls, whole machine"),
        cell("per second"),
        cell("per MB moved"),
    ]];
    for (name, n) in entries {
        let per_s = n / seconds;
        rows.push(vec![
            cell(name.as_str()),
            cell(format!("{per_s:.0}")),
            cell(format!("{:.1}", per_s / mb_per_s)),
        ]);
    }
    Some(rows)
}

/// A table of the counts in `counts` (name -> samples), most first, with each count's share
/// of every denominator in `shares`.
fn counts_table(what: &str, counts: &Value, shares: &[(&str, f64)]) -> Option<Table> {
    let mut entries: Vec<(&String, f64)> = counts
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k, v.as_f64()?)))
        .collect::<Option<_>>()?;
    if entries.is_empty() {
        return None;
    }
    entries.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut header = vec![cell(what), cell("samples")];
    header.extend(shares.iter().map(|(name, _)| cell(*name)));
    let mut rows = vec![header];
    for (name, n) in entries {
        let mut row = vec![cell(name.as_str()), cell(format!("{n:.0}"))];
        row.extend(
            shares
                .iter()
                .map(|(_, of)| cell(format!("{:.1}%", 100.0 * n / of))),
        );
        rows.push(row);
    }
    Some(rows)
}

/// "2026-12-03, commit 1234567, `command`, kernel K, N cores (CPU)".
fn source_line(run: &Value) -> String {
    let m = &run["machine"];
    format!(
        "run of {} on commit `{}` (`{}`), kernel {}, {} cores ({})",
        run["date"].as_str().unwrap_or("?").get(..10).unwrap_or("?"),
        run["commit"]
            .as_str()
            .unwrap_or("?")
            .get(..10)
            .unwrap_or("?"),
        run["command"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
    )
}

fn criterion_figure(run: &Value, key: &str) -> Option<String> {
    // `ID/per/N`: a bench whose iteration does N operations, as the time of one.
    let (key, per) = match key.rsplit_once("/per/") {
        Some((id, n)) => (id, n.parse::<f64>().ok().filter(|n| *n > 0.0)?),
        None => (key, 1.0),
    };
    let (id, range) = match key.strip_suffix("/range") {
        Some(id) => (id, true),
        None => (key, false),
    };
    let b = run["benches"].get(id)?;
    let unit = b["unit"].as_str()?;
    let at = |field: &str| Some(number(b[field].as_f64()? / per));
    if range {
        Some(format!("{}-{} {unit}", at("min")?, at("max")?))
    } else {
        Some(format!("{} {unit}", at("median")?))
    }
}

fn result<'a>(run: &'a Value, mode: &str, workload: &str) -> Option<&'a Value> {
    run["results"]
        .as_array()?
        .iter()
        .find(|r| r["mode"] == mode && r["workload"] == workload)
}

fn e2e_figure(run: &Value, key: &str) -> Option<String> {
    match key {
        "table" => return Some(markdown(&e2e_table(run)?)),
        "rate-table" => return Some(markdown(&rate_table(run)?)),
        _ => {}
    }
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["af_xdp", mode, field] => Some(number(run["af_xdp"][*mode][*field].as_f64()?)),
        [mode, workload] => {
            let r = result(run, mode, workload)?;
            Some(format!(
                "{} {}",
                number(r["median"].as_f64()?),
                r["unit"].as_str()?
            ))
        }
        [mode, workload, "ratio"] => {
            let r = result(run, mode, workload)?;
            r["ratio_to_kernel_vxlan"]
                .as_f64()
                .map(|x| format!("{x:.2}x"))
        }
        _ => None,
    }
}

/// A table: header row, then rows; a cell may have a second, smaller line (the spread).
type Table = Vec<Vec<(String, Option<String>)>>;

fn cell(s: impl Into<String>) -> (String, Option<String>) {
    (s.into(), None)
}

fn spread(r: &Value) -> Option<String> {
    Some(format!(
        "{}-{}",
        number(r["min"].as_f64()?),
        number(r["max"].as_f64()?)
    ))
}

/// Medians (ratio to kernel VXLAN) of every workload in every mode, min-max under each.
fn e2e_table(run: &Value) -> Option<Table> {
    let modes: Vec<&str> = run["modes"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut header = vec![cell("workload")];
    header.extend(modes.iter().map(|m| cell(format!("`{m}`"))));
    let mut rows = vec![header];
    for w in run["workloads"].as_array()? {
        let name = w["name"].as_str()?;
        let mut row = vec![cell(w["label"].as_str()?)];
        for m in &modes {
            let r = result(run, m, name)?;
            let mut main = number(r["median"].as_f64()?);
            if w["has_ratio"] == Value::Bool(true) {
                let _ = write!(main, " ({})", ratio(&r["ratio_to_kernel_vxlan"]));
            }
            row.push((main, spread(r)));
        }
        rows.push(row);
    }
    Some(rows)
}

/// Per mode and for the generator's ceiling: the unpaced trial's offered, delivered and loss,
/// the no-drop rate, and the delivered rate as a share of the ceiling's.
fn rate_table(run: &Value) -> Option<Table> {
    let mut modes: Vec<&str> = run["modes"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    modes.push("generator-ceiling");
    let ceiling = result(run, "generator-ceiling", "udp_64b_delivered")?["median"].as_f64()?;
    let mut rows = vec![[
        "mode",
        "offered, kpps",
        "delivered, kpps",
        "loss, %",
        "no-drop rate, kpps",
        "delivered / ceiling's",
        "limited by",
    ]
    .map(cell)
    .to_vec()];
    for m in modes {
        let get = |w: &str| result(run, m, w);
        let (off, del, loss, ndr) = (
            get("udp_64b_max_offered")?,
            get("udp_64b_delivered")?,
            get("udp_64b_loss")?,
            get("udp_64b_ndr")?,
        );
        let del_median = del["median"].as_f64()?;
        let name = if m == "generator-ceiling" {
            "generator's ceiling (one veth, no forwarding)".to_string()
        } else {
            format!("`{m}`")
        };
        rows.push(vec![
            cell(name),
            (number(off["median"].as_f64()?), spread(off)),
            (number(del_median), spread(del)),
            (format!("{:.2}", loss["median"].as_f64()?), None),
            (number(ndr["median"].as_f64()?), spread(ndr)),
            cell(if ceiling > 0.0 {
                format!("{:.2}", del_median / ceiling)
            } else {
                "-".into()
            }),
            // No loss at the generator's full rate: the sending side (the generator, with the
            // path's work done in its own context) is the limit; loss: a queue on the path.
            cell(if loss["median"].as_f64()? <= 0.1 {
                "sender"
            } else {
                "path (loss)"
            }),
        ]);
    }
    Some(rows)
}

/// The table as Markdown, the spread as a second line in small type. Starts and ends with a
/// newline so the markers sit on lines of their own.
fn markdown(t: &Table) -> String {
    let mut s = String::from("\n");
    for (i, row) in t.iter().enumerate() {
        s.push('|');
        for (main, sub) in row {
            match sub {
                Some(sub) => {
                    let _ = write!(s, " {main}<br><sub>{sub}</sub> |");
                }
                None => {
                    let _ = write!(s, " {main} |");
                }
            }
        }
        s.push('\n');
        if i == 0 {
            s.push('|');
            s.push_str(&"---|".repeat(row.len()));
            s.push('\n');
        }
    }
    s
}

/// The table as aligned text for a terminal, the spread in brackets.
fn text(t: &Table) -> String {
    let cells: Vec<Vec<String>> = t
        .iter()
        .map(|row| {
            row.iter()
                .map(|(main, sub)| match sub {
                    Some(sub) => format!("{main} [{sub}]"),
                    None => main.replace('`', ""),
                })
                .collect()
        })
        .collect();
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            cells
                .iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for row in &cells {
        for (c, v) in row.iter().enumerate() {
            let _ = write!(s, "{v:<w$}  ", w = widths[c]);
        }
        s.push('\n');
    }
    s
}

/// What `podwire-lab bench` prints at the end: the source and both tables of its run file.
pub fn e2e_text(run: &Value) -> Option<String> {
    Some(format!(
        "{}; medians of {} rounds [min-max], (ratio to kernel-vxlan)\n\n{}\npacket rate, 64-byte datagrams, no-drop rate = the highest offered rate with loss <= {}%:\n\n{}",
        source_line(run),
        run["rounds"],
        text(&e2e_table(run)?),
        run["ndr_loss"].as_f64()? * 100.0,
        text(&rate_table(run)?)
    ))
}

/// The documents figures may appear in: README.md and every Markdown file under docs/.
pub fn documents(root: &Path) -> Vec<PathBuf> {
    let mut docs = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                docs.push(p);
            }
        }
    }
    docs.sort();
    docs
}

/// Renders every document under `root`: (path, its text now, what it should be).
pub fn render_all(root: &Path) -> Result<Vec<(PathBuf, String, String)>, FigureError> {
    documents(root)
        .into_iter()
        .map(|p| {
            let now = std::fs::read_to_string(&p).map_err(|source| FigureError::Read {
                path: p.clone(),
                source,
            })?;
            let name = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let want = render(&now, &name, root)?;
            Ok((p, now, want))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run_dir() -> (tempfile_dir::Dir, PathBuf) {
        let d = tempfile_dir::Dir::new();
        let root = d.0.clone();
        std::fs::create_dir_all(root.join(RUN_DIR)).unwrap();
        (d, root)
    }

    /// A temporary directory removed on drop (no crate for one use).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "podwire-figures-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn criterion_run() -> Value {
        json!({
            "kind": "criterion",
            "commit": "0123456789abcdef0123456789abcdef01234567",
            "dirty": false,
            "date": "2026-12-03T16:50:00Z",
            "command": "./dev bench --record x.json",
            "machine": {"kernel": "6.18", "cores": 2, "cpu": "test cpu"},
            "benches": {"route/lookup/10000": {"unit": "ns", "samples": [2.0, 2.31, 3.0],
                        "min": 2.0, "median": 2.31, "max": 3.0}}
        })
    }

    #[test]
    fn test_renders_and_fails_on_bad_sources() {
        let (_d, root) = run_dir();
        let file = root.join("docs/bench/c.json");
        std::fs::write(&file, criterion_run().to_string()).unwrap();
        let doc = "a <!-- fig docs/bench/c.json#route/lookup/10000 -->9 ns<!-- /fig --> b \
                   <!-- fig docs/bench/c.json#route/lookup/10000/range --><!-- /fig -->";
        assert_eq!(
            render(doc, "d.md", &root).unwrap(),
            "a <!-- fig docs/bench/c.json#route/lookup/10000 -->2.31 ns<!-- /fig --> b \
             <!-- fig docs/bench/c.json#route/lookup/10000/range -->2.00-3.00 ns<!-- /fig -->"
        );
        let fails = |doc: &str| render(doc, "d.md", &root).unwrap_err().to_string();
        assert_eq!(
            render(
                "<!-- fig docs/bench/c.json#route/lookup/10000/per/10 --><!-- /fig -->",
                "d.md",
                &root
            )
            .unwrap(),
            "<!-- fig docs/bench/c.json#route/lookup/10000/per/10 -->0.231 ns<!-- /fig -->"
        );
        assert!(fails("<!-- fig docs/bench/c.json#nope -->x<!-- /fig -->").contains("no figure"));
        assert!(
            fails("<!-- fig docs/bench/c.json#route/lookup/10000/per/0 -->x<!-- /fig -->")
                .contains("no figure")
        );
        assert!(fails("<!-- fig docs/bench/c.json#route/lookup/10000 -->x").contains("not closed"));
        assert!(fails("<!-- fig /etc/passwd#x --><!-- /fig -->").contains("PATH#KEY"));
        assert!(fails("<!-- fig docs/bench/gone.json#x --><!-- /fig -->").contains("reading"));
        for (field, bad, says) in [
            ("dirty", json!(true), "uncommitted"),
            ("commit", json!("unknown"), "no commit"),
            ("date", json!(""), "no date"),
            ("command", Value::Null, "no command"),
            ("machine", json!({}), "no machine"),
        ] {
            let mut run = criterion_run();
            run[field] = bad;
            std::fs::write(&file, run.to_string()).unwrap();
            let err = fails("<!-- fig docs/bench/c.json#route/lookup/10000 --><!-- /fig -->");
            assert!(err.contains(says), "{field}: {err}");
        }
    }

    #[test]
    fn test_profile_split_is_rendered_as_shares() {
        let (_d, root) = run_dir();
        let mut run = criterion_run();
        run["kind"] = json!("profile");
        run["tcp_mbps"] = json!(3964.07);
        run["split"] = json!({"samples": 200,
            "threads": {"podwire workers": 100, "idle": 100},
            "workers": {"userspace": 25, "UDP send": 75},
            "worker_symbols": {"memmove": 3, "l4_sum": 5, "x`y": 1}});
        std::fs::write(root.join("docs/bench/p.json"), run.to_string()).unwrap();
        let fig = |key: &str| {
            let doc = format!("<!-- fig docs/bench/p.json#{key} --><!-- /fig -->");
            render(&doc, "d.md", &root).map(|out| out.replace(&doc[..doc.len() - 13], ""))
        };
        let split = fig("split").unwrap();
        // Most first; shares of the workers' 100 and of all 200 samples.
        let send = split.find("| UDP send | 75 | 75.0% | 37.5% |").unwrap();
        let user = split.find("| userspace | 25 | 25.0% | 12.5% |").unwrap();
        assert!(send < user, "{split}");
        let symbols = fig("symbols/2").unwrap();
        assert!(symbols.contains("| `l4_sum` | 5 | 5.0% |"), "{symbols}");
        assert!(!symbols.contains("x"), "only the top 2: {symbols}");
        assert!(fig("tcp").unwrap().starts_with("3964 Mbit/s"));
        assert!(fig("threads").unwrap().contains("| idle | 100 | 50.0% |"));
        run["seconds"] = json!(2);
        run["tcp_mbps"] = json!(8000.0);
        run["syscalls"] = json!({"all": 4000, "read": 1000, "sendto": 0});
        std::fs::write(root.join("docs/bench/p.json"), run.to_string()).unwrap();
        let calls = fig("syscalls").unwrap();
        assert!(calls.contains("| all | 2000 | 2.0 |"), "{calls}");
        assert!(calls.contains("| read | 500 | 0.5 |"), "{calls}");
        assert!(!calls.contains("sendto"), "never called: {calls}");
        // A profile without worker samples (the kernel's) has no split; N must be a count.
        run["split"]["workers"] = json!({});
        std::fs::write(root.join("docs/bench/p.json"), run.to_string()).unwrap();
        for key in ["split", "symbols/0", "symbols/x", "nope"] {
            assert!(
                fig(key).unwrap_err().to_string().contains("no figure"),
                "{key}"
            );
        }
    }

    #[test]
    fn test_numbers() {
        assert_eq!(number(4677.4), "4677");
        assert_eq!(number(25.54), "25.5");
        assert_eq!(number(2.314), "2.31");
        assert_eq!(number(0.4321), "0.432");
        assert_eq!(number(0.0), "0");
    }
}
