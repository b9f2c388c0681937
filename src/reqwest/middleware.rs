//! The layer as a reqwest-middleware middleware.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Extensions, Request, Response};
use reqwest_middleware::{Middleware, Next};
use tower_layer::Layer;
use tower_service::Service;

use tokio::time::Instant;

use super::{to_http_response, to_reqwest_body};
use crate::policy::CallDeadline;
use crate::{BoxError, ColdStartRetry, ColdStartRetryLayer, RequestBody};

/// [`ColdStartRetryLayer`] as a reqwest-middleware middleware: every
/// behaviour of the layer for a `reqwest_middleware::ClientWithMiddleware`,
/// and one registry of cold models for all calls through that client.
///
/// The `ColdStartReport` is in the `reqwest::Response`'s extensions, and the
/// response keeps its URL.
///
/// A request's timeout (`RequestBuilder::timeout`) bounds the whole call,
/// waits and retries included, as reqwest documents it: each attempt gets
/// the time left, none is sent past it, and the call then ends in reqwest's
/// own timeout error. A client's timeout (`ClientBuilder::timeout`) cannot
/// be seen by a middleware (reqwest has no getter for it): it bounds each
/// attempt, which is how to get a per-attempt bound. For a whole-call bound
/// on every request, give it to [`timeout`](Self::timeout) as well.
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
    timeout: Option<std::time::Duration>,
}

impl ColdStartMiddleware {
    /// The middleware of `layer`.
    pub fn new(layer: ColdStartRetryLayer) -> Self {
        ColdStartMiddleware {
            layer,
            timeout: None,
        }
    }

    /// Sets the deadline of the whole call, waits and retries included, for a request that sets
    /// no timeout of its own.
    ///
    /// Note that reqwest does not tell a middleware its client's timeout: give the same value here
    /// to have it bound whole calls.
    ///
    /// Default: none (a request's own timeout still bounds its call).
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
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
        let deadline = req.extensions().get::<CallDeadline>().copied();
        let req = req.map(to_reqwest_body);
        Box::pin(async move {
            let mut req = reqwest::Request::try_from(req)?;
            if let Some(CallDeadline(deadline)) = deadline {
                // The time left of the caller's timeout, not all of it again:
                // none left ends the attempt in reqwest's own timeout error,
                // before anything is sent.
                *req.timeout_mut() = Some(deadline.saturating_duration_since(Instant::now()));
            }
            let answer = next.run(req, &mut extensions).await;
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(extensions);
            answer.map(to_http_response)
        })
    }
}

/// The layer's error as the middleware's: reqwest's and other
/// middlewares' errors as they were; the layer's own in
/// `reqwest_middleware::Error::Middleware`, where `downcast_ref` finds
/// [`Unreachable`](crate::Unreachable) as it does on the layer's boxed error,
/// and `chain()` walks on to the client's error.
fn to_middleware_error(error: BoxError) -> reqwest_middleware::Error {
    let error = match error.downcast::<reqwest_middleware::Error>() {
        Ok(error) => return *error,
        Err(error) => error,
    };
    let error = match error.downcast::<reqwest::Error>() {
        Ok(error) => return reqwest_middleware::Error::Reqwest(*error),
        Err(error) => error,
    };
    match error.downcast::<crate::Unreachable>() {
        Ok(unreachable) => reqwest_middleware::Error::middleware(*unreachable),
        Err(error) => reqwest_middleware::Error::middleware(Layered(error)),
    }
}

/// Another error of the layer's own (a request body that failed), for
/// reqwest-middleware; its source is that error.
#[derive(Debug)]
struct Layered(BoxError);

impl std::fmt::Display for Layered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the cold-start layer failed the request")
    }
}

impl std::error::Error for Layered {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
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
        // reqwest's own timeout for this request bounds the whole call,
        // waits included, as reqwest documents it.
        let deadline = req
            .timeout()
            .copied()
            .or(self.timeout)
            .map(|timeout| Instant::now() + timeout);
        let req = Request::try_from(req)?;
        let last = Arc::new(Mutex::new(None));
        let rest = Rest {
            next,
            extensions: extensions.clone(),
            last: Arc::clone(&last),
        };
        let mut service: ColdStartRetry<Rest<'_>> = self.layer.layer(rest);
        // `Rest` is always ready.
        let future = service.call(req);
        let answer = match deadline {
            Some(deadline) => future.with_deadline(deadline).await,
            None => future.await,
        };
        if let Some(last) = last.lock().unwrap_or_else(|e| e.into_inner()).take() {
            *extensions = last;
        }
        let response = answer.map_err(to_middleware_error)?;
        Ok(reqwest::Response::from(response.map(reqwest::Body::wrap)))
    }
}
