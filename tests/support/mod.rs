//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod hf_server;

use bytes::Bytes;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
