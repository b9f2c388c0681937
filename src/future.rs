//! The response future: one state machine per call.
//!
//! Each state polls one thing and hands the result to one decision of the
//! call's bookkeeping, which says what to do next.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::call::{Attempt, Call, Step, Wait};
use crate::layer::Config;
use crate::peek::Peek;
use crate::replay::{self, Reader};
use crate::{BoxError, RequestBody, ResponseBody};

pin_project! {
    /// Response future of [`ColdStartRetry`](crate::ColdStartRetry).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        #[pin]
        state: State<S::Future, ReqBody, ResBody>,
        call: Call<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwned]
    enum State<F, ReqBody, ResBody>
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
        // like the wait: the warm path never gets here, and every state
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
    S::Error: Into<BoxError>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    pub(crate) fn new(service: S, config: Arc<Config>, req: Request<ReqBody>) -> Self {
        let (parts, body) = req.into_parts();
        let mut call = Call::new(service, config, parts);
        // Only planned here; the first poll reads the body (if any) and
        // sends. The service was polled ready by the caller.
        let body_limit = call.config().body_limit;
        let source = replay::plan(body, body_limit, call.allowance());
        let state = State::Buffering {
            reader: Reader::new(source, body_limit),
        };
        ResponseFuture { state, call }
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body,
{
    /// Bounds the whole call by the caller's `deadline` (see
    /// [`Call::set_deadline`]).
    #[cfg(feature = "reqwest-middleware")]
    pub(crate) fn with_deadline(mut self, deadline: tokio::time::Instant) -> Self {
        self.call.set_deadline(deadline);
        self
    }
}

impl<F, ReqBody, ResBody: Body> State<F, ReqBody, ResBody> {
    /// The state a step leads to, and the caller's answer if it is done.
    #[allow(clippy::type_complexity)]
    fn of(
        step: Step<F, ResBody>,
    ) -> (
        Self,
        Option<Result<Response<ResponseBody<ResBody>>, BoxError>>,
    ) {
        let state = match step {
            Step::Call(future, attempt) => State::Calling { future, attempt },
            Step::Check(future, attempt, deadline) => State::Checking {
                future,
                attempt,
                deadline,
            },
            Step::Peek(peek, attempt) => State::Peeking { peek, attempt },
            Step::Wait(wait) => State::Waiting { wait },
            Step::Ready => State::Readying,
            Step::Done(answer) => return (State::Done, Some(answer)),
        };
        (state, None)
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
        let call = this.call;
        loop {
            let step = match this.state.as_mut().project() {
                StateProj::Buffering { reader } => {
                    let read = ready!(reader.poll_read(cx, call.allowance()));
                    call.buffered(read)
                }
                StateProj::Calling { future, attempt } => {
                    let answer = ready!(future.poll(cx));
                    call.answered(answer, *attempt)
                }
                StateProj::Peeking { peek, .. } => {
                    let end = ready!(peek.poll_read(cx));
                    // Leave the state, handing what it read to the decision.
                    match this.state.as_mut().project_replace(State::Done) {
                        StateOwned::Peeking { peek, attempt } => call.peeked(*peek, end, attempt),
                        _ => unreachable!("in the Peeking state"),
                    }
                }
                StateProj::Waiting { wait } => {
                    let registry = &call.config().registry;
                    let woken = ready!(wait.poll_wake(cx, registry, call.key()));
                    call.woken(wait, woken)
                }
                StateProj::Checking {
                    future,
                    attempt,
                    deadline,
                } => match future.poll(cx) {
                    Poll::Ready(answer) => call.answered(answer, *attempt),
                    Poll::Pending => {
                        ready!(deadline.as_mut().poll(cx));
                        call.check_timed_out()
                    }
                },
                StateProj::Readying => {
                    let ready = ready!(call.poll_ready(cx));
                    call.ready(ready)
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            let (state, answer) = State::of(step);
            this.state.set(state);
            if let Some(answer) = answer {
                return Poll::Ready(answer);
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
        let state = match &self.state {
            State::Buffering { .. } => "reading the request body",
            State::Calling { .. } => "waiting for a response",
            State::Checking { .. } => "waiting for a readiness check",
            State::Peeking { .. } => "reading a response that may be a cold start",
            State::Waiting { wait } => wait.what(),
            State::Readying => "waiting for the service to be ready",
            State::Done => "done",
        };
        let report = self.call.report();
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &report.attempts())
            .field("waited", &report.waited())
            .finish()
    }
}
