//! One call's bookkeeping, and every decision the response future asks of it.
//!
//! The future ([`crate::future`]) polls one thing at a time and hands what it
//! got to one method here, which says what to do next as a [`Step`]: send,
//! read a body, wait, poll the service, or answer. Nothing here polls.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{request, Request, Response, StatusCode, Uri};
use http_body::Body;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{sleep_until, Instant, Sleep};
use tower_service::Service;

use crate::body::End;
use crate::classifier::{
    ColdStart, Hint, Hold, ResponseView, PEEK_LIMIT, SELF_HOSTED_POLL, X_WAIT_FOR_MODEL,
};
use crate::gate::{Company, Gate, Probe, Registry, Snapshot};
use crate::head::Head;
use crate::layer::Config;
use crate::peek::Peek;
use crate::replay::{Allowance, Asked, Buffered, Buffering};
use crate::wake::{self, Answer};
use crate::{
    BoxError, ColdStartReport, GaveUp, RequestBody, ResponseBody, RetryEvent, Unbuffered,
    Unreachable,
};

/// The smallest request body for which a readiness check pays: below it,
/// resending the request costs about what a check does, and the request is
/// the truth (a route may be server-wide, slower than the model, or wrong).
pub(crate) const ROUTE_BODY: usize = 64 * 1024;

/// The longest a readiness check may take (and never past the budget): a
/// route that answers no sooner than this is no help.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the future does next.
// A step is moved once, from a decision to the state it names; boxing the
// answer would put an allocation on the warm path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step<F, B: Body> {
    /// Wait for this response.
    Call(F, Attempt),
    /// Wait for this readiness check's answer, until the deadline.
    Check(F, Attempt, Pin<Box<Sleep>>),
    /// Read the start of this response's body to classify it.
    Peek(Box<Peek<B>>, Attempt),
    /// Wait for a timer, another caller's probe, or the model's release.
    Wait(Box<Wait>),
    /// Poll the service ready, then send the next attempt.
    Ready,
    /// Answer the caller.
    Done(Result<Response<ResponseBody<B>>, BoxError>),
}

/// The caller's deadline for the whole call, on each attempt of a call that
/// has one, for the adapter to give the client the time left.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "reqwest-middleware"), allow(dead_code))]
pub(crate) struct CallDeadline(pub(crate) Instant);

/// What the request in flight asked, for reading its answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    // Whether it asked the server to hold it.
    held: bool,
    // Whether it is a readiness check (an empty GET of the server's
    // readiness route), not the caller's request.
    check: bool,
    // When it was sent, if it is a retry or held (the first request is not
    // timed: the warm path reads no clock).
    sent: Option<Instant>,
}

/// The caller's request head, as far as the call has got.
enum Kept {
    /// Not sent yet.
    Unsent(request::Parts),
    /// Sent; a copy is kept for retries.
    Copy(Head),
    /// Sent, and no retry can follow (an unbuffered body, or the last
    /// possible attempt went out).
    Spent,
}

/// What a call learns once it met its model cold.
struct Cold {
    // When this call first met the model loading.
    since: Instant,
    // Time spent without a request in flight: asleep, or waiting for
    // another caller's probe of the same model.
    waited: Duration,
    // The latest loading response seen, returned as it came if the budget
    // runs out before the next attempt is sent. A caller waiting behind a
    // probe keeps none: it takes the model's latest when it stops waiting.
    last: Option<Arc<Snapshot>>,
}

/// Everything about one call that is not pinned.
pub(crate) struct Call<S, ReqBody> {
    service: S,
    config: Arc<Config>,
    request: Kept,
    body: Buffered,
    // Requests sent so far.
    attempts: u32,
    // The model's key in the shared registry, once needed (`Some(None)`:
    // the user's key function gave none, so this call is not coalesced).
    key: Option<Option<u64>>,
    // Boxed: the warm path never needs it.
    cold: Option<Box<Cold>>,
    // Held while this call is the one probing a cold model.
    probe: Option<Probe>,
    // Bytes this call holds in the layer's replay pool.
    pooled: usize,
    // Why the body was not buffered, if it was not.
    unbuffered: Option<Unbuffered>,
    // Whether the model's server was last found unreachable (a refused
    // connection) rather than loading; and whether it ever was, this call.
    unreachable: bool,
    met_unreachable: bool,
    // Whether this call's next request, as the model's probe, is a
    // readiness check (where the server has a readiness route).
    check_next: bool,
    // Readiness checks sent.
    checks: u32,
    // Whether the latest probe was a readiness check (checks and requests
    // alternate where only company makes a check worth it).
    checked_last: bool,
    // Whether a check said "ready" since the last request: if the request
    // then meets the model cold, the route lied.
    said_ready: bool,
    // Why the call gave up, if it did.
    gave_up: Option<GaveUp>,
    // The caller's own deadline for the whole call, where an adapter knows
    // it (a reqwest request's timeout): no wait runs past it, and the
    // attempt sent at it is told it has no time left, so that it ends in
    // the client's own timeout error.
    deadline: Option<Instant>,
    // Whether a client asked the body of the request in flight for its
    // data (kept only where a refused connection may be retried: it is the
    // proof that the refusal was of the request's own first connection).
    asked: Option<Asked>,
    _body: PhantomData<fn() -> ReqBody>,
}

impl<S, ReqBody> Drop for Call<S, ReqBody> {
    fn drop(&mut self) {
        if self.pooled > 0 {
            self.config.pool.give_back(self.pooled);
        }
    }
}

