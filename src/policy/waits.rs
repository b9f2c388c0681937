//! Waiting: the pace of a call's own next request, its turn behind other
//! callers of the same model, and what ends a wait.

use std::sync::Arc;
use std::time::Duration;

use http_body::Body;
use tokio::time::Instant;

use super::{Attempt, Next, Policy, ROUTE_BODY};
use crate::classifier::ColdStart;
use crate::coalesce::{ColdModel, Turn, Waiter};
use crate::pace::{self, Answer};
use crate::report::announce;
use crate::wait::{Wait, WaitKind, Woken};
use crate::{GaveUp, RetryEvent};

impl<ReqBody> Policy<ReqBody> {
    /// Acts on the model's answer to "may I send?": `None` to send now. A
    /// call that took over the probe checks the readiness route first where
    /// the model's latest answer allows it.
    pub(super) fn follow<ResBody: Body>(
        &mut self,
        turn: Turn,
        heard: u64,
    ) -> Option<Next<ReqBody, ResBody>> {
        if let Some(model) = self.standing.probing() {
            self.route.check_next = model.last().checkable;
        }
        match turn {
            Turn::Send => None,
            Turn::PauseUntil(resume, model) => Some(self.pause_until(resume, model)),
            Turn::WaitBehind(waiter) => Some(self.wait_behind(waiter, heard)),
        }
    }

    /// This call took over `model`'s probe: it pauses until the pace allows
    /// its request. A budget that ends first ends without a request.
    fn pause_until<ResBody: Body>(
        &mut self,
        resume: Instant,
        model: Arc<ColdModel>,
    ) -> Next<ReqBody, ResBody> {
        let cold = self.cold();
        if cold.latest.is_none() {
            cold.latest = Some(model.last());
        }
        let remaining = self.remaining();
        let pause = resume.saturating_duration_since(Instant::now());
        let gives_up = pause > remaining;
        Next::Wait(Wait::pause(pause.min(remaining), Some(model), gives_up))
    }

    /// Waits behind another caller's probe until the budget (or the
    /// caller's deadline) ends, telling the caller of each loading answer
    /// it has not heard of (`heard` so far).
    pub(super) fn wait_behind<ResBody: Body>(
        &mut self,
        waiter: Waiter,
        mut heard: u64,
    ) -> Next<ReqBody, ResBody> {
        let max = self.shared.config.max_total_wait;
        let cold = self.cold();
        // A waiter keeps no loading answer of its own.
        cold.latest = None;
        let budget_end = cold
            .since
            .checked_add(max)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let deadline = self.deadline.map_or(budget_end, |d| d.min(budget_end));
        let left = deadline.saturating_duration_since(Instant::now());
        self.tell_waiting(&waiter, &mut heard, left);
        Next::Wait(Wait::behind(waiter, deadline, heard))
    }

    /// Tells the caller of a loading answer, by another call's probe, that
    /// it has not heard of yet: same facts as a prober's wait.
    fn tell_waiting(&self, waiter: &Waiter, heard: &mut u64, left: Duration) {
        let Some(latest) = waiter.news(heard) else {
            return;
        };
        let Some(uri) = self.requests.uri() else {
            return;
        };
        let elapsed = self
            .cold
            .as_ref()
            .map_or(Duration::ZERO, |cold| cold.since.elapsed());
        let event = RetryEvent {
            uri: &uri,
            model: latest.model.as_deref(),
            attempt: self.attempts,
            wait: left,
            estimate: latest.estimate,
            elapsed,
            behind_probe: true,
            unreachable: latest.refused.is_some(),
        };
        announce(self.shared.config.on_retry.as_ref(), &event);
    }

