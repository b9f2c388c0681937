//! A HuggingFace-like model server on 127.0.0.1, speaking the serverless API's wire contract.
//!
//! Shared by the tests, the quickstart example and the benches (`#[path]`).
//! It speaks HTTP/1.1 and HTTP/2 (prior knowledge) on one port, records every
//! request it receives, and serves each model path with a behaviour:
//! warm, cold for a while (holding requests that carry `x-wait-for-model`, or
//! not), never loading, or a fixed response. Time is tokio's, so tests run it
//! under paused time.
#![allow(dead_code, unreachable_pub)]

use std::cell::Cell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// The (estimated_time, seconds until the model answered) pairs recorded
/// against api-inference.huggingface.co.
pub const RECORDED_COLD_STARTS: [(f64, u64); 7] = [
    (20.0, 10),
    (20.0, 24),
    (32.137, 28),
    (20.0, 12),
    (22.307, 11),
    (53.374, 9),
    (20.0, 11),
];

/// A canned answer: status, headers, body.
pub type Canned = (u16, Vec<(&'static str, String)>, Bytes);

/// How a model path answers.
#[derive(Clone, Debug)]
pub enum Model {
    /// Answers 200 at once, echoing the request body.
    Warm,
    /// Answers the loading 503 until `ready_after` has passed since its first
    /// request, then 200. `estimate` is the raw JSON text of `estimated_time`
    /// (`None`: the field is omitted). When `holds`, a request carrying
    /// `x-wait-for-model` is held until the model is ready, for at most 60 s
    /// (then 500 "Model too busy", as HuggingFace does).
    Cold {
        ready_after: Duration,
        estimate: Option<String>,
        holds: bool,
    },
    /// Answers the loading 503 forever.
    NeverLoads { estimate: Option<String> },
    /// Answers the loading 503 to one request in `every` (the first, then
    /// every `every`-th), 200 to the others: a model that keeps being
    /// unloaded, for load tests.
    Flaky { every: usize, estimate: String },
    /// Answers these, one per request, then 200 (echo or the set answer).
    Sequence(Vec<Canned>),
    /// An Inference Endpoint scaled to zero: `status` (503 or 502) until
    /// `ready_after` since its first request; a request carrying
    /// `X-Scale-Up-Timeout: N` is held until ready if that is within N s.
    Endpoint { ready_after: Duration, status: u16 },
    /// Answers what the script says for each request (with the number of
    /// requests this path received, this one included), after the delay it
    /// gives.
    Script(Script),
    /// Always answers this.
    Fixed {
        status: StatusCode,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
}

/// What a script says for one request: wait this long, then answer this.
pub type Scripted = (Duration, Canned);

/// A scripted answer per request: a delay, then a canned answer.
#[derive(Clone)]
pub struct Script(pub Arc<ScriptFn>);

/// The script's function: the request, and how many this path received.
pub type ScriptFn = dyn Fn(&Received, usize) -> Scripted + Send + Sync;

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script")
    }
}

impl Model {
    /// Answers each request with `script(request, nth)` after its delay.
    pub fn script(script: impl Fn(&Received, usize) -> Scripted + Send + Sync + 'static) -> Self {
        Model::Script(Script(Arc::new(script)))
    }

    /// Cold for `ready_after`, with HuggingFace's usual estimate of 20 s,
    /// honouring the hold header.
    pub fn cold(ready_after: Duration) -> Self {
        Model::Cold {
            ready_after,
            estimate: Some("20.0".into()),
            holds: true,
        }
    }

    pub fn cold_with(ready_after: Duration, estimate: f64, holds: bool) -> Self {
        Model::Cold {
            ready_after,
            estimate: Some(format!("{estimate:?}")),
            holds,
        }
    }

    pub fn never_loads(estimate: &str) -> Self {
        Model::NeverLoads {
            estimate: Some(estimate.into()),
        }
    }

    pub fn fixed(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Model::Fixed {
            status: StatusCode::from_u16(status).unwrap(),
            headers: vec![("content-type", content_type.into())],
            body: body.into(),
        }
    }
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    /// When it arrived, on tokio's clock.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    models: HashMap<String, Model>,
    first_seen: HashMap<String, Instant>,
    seen: HashMap<String, usize>,
    // Off for load tests, so that the server's memory stays flat.
    not_recording: bool,
    // What a warm model answers; `None`: it echoes the request body.
    answer: Option<Bytes>,
    count: usize,
    received: Vec<Received>,
}

/// A running server. It stops when the runtime that started it ends.
#[derive(Clone)]
pub struct HfServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

/// The loading body HuggingFace sends, for `model` with `estimate`.
pub fn loading_body(model: &str, estimate: Option<&str>) -> Bytes {
    match estimate {
        Some(e) => {
            format!(r#"{{"error":"Model {model} is currently loading","estimated_time":{e}}}"#)
        }
        None => format!(r#"{{"error":"Model {model} is currently loading"}}"#),
    }
    .into()
}

impl HfServer {
    /// Starts a server serving `models` (path -> behaviour) on 127.0.0.1.
    pub async fn start<'a>(models: impl IntoIterator<Item = (&'a str, Model)>) -> Self {
        Self::start_on(0, models).await
    }

    /// The same, on `port` (0: any free port).
    pub async fn start_on<'a>(
        port: u16,
        models: impl IntoIterator<Item = (&'a str, Model)>,
    ) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let server = Self::detached(listener.local_addr().unwrap(), models);
        let accept = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                accept.serve(stream);
            }
        });
        server
    }

    /// A server that listens nowhere: give it connections with
    /// [`serve`](Self::serve) (e.g. in-memory pipes). `addr` only names it
    /// in [`url`](Self::url).
    pub fn detached<'a>(
        addr: SocketAddr,
        models: impl IntoIterator<Item = (&'a str, Model)>,
    ) -> Self {
        let state = State {
            models: models.into_iter().map(|(p, m)| (p.to_owned(), m)).collect(),
            ..State::default()
        };
        HfServer {
            addr,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Serves one connection, HTTP/1.1 or HTTP/2, in a task of its own.
    pub fn serve<I>(&self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        tokio::spawn(ServerSide::new(async move {
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(ServerExecutor);
            // The cold-start bench's baselines hold one request per caller,
            // 1000 at once, on one HTTP/2 connection.
            builder.http2().max_concurrent_streams(100_000);
            let _ = builder.serve_connection(TokioIo::new(io), service).await;
        }));
    }

    /// When `path` received its first request (its cold start began).
    pub fn first_seen(&self, path: &str) -> Option<Instant> {
        self.state.lock().unwrap().first_seen.get(path).copied()
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request received so far, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Seconds from the first request to each request, as the server saw
    /// them.
    pub fn offsets(&self) -> Vec<f64> {
        let received = self.received();
        let Some(first) = received.first().map(|r| r.at) else {
            return Vec::new();
        };
        received
            .iter()
            .map(|r| (r.at - first).as_secs_f64())
            .collect()
    }

    /// How many requests were received so far.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap().count
    }

    /// Makes warm models answer `answer` instead of echoing the request.
    pub fn set_answer(&self, answer: impl Into<Bytes>) {
        self.state.lock().unwrap().answer = Some(answer.into());
    }

    /// Stops keeping each request (counting goes on), for load tests.
    pub fn stop_recording(&self) {
        self.state.lock().unwrap().not_recording = true;
    }

    /// Replaces the behaviour of `path`.
    pub fn set_model(&self, path: &str, model: Model) {
        let mut state = self.state.lock().unwrap();
        state.models.insert(path.to_owned(), model);
        state.first_seen.remove(path);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let (body, trailers) = match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                (collected.to_bytes(), trailers)
            }
            Err(_) => return plain(StatusCode::BAD_REQUEST, "broken request body"),
        };
        let now = Instant::now();
        let path = parts.uri.path().to_owned();
        let holds_requested = parts
            .headers
            .get("x-wait-for-model")
            .is_some_and(|v| v == "true" || v == "1");
        let received = Received {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
            trailers,
            at: now,
        };
        let (model, first_seen, nth, answer) = {
            let mut state = self.state.lock().unwrap();
            state.count += 1;
            if !state.not_recording {
                state.received.push(received.clone());
            }
            let first_seen = *state.first_seen.entry(path.clone()).or_insert(now);
            let seen = state.seen.entry(path.clone()).or_insert(0);
            *seen += 1;
            let nth = *seen;
            (
                state.models.get(&path).cloned(),
                first_seen,
                nth,
                state.answer.clone(),
            )
        };
        let model_id = path.trim_start_matches("/models/");
        let body = answer.unwrap_or(body);
        match model {
            None => plain(StatusCode::NOT_FOUND, "no such model"),
            Some(Model::Warm) => ok(body),
            Some(Model::Fixed {
                status,
                headers,
                body,
            }) => {
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = status;
                for (name, value) in headers {
                    response.headers_mut().insert(name, value.parse().unwrap());
                }
                response
            }
            Some(Model::Script(Script(script))) => {
                let (delay, (status, headers, body)) = script(&received, nth);
                tokio::time::sleep(delay).await;
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                for (name, value) in headers {
                    response.headers_mut().append(name, value.parse().unwrap());
                }
                response
            }
            Some(Model::NeverLoads { estimate }) => loading(model_id, estimate.as_deref()),
            Some(Model::Sequence(steps)) => match steps.get(nth - 1) {
                Some((status, headers, body)) => {
                    let mut response = Response::new(Full::new(body.clone()));
                    *response.status_mut() = StatusCode::from_u16(*status).unwrap();
                    for (name, value) in headers {
                        response.headers_mut().append(*name, value.parse().unwrap());
                    }
                    response
                }
                None => ok(body),
            },
            Some(Model::Endpoint {
                ready_after,
                status,
            }) => {
                let ready_at = first_seen + ready_after;
                if now >= ready_at {
                    return ok(body);
                }
                let hold = parts
                    .headers
                    .get("x-scale-up-timeout")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                if let Some(secs) = hold {
                    if ready_at <= now + Duration::from_secs(secs) {
                        tokio::time::sleep_until(ready_at).await;
                        return ok(body);
                    }
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                Response::builder()
                    .status(status)
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from_static(b"Service Unavailable")))
                    .unwrap()
            }
            Some(Model::Flaky { every, estimate }) => {
                if (nth - 1) % every.max(1) == 0 {
                    loading(model_id, Some(&estimate))
                } else {
                    ok(body)
                }
            }
            Some(Model::Cold {
                ready_after,
                estimate,
                holds,
            }) => {
                let ready_at = first_seen + ready_after;
                if now >= ready_at {
                    return ok(body);
                }
                if holds && holds_requested {
                    let hold_limit = now + Duration::from_secs(60);
                    if ready_at <= hold_limit {
                        tokio::time::sleep_until(ready_at).await;
                        return ok(body);
                    }
                    tokio::time::sleep_until(hold_limit).await;
                    return too_busy();
                }
                loading(model_id, estimate.as_deref())
            }
        }
    }
}

