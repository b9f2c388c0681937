//! The response future: one state machine per call.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{request, response, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{sleep, Instant, Sleep};
use tower_service::Service;

use crate::body::End;
use crate::classify::{self, ColdStart, PEEK_LIMIT, PEEK_TIMEOUT};
use crate::head::Head;
use crate::layer::Config;
use crate::replay::{self, Buffered, Buffering, Plan, Reader};
use crate::{BoxError, ColdStartReport, RequestBody, ResponseBody, RetryEvent};

/// The header that asks HuggingFace to hold a request until the model is loaded.
static X_WAIT_FOR_MODEL: HeaderName = HeaderName::from_static("x-wait-for-model");

pin_project! {
    /// Response future of [`ColdStartRetry`](crate::ColdStartRetry).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        #[pin]
        state: State<S::Future, ReqBody, ResBody>,
        service: S,
        // A copy, not an `Arc`: no shared counter is touched per call.
        config: Config,
        // The caller's request head, until the first attempt takes it.
        parts: Option<request::Parts>,
        // A copy of it for retries; `None` when no retry can follow (an
        // unbuffered body, or the last possible attempt was sent).
        head: Option<Head>,
        body: Buffered,
        // Requests sent so far.
        attempts: u32,
        // Whether the request in flight asked the server to hold it.
        held: bool,
        // Time slept so far.
        waited: Duration,
        // When the first loading response arrived.
        cold_since: Option<Instant>,
        // The latest loading response, returned as it came if the budget
        // runs out before the next attempt is sent.
        // Boxed: only a cold start needs it.
        last: Option<Box<Loading>>,
    }
}

/// A 503 whose body is being read.
struct Peek<B> {
    head: response::Parts,
    body: Pin<Box<B>>,
    read: Vec<Bytes>,
    len: usize,
    // A loading body comes with the headers; one that trickles is not one,
    // and must not hold the caller.
    deadline: Pin<Box<Sleep>>,
}

impl<B: Body<Data = Bytes>> Peek<B> {
    fn new(head: response::Parts, body: B) -> Self {
        Peek {
            head,
            body: Box::pin(body),
            read: Vec::new(),
            len: 0,
            deadline: Box::pin(sleep(PEEK_TIMEOUT)),
        }
    }

    /// Reads until the body ends (`Some`: how it ended), or passes
    /// [`PEEK_LIMIT`] or [`PEEK_TIMEOUT`] (`None`: not a loading body).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<End<B::Error>>> {
        loop {
            let frame = match self.body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    ready!(self.deadline.as_mut().poll(cx));
                    return Poll::Ready(None);
                }
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Some(End::Error(error))),
                None => return Poll::Ready(Some(End::Eof)),
            };
            match frame.into_data() {
                Ok(data) => {
                    self.len = self.len.saturating_add(data.len());
                    self.read.push(data);
                    if self.len > PEEK_LIMIT {
                        return Poll::Ready(None);
                    }
                }
                Err(frame) => {
                    // Trailers end the body; no other frame kind exists.
                    if let Ok(trailers) = frame.into_trailers() {
                        return Poll::Ready(Some(End::Trailers(trailers)));
                    }
                }
            }
        }
    }
}

/// A loading response, read to its end.
struct Loading {
    head: response::Parts,
    body: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
}

pin_project! {
    #[project = StateProj]
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
        },
        // Reading the start of a 503 body to classify it. Boxed, like the
        // sleep: the warm path never gets here, and every state change moves
        // the whole enum.
        Peeking {
            peek: Option<Box<Peek<ResBody>>>,
        },
        // Sleeping before the next attempt.
        Sleeping {
            sleep: Pin<Box<Sleep>>,
            started: Instant,
        },
        // Waiting for the inner service to be ready for the next attempt.
        Readying {
            // The service made us wait: the budget must be checked again.
            delayed: bool,
        },
        // The response has been returned.
        Done,
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    pub(crate) fn new(mut service: S, config: Config, req: Request<ReqBody>) -> Self {
        let (parts, body) = req.into_parts();
        let mut parts = Some(parts);
        let mut head = None;
        let mut attempts = 0;
        let mut held = false;
        let state = match replay::plan(body, config.body_limit) {
            Plan::Read(source) => State::Buffering {
                reader: Reader::new(source, config.body_limit),
            },
            Plan::Empty => {
                let req = first_request(&mut parts, &mut head, &Buffered::default(), &config);
                held = asks_to_hold(&req);
                attempts += 1;
                State::Calling {
                    future: service.call(req),
                }
            }
            Plan::Stream(body) => {
                // Too large to buffer: one attempt, no retry.
                let parts = parts.take().expect("set above");
                attempts += 1;
                State::Calling {
                    future: service.call(Request::from_parts(parts, body)),
                }
            }
        };
        ResponseFuture {
            state,
            service,
            config,
            parts,
            head,
            body: Buffered::default(),
            attempts,
            held,
            waited: Duration::ZERO,
            cold_since: None,
            last: None,
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
            State::Peeking { .. } => "reading a 503 body",
            State::Sleeping { .. } => "sleeping before a retry",
            State::Readying { .. } => "waiting for the service to be ready",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.attempts)
            .field("waited", &self.waited)
            .finish()
    }
}