/// A wait: a pause before this call's next request, or a wait behind
/// another caller's probe. Either ends early when the model's state changes.
pub(crate) struct Wait {
    timer: Pin<Box<Sleep>>,
    started: Instant,
    // The model's gate, and a wake-up for its next change.
    gate: Option<(Arc<Gate>, Pin<Box<OwnedNotified>>)>,
    kind: WaitKind,
}

enum WaitKind {
    /// This call sends the model's next request. `gives_up`: the pause
    /// runs to the end of the budget, which ends the call unless the model
    /// is released first.
    Pause { gives_up: bool },
    /// Behind another caller's probe until the budget ends, counted among
    /// the probe's company; `heard`: the model's loading answers this
    /// caller was told of.
    Behind { company: Company, heard: u64 },
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// Its timer.
    Timer,
    /// A change of the model's state: a probe given back or a new loading
    /// answer (behind a probe), or the model's release.
    Gate,
}

impl Wait {
    fn new(duration: Duration, gate: Option<Arc<Gate>>, kind: WaitKind) -> Box<Self> {
        Self::until(Instant::now() + duration, gate, kind)
    }

    fn until(deadline: Instant, gate: Option<Arc<Gate>>, kind: WaitKind) -> Box<Self> {
        Box::new(Wait {
            timer: Box::pin(sleep_until(deadline)),
            started: Instant::now(),
            gate: gate.map(|gate| {
                let wake = gate.wake_up();
                (gate, wake)
            }),
            kind,
        })
    }

    /// Waits for the timer or a change of the model. A pause is woken only
    /// when its gate is gone (the model released); a wait behind a probe by
    /// any change.
    pub(crate) fn poll_wake(
        &mut self,
        cx: &mut Context<'_>,
        registry: &Registry,
        key: Option<u64>,
    ) -> Poll<Woken> {
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woken::Timer);
        }
        let Some((gate, wake)) = &mut self.gate else {
            return Poll::Pending;
        };
        loop {
            ready!(wake.as_mut().poll(cx));
            if let WaitKind::Behind { .. } = self.kind {
                return Poll::Ready(Woken::Gate);
            }
            // Listen again before looking, so that no change is missed.
            *wake = gate.wake_up();
            match key.and_then(|key| registry.gate(key)) {
                // Woken for something else (another caller's answer).
                Some(current) if Arc::ptr_eq(&current, gate) => {}
                _ => return Poll::Ready(Woken::Gate),
            }
        }
    }

    /// What the wait is for, in a few words.
    pub(crate) fn what(&self) -> &'static str {
        match self.kind {
            WaitKind::Pause { .. } => "sleeping before a retry",
            WaitKind::Behind { .. } => "waiting for another caller's probe",
        }
    }
}

impl<S, ReqBody> Call<S, ReqBody> {
    pub(crate) fn new(service: S, config: Arc<Config>, parts: request::Parts) -> Self {
        Call {
            service,
            config,
            request: Kept::Unsent(parts),
            body: Buffered::default(),
            attempts: 0,
            key: None,
            cold: None,
            probe: None,
            pooled: 0,
            unbuffered: None,
            unreachable: false,
            met_unreachable: false,
            check_next: false,
            checks: 0,
            checked_last: false,
            said_ready: false,
            gave_up: None,
            deadline: None,
            asked: None,
            _body: PhantomData,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn key(&self) -> Option<u64> {
        self.key.flatten()
    }

    pub(crate) fn report(&self) -> ColdStartReport {
        let waited = self.cold.as_ref().map_or(Duration::ZERO, |c| c.waited);
        ColdStartReport::new(self.attempts, waited, self.unbuffered, self.met_unreachable)
            .with_checks(self.checks, self.gave_up)
    }

    /// This call's share of the layer's replay pool.
    pub(crate) fn allowance(&mut self) -> Allowance<'_> {
        Allowance {
            pool: &self.config.pool,
            cap: self.config.total_body_limit,
            held: &mut self.pooled,
        }
    }

    /// Polls the service ready for the next attempt.
    pub(crate) fn poll_ready<R>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<R>,
        S::Error: Into<BoxError>,
    {
        self.service.poll_ready(cx).map_err(Into::into)
    }

    fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(|| {
            Box::new(Cold {
                since: Instant::now(),
                waited: Duration::ZERO,
                last: None,
            })
        })
    }

    /// The time left in this call's budget (all of it before a cold start).
    fn remaining(&self) -> Duration {
        let budget = self.budget_left();
        self.deadline.map_or(budget, |d| {
            budget.min(d.saturating_duration_since(Instant::now()))
        })
    }

    /// The time left in the cold-start budget alone.
    fn budget_left(&self) -> Duration {
        let max = self.config.max_total_wait;
        self.cold
            .as_ref()
            .map_or(max, |cold| max.saturating_sub(cold.since.elapsed()))
    }

