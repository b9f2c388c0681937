//! The response future: one state machine per call.
//!
//! The future owns the inner service. Each phase polls one thing and hands
//! the result to one decision of the call's `Policy`, which says what to
//! do next; the future then calls the service with the request the policy
//! built, as tower's retry future does.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Sleep};
use tower_service::Service;

use crate::config::Shared;
use crate::loading::Peek;
use crate::policy::{Attempt, Next, Policy};
use crate::request_body::Reader;
use crate::wait::Wait;
use crate::{BoxError, RequestBody, ResponseBody};

pin_project! {
    /// Response future of [`ColdStartRetry`](crate::ColdStartRetry).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        #[pin]
        phase: Phase<S::Future, ReqBody, ResBody>,
        service: S,
        policy: Policy<ReqBody>,
    }
}

pin_project! {
    #[project = PhaseProj]
    #[project_replace = PhaseOwned]
    enum Phase<F, ReqBody, ResBody>
    where
        ResBody: Body,
    {
        // Reading the request body into memory.
        Buffering {
            #[pin]
            reader: Reader<ReqBody>,
        },
        // Waiting for the inner service's response.
        Calling {
            #[pin]
            future: F,
            attempt: Attempt,
        },
        // Waiting for the answer to a readiness check, until its deadline.
        Checking {
            #[pin]
            future: F,
            attempt: Attempt,
            deadline: Pin<Box<Sleep>>,
        },
        // Reading the start of a response that may be a cold start. Boxed,
        // like the wait: the warm path never gets here, and every phase
        // change moves the whole enum.
        Peeking {
            peek: Box<Peek<ResBody>>,
            attempt: Attempt,
        },
        // Asleep before the next attempt, or waiting for another caller's
        // probe of the same cold model.
        Waiting {
            wait: Box<Wait>,
        },
        // Waiting for the inner service to be ready for the next attempt.
        Readying,
        // The response has been returned.
        Done,
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    pub(crate) fn new(service: S, shared: Arc<Shared>, req: Request<ReqBody>) -> Self {
        let (parts, body) = req.into_parts();
        let mut policy = Policy::new(shared, parts);
        // Only planned here; the first poll reads the body (if any) and
        // sends. The service was polled ready by the caller.
        let limit = policy.config().body_limit;
        let reader = Reader::new(body, limit, policy.allowance());
        ResponseFuture {
            phase: Phase::Buffering { reader },
            service,
            policy,
        }
    }

    /// Bounds the whole call by the caller's `deadline` (see
    /// [`Policy::set_deadline`]).
    #[cfg(feature = "reqwest-middleware")]
    pub(crate) fn with_deadline(mut self, deadline: tokio::time::Instant) -> Self {
        self.policy.set_deadline(deadline);
        self
    }
}

impl<F, ReqBody, ResBody: Body> Phase<F, ReqBody, ResBody> {
    /// The phase `next` leads to, calling `service` for a request to send;
    /// or the caller's answer.
    #[allow(clippy::type_complexity)]
    #[inline]
    fn of<S>(
        next: Next<ReqBody, ResBody>,
        service: &mut S,
    ) -> ControlFlow<Result<Response<ResponseBody<ResBody>>, BoxError>, Self>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>, Future = F>,
    {
        ControlFlow::Continue(match next {
            Next::Send(request, attempt) => Phase::Calling {
                future: service.call(request),
                attempt,
            },
            Next::Check(request, attempt, deadline) => Phase::Checking {
                future: service.call(request),
                attempt,
                deadline: Box::pin(sleep_until(deadline)),
            },
            Next::Peek(peek, attempt) => Phase::Peeking { peek, attempt },
            Next::Wait(wait) => Phase::Waiting { wait },
            Next::Ready => Phase::Readying,
            Next::Done(answer) => return ControlFlow::Break(answer),
        })
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let policy = this.policy;
        loop {
            let next = match this.phase.as_mut().project() {
                PhaseProj::Buffering { reader } => {
                    let read = ready!(reader.poll_read(cx, policy.allowance()));
                    policy.buffered(read)
                }
                PhaseProj::Calling { future, attempt } => {
                    let answer = ready!(future.poll(cx)).map_err(Into::into);
                    policy.answered(answer, *attempt)
                }
                PhaseProj::Checking {
                    future,
                    attempt,
                    deadline,
                } => match future.poll(cx) {
                    Poll::Ready(answer) => {
                        let status = answer.map(|response| response.status());
                        policy.checked(status.map_err(Into::into), *attempt)
                    }
                    Poll::Pending => {
                        ready!(deadline.as_mut().poll(cx));
                        policy.check_timed_out()
                    }
                },
                PhaseProj::Peeking { peek, .. } => {
                    let end = ready!(peek.poll_read(cx));
                    // Leave the phase, handing what it read to the decision.
                    match this.phase.as_mut().project_replace(Phase::Done) {
                        PhaseOwned::Peeking { peek, attempt } => policy.peeked(*peek, end, attempt),
                        _ => unreachable!("in the Peeking phase"),
                    }
                }
                PhaseProj::Waiting { wait } => {
                    let woken = ready!(wait.poll_wake(cx));
                    policy.woken(wait, woken)
                }
                PhaseProj::Readying => {
                    let ready = ready!(this.service.poll_ready(cx)).map_err(Into::into);
                    policy.ready(ready)
                }
                PhaseProj::Done => panic!("ResponseFuture polled after completion"),
            };
            match Phase::of(next, this.service) {
                ControlFlow::Continue(phase) => this.phase.set(phase),
                ControlFlow::Break(answer) => {
                    this.phase.set(Phase::Done);
                    return Poll::Ready(answer);
                }
            }
        }
    }
}

impl<S, ReqBody, ResBody> std::fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the request head (it holds credentials) nor the service.
        let phase = match &self.phase {
            Phase::Buffering { .. } => "reading the request body",
            Phase::Calling { .. } => "waiting for a response",
            Phase::Checking { .. } => "waiting for a readiness check",
            Phase::Peeking { .. } => "reading a response that may be a cold start",
            Phase::Waiting { wait } => wait.what(),
            Phase::Readying => "waiting for the service to be ready",
            Phase::Done => "done",
        };
        let report = self.policy.report();
        f.debug_struct("ResponseFuture")
            .field("state", &phase)
            .field("attempts", &report.attempts())
            .field("waited", &report.waited())
            .finish()
    }
}
