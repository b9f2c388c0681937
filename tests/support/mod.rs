//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod capture;
pub mod hf_server;
pub mod wire;

use bytes::Bytes;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;
use tower_cold_start::{ColdStartRetry, ColdStartRetryLayer, RequestBody, WaitStrategy};

#[allow(unused_imports)]
pub use hf_server::{loading_body, HfServer, Model, Received};

/// hyper-util's HTTP/1 client, with the body type left to inference.
pub fn http1<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// hyper-util's client speaking HTTP/2 with prior knowledge.
pub fn http2<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// The layer with the first release's wake-up, `WaitStrategy::SleepEstimate` (sleep
/// `estimated_time`): for the tests that pin that schedule.
pub fn advised() -> ColdStartRetryLayer {
    ColdStartRetryLayer::new().wait_strategy(WaitStrategy::SleepEstimate)
}

/// hyper-util's HTTP/1 client behind the layer.
pub type Layered = ColdStartRetry<Client<HttpConnector, RequestBody<http_body_util::Full<Bytes>>>>;

/// `layer` over hyper-util's HTTP/1 client.
pub fn layered(layer: ColdStartRetryLayer) -> Layered {
    tower::ServiceBuilder::new().layer(layer).service(http1())
}

/// What a caller got, read whole: the response with its body collected,
/// and the layer's report. Every test reads an answer through this.
pub struct Outcome {
    pub status: u16,
    pub attempts: u32,
    pub body: Bytes,
    pub report: tower_cold_start::ColdStartReport,
    pub response: Response<Bytes>,
}

/// Reads a whole response into an [`Outcome`].
pub async fn outcome<B>(response: Response<B>) -> Outcome
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let report = report(&response);
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Outcome {
        status: parts.status.as_u16(),
        attempts: report.attempts(),
        body: body.clone(),
        report,
        response: Response::from_parts(parts, body),
    }
}

/// Posts `body` to `url` through `client`, and reads the whole answer.
pub async fn post(client: Layered, url: impl AsRef<str>, body: impl Into<Bytes>) -> Outcome {
    let request = http::Request::post(url.as_ref())
        .body(http_body_util::Full::new(body.into()))
        .unwrap();
    outcome(client.oneshot(request).await.unwrap()).await
}

/// Posts `body` to `url` through `client`; returns the status, when the
/// answer came, and the attempts. Checks that a 200 echoes the body (the
/// test server echoes): no caller gets another's answer.
pub async fn send(
    client: Layered,
    url: String,
    body: impl Into<Bytes>,
) -> (u16, tokio::time::Instant, u32) {
    let body = body.into();
    let got = post(client, url, body.clone()).await;
    if got.status == 200 {
        assert_eq!(got.body, body, "another caller's answer");
    }
    (got.status, tokio::time::Instant::now(), got.attempts)
}

/// The report the layer attached to a response.
pub fn report<B>(response: &Response<B>) -> tower_cold_start::ColdStartReport {
    *response
        .extensions()
        .get::<tower_cold_start::ColdStartReport>()
        .expect("every response carries a report")
}

/// Reads a whole response body.
pub async fn bytes<B>(response: Response<B>) -> Bytes
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    response.into_body().collect().await.unwrap().to_bytes()
}

/// A JSON request body of about `len` bytes, as a model input.
pub fn json_input(len: usize) -> Bytes {
    let mut s = String::from(r#"{"inputs":""#);
    while s.len() + 2 < len {
        s.push_str("I like you. ");
    }
    s.truncate(len.saturating_sub(2).max(11));
    s.push_str(r#""}"#);
    Bytes::from(s)
}

pin_project_lite::pin_project! {
    /// A hand-made streaming body: the given frames, one per poll, with no
    /// size hint (like a proxied chunked upload). Not `Unpin`, to prove the
    /// layer needs no `Unpin` body.
    pub struct Frames {
        frames: std::collections::VecDeque<http_body::Frame<Bytes>>,
        #[pin]
        _pin: std::marker::PhantomPinned,
    }
}

impl Frames {
    pub fn new(frames: Vec<http_body::Frame<Bytes>>) -> Self {
        Frames {
            frames: frames.into(),
            _pin: std::marker::PhantomPinned,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.project().frames.pop_front().map(Ok))
    }
}
