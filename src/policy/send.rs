//! Sending: the first request (once the model's state admits it), each
//! retry, a readiness check, and a body sent once unbuffered.

use http::Uri;
use http_body::Body;
use tokio::time::Instant;

use super::{model_key, Attempt, CallDeadline, Next, Policy, CHECK_TIMEOUT, ROUTE_BODY};
use crate::classifier::Hold;
use crate::request::Outgoing;
use crate::request_body::{Asked, Buffered, Buffering};
use crate::{BoxError, RequestBody, Unbuffered};

impl<ReqBody> Policy<ReqBody> {
    /// The request body was read: send it, or send it once unbuffered.
    #[inline]
    pub(crate) fn buffered<ResBody: Body>(
        &mut self,
        read: Result<Buffering<ReqBody>, BoxError>,
    ) -> Next<ReqBody, ResBody> {
        match read {
            Err(error) => Next::Done(Err(error)),
            Ok(Buffering::Done(buffered)) => self.first(buffered),
            Ok(Buffering::Overflow(body, reason)) => self.send_once(body, reason),
        }
    }

    /// Sends the first attempt (the service taken in `call` is still
    /// ready), unless the model is known cold: then it waits its turn.
    #[inline]
    fn first<ResBody: Body>(&mut self, body: Buffered) -> Next<ReqBody, ResBody> {
        self.requests.set_body(body);
        let turn = self.standing.admit(
            &self.shared.runtime.registry,
            || model_key(&mut self.key, &self.requests, &self.shared),
            self.shared.config.wait_strategy,
        );
        match self.follow(turn, 0) {
            Some(next) => next,
            None => self
                .send()
                .unwrap_or_else(|| Next::Done(Err("request head lost".into()))),
        }
    }

    /// Builds the next attempt, the first or a retry, or a readiness check
    /// in its place. A retry or a probe asks the server to hold it, unless
    /// `hold_retries(false)`. `None` when no attempt can follow.
    #[inline]
    pub(super) fn send<ResBody: Body>(&mut self) -> Option<Next<ReqBody, ResBody>> {
        self.standing.sending();
        let retry = self.requests.sent();
        if retry && self.route.check_next {
            if let Some(route) = self.route_to_check() {
                return self.send_check(route);
            }
        }
        self.route.checked_last = false;
        let config = &self.shared.config;
        let first_hold = match config.hold_retries {
            true => config.classifier.first_hold(),
            false => Hold::None,
        };
        let hold = match &self.cold {
            Some(cold) if config.hold_retries && (retry || self.standing.probing().is_some()) => {
                cold.latest
                    .as_ref()
                    .map_or(first_hold, |latest| latest.hold)
            }
            _ if !retry => first_hold,
            _ => Hold::None,
        };
        let last = self.attempts + 1 >= config.max_attempts;
        // Watched only where a refusal may be retried: a refusal of this
        // attempt proves nothing unless the body was never asked for.
        self.asked = (config.classifier.retries_refused() && !last).then(Asked::default);
        let remaining = self.remaining();
        let Outgoing { mut request, held } =
            self.requests
                .next(hold, remaining, last, self.asked.clone())?;
        if let Some(deadline) = self.deadline {
            request.extensions_mut().insert(CallDeadline(deadline));
        }
        let attempt = Attempt {
            held,
            sent: (retry || held).then(Instant::now),
        };
        self.attempts += 1;
        Some(Next::Send(request, attempt))
    }

    /// The readiness route to check instead of sending the request, where a
    /// check pays and the route has not proved wrong for this model: for a
    /// large body (a check saves resending it), or, while other callers
    /// wait on the model, every other probe (a truthful route can release
    /// them all before the request's own answer, which a model server
    /// gives only after its work). The request itself is the probe
    /// otherwise, and it is the truth: a route may be server-wide, slower
    /// than the model, or wrong.
    pub(super) fn route_to_check(&mut self) -> Option<Uri> {
        let uri = self.requests.uri()?;
        let route = self.shared.config.classifier.readiness(&uri)?;
        let key = self.model_key()?;
        if !self.shared.runtime.registry.trusts_route(key) {
            return None;
        }
        let large = self.requests.body_len() >= ROUTE_BODY;
        let company = self.standing.has_company();
        (large || (company && !self.route.checked_last)).then_some(route)
    }

    /// Sends an empty `GET` of the readiness route, bounded by
    /// [`CHECK_TIMEOUT`] and the time left.
    fn send_check<ResBody: Body>(&mut self, route: Uri) -> Option<Next<ReqBody, ResBody>> {
        let request = self.requests.check(route)?;
        self.checks += 1;
        self.route.checked_last = true;
        let now = Instant::now();
        let attempt = Attempt {
            held: false,
            sent: Some(now),
        };
        let deadline = now + CHECK_TIMEOUT.min(self.remaining());
        Some(Next::Check(request, attempt, deadline))
    }

    /// Sends a body that is not buffered once, as it is: no retry follows.
    fn send_once<ResBody: Body>(
        &mut self,
        body: RequestBody<ReqBody>,
        reason: Unbuffered,
    ) -> Next<ReqBody, ResBody> {
        let Some(request) = self.requests.once(body) else {
            return Next::Done(Err("request head lost".into()));
        };
        self.attempts = 1;
        self.unbuffered = Some(reason);
        let attempt = Attempt {
            held: false,
            sent: None,
        };
        Next::Send(request, attempt)
    }
}