    /// Sets the caller's deadline for the whole call.
    #[cfg(feature = "reqwest-middleware")]
    pub(crate) fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// Out of time at the end of a wait: at the caller's deadline (with
    /// budget left) the next attempt goes, told it has no time, so that the
    /// client ends it with its own timeout error and sends nothing; at the
    /// end of the budget the call gives up.
    fn out_of_time<B: Body>(&mut self) -> Step<S::Future, B>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        if self.deadline.is_some() && !self.budget_left().is_zero() {
            return Step::Ready;
        }
        self.give_up(GaveUp::Budget)
    }

    fn registry_key(&mut self) -> Option<u64> {
        if let Some(key) = self.key {
            return key;
        }
        let registry = &self.config.registry;
        let key = match (&self.config.model_key, &self.request) {
            (Some(model_key), Kept::Unsent(parts)) => {
                model_key(registry, &parts.uri, &parts.headers, self.body.bytes())
            }
            (Some(model_key), Kept::Copy(head)) => {
                let parts = head.rebuild()?;
                model_key(registry, &parts.uri, &parts.headers, self.body.bytes())
            }
            (None, Kept::Unsent(parts)) => Some(registry.key(&parts.uri)),
            (None, Kept::Copy(head)) => head
                .uri_parts()
                .map(|(scheme, authority, path)| registry.key_of(scheme, authority, path)),
            // Sent, and no copy kept: no retry follows, nothing to key.
            (_, Kept::Spent) => return None,
        };
        self.key = Some(key);
        key
    }

    fn uri(&self) -> Option<Uri> {
        match &self.request {
            Kept::Unsent(parts) => Some(parts.uri.clone()),
            Kept::Copy(head) => Some(head.uri()),
            Kept::Spent => None,
        }
    }

    /// Before an attempt: if the model is known cold, take the probe or wait
    /// for whoever holds it (`None`: send now). One relaxed load while no
    /// model is cold.
    pub(crate) fn admit(&mut self) -> Option<Box<Wait>> {
        if self.probe.is_some() || !self.config.registry.any_cold() {
            return None;
        }
        let key = self.registry_key()?;
        let gate = self.config.registry.gate(key)?;
        self.enter(key, gate, 0)
    }

    /// Takes the probe of `gate`, or waits behind whoever holds it (`None`:
    /// send now). The wake-up is registered before the probe is tried and
    /// the gate looked up again, so that a probe given back, or the model
    /// turning warm, in between is not missed. A caller that waits is told
    /// of each loading answer it has not heard yet (`heard` so far).
    fn enter(&mut self, key: u64, mut gate: Arc<Gate>, heard: u64) -> Option<Box<Wait>> {
        let company = loop {
            let company = match gate.probe_or_join() {
                Err(company) => company,
                Ok(probe) => return self.take_over(gate, probe),
            };
            // Counted as company before looking again: the gate cannot be
            // forgotten as idle while this caller decides to wait on it.
            match self.config.registry.gate(key) {
                Some(current) if Arc::ptr_eq(&current, &gate) => break company,
                Some(current) => gate = current,
                None => return None,
            }
        };
        let since = self.cold().since;
        // A waiter keeps no loading answer of its own.
        self.cold().last = None;
        let budget_end = since
            .checked_add(self.config.max_total_wait)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let deadline = self.deadline.map_or(budget_end, |d| d.min(budget_end));
        let mut wait = Wait::until(deadline, Some(gate), WaitKind::Behind { company, heard });
        self.tell_waiting(
            &mut wait,
            deadline.saturating_duration_since(Instant::now()),
        );
        Some(wait)
    }

    /// Holds the probe of `gate`, keeping to the strategy's pace across
    /// probers: a probe given back (its caller gave up) is not an answer
    /// from the model. A budget that ends first ends without a request.
    fn take_over(&mut self, gate: Arc<Gate>, probe: Probe) -> Option<Box<Wait>> {
        self.probe = Some(probe);
        // The model is cold and this call now probes it.
        let last = gate.last();
        self.check_next = last.checkable;
        let resume = gate.asked() + wake::pace(self.config.wait_strategy, last.poll);
        let now = Instant::now();
        if resume <= now {
            return None;
        }
        let cold = self.cold();
        if cold.last.is_none() {
            cold.last = Some(gate.last());
        }
        let remaining = self.remaining();
        let pause = resume - now;
        let gives_up = pause > remaining;
        Some(Wait::new(
            pause.min(remaining),
            Some(gate),
            WaitKind::Pause { gives_up },
        ))
    }

    /// Tells the caller of a loading answer, by another call's probe, that
    /// it has not heard of yet: same facts as a prober's wait.
    fn tell_waiting(&self, wait: &mut Wait, left: Duration) {
        let (Some((gate, _)), WaitKind::Behind { heard, .. }) = (&wait.gate, &mut wait.kind) else {
            return;
        };
        let (answers, last) = gate.heard();
        if answers == *heard {
            return;
        }
        *heard = answers;
        let Some(uri) = self.uri() else { return };
        let elapsed = self
            .cold
            .as_ref()
            .map_or(Duration::ZERO, |cold| cold.since.elapsed());
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
                unreachable: last.refused.is_some(),
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
                self.check_next = false;
                self.said_ready = false;
                None
            }
        }
    }

    /// The latest loading response, exactly as it came: this call's own, or
    /// a newer one its model gave another caller.
    fn give_up<B: Body>(&mut self, why: GaveUp) -> Step<S::Future, B>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        self.gave_up = Some(why);
        let shared = self
            .probe
            .take()
            .filter(Probe::is_current)
            .map(|probe| probe.gate().last());
        let own = self.cold.as_mut().and_then(|cold| cold.last.take());
        let last = match (own, shared) {
            (Some(own), Some(shared)) if shared.at > own.at => Some(shared),
            (own, shared) => own.or(shared),
        };
        let Some(snapshot) = last else {
            // Nothing to give back: no loading answer was kept. The budget
            // and the bookkeeping above make this unreachable.
            return Step::Done(Err("cold start: no loading response was kept".into()));
        };
        if let Some(error) = &snapshot.refused {
            return Step::Done(Err(Box::new(Unreachable(Arc::clone(error), why))));
        }
        let Snapshot {
            head,
            body,
            trailers,
            ..
        } = Arc::try_unwrap(snapshot).unwrap_or_else(|shared| (*shared).clone());
        let response = Response::from_parts(
            head,
            ResponseBody::peeked(body, trailers.map(End::Trailers), None),
        );
        Step::Done(Ok(finish(response, self.report())))
    }

    /// Builds the next attempt: the first (from the caller's own head) or a
    /// retry (from the kept copy), and sends it through the service, which
    /// must be ready. A retry or a probe asks the server to hold it, unless
    /// `hold_retries(false)`. `None` when no attempt can follow.
    fn send<B: Body>(&mut self) -> Option<Step<S::Future, B>>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        // A probe of a model released since (its pause ending as the
        // release came, say) is not sent under: someone else may probe anew.
        if self.probe.as_ref().is_some_and(|probe| !probe.is_current()) {
            self.probe = None;
        }
        let retry = !matches!(self.request, Kept::Unsent(_));
        if retry && self.check_next {
            if let Some(route) = self.route_to_check() {
                return self.send_check(route);
            }
        }
        self.checked_last = false;
        let hold = match &self.cold {
            Some(cold) if self.config.hold_retries && (retry || self.probe.is_some()) => cold
                .last
                .as_ref()
                .map_or(self.config.first_hold, |last| last.hold),
            _ if !retry => self.config.first_hold,
            _ => Hold::None,
        };
        let last_possible = self.attempts + 1 >= self.config.max_attempts;
        let parts = match std::mem::replace(&mut self.request, Kept::Spent) {
            Kept::Unsent(parts) => {
                if !last_possible {
                    self.request = Kept::Copy(Head::copy(&parts));
                }
                parts
            }
            Kept::Copy(head) => {
                let parts = head.rebuild()?;
                if !last_possible {
                    self.request = Kept::Copy(head);
                }
                parts
            }
            Kept::Spent => return None,
        };
        // Watched only where a refusal may be retried: a refusal of this
        // attempt proves nothing unless the body was never asked for.
        self.asked = (self.config.retries_refused && !last_possible).then(Asked::default);
        let mut req =
            Request::from_parts(parts, RequestBody::replay(&self.body, self.asked.clone()));
        if let Some(deadline) = self.deadline {
            req.extensions_mut().insert(CallDeadline(deadline));
        }
        hold.apply(req.headers_mut(), self.remaining());
        let held = hold != Hold::None || req.headers().contains_key(&X_WAIT_FOR_MODEL);
        let attempt = Attempt {
            held,
            check: false,
            sent: (retry || held).then(Instant::now),
        };
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
        Some(Step::Call(self.service.call(req), attempt))
    }

    /// The readiness route to check instead of sending the request, where a
    /// check pays and the route has not proved wrong for this model: for a
    /// large body (a check saves resending it), or, while other callers
    /// wait on the model, every other probe (a truthful route can release
    /// them all before the request's own answer, which a model server
    /// gives only after its work). The request itself is the probe
    /// otherwise, and it is the truth: a route may be server-wide, slower
    /// than the model, or wrong.
    fn route_to_check(&mut self) -> Option<Uri> {
        let uri = self.uri()?;
        let route = match &self.config.readiness {
            Some(route) => route(&uri),
            None => self.config.classifier.0.readiness(&uri),
        }?;
        let key = self.registry_key()?;
        if !self.config.registry.trusts_route(key) {
            return None;
        }
        let large = self.body.bytes().len() >= ROUTE_BODY;
        let company = self
            .probe
            .as_ref()
            .is_some_and(|probe| probe.gate().has_company());
        (large || (company && !self.checked_last)).then(|| with_query_of(route, &uri))
    }

    /// Stops using this model's readiness route: it answered something that
    /// is neither ready nor not ready, or said ready while the model was not.
    fn distrust_route(&mut self) {
        if let Some(key) = self.registry_key() {
            self.config.registry.distrust_route(key);
        }
        self.check_next = false;
    }

    /// Sends an empty `GET` of the readiness route, with the caller's
    /// headers and query (credentials included) but not its body, bounded
    /// by [`CHECK_TIMEOUT`] and the time left.
    fn send_check<B: Body>(&mut self, route: Uri) -> Option<Step<S::Future, B>>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        let Kept::Copy(head) = &self.request else {
            return None;
        };
        let mut parts = head.rebuild()?;
        parts.method = http::Method::GET;
        parts.uri = route;
        for name in [
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_TYPE,
            http::header::TRANSFER_ENCODING,
            http::header::TRAILER,
        ] {
            parts.headers.remove(name);
        }
        let req = Request::from_parts(parts, RequestBody::replay(&Buffered::default(), None));
        self.checks += 1;
        self.checked_last = true;
        if let Some(probe) = &self.probe {
            probe.gate().asked_now();
        }
        let now = Instant::now();
        let attempt = Attempt {
            held: false,
            check: true,
            sent: Some(now),
        };
        let deadline = Box::pin(sleep_until(now + CHECK_TIMEOUT.min(self.remaining())));
        Some(Step::Check(self.service.call(req), attempt, deadline))
    }

    /// Sends the first attempt, or waits for the model's probe.
    pub(crate) fn first<B: Body>(&mut self) -> Step<S::Future, B>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        match self.admit() {
            Some(wait) => Step::Wait(wait),
            // The service taken in `call` is still ready.
            None => self
                .send()
                .unwrap_or_else(|| Step::Done(Err("request head lost".into()))),
        }
    }

    /// Sends a body that is not buffered once, as it is: no retry follows.
    pub(crate) fn send_once<B: Body>(
        &mut self,
        body: RequestBody<ReqBody>,
        reason: Unbuffered,
    ) -> Step<S::Future, B>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        let Kept::Unsent(parts) = std::mem::replace(&mut self.request, Kept::Spent) else {
            return Step::Done(Err("request head lost".into()));
        };
        self.attempts = 1;
        self.unbuffered = Some(reason);
        let attempt = Attempt {
            held: false,
            check: false,
            sent: None,
        };
        Step::Call(self.service.call(Request::from_parts(parts, body)), attempt)
    }
}

