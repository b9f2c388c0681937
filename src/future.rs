//! The response future: one state machine per call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{request, response, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tower_service::Service;

use crate::body::End;
use crate::classifier::{
    ColdStart, Hint, Hold, ResponseView, PEEK_LIMIT, PEEK_TIMEOUT, X_WAIT_FOR_MODEL,
};
use crate::gate::{Company, Gate, Probe, Snapshot};
use crate::head::Head;
use crate::layer::Config;
use crate::replay::{self, Allowance, Buffered, Buffering, Plan, Reader};
use crate::wake::{self, Answer};
use crate::{BoxError, ColdStartReport, RequestBody, ResponseBody, RetryEvent, Unbuffered};

pin_project! {
    /// Response future of [`ColdStartRetry`](crate::ColdStartRetry).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        #[pin]
        state: State<S::Future, ReqBody, ResBody>,
        call: Call<S>,
    }
}

/// Everything about one call that is not pinned.
struct Call<S> {
    service: S,
    config: Arc<Config>,
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
    // When the request in flight was sent, if it is a retry or held (the
    // first request is not timed: the warm path reads no clock).
    sent: Option<Instant>,
    // Time spent without a request in flight: asleep, or waiting for
    // another caller's probe of the same model.
    waited: Duration,
    // When this call first met the model loading.
    cold_since: Option<Instant>,
    // The latest loading response seen, returned as it came if the budget
    // runs out before the next attempt is sent.
    last: Option<Arc<Snapshot>>,
    // The model's key in the shared registry, once needed (`Some(None)`:
    // the user's key function gave none, so this call is not coalesced).
    key: Option<Option<u64>>,
    // Held while this call is the one probing a cold model.
    probe: Option<Probe>,
    // Bytes this call holds in the layer's replay pool.
    pooled: usize,
    // Why the body was not buffered, if it was not.
    unbuffered: Option<Unbuffered>,
}