/// Builds the first attempt from the caller's own head, keeping a compact
/// copy of it if a retry may follow.
fn first_request<B>(
    parts: &mut Option<request::Parts>,
    head: &mut Option<Head>,
    body: &Buffered,
    config: &Config,
) -> Request<RequestBody<B>> {
    let parts = parts.take().expect("the first attempt is built once");
    if config.max_attempts > 1 {
        *head = Some(Head::copy(&parts));
    }
    Request::from_parts(parts, RequestBody::replay(body))
}

/// Builds attempt `attempts + 1` (a retry) from the kept copy, which is
/// dropped when no attempt can follow this one. `None` if the copy no longer
/// makes a valid head (see [`Head::rebuild`]).
fn retry_request<B>(
    head: &mut Option<Head>,
    body: &Buffered,
    config: &Config,
    attempts: u32,
) -> Option<Request<RequestBody<B>>> {
    let mut parts = head.as_ref()?.rebuild()?;
    if attempts + 1 >= config.max_attempts {
        *head = None;
    }
    if config.wait_for_model && !parts.headers.contains_key(&X_WAIT_FOR_MODEL) {
        parts
            .headers
            .insert(X_WAIT_FOR_MODEL.clone(), HeaderValue::from_static("true"));
    }
    Some(Request::from_parts(parts, RequestBody::replay(body)))
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
        loop {
            match this.state.as_mut().project() {
                StateProj::Buffering { reader } => {
                    let req = match ready!(reader.poll_read(cx)) {
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        Ok(Buffering::Done(buffered)) => {
                            *this.body = buffered;
                            first_request(this.parts, this.head, this.body, this.config)
                        }
                        Ok(Buffering::Overflow(body)) => {
                            let parts = this.parts.take().expect("kept until sent");
                            Request::from_parts(parts, body)
                        }
                    };
                    *this.held = asks_to_hold(&req);
                    *this.attempts += 1;
                    let future = this.service.call(req);
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    if !may_be_cold_start(&response, this.head.is_some(), *this.held) {
                        this.state.set(State::Done);
                        let report = ColdStartReport::new(*this.attempts, *this.waited);
                        return Poll::Ready(Ok(finish(
                            response.map(ResponseBody::passthrough),
                            report,
                        )));
                    }
                    let (head, body) = response.into_parts();
                    this.state.set(State::Peeking {
                        peek: Some(Box::new(Peek::new(head, body))),
                    });
                }
                StateProj::Peeking { peek } => {
                    let end = ready!(peek.as_mut().expect("kept until read").poll_read(cx));
                    let Peek {
                        head, body, read, ..
                    } = *peek.take().expect("kept until read");
                    let Some(end) = end else {
                        // Too large or too slow for a loading body: hand it
                        // on, the bytes read first.
                        let response = Response::from_parts(
                            head,
                            ResponseBody::peeked(read, None, Some(body)),
                        );
                        let report = ColdStartReport::new(*this.attempts, *this.waited);
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(finish(response, report)));
                    };
                    let cold = match &end {
                        End::Error(_) => None,
                        End::Trailers(_) | End::Eof => {
                            classify::classify(head.status, &contiguous(&read), *this.held)
                        }
                    };
                    let Some(cold) = cold else {
                        let response =
                            Response::from_parts(head, ResponseBody::peeked(read, Some(end), None));
                        let report = ColdStartReport::new(*this.attempts, *this.waited);
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(finish(response, report)));
                    };
                    let trailers = match end {
                        End::Trailers(trailers) => Some(trailers),
                        _ => None,
                    };
                    *this.last = Some(Box::new(Loading {
                        head,
                        body: read,
                        trailers,
                    }));
                    match plan_wait(
                        this.config,
                        this.cold_since,
                        *this.attempts,
                        this.head.as_ref(),
                        &cold,
                    ) {
                        Some(wait) => {
                            let started = Instant::now();
                            this.state.set(State::Sleeping {
                                sleep: Box::pin(sleep(wait)),
                                started,
                            });
                        }
                        None => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(give_up(
                                this.last,
                                *this.attempts,
                                *this.waited,
                            )));
                        }
                    }
                }
                StateProj::Sleeping { sleep, started } => {
                    ready!(sleep.as_mut().poll(cx));
                    *this.waited += started.elapsed();
                    this.state.set(State::Readying { delayed: false });
                }
                StateProj::Readying { delayed } => {
                    match this.service.poll_ready(cx) {
                        Poll::Pending => {
                            *delayed = true;
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(error)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    // The sleep was sized to end within the budget; only a
                    // service that kept us waiting can have pushed us past it.
                    if *delayed && past_budget(this.config, *this.cold_since) {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(give_up(this.last, *this.attempts, *this.waited)));
                    }
                    let Some(req) =
                        retry_request(this.head, this.body, this.config, *this.attempts)
                    else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(give_up(this.last, *this.attempts, *this.waited)));
                    };
                    *this.last = None;
                    *this.held = asks_to_hold(&req);
                    *this.attempts += 1;
                    let future = this.service.call(req);
                    this.state.set(State::Calling { future });
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