impl<S, ReqBody, ResBody> Call<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    /// The request body was read: send it, or send it once unbuffered.
    pub(crate) fn buffered(
        &mut self,
        read: Result<Buffering<ReqBody>, BoxError>,
    ) -> Step<S::Future, ResBody> {
        match read {
            Err(error) => Step::Done(Err(error)),
            Ok(Buffering::Done(buffered)) => {
                self.body = buffered;
                self.first()
            }
            Ok(Buffering::Overflow(body, reason)) => self.send_once(body, reason),
        }
    }

    /// The service answered: hand the answer on, or read it if it may be a
    /// cold start this call can retry.
    pub(crate) fn answered(
        &mut self,
        answer: Result<Response<ResBody>, S::Error>,
        attempt: Attempt,
    ) -> Step<S::Future, ResBody> {
        if attempt.check {
            let answer = answer.map(|response| response.status());
            return self.checked(answer.map_err(Into::into), attempt);
        }
        let asked = self.asked.take();
        let response = match answer {
            Ok(response) => response,
            Err(error) => {
                let error: BoxError = error.into();
                let retryable = matches!(self.request, Kept::Copy(_));
                // Only a refusal of the request's own first connection: a
                // client that asked for the body had a connection (a
                // redirect's later hop may be what refused).
                let unsent = asked.is_some_and(|asked| !asked.was_asked());
                if retryable && unsent && refused(&*error) {
                    // Nothing reached the server: it is still booting.
                    let snapshot = Arc::new(unreachable(error));
                    let booting =
                        ColdStart::new(Hint::Unknown).with_poll_interval(SELF_HOSTED_POLL);
                    return self.cold_start(snapshot, &booting, attempt);
                }
                if let (Some(reason), true) = (self.unbuffered, self.config.retries_refused) {
                    if refused(&*error) {
                        tracing::warn!(
                            reason = reason.as_str(),
                            "connection refused (the server may be booting), but the request \
                             body was not buffered; not retried"
                        );
                    }
                }
                // Not an answer from the model: someone else may probe.
                self.probe = None;
                return Step::Done(Err(error));
            }
        };
        let status = response.status();
        let maybe_cold = self
            .config
            .classifier
            .may_be_cold_start(status, attempt.held);
        let readable = maybe_cold
            && matches!(self.request, Kept::Copy(_))
            && response.body().size_hint().lower() <= PEEK_LIMIT as u64;
        if readable {
            let (head, body) = response.into_parts();
            return Step::Peek(Box::new(Peek::new(head, body)), attempt);
        }
        if maybe_cold {
            // Maybe loading, unread (the last attempt, or a large body):
            // not proof that the model is warm.
            self.probe = None;
            if let Some(reason) = self.unbuffered {
                warn_unbuffered(status, reason);
            }
        } else {
            self.record(None);
        }
        let response = response.map(ResponseBody::passthrough);
        Step::Done(Ok(finish(response, self.report())))
    }

    /// The start of a response was read (`end`: how its body ended, or
    /// `None` when it was too large or too slow to be a loading body).
    pub(crate) fn peeked(
        &mut self,
        peek: Peek<ResBody>,
        end: Option<End<ResBody::Error>>,
        attempt: Attempt,
    ) -> Step<S::Future, ResBody> {
        let cold = match &end {
            Some(End::Trailers(_) | End::Eof) => self.config.classifier.0.classify(&ResponseView {
                status: peek.head.status,
                headers: &peek.head.headers,
                body: &peek.bytes(),
                held: attempt.held,
                attempt: self.attempts,
            }),
            Some(End::Error(_)) | None => None,
        };
        let Some(cold) = cold else {
            // Not a cold start: hand it on, the bytes read first.
            self.record(None);
            let Peek {
                head, body, read, ..
            } = peek;
            let rest = end.is_none().then_some(body);
            let response = Response::from_parts(head, ResponseBody::peeked(read, end, rest));
            return Step::Done(Ok(finish(response, self.report())));
        };
        let snapshot = Arc::new(snapshot(peek, end, &cold));
        self.cold_start(snapshot, &cold, attempt)
    }

    /// The model is cold (`snapshot`: its loading answer, or a refused
    /// connection): wait for another caller's probe, or plan this call's
    /// own next attempt.
    fn cold_start(
        &mut self,
        snapshot: Arc<Snapshot>,
        cold: &ColdStart,
        attempt: Attempt,
    ) -> Step<S::Future, ResBody> {
        self.unreachable = snapshot.refused.is_some();
        self.met_unreachable |= self.unreachable;
        let snapshot_checkable = snapshot.checkable;
        let gate = self.record(Some(&snapshot));
        self.cold().last = Some(snapshot);
        // A route that said ready before this cold answer lied.
        if std::mem::take(&mut self.said_ready) {
            self.distrust_route();
        }
        if self.attempts >= self.config.max_attempts {
            return self.give_up(GaveUp::Attempts);
        }
        // Another caller probes this model: wait for it rather than retry
        // on our own.
        if let (None, Some(gate), Some(key)) = (&self.probe, gate, self.key()) {
            if let Some(wait) = self.enter(key, gate, 0) {
                if let WaitKind::Behind { .. } = wait.kind {
                    return Step::Wait(wait);
                }
            }
        }
        // This call polls the model itself now.
        self.check_next = snapshot_checkable;
        self.poll_again(cold, attempt)
    }

    /// The pause before this call's own next request to a cold model.
    fn poll_again(&mut self, cold: &ColdStart, attempt: Attempt) -> Step<S::Future, ResBody> {
        match self.plan_wait(cold, attempt) {
            Err(why) => self.give_up(why),
            Ok(wait) if wait.is_zero() => Step::Ready,
            Ok(wait) => {
                let gate = self.probe.as_ref().map(|probe| Arc::clone(probe.gate()));
                Step::Wait(Wait::new(wait, gate, WaitKind::Pause { gives_up: false }))
            }
        }
    }

    /// A wait ended.
    pub(crate) fn woken(&mut self, wait: &Wait, woken: Woken) -> Step<S::Future, ResBody> {
        let heard = match &wait.kind {
            WaitKind::Pause { gives_up } => {
                self.cold().waited += wait.started.elapsed();
                if *gives_up && woken == Woken::Timer {
                    return self.out_of_time();
                }
                if woken == Woken::Gate {
                    // Released: the model is warm, send the request itself.
                    self.check_next = false;
                }
                return Step::Ready;
            }
            WaitKind::Behind { company, heard } => {
                // Whatever comes next may end in giving up.
                self.cold().last = Some(company.gate().last());
                *heard
            }
        };
        if woken == Woken::Timer {
            self.cold().waited += wait.started.elapsed();
            return self.out_of_time();
        }
        // The probe was given back, or the model answered: look again (the
        // gate may be gone, or a new one may exist).
        let gate = self
            .key()
            .and_then(|key| Some((key, self.config.registry.gate(key)?)));
        let next = gate.and_then(|(key, gate)| self.enter(key, gate, heard));
        match next {
            Some(mut next) if matches!(next.kind, WaitKind::Behind { .. }) => {
                // Keep counting from when this wait began.
                next.started = wait.started;
                Step::Wait(next)
            }
            next => {
                self.cold().waited += wait.started.elapsed();
                if next.is_none() && self.probe.is_none() {
                    // Released, not taking over: send the request itself.
                    self.check_next = false;
                }
                next.map_or(Step::Ready, Step::Wait)
            }
        }
    }

    /// A readiness check answered (its status), or failed. Ready: the
    /// request goes now, and so do the callers waiting on the model. Not
    /// ready (a `503` or `429`, or a refused connection): poll again.
    /// Anything else (a `404`, a `401`, a redirect, a `500`, another error)
    /// shows the route wrong for this server: it is dropped for this model,
    /// and the request goes now.
    fn checked(
        &mut self,
        answer: Result<StatusCode, BoxError>,
        attempt: Attempt,
    ) -> Step<S::Future, ResBody> {
        self.unreachable = false;
        match answer {
            Ok(status) if status.is_success() => {
                self.said_ready = true;
                self.check_next = false;
                let company = self.probe.as_ref().is_some_and(|p| p.gate().has_company());
                if let (true, Some(key)) = (company, self.registry_key()) {
                    self.config.registry.mark_warm(key);
                    self.probe = None;
                }
                Step::Ready
            }
            Ok(StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) => {
                // Up again after a refusal: the next probe is the request,
                // so that the model's own answer is the latest one kept.
                if self.latest().is_some_and(|last| last.refused.is_some()) {
                    self.check_next = false;
                }
                self.poll_again(&self.not_ready(), attempt)
            }
            Err(error) if refused(&*error) => {
                // The latest the server "said": it is down again, or still.
                self.unreachable = true;
                self.met_unreachable = true;
                self.cold().last = Some(Arc::new(unreachable(error)));
                self.poll_again(&self.not_ready(), attempt)
            }
            Ok(_) | Err(_) => {
                self.distrust_route();
                Step::Ready
            }
        }
    }

    /// A readiness check had no answer by its deadline: the budget is spent,
    /// or the route is too slow to help, and the request goes now.
    pub(crate) fn check_timed_out(&mut self) -> Step<S::Future, ResBody> {
        if self.remaining().is_zero() {
            return self.give_up(GaveUp::Budget);
        }
        self.distrust_route();
        Step::Ready
    }

    /// The latest cold-start answer this call keeps, if any.
    fn latest(&self) -> Option<&Snapshot> {
        self.cold.as_ref()?.last.as_deref()
    }

    /// A check's "not ready", paced as the model's latest answer asks.
    fn not_ready(&self) -> ColdStart {
        let cold = ColdStart::new(Hint::Unknown);
        match self.latest().and_then(|last| last.poll) {
            Some(poll) => cold.with_poll_interval(poll),
            None => cold,
        }
    }

    /// The service is ready (or failed) for the next attempt. Nothing is sent
    /// past the budget, whatever took the time (a check, a slow service).
    pub(crate) fn ready(&mut self, ready: Result<(), BoxError>) -> Step<S::Future, ResBody> {
        if let Err(error) = ready {
            self.probe = None;
            return Step::Done(Err(error));
        }
        let past_budget = self
            .cold
            .as_ref()
            .is_some_and(|cold| cold.since.elapsed() > self.config.max_total_wait);
        if past_budget {
            return self.give_up(GaveUp::Budget);
        }
        match self.send() {
            Some(step) => step,
            None => self.give_up(GaveUp::Attempts),
        }
    }

    /// Decides the wait after a loading response, or why the call gives up
    /// (attempts or time spent). Tells tracing and the hook.
    fn plan_wait(&mut self, cold: &ColdStart, attempt: Attempt) -> Result<Duration, GaveUp> {
        let uri = self.uri().ok_or(GaveUp::Attempts)?;
        if self.attempts >= self.config.max_attempts {
            return Err(GaveUp::Attempts);
        }
        // The self-hosted pace is for cheap probes: a small request, or a
        // check. A large body with no route to check waits at the usual pace.
        let cheap = self.body.bytes().len() < ROUTE_BODY || self.route_to_check().is_some();
        let now = Instant::now();
        let since = self.cold().since;
        let elapsed = now.saturating_duration_since(since);
        let remaining = self.remaining();
        let config = &self.config;
        let answer = Answer {
            hint: cold.hint(),
            // Readiness checks ask the model too: they pace a lone caller.
            attempt: self.attempts + self.checks,
            took: attempt
                .sent
                .map_or(Duration::ZERO, |sent| now.saturating_duration_since(sent)),
            held: attempt.held,
            company: self
                .probe
                .as_ref()
                .is_some_and(|probe| probe.gate().has_company()),
            poll: cold.poll_interval().filter(|_| cheap),
        };
        let jitter = config.jitter.then(wake::random_unit);
        let wait = wake::next_wait(
            config.wait_strategy,
            &answer,
            config.wait_bounds(),
            jitter,
            remaining,
        );
        let wait = match wait {
            Some(wait) => wait,
            // At the caller's deadline, before the budget's end: go now.
            None if remaining.is_zero() && !self.budget_left().is_zero() => Duration::ZERO,
            None => return Err(GaveUp::Budget),
        };
        let estimate = match cold.hint() {
            Hint::Estimate(secs) => Some(secs),
            _ => None,
        };
        announce(
            config,
            &RetryEvent {
                uri: &uri,
                model: cold.model(),
                attempt: self.attempts + self.checks,
                wait,
                estimate,
                elapsed,
                behind_probe: false,
                unreachable: self.unreachable,
            },
        );
        Ok(wait)
    }
}

