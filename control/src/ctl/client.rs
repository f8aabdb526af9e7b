//! `podwire ctl`'s side: one request per connection, its answer read back.

use super::protocol::{CaptureRequest, Captured, Request, Response};
use super::CtlError;
use serde::Serialize;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Asks the daemon at `path` and returns its answer, typed.
pub fn call(path: &Path, req: &Request) -> Result<Response, CtlError> {
    let v = request(path, req)?;
    Response::decode(req, v).map_err(|e| CtlError::Answer(e.to_string()))
}

/// Sends one request to the daemon at `path` and returns its answer as JSON (for scripts and
/// the lab, which read fields by name); a refusal is [`CtlError::Refused`].
pub fn request<R: Serialize + ?Sized>(path: &Path, req: &R) -> Result<Value, CtlError> {
    let connect = |source| CtlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let line = request_line(req)?;
    let mut s = UnixStream::connect(path).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(connect)?;
    s.write_all(line.as_bytes()).map_err(connect)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(connect)?;
    answer(&line)
}

/// `podwire ctl capture`: asks the daemon at `socket` for a capture and writes the pcap it
/// sends to `path`, created (mode 0600 less the umask, or truncated) by the caller, not by the
/// daemon.
pub fn capture(socket: &Path, req: &CaptureRequest, path: &Path) -> Result<Captured, CtlError> {
    let v = capture_to_file(socket, &Request::Capture(req.clone()), path)?;
    serde_json::from_value(v).map_err(|e| CtlError::Answer(e.to_string()))
}

/// [`capture`] for a request as JSON (`port`, `count`, `timeout_ms`); returns the daemon's JSON
/// line with `path`.
pub fn capture_to_file<R: Serialize + ?Sized>(
    socket: &Path,
    req: &R,
    path: &Path,
) -> Result<Value, CtlError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_err = |source| CtlError::File {
        path: path.to_path_buf(),
        source,
    };
    let connect = |source| CtlError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let line = request_line(req)?;
    let wait = serde_json::from_str::<Request>(&line)
        .ok()
        .and_then(|r| match r {
            Request::Capture(c) => Some(Duration::from_millis(c.timeout_ms)),
            _ => None,
        })
        .unwrap_or(Duration::from_secs(10));
    // Before asking: a path that cannot be written fails now, not after the wait.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    let mut s = UnixStream::connect(socket).map_err(connect)?;
    s.set_read_timeout(Some(wait + Duration::from_secs(10)))
        .map_err(connect)?;
    s.write_all(line.as_bytes()).map_err(connect)?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).map_err(connect)?;
    let mut v = answer(&head)?;
    let len = v["pcap_bytes"]
        .as_u64()
        .ok_or_else(|| CtlError::Answer(format!("no pcap_bytes in {v}")))?;
    let mut w = std::io::BufWriter::new(file);
    let copied = std::io::copy(&mut r.take(len), &mut w).map_err(connect)?;
    if copied != len {
        return Err(CtlError::Answer(format!(
            "the capture was cut short: {copied} of {len} bytes"
        )));
    }
    w.flush().map_err(file_err)?;
    v["path"] = Value::from(path.display().to_string());
    Ok(v)
}

/// A request as the line the daemon reads.
fn request_line<R: Serialize + ?Sized>(req: &R) -> Result<String, CtlError> {
    let mut line = serde_json::to_string(req).map_err(|e| CtlError::Request(e.to_string()))?;
    line.push('\n');
    Ok(line)
}

/// An answer line: the answer, or the daemon's refusal.
fn answer(line: &str) -> Result<Value, CtlError> {
    let v: Value = serde_json::from_str(line).map_err(|e| CtlError::Answer(e.to_string()))?;
    if let Some(e) = v["error"].as_str() {
        return Err(CtlError::Refused(e.to_string()));
    }
    Ok(v)
}
