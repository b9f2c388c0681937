//! The service, and how the layer makes it.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::config::Shared;
use crate::future::ResponseFuture;
use crate::{BoxError, ColdStartRetryLayer, RequestBody, ResponseBody};

/// A service that waits out model cold starts and retries.
///
/// Built by [`ColdStartRetryLayer`]; see the [crate docs](crate) for the
/// behaviour.
#[derive(Clone, Debug)]
pub struct ColdStartRetry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> ColdStartRetry<S> {
    /// Wraps `inner` with the defaults, same as
    /// `ColdStartRetryLayer::new().layer(inner)`.
    pub fn new(inner: S) -> Self {
        ColdStartRetry {
            inner,
            shared: Arc::default(),
        }
    }

    /// A layer with the defaults, same as [`ColdStartRetryLayer::new`].
    pub fn layer() -> ColdStartRetryLayer {
        ColdStartRetryLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// How many models this service's layer holds as cold now: each one has
    /// callers probing it or waiting for it. A gauge for metrics; `0` while
    /// every model is warm.
    pub fn cold_models(&self) -> usize {
        self.shared.runtime.registry.cold_models()
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Layer<S> for ColdStartRetryLayer {
    type Service = ColdStartRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ColdStartRetry {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ColdStartRetry<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // `self.inner` was polled ready; take it for this call and leave a
        // fresh clone behind for the next one. See "Be careful when cloning
        // inner services" in the `tower_service::Service` docs.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(inner, Arc::clone(&self.shared), req)
    }
}
