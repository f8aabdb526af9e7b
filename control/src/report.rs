//! Worker counters as JSON (the `--stats-file`), and back.

use podwire_dataplane::pipeline::DropReason;
use podwire_dataplane::stats::{Counter, LocalStats};
use serde_json::{json, Map, Value};

fn stats_object(s: &LocalStats) -> Value {
    let mut obj = Map::new();
    for c in Counter::ALL {
        obj.insert(c.as_str().to_string(), json!(s.counter(c)));
    }
    let drops: Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(s.drops(*r))))
        .collect();
    obj.insert("drops".to_string(), Value::Object(drops));
    Value::Object(obj)
}

/// `{"workers": [..], "total": {..}}` with every counter and every drop reason.
pub fn stats_json(workers: &[LocalStats]) -> Value {
    let mut total = LocalStats::default();
    for w in workers {
        total.merge(w);
    }
    json!({
        "workers": workers.iter().map(stats_object).collect::<Vec<_>>(),
        "total": stats_object(&total),
    })
}

/// Reads the `total` section of a stats document back.
pub fn total_from_json(v: &Value) -> Option<LocalStats> {
    let t = v.get("total")?;
    let mut s = LocalStats::default();
    for c in Counter::ALL {
        s.counters[c as usize] = t.get(c.as_str())?.as_u64()?;
    }
    for r in DropReason::ALL {
        s.drops[r as usize] = t.get("drops")?.get(r.as_str())?.as_u64()?;
    }
    Some(s)
}

/// Writes `v` to `path` atomically (a temporary file beside it, never through a symlink, then
/// renamed over it). Mode 0644: counters and drop reasons hold no secrets, and a monitoring
/// agent that does not run as root reads them.
pub fn write_json(path: &std::path::Path, v: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    crate::atomic_file::write(path, &tmp, &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_round_trip() {
        let mut a = LocalStats::default();
        a.add(Counter::RxTun, 5);
        a.drop(DropReason::UnknownPeer);
        let mut b = LocalStats::default();
        b.add(Counter::RxTun, 1);
        let v = stats_json(&[a, b]);
        let t = total_from_json(&v).unwrap();
        assert_eq!(t.counter(Counter::RxTun), 6);
        assert_eq!(t.drops(DropReason::UnknownPeer), 1);
        assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn test_a_symlink_at_the_temporary_name_is_not_followed() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("podwire-stats-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.join("stats.json");
        std::os::unix::fs::symlink(&victim, dir.join("stats.tmp")).unwrap();
        let v = stats_json(&[LocalStats::default()]);
        write_json(&path, &v).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        let written = std::fs::symlink_metadata(&path).unwrap();
        assert!(written.is_file());
        assert_eq!(written.mode() & 0o777, 0o644);
        let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, v);
        // Written again over its previous self (the temporary name is free again).
        write_json(&path, &v).unwrap();
        assert!(!dir.join("stats.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