impl<S> Drop for Call<S> {
    fn drop(&mut self) {
        if self.pooled > 0 {
            self.config.pool.give_back(self.pooled);
        }
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

/// A caller waiting while another probes the same cold model.
struct Wait {
    wake: Pin<Box<OwnedNotified>>,
    deadline: Pin<Box<Sleep>>,
    started: Instant,
    // The model's loading answers this caller was told of.
    heard: u64,
    // Counts this caller among the probe's company while it waits.
    company: Company,
}

/// A sleep before the next attempt.
struct Nap {
    sleep: Pin<Box<Sleep>>,
    started: Instant,
    // For the caller probing a cold model: woken when another response shows
    // the model warm, so that the prober does not sleep past it.
    wake: Option<(Arc<Gate>, Pin<Box<OwnedNotified>>)>,
    // The nap lasts until the budget ends: give up then, unless woken.
    gives_up: bool,
}

impl Nap {
    /// Whether the nap is over: its time is up (`false`), or the model it
    /// waits for was seen warm, its gate gone (`true`).
    fn poll_over(&mut self, cx: &mut Context<'_>, config: &Config, key: Option<u64>) -> Poll<bool> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        let Some((gate, wake)) = &mut self.wake else {
            return Poll::Pending;
        };
        loop {
            ready!(wake.as_mut().poll(cx));
            // Listen again before looking, so that no change is missed.
            *wake = gate.wake_up();
            match key.and_then(|key| config.registry.gate(key)) {
                // Woken for something else (a probe given back).
                Some(current) if Arc::ptr_eq(&current, gate) => {}
                _ => return Poll::Ready(true),
            }
        }
    }
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
        // waits: the warm path never gets here, and every state change moves
        // the whole enum.
        Peeking {
            peek: Option<Box<Peek<ResBody>>>,
        },
        // Sleeping before the next attempt.
        Sleeping {
            nap: Box<Nap>,
        },
        // Waiting for another caller's probe of the same cold model.
        Waiting {
            wait: Box<Wait>,
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

/// What a call does next, once it knows the model's state.
enum Next {
    /// Send (the service is ready).
    Send,
    /// Wait for another caller's probe.
    Wait(Box<Wait>),
    /// Probe the model, after this pause: it was asked too recently.
    Pause(Box<Nap>),
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    pub(crate) fn new(service: S, config: Arc<Config>, req: Request<ReqBody>) -> Self {
        let (parts, body) = req.into_parts();
        let mut call = Call {
            service,
            config,
            parts: None,
            head: None,
            body: Buffered::default(),
            attempts: 0,
            held: false,
            sent: None,
            waited: Duration::ZERO,
            cold_since: None,
            last: None,
            key: None,
            probe: None,
            pooled: 0,
            unbuffered: None,
        };
        let state = match replay::plan(body, call.config.body_limit, call.allowance()) {
            Plan::Read(source) => {
                call.parts = Some(parts);
                State::Buffering {
                    reader: Reader::new(source, call.config.body_limit),
                }
            }
            Plan::Empty => {
                call.parts = Some(parts);
                // The service was polled ready by the caller.
                match call.check_gate() {
                    Next::Send => {
                        let req = call
                            .next_request()
                            .expect("the first attempt is always built");
                        State::Calling {
                            future: call.send(req),
                        }
                    }
                    Next::Wait(wait) => State::Waiting { wait },
                    Next::Pause(nap) => State::Sleeping { nap },
                }
            }
            Plan::Stream(body, reason) => {
                // Too large to buffer: one attempt, no retry.
                call.attempts = 1;
                call.unbuffered = Some(reason);
                State::Calling {
                    future: call.service.call(Request::from_parts(parts, body)),
                }
            }
        };
        ResponseFuture { state, call }
    }
}

impl<S> Call<S> {
    /// This call's share of the layer's replay pool.
    fn allowance(&mut self) -> Allowance<'_> {
        Allowance {
            pool: &self.config.pool,
            cap: self.config.total_body_limit,
            held: &mut self.pooled,
        }
    }

    fn registry_key(&mut self) -> Option<u64> {
        if let Some(key) = self.key {
            return key;
        }
        let registry = &self.config.registry;
        let key = match (&self.config.model_key, &self.parts, &self.head) {
            (Some(model_key), Some(parts), _) => {
                model_key(registry, &parts.uri, &parts.headers, self.body.bytes())
            }
            (Some(model_key), None, Some(head)) => {
                let parts = head.rebuild()?;
                model_key(registry, &parts.uri, &parts.headers, self.body.bytes())
            }
            (None, Some(parts), _) => Some(registry.key(&parts.uri)),
            (None, None, Some(head)) => head
                .uri_parts()
                .map(|(scheme, authority, path)| registry.key_of(scheme, authority, path)),
            // Sent, and no copy kept: unknown, but maybe later (never, in
            // fact: the copy is only dropped for the last attempt).
            (_, None, None) => return None,
        };
        self.key = Some(key);
        key
    }

    /// Before an attempt: if the model is known cold, take the probe or wait
    /// for whoever holds it. One relaxed load while no model is cold.
    fn check_gate(&mut self) -> Next {
        if self.probe.is_some() || !self.config.registry.any_cold() {
            return Next::Send;
        }
        let Some(key) = self.registry_key() else {
            return Next::Send;
        };
        match self.config.registry.gate(key) {
            None => Next::Send,
            Some(gate) => self.enter(gate, 0),
        }
    }

    /// Takes the probe of `gate`, or sets up a wait for it. The wake-up is
    /// registered before the probe is tried and the gate looked up again, so
    /// that a probe given back, or the model turning warm, in between is not
    /// missed.
    ///
    /// A caller that waits is told of each loading answer it has not heard
    /// yet (`heard` so far), through tracing and the hook.
    fn enter(&mut self, mut gate: Arc<Gate>, heard: u64) -> Next {
        let key = self.key.flatten().expect("a gate is entered by key");
        let (wake, company) = loop {
            let wake = gate.wake_up();
            let company = match gate.probe_or_join() {
                Err(company) => company,
                Ok(probe) => {
                    self.probe = Some(probe);
                    // Keep to the strategy's pace across probers: a probe given
                    // back (its caller gave up) is not an answer from the model.
                    let resume = gate.asked() + wake::pace(self.config.wait_strategy);
                    let now = Instant::now();
                    if resume <= now {
                        return Next::Send;
                    }
                    self.cold_since.get_or_insert(now);
                    if self.last.is_none() {
                        self.last = Some(gate.last());
                    }
                    // A budget that ends first ends without another request.
                    let remaining = self.remaining();
                    let pause = resume - now;
                    return Next::Pause(Box::new(Nap {
                        sleep: Box::pin(sleep(pause.min(remaining))),
                        started: now,
                        wake: Some((Arc::clone(&gate), wake)),
                        gives_up: pause > remaining,
                    }));
                }
            };
            // Counted as company before looking again: the gate cannot be
            // forgotten as idle while this caller decides to wait on it.
            match self.config.registry.gate(key) {
                Some(current) if Arc::ptr_eq(&current, &gate) => break (wake, company),
                Some(current) => gate = current,
                None => return Next::Send,
            }
        };
        let now = Instant::now();
        let since = *self.cold_since.get_or_insert(now);
        // A waiter keeps no loading answer of its own: it takes the model's
        // latest from the gate when it stops waiting.
        self.last = None;
        let deadline = since
            .checked_add(self.config.max_total_wait)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        let mut wait = Box::new(Wait {
            wake,
            deadline: Box::pin(sleep_until(deadline)),
            started: now,
            heard,
            company,
        });
        self.tell_waiting(&mut wait, deadline.saturating_duration_since(now));
        Next::Wait(wait)
    }

    /// Tells the caller of a loading answer, by another call's probe, that
    /// it has not heard of yet: same facts as a prober's wait.
    fn tell_waiting(&self, wait: &mut Wait, left: Duration) {
        let (answers, last) = wait.company.gate().heard();
        if answers == wait.heard {
            return;
        }
        wait.heard = answers;
        let uri = match (&self.parts, &self.head) {
            (Some(parts), _) => parts.uri.clone(),
            (None, Some(head)) => head.uri(),
            (None, None) => return,
        };
        let elapsed = self
            .cold_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        announce(
            &self.config,
            &RetryEvent {
                uri: &uri,
                model: last.model.as_deref(),
                attempt: self.attempts,
                wait: left,
                estimate: last.estimate,
                elapsed,
                behind_probe: true,
            },
        );
    }

    /// Records the model's answer in the shared registry: loading (a gate,
    /// with this response as the latest), or anything else (the gate goes,
    /// every waiter is released).
    ///
    /// A call whose loading answer creates the gate probes it. A probe of an
    /// older gate (one released by a warm answer in the meantime) is given
    /// up: it no longer stands for the model.
    fn record(&mut self, loading: Option<&Arc<Snapshot>>) -> Option<Arc<Gate>> {
        match loading {
            Some(snapshot) => {
                let key = self.registry_key()?;
                let (gate, created) = self.config.registry.mark_cold(key, Arc::clone(snapshot));
                if created.is_some() {
                    self.probe = created;
                } else if self
                    .probe
                    .as_ref()
                    .is_some_and(|probe| !Arc::ptr_eq(probe.gate(), &gate))
                {
                    self.probe = None;
                }
                Some(gate)
            }
            None => {
                if self.config.registry.any_cold() {
                    if let Some(key) = self.registry_key() {
                        self.config.registry.mark_warm(key);
                    }
                }
                self.probe = None;
                None
            }
        }
    }

    fn report(&self) -> ColdStartReport {
        ColdStartReport::new(self.attempts, self.waited, self.unbuffered)
    }

    /// The latest loading response, exactly as it came.
    fn give_up<B: Body>(&mut self) -> Response<ResponseBody<B>> {
        self.probe = None;
        let snapshot = self
            .last
            .take()
            .expect("a loading response is kept while waiting");
        let Snapshot {
            head,
            body,
            trailers,
            ..
        } = Arc::try_unwrap(snapshot).unwrap_or_else(|shared| Snapshot {
            head: shared.head.clone(),
            body: shared.body.clone(),
            trailers: shared.trailers.clone(),
            hold: shared.hold,
            model: shared.model.clone(),
            estimate: shared.estimate,
        });
        let response = Response::from_parts(
            head,
            ResponseBody::peeked(body, trailers.map(End::Trailers), None),
        );
        finish(response, self.report())
    }
}

impl<S> Call<S> {
    /// Builds the next attempt: the first (from the caller's own head) or a
    /// retry (from the kept copy). A retry or a probe asks the server to
    /// hold it, unless `hold_retries(false)`. `None` only if the kept copy
    /// no longer makes a valid head, which `http`'s safe constructors cannot
    /// cause.
    fn next_request<B>(&mut self) -> Option<Request<RequestBody<B>>> {
        // A probe of a model released since (its nap ending as the release
        // came, say) is not sent under: someone else may probe anew.
        if self.probe.as_ref().is_some_and(|probe| !probe.is_current()) {
            self.probe = None;
        }
        let hold = if self.config.hold_retries && (self.parts.is_none() || self.probe.is_some()) {
            self.last.as_ref().map_or(Hold::None, |last| last.hold)
        } else {
            Hold::None
        };
        let retry = self.parts.is_none();
        let mut req = match self.parts.take() {
            Some(parts) => {
                if self.config.max_attempts > 1 {
                    self.head = Some(Head::copy(&parts));
                }
                Request::from_parts(parts, RequestBody::replay(&self.body))
            }
            None => {
                let parts = self.head.as_ref()?.rebuild()?;
                if self.attempts + 1 >= self.config.max_attempts {
                    self.head = None;
                }
                Request::from_parts(parts, RequestBody::replay(&self.body))
            }
        };
        hold.apply(req.headers_mut(), self.remaining());
        self.held = hold != Hold::None || req.headers().contains_key(&X_WAIT_FOR_MODEL);
        self.sent = (retry || self.held).then(Instant::now);
        Some(req)
    }

    /// The time left in this call's budget (all of it before a cold start).
    fn remaining(&self) -> Duration {
        let max = self.config.max_total_wait;
        self.cold_since
            .map_or(max, |since| max.saturating_sub(since.elapsed()))
    }

    /// Sends `req` through the service, which must be ready.
    fn send<B>(&mut self, req: Request<RequestBody<B>>) -> S::Future
    where
        S: Service<Request<RequestBody<B>>>,
    {
        self.attempts += 1;
        if let Some(probe) = &self.probe {
            #[cfg(test)]
            if !probe.is_current() {
                let live = &self.config.registry.live;
                live.stale_sends
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            probe.gate().asked_now();
        }
        self.service.call(req)
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
            State::Waiting { .. } => "waiting for another caller's probe",
            State::Readying { .. } => "waiting for the service to be ready",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.call.attempts)
            .field("waited", &self.call.waited)
            .finish()
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
            match this.state.as_mut().project() {
                StateProj::Buffering { reader } => {
                    match ready!(reader.poll_read(cx, call.allowance())) {
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        Ok(Buffering::Done(buffered)) => {
                            call.body = buffered;
                            // The service taken in `call` is still ready.
                            match call.check_gate() {
                                Next::Send => {
                                    let req = call
                                        .next_request()
                                        .expect("the first attempt is always built");
                                    let future = call.send(req);
                                    this.state.set(State::Calling { future });
                                }
                                Next::Wait(wait) => this.state.set(State::Waiting { wait }),
                                Next::Pause(nap) => this.state.set(State::Sleeping { nap }),
                            }
                        }
                        Ok(Buffering::Overflow(body, reason)) => {
                            let parts = call.parts.take().expect("kept until sent");
                            call.attempts += 1;
                            call.unbuffered = Some(reason);
                            let future = call.service.call(Request::from_parts(parts, body));
                            this.state.set(State::Calling { future });
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            // Not an answer from the model: someone else may
                            // take the probe.
                            call.probe = None;
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let maybe_cold = call
                        .config
                        .classifier
                        .may_be_cold_start(response.status(), call.held);
                    // Read only for a call that may retry, and a body that may be
                    // small enough.
                    let readable = maybe_cold
                        && call.head.is_some()
                        && response.body().size_hint().lower() <= PEEK_LIMIT as u64;
                    if !readable {
                        if maybe_cold {
                            // Maybe loading, unread (the last attempt, or a
                            // large body): not proof that the model is warm.
                            call.probe = None;
                            if let Some(reason) = call.unbuffered {
                                warn_unbuffered(response.status(), reason);
                            }
                        } else {
                            call.record(None);
                        }
                        this.state.set(State::Done);
                        let response = response.map(ResponseBody::passthrough);
                        return Poll::Ready(Ok(finish(response, call.report())));
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
                        call.record(None);
                        let response = Response::from_parts(
                            head,
                            ResponseBody::peeked(read, None, Some(body)),
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(finish(response, call.report())));
                    };
                    let cold = match &end {
                        End::Error(_) => None,
                        End::Trailers(_) | End::Eof => {
                            call.config.classifier.0.classify(&ResponseView {
                                status: head.status,
                                headers: &head.headers,
                                body: &contiguous(&read),
                                held: call.held,
                                attempt: call.attempts,
                            })
                        }
                    };
                    let Some(cold) = cold else {
                        call.record(None);
                        let response =
                            Response::from_parts(head, ResponseBody::peeked(read, Some(end), None));
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(finish(response, call.report())));
                    };
                    let trailers = match end {
                        End::Trailers(trailers) => Some(trailers),
                        _ => None,
                    };
                    let snapshot = Arc::new(Snapshot {
                        head,
                        body: read,
                        trailers,
                        hold: cold.hold(),
                        model: cold.model().map(str::to_owned),
                        estimate: match cold.hint() {
                            Hint::Estimate(secs) => Some(secs),
                            _ => None,
                        },
                    });
                    let gate = call.record(Some(&snapshot));
                    call.last = Some(snapshot);
                    if call.attempts >= call.config.max_attempts {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(call.give_up()));
                    }
                    // Another caller probes this model: wait for it rather
                    // than retry on our own.
                    if let (None, Some(gate)) = (&call.probe, gate) {
                        if let Next::Wait(wait) = call.enter(gate, 0) {
                            this.state.set(State::Waiting { wait });
                            continue;
                        }
                    }
                    match plan_wait(call, &cold) {
                        Some(wait) if wait.is_zero() => {
                            this.state.set(State::Readying { delayed: false });
                        }
                        Some(wait) => {
                            let wake = call.probe.as_ref().map(|probe| {
                                let gate = Arc::clone(probe.gate());
                                let wake = gate.wake_up();
                                (gate, wake)
                            });
                            this.state.set(State::Sleeping {
                                nap: Box::new(Nap {
                                    sleep: Box::pin(sleep(wait)),
                                    started: Instant::now(),
                                    wake,
                                    gives_up: false,
                                }),
                            });
                        }
                        None => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(call.give_up()));
                        }
                    }
                }
                StateProj::Sleeping { nap } => {
                    let warm = ready!(nap.poll_over(cx, &call.config, call.key.flatten()));
                    call.waited += nap.started.elapsed();
                    if nap.gives_up && !warm {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(call.give_up()));
                    }
                    this.state.set(State::Readying { delayed: false });
                }
                StateProj::Waiting { wait } => {
                    let timed_out = wait.deadline.as_mut().poll(cx).is_ready();
                    if !timed_out {
                        ready!(wait.wake.as_mut().poll(cx));
                    }
                    // Whatever comes next may end in giving up.
                    call.last = Some(wait.company.gate().last());
                    if timed_out {
                        call.waited += wait.started.elapsed();
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(call.give_up()));
                    }
                    // The probe was given back or the model answered: look
                    // again (the gate may be gone, or a new one may exist).
                    let key = call.key.flatten().expect("a waiting call knows its key");
                    let gate = call.config.registry.gate(key);
                    match gate {
                        None => {
                            call.waited += wait.started.elapsed();
                            this.state.set(State::Readying { delayed: false });
                        }
                        Some(gate) => {
                            let rearm = call.enter(gate, wait.heard);
                            match rearm {
                                Next::Send => {
                                    call.waited += wait.started.elapsed();
                                    this.state.set(State::Readying { delayed: false });
                                }
                                Next::Wait(mut next) => {
                                    // Keep counting from when this wait began.
                                    next.started = wait.started;
                                    this.state.set(State::Waiting { wait: next });
                                }
                                Next::Pause(nap) => {
                                    call.waited += wait.started.elapsed();
                                    this.state.set(State::Sleeping { nap });
                                }
                            }
                        }
                    }
                }
                StateProj::Readying { delayed } => {
                    match call.service.poll_ready(cx) {
                        Poll::Pending => {
                            *delayed = true;
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(error)) => {
                            call.probe = None;
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    // The sleep was sized to end within the budget; only a
                    // service that kept us waiting can have pushed us past it.
                    if *delayed && past_budget(&call.config, call.cold_since) {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(call.give_up()));
                    }
                    let Some(req) = call.next_request() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(call.give_up()));
                    };
                    let future = call.send(req);
                    this.state.set(State::Calling { future });
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The bytes read, as one slice (copied only when they came in pieces).
fn contiguous(chunks: &[Bytes]) -> std::borrow::Cow<'_, [u8]> {
    match chunks {
        [] => std::borrow::Cow::Borrowed(&[]),
        [one] => std::borrow::Cow::Borrowed(one),
        many => std::borrow::Cow::Owned(many.concat()),
    }
}

