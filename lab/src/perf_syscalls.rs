//! System calls made on the whole machine while a stream runs, by family: `perf stat -a` over
//! the kernel's `syscalls:sys_enter_*` tracepoints (every thread, the pods' included, so the
//! kernel's path and podwire's are counted alike).
//!
//! The families are the ones the datapaths use to move packets and to wait; `all` counts every
//! system call (`raw_syscalls:sys_enter`), and `context switches` the scheduler's.

use std::collections::BTreeMap;
use thiserror::Error;

/// The tracepoints counted: (perf event, family name in the run file).
pub const EVENTS: &[(&str, &str)] = &[
    ("raw_syscalls:sys_enter", "all"),
    ("syscalls:sys_enter_read", "read"),
    ("syscalls:sys_enter_write", "write"),
    ("syscalls:sys_enter_readv", "readv"),
    ("syscalls:sys_enter_writev", "writev"),
    ("syscalls:sys_enter_sendto", "sendto"),
    ("syscalls:sys_enter_sendmsg", "sendmsg"),
    ("syscalls:sys_enter_sendmmsg", "sendmmsg"),
    ("syscalls:sys_enter_recvfrom", "recvfrom"),
    ("syscalls:sys_enter_recvmsg", "recvmsg"),
    ("syscalls:sys_enter_recvmmsg", "recvmmsg"),
    ("syscalls:sys_enter_epoll_wait", "epoll_wait"),
    ("syscalls:sys_enter_epoll_pwait", "epoll_pwait"),
    ("syscalls:sys_enter_poll", "poll"),
    ("syscalls:sys_enter_futex", "futex"),
    ("context-switches", "context switches"),
];

#[derive(Debug, Error, PartialEq)]
pub enum StatError {
    #[error("perf stat printed no count for {0}")]
    Missing(&'static str),
    #[error("perf stat could not count {event}: {value}")]
    NotCounted { event: &'static str, value: String },
}

/// The `-e` argument for [`EVENTS`].
pub fn event_list() -> String {
    EVENTS.iter().map(|(e, _)| *e).collect::<Vec<_>>().join(",")
}

/// Parses `perf stat -x,` output (count, unit, event, ...; one line per event) into counts by
/// family. Every event must have a count: a tracepoint perf could not count is an error, not 0.
pub fn parse(perf_stat_csv: &str) -> Result<BTreeMap<String, u64>, StatError> {
    let mut out = BTreeMap::new();
    for &(event, family) in EVENTS {
        let line = perf_stat_csv
            .lines()
            .find(|l| l.split(',').nth(2) == Some(event))
            .ok_or(StatError::Missing(event))?;
        let value = line.split(',').next().unwrap_or_default();
        let n = value.parse::<u64>().map_err(|_| StatError::NotCounted {
            event,
            value: value.to_string(),
        })?;
        out.insert(family.to_string(), n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(skip: Option<&str>, bad: Option<&str>) -> String {
        EVENTS
            .iter()
            .filter(|(e, _)| Some(*e) != skip)
            .enumerate()
            .map(|(i, (e, _))| {
                let count = if Some(*e) == bad {
                    "<not supported>".to_string()
                } else {
                    (i * 10).to_string()
                };
                format!("{count},,{e},2000512345,100.00,,\n")
            })
            .collect()
    }

    #[test]
    fn test_every_family_is_read() {
        let counts = parse(&csv(None, None)).unwrap();
        assert_eq!(counts.len(), EVENTS.len());
        assert_eq!(counts["all"], 0);
        assert_eq!(counts["read"], 10);
        assert_eq!(counts["context switches"], 10 * (EVENTS.len() - 1) as u64);
    }

    #[test]
    fn test_a_missing_or_uncounted_event_is_an_error() {
        assert_eq!(
            parse(&csv(Some("syscalls:sys_enter_write"), None)),
            Err(StatError::Missing("syscalls:sys_enter_write"))
        );
        assert!(matches!(
            parse(&csv(None, Some("syscalls:sys_enter_recvmmsg"))),
            Err(StatError::NotCounted { .. })
        ));
    }
}
