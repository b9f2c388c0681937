//! The layer as a reqwest-middleware middleware.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Extensions, Request, Response};
use reqwest_middleware::{Middleware, Next};
use tower_service::Service;

use super::{to_http_response, to_reqwest_body};
use crate::{BoxError, ColdStartRetry, ColdStartRetryLayer, RequestBody};

/// [`ColdStartRetryLayer`] as a reqwest-middleware middleware: every
/// behaviour of the layer for a `reqwest_middleware::ClientWithMiddleware`,
/// and one registry of cold models for all calls through that client.
///
/// The `ColdStartReport` is in the `reqwest::Response`'s extensions, and the
/// response keeps its URL.
///
/// Put it *after* `reqwest-retry`'s middleware in the chain (added later with
/// `.with`, so it runs inside it): a cold start is then waited out here,
/// within one of reqwest-retry's attempts, and only what is not a cold start
/// reaches reqwest-retry. The other way round, reqwest-retry sees every
/// loading `503` first and retries it on its own short backoff: each request
/// the layer sends becomes several (four with three retries), and the
/// layer's pace and coalescing are undone.
#[derive(Debug, Clone, Default)]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub struct ColdStartMiddleware {
    layer: ColdStartRetryLayer,
}

impl ColdStartMiddleware {
    /// The middleware of `layer`.
    pub fn new(layer: ColdStartRetryLayer) -> Self {
        ColdStartMiddleware { layer }
    }
}

impl From<ColdStartRetryLayer> for ColdStartMiddleware {
    fn from(layer: ColdStartRetryLayer) -> Self {
        Self::new(layer)
    }
}

/// The rest of the middleware chain as a tower service: each attempt runs
/// it with a copy of the chain's extensions; the last attempt's are handed
/// back to the chain.
#[derive(Clone)]
struct Rest<'a> {
    next: Next<'a>,
    extensions: Extensions,
    last: Arc<Mutex<Option<Extensions>>>,
}

type RestFuture<'a> = Pin<
    Box<
        dyn Future<Output = Result<Response<reqwest::Body>, reqwest_middleware::Error>> + Send + 'a,
    >,
>;

impl<'a> Service<Request<RequestBody<reqwest::Body>>> for Rest<'a> {
    type Response = Response<reqwest::Body>;
    type Error = reqwest_middleware::Error;
    type Future = RestFuture<'a>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<reqwest::Body>>) -> Self::Future {
        let next = self.next.clone();
        let mut extensions = self.extensions.clone();
        let last = Arc::clone(&self.last);
        let req = req.map(to_reqwest_body);
        Box::pin(async move {
            let req = reqwest::Request::try_from(req)?;
            let answer = next.run(req, &mut extensions).await;
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(extensions);
            answer.map(to_http_response)
        })
    }
}

/// The layer's error as the middleware's: reqwest's and other
/// middlewares' errors as they were, the layer's own boxed.
fn to_middleware_error(error: BoxError) -> reqwest_middleware::Error {
    let error = match error.downcast::<reqwest_middleware::Error>() {
        Ok(error) => return *error,
        Err(error) => error,
    };
    match error.downcast::<reqwest::Error>() {
        Ok(error) => reqwest_middleware::Error::Reqwest(*error),
        Err(error) => reqwest_middleware::Error::middleware(Layered(error)),
    }
}

/// An error of the layer's own (a request body that failed, a model server
/// unreachable past the budget), for reqwest-middleware.
#[derive(Debug)]
struct Layered(BoxError);

impl std::fmt::Display for Layered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Layered {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[async_trait::async_trait]
impl Middleware for ColdStartMiddleware {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let req = Request::try_from(req)?;
        let last = Arc::new(Mutex::new(None));
        let rest = Rest {
            next,
            extensions: extensions.clone(),
            last: Arc::clone(&last),
        };
        let mut service =
            ColdStartRetry::with_config(rest, std::sync::Arc::clone(&self.layer.config));
        // `Rest` is always ready.
        let answer = service.call(req).await;
        if let Some(last) = last.lock().unwrap_or_else(|e| e.into_inner()).take() {
            *extensions = last;
        }
        let response = answer.map_err(to_middleware_error)?;
        Ok(reqwest::Response::from(response.map(reqwest::Body::wrap)))
    }
}