    /// A wait ended.
    pub(crate) fn woken<ResBody: Body>(
        &mut self,
        wait: &Wait,
        woken: Woken,
    ) -> Next<ReqBody, ResBody> {
        let heard = match &wait.kind {
            WaitKind::Pause { gives_up } => {
                self.cold().waited += wait.started.elapsed();
                if *gives_up && woken == Woken::Timer {
                    return self.out_of_time();
                }
                if woken == Woken::ModelChanged {
                    // Released: the model is warm, send the request itself.
                    self.route.check_next = false;
                }
                return Next::Ready;
            }
            WaitKind::Behind { waiter, heard } => {
                // Whatever comes next may end in giving up.
                self.cold().latest = Some(waiter.model().last());
                *heard
            }
        };
        if woken == Woken::Timer {
            self.cold().waited += wait.started.elapsed();
            return self.out_of_time();
        }
        // The probe was given back, or the model answered: look again (the
        // model may be warm now, or cold anew).
        let strategy = self.shared.config.wait_strategy;
        let registry = &self.shared.runtime.registry;
        let turn = match self
            .key_now()
            .and_then(|key| Some((key, registry.cold_model(key)?)))
        {
            Some((key, model)) => self.standing.take_turn(registry, key, model, strategy),
            None => Turn::Send,
        };
        match self.follow(turn, heard) {
            Some(Next::Wait(mut next)) if matches!(next.kind, WaitKind::Behind { .. }) => {
                // Keep counting from when this wait began.
                next.started = wait.started;
                Next::Wait(next)
            }
            next => {
                self.cold().waited += wait.started.elapsed();
                if next.is_none() && self.standing.probing().is_none() {
                    // Released, not taking over: send the request itself.
                    self.route.check_next = false;
                }
                next.unwrap_or(Next::Ready)
            }
        }
    }

    /// The model's key, if already known (a waiter's is).
    fn key_now(&self) -> Option<u64> {
        match self.key {
            super::Keyed::Model(key) => Some(key),
            _ => None,
        }
    }

    /// The pause before this call's own next request to a cold model.
    pub(super) fn poll_again<ResBody: Body>(
        &mut self,
        cold: &ColdStart,
        attempt: Attempt,
    ) -> Next<ReqBody, ResBody> {
        match self.plan_wait(cold, attempt) {
            Err(why) => self.give_up(why),
            Ok(wait) if wait.is_zero() => Next::Ready,
            Ok(wait) => {
                let probing = self.standing.probing().cloned();
                Next::Wait(Wait::pause(wait, probing, false))
            }
        }
    }

    /// Decides the wait after a loading response, or why the call gives up
    /// (attempts or time spent). Tells tracing and the hook.
    fn plan_wait(&mut self, cold: &ColdStart, attempt: Attempt) -> Result<Duration, GaveUp> {
        let uri = self.requests.uri().ok_or(GaveUp::Attempts)?;
        if self.attempts >= self.shared.config.max_attempts {
            return Err(GaveUp::Attempts);
        }
        // The self-hosted pace is for cheap probes: a small request, or a
        // check. A large body with no route to check waits at the usual pace.
        let cheap = self.requests.body_len() < ROUTE_BODY || self.route_to_check().is_some();
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.cold().since);
        let remaining = self.remaining();
        let answer = Answer {
            hint: cold.hint(),
            // Readiness checks ask the model too: they pace a lone caller.
            attempt: self.attempts + self.checks,
            took: attempt
                .sent
                .map_or(Duration::ZERO, |sent| now.saturating_duration_since(sent)),
            held: attempt.held,
            company: self.standing.has_company(),
            poll: cold.poll_interval().filter(|_| cheap),
        };
        let config = &self.shared.config;
        let jitter = config.jitter.then(pace::random_unit);
        let strategy = config.wait_strategy;
        let wait = match pace::next_wait(strategy, &answer, config.wait_bounds(), jitter, remaining)
        {
            Some(wait) => wait,
            // At the caller's deadline, before the budget's end: go now.
            None if remaining.is_zero() && !self.budget_left().is_zero() => Duration::ZERO,
            None => return Err(GaveUp::Budget),
        };
        let event = RetryEvent {
            uri: &uri,
            model: cold.model(),
            attempt: self.attempts + self.checks,
            wait,
            estimate: cold.estimate(),
            elapsed,
            behind_probe: false,
            unreachable: self.unreachable,
        };
        announce(config.on_retry.as_ref(), &event);
        Ok(wait)
    }
}