fn asks_to_hold<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(&X_WAIT_FOR_MODEL)
}

/// Whether a response is worth reading: a 503 for a request that may still be
/// retried, with a body that may be small enough to be a loading body.
fn may_be_cold_start<B: Body>(response: &Response<B>, retryable: bool, held: bool) -> bool {
    retryable
        && classify::worth_reading(response.status(), held)
        && response.body().size_hint().lower() <= PEEK_LIMIT as u64
}

/// The bytes read, as one slice (copied only when they came in pieces).
fn contiguous(chunks: &[Bytes]) -> std::borrow::Cow<'_, [u8]> {
    match chunks {
        [] => std::borrow::Cow::Borrowed(&[]),
        [one] => std::borrow::Cow::Borrowed(one),
        many => std::borrow::Cow::Owned(many.concat()),
    }
}

/// Decides the wait after a loading response, or `None` when the budget
/// (attempts or time) is spent. Reports the wait to tracing and the hook.
fn plan_wait(
    config: &Config,
    cold_since: &mut Option<Instant>,
    attempts: u32,
    head: Option<&Head>,
    cold: &ColdStart,
) -> Option<Duration> {
    let uri = head?.uri();
    let uri = &uri;
    let now = Instant::now();
    let since = *cold_since.get_or_insert(now);
    if attempts >= config.max_attempts {
        return None;
    }
    let elapsed = now.saturating_duration_since(since);
    let remaining = config.max_total_wait.saturating_sub(elapsed);
    // After a hold that timed out the server has just waited: retry soon.
    let hint = if cold.after_hold {
        Some(0.0)
    } else {
        cold.estimate
    };
    let wait = classify::wait_within(hint, config.wait_bounds(), remaining)?;
    let event = RetryEvent {
        uri,
        model: cold.model.as_deref(),
        attempt: attempts,
        wait,
        estimate: cold.estimate,
        elapsed,
    };
    tracing::info!(
        authority = uri.authority().map(|a| a.as_str()),
        path = uri.path(),
        model = event.model,
        attempt = attempts,
        wait_ms = wait.as_millis() as u64,
        estimate = cold.estimate,
        "model is loading; waiting before retrying"
    );
    if let Some(hook) = &config.on_retry {
        hook(&event);
    }
    Some(wait)
}

fn past_budget(config: &Config, cold_since: Option<Instant>) -> bool {
    cold_since.is_some_and(|since| since.elapsed() > config.max_total_wait)
}

/// The last loading response, exactly as it came.
fn give_up<B: Body>(
    last: &mut Option<Box<Loading>>,
    attempts: u32,
    waited: Duration,
) -> Response<ResponseBody<B>> {
    let Loading {
        head,
        body,
        trailers,
    } = *last
        .take()
        .expect("a loading response is kept while waiting");
    let response = Response::from_parts(
        head,
        ResponseBody::peeked(body, trailers.map(End::Trailers), None),
    );
    finish(response, ColdStartReport::new(attempts, waited))
}

fn finish<B>(mut response: Response<B>, report: ColdStartReport) -> Response<B> {
    response.extensions_mut().insert(report);
    response
}
