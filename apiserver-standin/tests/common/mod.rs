//! Test helpers: a started stand-in, objects, and a small HTTP/1.1 client over std's
//! TcpStream that sees exactly what the server sends (status, headers, chunks).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podwire_apiserver_standin::{Config, Handle, Role, StandIn};
use serde_json::Value;

pub const ADMIN: &str = "admin-token";
pub const READER: &str = "reader-token";

/// A stand-in on a free port with an admin and a reader token.
pub fn start(config: Config) -> Handle {
    let config = config
        .with_token(ADMIN, Role::Admin)
        .with_token(READER, Role::Reader);
    StandIn::start("127.0.0.1:0".parse().unwrap(), config).unwrap()
}

/// A node with a name and annotations.
pub fn node(name: &str, annotations: &[(&str, &str)]) -> Node {
    let annotations = annotations
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// A service in `namespace` with labels.
pub fn service(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    let labels = labels
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Service::default()
    }
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A request to send.
#[derive(Debug, Clone, Copy)]
pub struct Req<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub token: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a str,
}

impl<'a> Req<'a> {
    pub fn get(path: &'a str) -> Self {
        Self {
            method: "GET",
            path,
            token: Some(ADMIN),
            content_type: None,
            body: "",
        }
    }

    pub fn patch(path: &'a str, content_type: &'a str, body: &'a str) -> Self {
        Self {
            method: "PATCH",
            path,
            token: Some(ADMIN),
            content_type: Some(content_type),
            body,
        }
    }

    pub fn with(self, method: &'a str, body: &'a str) -> Self {
        Self {
            method,
            body,
            content_type: Some("application/json"),
            ..self
        }
    }

    pub fn token(self, token: Option<&'a str>) -> Self {
        Self { token, ..self }
    }
}

fn send(addr: SocketAddr, request: Req<'_>) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        request.method,
        request.path,
        request.body.len()
    );
    if let Some(token) = request.token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(content_type) = request.content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(request.body.as_bytes()).unwrap();
    BufReader::new(stream)
}

fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let Some((key, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    (status, headers)
}

/// Sends `request` and reads the whole response.
pub fn call(addr: SocketAddr, request: Req<'_>) -> Reply {
    let mut reader = send(addr, request);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers.iter().any(|(key, value)| {
        key.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked")
    });
    let mut body = Vec::new();
    if chunked {
        let mut stream = ChunkReader {
            reader,
            pending: Vec::new(),
        };
        while let Ok(Some(chunk)) = stream.chunk() {
            body.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    };
    Reply {
        status,
        headers,
        body,
    }
}

struct ChunkReader {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
}

impl ChunkReader {
    /// The next chunk; `Ok(None)` at the terminating chunk, `Err` when the connection ends
    /// or times out first.
    fn chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut size = String::new();
        if self.reader.read_line(&mut size)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-stream",
            ));
        }
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk)?;
        chunk.truncate(size);
        Ok((size > 0).then_some(chunk))
    }
}

/// How a watch stream went on.
#[derive(Debug, PartialEq)]
pub enum Next {
    Event(Value),
    /// The terminating chunk: the server ended the stream cleanly.
    End,
    /// The connection ended without it, or nothing came in time.
    Broken(String),
}

/// An open watch.
pub struct Watch {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunks: ChunkReader,
}

impl Watch {
    pub fn open(addr: SocketAddr, path: &str) -> Self {
        let mut reader = send(addr, Req::get(path));
        let (status, headers) = read_head(&mut reader);
        Self {
            status,
            headers,
            chunks: ChunkReader {
                reader,
                pending: Vec::new(),
            },
        }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.chunks
            .reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
    }

    pub fn next(&mut self) -> Next {
        loop {
            if let Some(end) = self.chunks.pending.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.chunks.pending.drain(..=end).collect();
                return Next::Event(serde_json::from_slice(&line).unwrap());
            }
            match self.chunks.chunk() {
                Ok(Some(chunk)) => self.chunks.pending.extend(chunk),
                Ok(None) => return Next::End,
                Err(err) => return Next::Broken(err.to_string()),
            }
        }
    }

    /// The next event, which must be there.
    pub fn event(&mut self) -> Value {
        match self.next() {
            Next::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// `(type, metadata.name)` of an event.
pub fn summary(event: &Value) -> (String, String) {
    (
        event["type"].as_str().unwrap().to_owned(),
        event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
    )
}
