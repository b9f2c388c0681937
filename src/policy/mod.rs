//! One call's retry policy: its state, and every decision the response
//! future asks of it.
//!
//! The future ([`crate::future`]) owns the inner service and polls one thing
//! at a time; it hands what it got to one method here, which says what to do
//! next as a [`Next`]: send this request, check this readiness route, read
//! this response's body, wait, poll the service ready, or answer. Nothing
//! here polls, and nothing here knows the inner service.
//!
//! The methods are grouped by the event they handle: [`send`] builds and
//! admits requests, [`answers`] reads what came back, [`waits`] paces the
//! next request and waits behind other callers.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;

use crate::coalesce::Standing;
use crate::config::{Config, Shared};
use crate::loading::{LoadingAnswer, Peek};
use crate::report::{scrub_urls, Redacted};
use crate::request::Requests;
use crate::request_body::{Allowance, Asked};
use crate::wait::Wait;
use crate::{BoxError, ColdStartReport, GaveUp, RequestBody, ResponseBody, Unbuffered};

mod answers;
mod send;
mod waits;

/// The smallest request body for which a readiness check pays: below it,
/// resending the request costs about what a check does, and the request is
/// the truth (a route may be server-wide, slower than the model, or wrong).
pub(crate) const ROUTE_BODY: usize = 64 * 1024;

/// The longest a readiness check may take (and never past the budget): a
/// route that answers no sooner than this is no help.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the future does next.
// A `Next` is moved once, from a decision to the state it names; boxing the
// request or the answer would put an allocation on the warm path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Next<ReqBody, ResBody: Body> {
    /// Send this request (the service is ready), and wait for its answer.
    Send(Request<RequestBody<ReqBody>>, Attempt),
    /// Send this readiness check, and wait for its answer until the instant.
    Check(Request<RequestBody<ReqBody>>, Attempt, Instant),
    /// Read the start of this response's body to classify it.
    Peek(Box<Peek<ResBody>>, Attempt),
    /// Wait for a timer, another caller's probe, or the model's release.
    Wait(Box<Wait>),
    /// Poll the service ready, then ask [`Policy::ready`] what to send.
    Ready,
    /// Answer the caller.
    Done(Result<Response<ResponseBody<ResBody>>, BoxError>),
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
    // When it was sent, if it is a retry, held or a check (the first
    // request is not timed: the warm path reads no clock).
    sent: Option<Instant>,
}

/// The model's key in the shared registry, once needed.
#[derive(Debug, Clone, Copy)]
enum Keyed {
    NotYet,
    /// The user's key function gave none: this call waits out a cold start
    /// alone.
    Alone,
    Model(u64),
}

/// What a call learns once it met its model cold.
struct ColdStartSoFar {
    // When this call first met the model loading.
    since: Instant,
    // Time spent without a request in flight: asleep, or waiting for
    // another caller's probe of the same model.
    waited: Duration,
    // The latest loading answer seen, returned as it came if the budget
    // runs out before the next attempt is sent. A caller waiting behind a
    // probe keeps none: it takes the model's latest when it stops waiting.
    latest: Option<Arc<LoadingAnswer>>,
}

/// How the call uses the server's readiness route.
#[derive(Debug, Default)]
struct RouteUse {
    // Whether the next probe is a readiness check.
    check_next: bool,
    // Whether the latest probe was one (checks and requests alternate where
    // only company makes a check worth it).
    checked_last: bool,
    // Whether a check said "ready" since the last request: if the request
    // then meets the model cold, the route lied.
    said_ready: bool,
}

/// Everything one call knows, and decides from.
pub(crate) struct Policy<ReqBody> {
    shared: Arc<Shared>,
    requests: Requests<ReqBody>,
    // Requests sent so far, and readiness checks.
    attempts: u32,
    checks: u32,
    key: Keyed,
    // Boxed: the warm path never needs it.
    cold: Option<Box<ColdStartSoFar>>,
    standing: Standing,
    // Bytes this call holds in the layer's replay pool.
    pooled: usize,
    // Why the body was not buffered, if it was not.
    unbuffered: Option<Unbuffered>,
    // Whether the model's server was last found unreachable (a refused
    // connection) rather than loading; and whether it ever was, this call.
    unreachable: bool,
    met_unreachable: bool,
    route: RouteUse,
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
}

impl<ReqBody> Drop for Policy<ReqBody> {
    fn drop(&mut self) {
        if self.pooled > 0 {
            self.shared.runtime.pool.give_back(self.pooled);
        }
    }
}

