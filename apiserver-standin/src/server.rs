//! The HTTP side: accepting connections, authentication, authorization, routing.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::body::ResponseBody;
use crate::config::{Config, Role};
use crate::counters::Counters;
use crate::handlers;
use crate::kinds::KindTag;
use crate::query::Query;
use crate::route::{Route, Target};
use crate::status::ApiError;
use crate::store::Store;
use crate::verb::Verb;

/// Failures a test asked for: the next `count` requests get `code`.
#[derive(Debug, Default)]
pub struct Faults(Mutex<(u32, u16)>);

impl Faults {
    /// Fails the next `count` requests with `code`.
    pub fn fail_next(&self, count: u32, code: u16) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = (count, code);
    }

    fn take(&self) -> Option<u16> {
        let mut faults = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (faults.0 > 0).then(|| {
            faults.0 -= 1;
            faults.1
        })
    }
}

/// What every connection and watch shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub counters: Arc<Counters>,
    pub faults: Faults,
    /// Bumped to break every open watch stream.
    pub breaks: watch::Sender<u64>,
}

impl Shared {
    /// Shared state for `config`, with an empty store.
    pub fn new(config: Config) -> Self {
        let store = Store::new(config.history_size);
        Self {
            config,
            store,
            counters: Arc::default(),
            faults: Faults::default(),
            breaks: watch::Sender::new(0),
        }
    }
}

/// Serves connections from `listener` until the future is dropped, which also closes every
/// connection it accepted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(respond(&shared, request).await) }
                    });
                    // A connection error (a client gone, a broken watch) ends only this connection.
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A JSON response.
pub fn json_response<T: serde::Serialize>(code: u16, value: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(ResponseBody::Whole(Some(Bytes::from(body))));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn respond(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<ResponseBody> {
    match answer(shared, request).await {
        Ok(response) => response,
        Err(error) => json_response(error.code(), &error.to_status()),
    }
}

/// The role of the request's bearer token; 401 without a known one.
fn authenticate(config: &Config, headers: &HeaderMap) -> Result<Role, ApiError> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    token
        .and_then(|token| config.tokens.get(token.trim()).copied())
        .ok_or(ApiError::Unauthorized)
}

/// The verb of a request on `target`.
fn verb_of(method: &Method, target: &Target, query: &Query) -> Result<Verb, ApiError> {
    let named = target.name.is_some();
    let verb = match *method {
        Method::GET if query.watch && !target.status => Verb::Watch,
        Method::GET if named => Verb::Get,
        Method::GET => Verb::List,
        Method::POST if !named && (target.namespace.is_some() || !target.kind.namespaced()) => {
            Verb::Create
        }
        Method::PUT if named => Verb::Update,
        Method::PATCH if named => Verb::Patch,
        Method::DELETE if named && !target.status => Verb::Delete,
        _ => return Err(ApiError::MethodNotAllowed),
    };
    Ok(verb)
}

fn version() -> Response<ResponseBody> {
    json_response(
        200,
        &serde_json::json!({
            "major": "1", "minor": "37", "gitVersion": "v1.37.0-podwire-standin", "gitCommit": "",
            "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "none",
            "compiler": "none", "platform": "linux/amd64",
        }),
    )
}

async fn answer(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    if let Some(code) = shared.faults.take() {
        return Err(ApiError::Injected { code });
    }
    let role = authenticate(&shared.config, request.headers())?;
    let target = match Route::parse(request.uri().path()) {
        Route::Version => return Ok(version()),
        Route::Unknown => return Err(ApiError::NoRoute),
        Route::Resource(target) => target,
    };
    let query = Query::parse(request.uri().query())?;
    let verb = verb_of(request.method(), &target, &query)?;
    shared.counters.record(verb, target.kind);
    if !role.allows(verb) {
        let name = target.name.clone().unwrap_or_default();
        return Err(ApiError::Forbidden {
            kind: target.kind,
            name,
            user: role.user(),
            verb: verb.as_str(),
        });
    }
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(|err| ApiError::BadRequest(err.to_string()))?
        .to_bytes();
    let call = handlers::Call {
        target: &target,
        verb,
        query,
        content_type: content_type.as_deref(),
        body: &body,
    };
    match target.kind {
        KindTag::Nodes => handlers::serve::<Node>(shared, call),
        KindTag::Services => handlers::serve::<Service>(shared, call),
        KindTag::EndpointSlices => handlers::serve::<EndpointSlice>(shared, call),
    }
}