/// Whether an error proves that nothing reached the server: a refused
/// connection, anywhere in its source chain.
fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let io = error.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        next = error.source();
    }
    false
}

/// A refused connection, as the model's latest "answer".
fn unreachable(error: BoxError) -> Snapshot {
    let (head, ()) = Response::new(()).into_parts();
    Snapshot {
        head,
        body: Vec::new(),
        trailers: None,
        hold: Hold::None,
        model: None,
        estimate: None,
        refused: Some(Arc::from(error)),
        checkable: true,
        // A refused connection costs nothing: a server booting next to the
        // client is asked at the self-hosted pace.
        poll: Some(SELF_HOSTED_POLL),
        at: Instant::now(),
    }
}

/// `route` with the query of the caller's `uri` (where credentials may
/// travel, as `?api_key=`), unless the route has its own.
fn with_query_of(route: Uri, uri: &Uri) -> Uri {
    let (None, Some(query)) = (route.query(), uri.query()) else {
        return route;
    };
    let mut parts = route.into_parts();
    let path = parts.path_and_query.as_ref().map_or("/", |p| p.path());
    // A query that would not parse again is left off.
    if let Ok(path_and_query) = format!("{path}?{query}").parse() {
        parts.path_and_query = Some(path_and_query);
    }
    Uri::from_parts(parts).unwrap_or_default()
}

