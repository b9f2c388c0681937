//! Reading what came back: a response, an error, a peeked body, a
//! readiness check's answer.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::Body;

use super::{model_key, Attempt, Next, Policy};
use crate::classifier::{ColdStart, Hint};
use crate::loading::{self, is_refusal, LoadingAnswer, Peek, PEEK_LIMIT};
use crate::report::{warn_refused_unbuffered, warn_unbuffered};
use crate::request_body::Asked;
use crate::response_body::End;
use crate::{BoxError, GaveUp, ResponseBody};

impl<ReqBody> Policy<ReqBody> {
    /// The service answered: hand the answer on, or read it if it may be a
    /// cold start this call can retry.
    pub(crate) fn answered<ResBody: Body<Data = Bytes>>(
        &mut self,
        answer: Result<Response<ResBody>, BoxError>,
        attempt: Attempt,
    ) -> Next<ReqBody, ResBody> {
        let asked = self.asked.take();
        let response = match answer {
            Ok(response) => response,
            Err(error) => return self.failed(error, asked, attempt),
        };
        let status = response.status();
        let classifier = &self.shared.config.classifier;
        let maybe_cold = classifier.may_be_cold_start(status, attempt.held);
        let readable = maybe_cold
            && self.requests.can_retry()
            && response.body().size_hint().lower() <= PEEK_LIMIT as u64;
        if readable {
            let (head, body) = response.into_parts();
            return Next::Peek(Box::new(Peek::new(head, body)), attempt);
        }
        if maybe_cold {
            // Maybe loading, unread (the last attempt, or a large body):
            // not proof that the model is warm.
            self.standing.give_back();
            if let Some(reason) = self.unbuffered {
                warn_unbuffered(status, reason);
            }
        } else {
            self.warm();
        }
        let response = response.map(ResponseBody::passthrough);
        Next::Done(Ok(self.report().attach(response)))
    }

    /// The service failed. Only a refusal of the request's own first
    /// connection is retried (a client that asked for the body had a
    /// connection: a redirect's later hop may be what refused); every other
    /// error reaches the caller as it is.
    fn failed<ResBody: Body>(
        &mut self,
        error: BoxError,
        asked: Option<Asked>,
        attempt: Attempt,
    ) -> Next<ReqBody, ResBody> {
        let unsent = asked.is_some_and(|asked| !asked.was_asked());
        if self.requests.can_retry() && unsent && is_refusal(&*error) {
            // Nothing reached the server: it is still booting.
            let answer = Arc::new(LoadingAnswer::refused(error));
            return self.cold_start(answer, &LoadingAnswer::booting(), attempt);
        }
        let retries_refused = self.shared.config.classifier.retries_refused();
        if let (Some(reason), true) = (self.unbuffered, retries_refused) {
            if is_refusal(&*error) {
                warn_refused_unbuffered(reason);
            }
        }
        // Not an answer from the model: someone else may probe.
        self.standing.give_back();
        Next::Done(Err(error))
    }

    /// The start of a response was read (`end`: how its body ended, or
    /// `None` when it was too large or too slow to be a loading body).
    pub(crate) fn peeked<ResBody: Body<Data = Bytes>>(
        &mut self,
        peek: Peek<ResBody>,
        end: Option<End<ResBody::Error>>,
        attempt: Attempt,
    ) -> Next<ReqBody, ResBody> {
        let classifier = &self.shared.config.classifier;
        let cold = loading::classify(classifier, &peek, &end, attempt.held, self.attempts);
        let Some(cold) = cold else {
            // Not a cold start: hand it on, the bytes read first.
            self.warm();
            let Peek {
                head, body, read, ..
            } = peek;
            let rest = end.is_none().then_some(body);
            let response = Response::from_parts(head, ResponseBody::peeked(read, end, rest));
            return Next::Done(Ok(self.report().attach(response)));
        };
        let answer = Arc::new(LoadingAnswer::read(peek, end, &cold));
        self.cold_start(answer, &cold, attempt)
    }