impl<ReqBody> Policy<ReqBody> {
    pub(crate) fn new(shared: Arc<Shared>, parts: http::request::Parts) -> Self {
        Policy {
            shared,
            requests: Requests::new(parts),
            attempts: 0,
            checks: 0,
            key: Keyed::NotYet,
            cold: None,
            standing: Standing::default(),
            pooled: 0,
            unbuffered: None,
            unreachable: false,
            met_unreachable: false,
            route: RouteUse::default(),
            gave_up: None,
            deadline: None,
            asked: None,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn report(&self) -> ColdStartReport {
        let waited = self.cold.as_ref().map_or(Duration::ZERO, |c| c.waited);
        ColdStartReport::new(self.attempts, waited, self.unbuffered, self.met_unreachable)
            .with_checks(self.checks, self.gave_up)
    }

    /// This call's share of the layer's replay pool.
    pub(crate) fn allowance(&mut self) -> Allowance<'_> {
        Allowance {
            pool: &self.shared.runtime.pool,
            cap: self.shared.config.total_body_limit,
            held: &mut self.pooled,
        }
    }

    /// Sets the caller's deadline for the whole call.
    #[cfg(feature = "reqwest-middleware")]
    pub(crate) fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    fn cold(&mut self) -> &mut ColdStartSoFar {
        self.cold.get_or_insert_with(|| {
            Box::new(ColdStartSoFar {
                since: Instant::now(),
                waited: Duration::ZERO,
                latest: None,
            })
        })
    }

    /// The latest cold-start answer this call keeps, if any.
    fn latest(&self) -> Option<&LoadingAnswer> {
        self.cold.as_ref()?.latest.as_deref()
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
        let max = self.shared.config.max_total_wait;
        self.cold
            .as_ref()
            .map_or(max, |cold| max.saturating_sub(cold.since.elapsed()))
    }

    /// The model's key in the registry (computed once, on the cold path).
    fn model_key(&mut self) -> Option<u64> {
        model_key(&mut self.key, &self.requests, &self.shared)
    }

    /// The service is ready (or failed) for the next attempt. Nothing is sent
    /// past the budget, whatever took the time (a check, a slow service).
    pub(crate) fn ready<ResBody: Body>(
        &mut self,
        ready: Result<(), BoxError>,
    ) -> Next<ReqBody, ResBody> {
        if let Err(error) = ready {
            self.standing.give_back();
            return Next::Done(Err(error));
        }
        let max = self.shared.config.max_total_wait;
        if self
            .cold
            .as_ref()
            .is_some_and(|cold| cold.since.elapsed() > max)
        {
            return self.give_up(GaveUp::Budget);
        }
        match self.send() {
            Some(next) => next,
            None => self.give_up(GaveUp::Attempts),
        }
    }

    /// Out of time at the end of a wait: at the caller's deadline (with
    /// budget left) the next attempt goes, told it has no time, so that the
    /// client ends it with its own timeout error and sends nothing; at the
    /// end of the budget the call gives up.
    fn out_of_time<ResBody: Body>(&mut self) -> Next<ReqBody, ResBody> {
        if self.deadline.is_some() && !self.budget_left().is_zero() {
            return Next::Ready;
        }
        self.give_up(GaveUp::Budget)
    }

    /// The latest loading response, exactly as it came: this call's own, or
    /// a newer one its model gave another caller.
    fn give_up<ResBody: Body>(&mut self, why: GaveUp) -> Next<ReqBody, ResBody> {
        self.gave_up = Some(why);
        let shared = self.standing.leave();
        let own = self.cold.as_mut().and_then(|cold| cold.latest.take());
        match LoadingAnswer::newer(own, shared) {
            Some(answer) => Next::Done(answer.give_back(why, self.report())),
            // Nothing to give back: no loading answer was kept. The budget
            // and the bookkeeping make this unreachable.
            None => Next::Done(Err("cold start: no loading response was kept".into())),
        }
    }
}

/// The model's key: computed once, from the request and the user's key
/// function. A free function, so that it borrows only what it reads while
/// the call's standing is borrowed too.
fn model_key<B>(key: &mut Keyed, requests: &Requests<B>, shared: &Shared) -> Option<u64> {
    match *key {
        Keyed::Model(key) => return Some(key),
        Keyed::Alone => return None,
        Keyed::NotYet => {}
    }
    let registry = &shared.runtime.registry;
    let found = requests.key(registry, shared.config.model_key.as_ref());
    match found {
        Some(found) => *key = Keyed::Model(found),
        // No request can follow: nothing to key, now or later.
        None if !requests.can_retry() && requests.sent() => {}
        None => *key = Keyed::Alone,
    }
    found
}

impl<ReqBody, ResBody: Body> std::fmt::Debug for Next<ReqBody, ResBody> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URI without userinfo or query, no header, no body: credentials
        // travel in all of them.
        match self {
            Next::Send(request, attempt) => f
                .debug_tuple("Send")
                .field(request.method())
                .field(&Redacted(request.uri()))
                .field(attempt)
                .finish(),
            Next::Check(request, attempt, deadline) => f
                .debug_tuple("Check")
                .field(&Redacted(request.uri()))
                .field(attempt)
                .field(&deadline.saturating_duration_since(Instant::now()))
                .finish(),
            Next::Peek(peek, attempt) => f
                .debug_tuple("Peek")
                .field(&peek.head.status)
                .field(attempt)
                .finish(),
            Next::Wait(wait) => f.debug_tuple("Wait").field(wait).finish(),
            Next::Ready => f.write_str("Ready"),
            Next::Done(Ok(response)) => f.debug_tuple("Done").field(&response.status()).finish(),
            Next::Done(Err(error)) => f
                .debug_tuple("Done")
                .field(&scrub_urls(&error.to_string()))
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The decisions alone: no I/O, tokio's paused clock, responses handed
    //! in by hand.

    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::Full;

    use super::*;
    use crate::request_body::{Buffered, Buffering};
    use crate::response_body::End;
    use crate::wait::{WaitKind, Woken};
    use crate::{ColdStartRetryLayer, WaitStrategy};

    type TestPolicy = Policy<Full<Bytes>>;
    type TestNext = Next<Full<Bytes>, Full<Bytes>>;

    const LOADING: &[u8] = br#"{"error":"Model m is currently loading","estimated_time":20.0}"#;

    fn loading() -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from_static(LOADING)));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    }

    /// A call whose first attempt has gone out.
    fn sent(layer: ColdStartRetryLayer) -> (TestPolicy, Attempt) {
        let (parts, ()) = Request::post("http://m.test/models/m")
            .body(())
            .unwrap()
            .into_parts();
        let mut policy = Policy::new(Arc::clone(&layer.shared), parts);
        let read = Ok(Buffering::Done(Buffered::default()));
        match policy.buffered::<Full<Bytes>>(read) {
            Next::Send(_, attempt) => (policy, attempt),
            next => panic!("a warm model's first request goes out, not {next:?}"),
        }
    }

    /// Reads a peeked body to its end, as the Peeking state would.
    fn read_to_end(next: TestNext) -> (Peek<Full<Bytes>>, Option<End<Infallible>>, Attempt) {
        let Next::Peek(mut peek, attempt) = next else {
            panic!("a possible cold start is read, not {next:?}")
        };
        let waker = std::task::Waker::noop();
        let Poll::Ready(end) = peek.poll_read(&mut Context::from_waker(waker)) else {
            panic!("a full body is read at once")
        };
        (*peek, end, attempt)
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_answered_as_it_came_with_one_attempt() {
        let (mut policy, attempt) = sent(ColdStartRetryLayer::new());
        let answered = policy.answered(Ok(Response::new(Full::default())), attempt);
        let Next::Done(Ok(response)) = answered else {
            panic!("answered, not {answered:?}")
        };
        let report = response.extensions().get::<ColdStartReport>().unwrap();
        assert_eq!((report.attempts(), report.waited()), (1, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loading_answer_is_read_then_waited_out_with_the_probe() {
        let layer = ColdStartRetryLayer::new().jitter(false);
        let (mut policy, attempt) = sent(layer.clone());
        let (peek, end, attempt) = read_to_end(policy.answered(Ok(loading()), attempt));
        let Next::Wait(wait) = policy.peeked(peek, end, attempt) else {
            panic!("a loading answer is waited out")
        };
        assert!(matches!(wait.kind, WaitKind::Pause { gives_up: false }));
        assert!(
            policy.standing.probing().is_some(),
            "its answer created the model's state"
        );
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
        let (mut policy, attempt) = sent(layer.clone());
        // With one attempt allowed, nothing is read: the 503 goes back as is.
        let Next::Done(Ok(response)) = policy.answered(Ok(loading()), attempt) else {
            panic!("not read, answered")
        };
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(layer.cold_models(), 0, "an unread 503 proves nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_that_runs_to_the_budget_gives_up_with_the_latest_loading_answer() {
        let layer = ColdStartRetryLayer::new().wait_strategy(WaitStrategy::SleepEstimate);
        let (mut policy, attempt) = sent(layer);
        let (peek, end, attempt) = read_to_end(policy.answered(Ok(loading()), attempt));
        let Next::Wait(_) = policy.peeked(peek, end, attempt) else {
            panic!("waits")
        };
        tokio::time::advance(Duration::from_secs(30)).await;
        let pause = Wait::pause(Duration::ZERO, None, true);
        let Next::Done(Ok(response)) = policy.woken::<Full<Bytes>>(&pause, Woken::Timer) else {
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
        let (mut policy, attempt) = sent(layer);
        let (peek, end, attempt) = read_to_end(policy.answered(Ok(loading()), attempt));
        let _ = policy.peeked(peek, end, attempt);
        tokio::time::advance(Duration::from_secs(6)).await;
        let Next::Done(Ok(response)) = policy.ready::<Full<Bytes>>(Ok(())) else {
            panic!("gave up")
        };
        assert_eq!(policy.attempts, 1);
        let report = response.extensions().get::<ColdStartReport>().unwrap();
        assert_eq!(report.gave_up(), Some(GaveUp::Budget));
    }
}