/// Decides the sleep after a loading response, or `None` when the budget
/// (attempts or time) is spent. Reports the wait to tracing and the hook.
fn plan_wait<S>(call: &mut Call<S>, cold: &ColdStart) -> Option<Duration> {
    let uri = call.head.as_ref()?.uri();
    let uri = &uri;
    let config = &call.config;
    let now = Instant::now();
    let since = *call.cold_since.get_or_insert(now);
    if call.attempts >= config.max_attempts {
        return None;
    }
    let elapsed = now.saturating_duration_since(since);
    let remaining = config.max_total_wait.saturating_sub(elapsed);
    let estimate = match cold.hint() {
        Hint::Estimate(secs) => Some(secs),
        _ => None,
    };
    let jitter = config.jitter.then(wake::random_unit);
    let answer = Answer {
        hint: cold.hint(),
        attempt: call.attempts,
        took: call
            .sent
            .map_or(Duration::ZERO, |sent| now.saturating_duration_since(sent)),
        held: call.held,
        company: call
            .probe
            .as_ref()
            .is_some_and(|probe| probe.gate().has_company()),
    };
    let wait = wake::next_wait(
        config.wait_strategy,
        &answer,
        config.wait_bounds(),
        jitter,
        remaining,
    )?;
    announce(
        config,
        &RetryEvent {
            uri,
            model: cold.model(),
            attempt: call.attempts,
            wait,
            estimate,
            elapsed,
            behind_probe: false,
        },
    );
    Some(wait)
}

/// Tells tracing and the hook of a wait.
fn announce(config: &Config, event: &RetryEvent<'_>) {
    let uri = event.uri;
    let message = if event.behind_probe {
        "model is loading; waiting for another request's probe of it"
    } else {
        "model is loading; waiting before retrying"
    };
    tracing::info!(
        authority = uri.authority().map(|a| a.as_str()),
        path = uri.path(),
        model = event.model,
        attempt = event.attempt,
        wait_ms = event.wait.as_millis() as u64,
        estimate = event.estimate,
        behind_probe = event.behind_probe,
        "{message}"
    );
    if let Some(hook) = &config.on_retry {
        hook(event);
    }
}

/// A call that could not be retried met what may be a cold start.
fn warn_unbuffered(status: http::StatusCode, reason: Unbuffered) {
    tracing::warn!(
        status = status.as_u16(),
        reason = reason.as_str(),
        "response may be a cold start, but the request body was not buffered; not retried"
    );
}

fn past_budget(config: &Config, cold_since: Option<Instant>) -> bool {
    cold_since.is_some_and(|since| since.elapsed() > config.max_total_wait)
}

fn finish<B>(mut response: Response<B>, report: ColdStartReport) -> Response<B> {
    response.extensions_mut().insert(report);
    response
}