thread_local! {
    static SERVING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is running the server's code: the cold-start
/// bench counts the server's memory apart from the client's.
pub fn serving() -> bool {
    SERVING.try_with(Cell::get).unwrap_or(false)
}

/// Runs a server task with [`serving`] set.
struct ServerSide<F>(Pin<Box<F>>);

impl<F> ServerSide<F> {
    fn new(future: F) -> Self {
        ServerSide(Box::pin(future))
    }
}

impl<F: Future> Future for ServerSide<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = SERVING.with(|s| s.replace(true));
        let poll = self.0.as_mut().poll(cx);
        SERVING.with(|s| s.set(before));
        poll
    }
}

/// Spawns hyper's per-stream tasks as server tasks.
#[derive(Clone, Copy)]
struct ServerExecutor;

impl<F> hyper::rt::Executor<F> for ServerExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(ServerSide::new(future));
    }
}

/// A success: a JSON-ish answer that echoes the request body.
fn ok(body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .unwrap()
}

/// The loading 503 with the headers HuggingFace sends.
pub fn loading(model: &str, estimate: Option<&str>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header("content-type", "application/json")
        .header("access-control-allow-credentials", "true")
        .header(
            "vary",
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        )
        .header("x-request-id", "Ab3dE5gH7jK9mN1pQ3sT5")
        .body(Full::new(loading_body(model, estimate)))
        .unwrap()
}

fn too_busy() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"error":"Model too busy, unable to get response in less than 60 second(s)"}"#,
        )))
        .unwrap()
}
