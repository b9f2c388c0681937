//! Coalescing: callers of one cold model wait behind a single probe.
//!
//! [`registry`] holds what the callers share (one [`ColdModel`] per cold
//! model); [`Standing`] is one call's part in it, and every question a call
//! asks of it has one answer, a [`Turn`]: send now, pause until the pace
//! allows the model's next request, or wait behind another caller's probe.

use std::sync::Arc;
use tokio::time::Instant;

use crate::loading::LoadingAnswer;
use crate::pace;
use crate::WaitStrategy;

mod registry;

pub(crate) use registry::{ColdModel, Probe, Registry, Waiter};

/// What a call does next about its model's shared state.
#[derive(Debug)]
pub(crate) enum Turn {
    /// Send now: the model is not known cold (or not any more), or this
    /// call probes it and the pace allows a request.
    Send,
    /// This call took over the model's probe; the pace allows its next
    /// request at this instant (the model was asked too recently).
    PauseUntil(Instant, Arc<ColdModel>),
    /// Another caller probes the model: wait behind it.
    WaitBehind(Waiter),
}

/// One call's part in its model's shared state: the probe, while it holds
/// it.
#[derive(Debug, Default)]
pub(crate) struct Standing {
    probe: Option<Probe>,
}

impl Standing {
    /// Before an attempt: if the model is known cold, take its probe or
    /// wait for whoever holds it. One relaxed load while no model is cold;
    /// `key` is asked only when some model is.
    pub(crate) fn admit(
        &mut self,
        registry: &Registry,
        key: impl FnOnce() -> Option<u64>,
        strategy: WaitStrategy,
    ) -> Turn {
        if self.probe.is_some() || !registry.any_cold() {
            return Turn::Send;
        }
        match key().and_then(|key| Some((key, registry.cold_model(key)?))) {
            Some((key, model)) => self.take_turn(registry, key, model, strategy),
            None => Turn::Send,
        }
    }

    /// Takes the probe of `model` (keyed `key`), or waits behind whoever
    /// holds it. A prober taking over keeps to the `strategy`'s pace since
    /// the model was last asked: a probe given back (its caller gave up) is
    /// not an answer from the model.
    pub(crate) fn take_turn(
        &mut self,
        registry: &Registry,
        key: u64,
        model: Arc<ColdModel>,
        strategy: WaitStrategy,
    ) -> Turn {
        if let Some(waiter) = self.join_or_probe(registry, key, model) {
            return Turn::WaitBehind(waiter);
        }
        let Some(model) = self.probing() else {
            // The model turned warm meanwhile.
            return Turn::Send;
        };
        let resume = model.asked() + pace::pace(strategy, model.last().poll);
        if resume <= Instant::now() {
            return Turn::Send;
        }
        Turn::PauseUntil(resume, Arc::clone(model))
    }

    /// Waits behind whoever probes `model` (`Some`), or else takes its
    /// probe, unless the model turned warm meanwhile. The waiter is counted
    /// before the registry is asked again, so that a probe given back, or
    /// the model turning warm, in between is not missed, and the model is
    /// not forgotten as idle meanwhile.
    pub(crate) fn join_or_probe(
        &mut self,
        registry: &Registry,
        key: u64,
        mut model: Arc<ColdModel>,
    ) -> Option<Waiter> {
        loop {
            let waiter = match model.probe_or_join() {
                Err(waiter) => waiter,
                Ok(probe) => {
                    self.probe = Some(probe);
                    return None;
                }
            };
            match registry.cold_model(key) {
                Some(current) if Arc::ptr_eq(&current, &model) => return Some(waiter),
                Some(current) => model = current,
                None => return None,
            }
        }
    }

    /// A loading answer: the model is cold, with `answer` as its latest. A
    /// call whose answer makes the model cold probes it. A probe of an older
    /// state (one a warm answer released in the meantime) is given up: it no
    /// longer stands for the model.
    pub(crate) fn loading(
        &mut self,
        registry: &Arc<Registry>,
        key: u64,
        answer: Arc<LoadingAnswer>,
    ) -> Arc<ColdModel> {
        let (model, created) = registry.mark_cold(key, answer);
        if created.is_some() {
            self.probe = created;
        } else if self
            .probe
            .as_ref()
            .is_some_and(|probe| !Arc::ptr_eq(probe.model(), &model))
        {
            self.probe = None;
        }
        model
    }

    /// Any other answer: the model is warm, every waiter is released, and
    /// the probe is given back. `key` is asked only while some model is cold.
    pub(crate) fn warm(&mut self, registry: &Registry, key: impl FnOnce() -> Option<u64>) {
        if registry.any_cold() {
            if let Some(key) = key() {
                registry.mark_warm(key);
            }
        }
        self.probe = None;
    }

    /// Gives the probe back, if held: what ended is no answer from the
    /// model, and someone else may probe.
    pub(crate) fn give_back(&mut self) {
        self.probe = None;
    }

    /// The model this call probes, if it probes one.
    pub(crate) fn probing(&self) -> Option<&Arc<ColdModel>> {
        self.probe.as_ref().map(Probe::model)
    }

    /// Whether other callers wait for this call's probe.
    pub(crate) fn has_company(&self) -> bool {
        self.probing().is_some_and(|model| model.has_company())
    }

    /// Before a request goes out: a probe of a model released since (its
    /// pause ending as the release came, say) is given back, so that no
    /// request goes out under it; a current one records that the model is
    /// asked now.
    pub(crate) fn sending(&mut self) {
        if self.probe.as_ref().is_some_and(|probe| !probe.is_current()) {
            self.probe = None;
        }
        if let Some(model) = self.probing() {
            model.asked_now();
        }
    }

    /// Leaves the model for good (the call gives up), with the model's
    /// latest loading answer if this call still probed it.
    pub(crate) fn leave(&mut self) -> Option<Arc<LoadingAnswer>> {
        let probe = self.probe.take().filter(Probe::is_current)?;
        Some(probe.model().last())
    }
}