    /// The model is cold (`answer`: its loading answer, or a refused
    /// connection): wait for another caller's probe, or plan this call's
    /// own next attempt.
    fn cold_start<ResBody: Body>(
        &mut self,
        answer: Arc<LoadingAnswer>,
        cold: &ColdStart,
        attempt: Attempt,
    ) -> Next<ReqBody, ResBody> {
        self.unreachable = answer.refused.is_some();
        self.met_unreachable |= self.unreachable;
        let checkable = answer.checkable;
        let registry = &self.shared.runtime.registry;
        let model = model_key(&mut self.key, &self.requests, &self.shared).map(|key| {
            (
                key,
                self.standing.loading(registry, key, Arc::clone(&answer)),
            )
        });
        self.cold().latest = Some(answer);
        // A route that said ready before this cold answer lied.
        if std::mem::take(&mut self.route.said_ready) {
            self.distrust_route();
        }
        if self.attempts >= self.shared.config.max_attempts {
            return self.give_up(GaveUp::Attempts);
        }
        // Another caller probes this model: wait for it rather than retry
        // on our own. A probe free to take is taken, and paced from this
        // call's own answer below.
        if let (None, Some((key, model))) = (self.standing.probing(), model) {
            let registry = &self.shared.runtime.registry;
            if let Some(waiter) = self.standing.join_or_probe(registry, key, model) {
                return self.wait_behind(waiter, 0);
            }
        }
        // This call polls the model itself now.
        self.route.check_next = checkable;
        self.poll_again(cold, attempt)
    }

    /// An answer that is not "loading": the model is warm, and everyone
    /// waiting on it is released.
    fn warm(&mut self) {
        let registry = &self.shared.runtime.registry;
        self.standing.warm(registry, || {
            model_key(&mut self.key, &self.requests, &self.shared)
        });
        self.route.check_next = false;
        self.route.said_ready = false;
    }

    /// A readiness check answered (its status), or failed. Ready: the
    /// request goes now, and so do the callers waiting on the model. Not
    /// ready (a `503` or `429`, or a refused connection): poll again.
    /// Anything else (a `404`, a `401`, a redirect, a `500`, another error)
    /// shows the route wrong for this server: it is dropped for this model,
    /// and the request goes now.
    pub(crate) fn checked<ResBody: Body>(
        &mut self,
        answer: Result<StatusCode, BoxError>,
        attempt: Attempt,
    ) -> Next<ReqBody, ResBody> {
        self.unreachable = false;
        match answer {
            Ok(status) if status.is_success() => {
                self.route.said_ready = true;
                self.route.check_next = false;
                if self.standing.has_company() {
                    let registry = &self.shared.runtime.registry;
                    self.standing.warm(registry, || {
                        model_key(&mut self.key, &self.requests, &self.shared)
                    });
                }
                Next::Ready
            }
            Ok(StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) => {
                // Up again after a refusal: the next probe is the request,
                // so that the model's own answer is the latest one kept.
                if self.latest().is_some_and(|latest| latest.refused.is_some()) {
                    self.route.check_next = false;
                }
                self.poll_again(&self.not_ready(), attempt)
            }
            Err(error) if is_refusal(&*error) => {
                // The latest the server "said": it is down again, or still.
                self.unreachable = true;
                self.met_unreachable = true;
                self.cold().latest = Some(Arc::new(LoadingAnswer::refused(error)));
                self.poll_again(&self.not_ready(), attempt)
            }
            Ok(_) | Err(_) => {
                self.distrust_route();
                Next::Ready
            }
        }
    }

    /// A readiness check had no answer by its deadline: the budget is spent,
    /// or the route is too slow to help, and the request goes now.
    pub(crate) fn check_timed_out<ResBody: Body>(&mut self) -> Next<ReqBody, ResBody> {
        if self.remaining().is_zero() {
            return self.give_up(GaveUp::Budget);
        }
        self.distrust_route();
        Next::Ready
    }

    /// A check's "not ready", paced as the model's latest answer asks.
    fn not_ready(&self) -> ColdStart {
        let cold = ColdStart::new(Hint::Unknown);
        match self.latest().and_then(|latest| latest.poll) {
            Some(poll) => cold.with_poll_interval(poll),
            None => cold,
        }
    }

    /// Stops using this model's readiness route: it answered something that
    /// is neither ready nor not ready, or said ready while the model was not.
    fn distrust_route(&mut self) {
        if let Some(key) = self.model_key() {
            self.shared.runtime.registry.distrust_route(key);
        }
        self.route.check_next = false;
    }
}
