//! reqwest users: a reqwest client as a tower service, and the layer as a
//! reqwest-middleware middleware.
//!
//! [`ReqwestService`] (feature `reqwest`) puts a `reqwest::Client` under the
//! layer, for code that speaks tower:
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_cold_start::reqwest::ReqwestService;
//! use tower_cold_start::ColdStartRetryLayer;
//!
//! let client = ServiceBuilder::new()
//!     .layer(ColdStartRetryLayer::new())
//!     .service(ReqwestService::new(reqwest::Client::new()));
//! # let _ = client;
//! ```
//!
//! `ColdStartMiddleware` (feature `reqwest-middleware`) puts the layer in a
//! `reqwest_middleware::ClientWithMiddleware`, for code that already speaks
//! reqwest; every call through that client shares one registry of cold
//! models:
//!
//! ```
//! # #[cfg(feature = "reqwest-middleware")] {
//! use tower_cold_start::reqwest::ColdStartMiddleware;
//! use tower_cold_start::ColdStartRetryLayer;
//!
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(ColdStartMiddleware::new(ColdStartRetryLayer::new()))
//!     .build();
//! # let _ = client;
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use crate::{BoxError, RequestBody};

/// A `reqwest::Client` as a tower service, to put under the layer.
///
/// A replayed body goes to reqwest as in-memory bytes: it keeps its
/// `Content-Length`, and reqwest can clone it for its own protocol retries
/// and to follow a `307`/`308`. It is streamed (still with its
/// `Content-Length`) when it is over the layer's limit, has trailers, or
/// when the layer may retry a refused connection: only a streamed body
/// shows whether reqwest opened a connection for it, which is what tells
/// the request's own refused connection from a refused redirect hop. reqwest
/// then hands a `307`/`308` back rather than follow it. An error is
/// reqwest's own (`downcast_ref::<reqwest::Error>()` on the layer's boxed
/// error), and the response keeps its URL.
///
/// The client's timeout (`ClientBuilder::timeout`) bounds each attempt: the
/// adapter is below the layer, and reqwest does not say what its client's
/// timeout is. For a deadline on the whole call, waits included, put
/// `tower::timeout` outside the layer (see the crate docs), or use
/// [`ColdStartMiddleware`], where a request's own timeout bounds its call.
#[derive(Debug, Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub struct ReqwestService {
    client: ::reqwest::Client,
}

impl ReqwestService {
    /// Wraps `client`.
    pub fn new(client: ::reqwest::Client) -> Self {
        ReqwestService { client }
    }

    /// The client.
    pub fn get_ref(&self) -> &::reqwest::Client {
        &self.client
    }
}

impl From<::reqwest::Client> for ReqwestService {
    fn from(client: ::reqwest::Client) -> Self {
        Self::new(client)
    }
}

/// The response future of [`ReqwestService`].
pub struct ReqwestFuture {
    inner:
        Pin<Box<dyn Future<Output = Result<Response<::reqwest::Body>, ::reqwest::Error>> + Send>>,
}

impl std::fmt::Debug for ReqwestFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReqwestFuture")
    }
}

impl Future for ReqwestFuture {
    type Output = Result<Response<::reqwest::Body>, ::reqwest::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// The body reqwest sends for a replayed body.
pub(crate) fn to_reqwest_body<B>(body: RequestBody<B>) -> ::reqwest::Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    match body.into_bytes() {
        Ok(bytes) => ::reqwest::Body::from(bytes),
        Err(stream) => ::reqwest::Body::wrap(stream),
    }
}

/// A reqwest response as an `http::Response`, keeping its URL (reqwest
/// reads it back when the response becomes a `reqwest::Response` again).
pub(crate) fn to_http_response(response: ::reqwest::Response) -> Response<::reqwest::Body> {
    use ::reqwest::ResponseBuilderExt;
    let url = response.url().clone();
    let mut response = Response::from(response);
    let carrier = http::Response::builder()
        .url(url)
        .body(())
        .unwrap_or_default();
    response
        .extensions_mut()
        .extend(carrier.into_parts().0.extensions);
    response
}

impl<B> Service<Request<RequestBody<B>>> for ReqwestService
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<::reqwest::Body>;
    type Error = ::reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest's client queues internally; it is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<B>>) -> Self::Future {
        let client = self.client.clone();
        let req = req.map(to_reqwest_body);
        ReqwestFuture {
            inner: Box::pin(async move {
                let req = ::reqwest::Request::try_from(req)?;
                client.execute(req).await.map(to_http_response)
            }),
        }
    }
}

#[cfg(feature = "reqwest-middleware")]
mod middleware;

#[cfg(feature = "reqwest-middleware")]
pub use middleware::ColdStartMiddleware;