/// A loading response, read to its end, as the model's latest.
fn snapshot<B: Body>(peek: Peek<B>, end: Option<End<B::Error>>, cold: &ColdStart) -> Snapshot {
    Snapshot {
        head: peek.head,
        body: peek.read,
        trailers: match end {
            Some(End::Trailers(trailers)) => Some(trailers),
            _ => None,
        },
        hold: cold.hold(),
        model: cold.model().map(str::to_owned),
        estimate: match cold.hint() {
            Hint::Estimate(secs) => Some(secs),
            _ => None,
        },
        refused: None,
        checkable: !matches!(cold.hint(), Hint::Backoff | Hint::After(_)),
        poll: cold.poll_interval(),
        at: Instant::now(),
    }
}

/// Tells tracing and the hook of a wait.
fn announce(config: &Config, event: &RetryEvent<'_>) {
    let uri = event.uri;
    let message = match (event.unreachable, event.behind_probe) {
        (false, true) => "model is loading; waiting for another request's probe of it",
        (false, false) => "model is loading; waiting before retrying",
        (true, true) => "model server unreachable; waiting for another request's probe of it",
        (true, false) => "model server unreachable; waiting before retrying",
    };
    tracing::info!(
        // Host and port: never userinfo, nor the query (credentials travel
        // in both).
        authority = %crate::report::HostPort(uri),
        path = uri.path(),
        model = event.model,
        attempt = event.attempt,
        wait_ms = event.wait.as_millis() as u64,
        estimate = event.estimate,
        behind_probe = event.behind_probe,
        unreachable = event.unreachable,
        "{message}"
    );
    if let Some(hook) = &config.on_retry {
        hook(event);
    }
}

/// A call that could not be retried met what may be a cold start.
fn warn_unbuffered(status: StatusCode, reason: Unbuffered) {
    tracing::warn!(
        status = status.as_u16(),
        reason = reason.as_str(),
        "response may be a cold start, but the request body was not buffered; not retried"
    );
}

fn finish<B>(mut response: Response<B>, report: ColdStartReport) -> Response<B> {
    response.extensions_mut().insert(report);
    response
}

#[cfg(test)]
mod tests {
    //! The decisions alone: no I/O, tokio's paused clock, responses handed
    //! in by hand.

    use std::convert::Infallible;

    use http_body_util::Full;

    use super::*;
    use crate::{ColdStartRetryLayer, WaitStrategy};

    type Backend = tower::util::ServiceFn<
        fn(
            Request<RequestBody<Full<Bytes>>>,
        ) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
    >;
    type TestCall = Call<Backend, Full<Bytes>>;
    type TestStep =
        Step<std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>, Full<Bytes>>;

    fn ok(
        _: Request<RequestBody<Full<Bytes>>>,
    ) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
        std::future::ready(Ok(Response::new(Full::default())))
    }

    const LOADING: &[u8] = br#"{"error":"Model m is currently loading","estimated_time":20.0}"#;

    fn loading() -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from_static(LOADING)));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    }

    /// A call whose first attempt has gone out.
    fn sent(layer: ColdStartRetryLayer) -> (TestCall, Attempt) {
        let (parts, ()) = Request::post("http://m.test/models/m")
            .body(())
            .unwrap()
            .into_parts();
        let mut call = Call::new(
            tower::service_fn(ok as fn(_) -> _),
            Arc::clone(&layer.config),
            parts,
        );
        match call.first::<Full<Bytes>>() {
            Step::Call(_, attempt) => (call, attempt),
            _ => panic!("a warm model's first request goes out"),
        }
    }

    /// Reads a peeked body to its end, as the Peeking state would.
    fn read_to_end(step: TestStep) -> (Peek<Full<Bytes>>, Option<End<Infallible>>, Attempt) {
        let Step::Peek(mut peek, attempt) = step else {
            panic!("a possible cold start is read")
        };
        let waker = std::task::Waker::noop();
        let Poll::Ready(end) = peek.poll_read(&mut Context::from_waker(waker)) else {
            panic!("a full body is read at once")
        };
        (*peek, end, attempt)
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_answered_as_it_came_with_one_attempt() {
        let (mut call, attempt) = sent(ColdStartRetryLayer::new());
        let Step::Done(Ok(response)) = call.answered(Ok(Response::new(Full::default())), attempt)
        else {
            panic!("answered")
        };
        let report = response.extensions().get::<ColdStartReport>().unwrap();
        assert_eq!((report.attempts(), report.waited()), (1, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loading_answer_is_read_then_waited_out_with_the_probe() {
        let layer = ColdStartRetryLayer::new().jitter(false);
        let (mut call, attempt) = sent(layer.clone());
        let (peek, end, attempt) = read_to_end(call.answered(Ok(loading()), attempt));
        let Step::Wait(wait) = call.peeked(peek, end, attempt) else {
            panic!("a loading answer is waited out")
        };
        assert!(matches!(wait.kind, WaitKind::Pause { gives_up: false }));
        assert!(call.probe.is_some(), "its answer created the model's state");
        assert_eq!(layer.cold_models(), 1);
        // The default strategy retries 1 s after the first request.
        assert_eq!(
            wait.timer.deadline() - Instant::now(),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_allowed_attempt_gives_back_the_loading_answer_byte_for_byte() {
        let layer = ColdStartRetryLayer::new().max_attempts(1);
        let (mut call, attempt) = sent(layer.clone());
        // With one attempt allowed, nothing is read: the 503 goes back as is.
        let Step::Done(Ok(response)) = call.answered(Ok(loading()), attempt) else {
            panic!("not read, answered")
        };
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(layer.cold_models(), 0, "an unread 503 proves nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_that_runs_to_the_budget_gives_up_with_the_latest_loading_answer() {
        let layer = ColdStartRetryLayer::new().wait_strategy(WaitStrategy::SleepEstimate);
        let (mut call, attempt) = sent(layer);
        let (peek, end, attempt) = read_to_end(call.answered(Ok(loading()), attempt));
        let Step::Wait(_) = call.peeked(peek, end, attempt) else {
            panic!("waits")
        };
        tokio::time::advance(Duration::from_secs(30)).await;
        let pause = Wait::new(Duration::ZERO, None, WaitKind::Pause { gives_up: true });
        let Step::Done(Ok(response)) = call.woken(&pause, Woken::Timer) else {
            panic!("gave up")
        };
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let report = *response.extensions().get::<ColdStartReport>().unwrap();
        assert_eq!(report.attempts(), 1);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert_eq!(&body.to_bytes()[..], LOADING);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_sent_past_the_budget_whatever_took_the_time() {
        let layer = ColdStartRetryLayer::new().max_total_wait(Duration::from_secs(5));
        let (mut call, attempt) = sent(layer);
        let (peek, end, attempt) = read_to_end(call.answered(Ok(loading()), attempt));
        let _ = call.peeked(peek, end, attempt);
        tokio::time::advance(Duration::from_secs(6)).await;
        let Step::Done(Ok(response)) = call.ready(Ok(())) else {
            panic!("gave up")
        };
        assert_eq!(call.attempts, 1);
        let report = response.extensions().get::<ColdStartReport>().unwrap();
        assert_eq!(report.gave_up(), Some(GaveUp::Budget));
    }
}
