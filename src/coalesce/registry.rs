//! The registry of cold models: what concurrent callers of one cold model
//! share.
//!
//! Services made by one layer (and clones of one service) share a
//! [`Registry`]. Once a model (keyed by scheme, authority and path, or the
//! user's key) answers "loading", it gets a [`ColdModel`]: one request at a
//! time probes the model (the caller holding its [`Probe`]), the others wait
//! in-process as [`Waiter`]s instead of each retrying upstream. The first
//! answer that is not "loading" removes it and releases every waiter at once.
//!
//! A cold model's state lives only while somebody needs it: it is born with
//! its probe in the hands of the caller whose answer created it, and the last
//! of its prober and waiters to leave (answered, given up, or dropped
//! unpolled) removes it. Both are decided under its lock, so a state nobody
//! probes or waits on cannot be left behind.
//!
//! The warm path pays one relaxed atomic load: while no model is cold the
//! registry is not locked and nothing is allocated. While some model is cold,
//! a call for another model pays one more (its key's bucket), and takes the
//! lock only if a cold model shares that bucket (one chance in 32 per cold
//! model).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use http::Uri;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::loading::LoadingAnswer;

/// How many buckets the keys of cold models are counted in.
const BUCKETS: usize = 32;

/// The cold models of one layer.
#[derive(Default)]
pub(crate) struct Registry {
    // How many models are cold; zero on the warm path.
    cold: AtomicUsize,
    // How many are cold per bucket of keys (`key % BUCKETS`): a model
    // whose bucket is empty is warm, known without the lock.
    buckets: [AtomicU32; BUCKETS],
    models: Mutex<HashMap<u64, Arc<ColdModel>>>,
    // Models whose readiness route proved wrong (it answered neither ready
    // nor not ready) or lied (it said ready, then the model answered cold):
    // their probes send the request itself.
    untrusted_routes: Mutex<std::collections::HashSet<u64>>,
    hasher: RandomState,
    // Probes and waiters alive, of every cold model (those already released
    // included): a gauge, and the life-cycle tests' proof that none leaks.
    probes: AtomicUsize,
    waiters: AtomicUsize,
}

/// Who is counted in or out of a model.
#[derive(Clone, Copy)]
enum Role {
    Probe,
    Waiter,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cold_models", &self.cold.load(Ordering::Relaxed))
            .field("probes", &self.probes.load(Ordering::Relaxed))
            .field("waiters", &self.waiters.load(Ordering::Relaxed))
            .finish()
    }
}

/// A model known to be loading.
pub(crate) struct ColdModel {
    // Where it lives, to forget it when its last caller gives up (weak:
    // the registry owns the cold models).
    registry: Weak<Registry>,
    key: u64,
    state: Mutex<ModelState>,
    notify: Arc<Notify>,
}

struct ModelState {
    probing: bool,
    // Callers waiting for the probe: the prober polls faster for company.
    waiting: usize,
    // When the model was last asked: the first loading answer, then each
    // probe sent. A prober taking over keeps to the strategy's pace.
    asked: tokio::time::Instant,
    // The latest loading response, for a waiter whose budget runs out before
    // it sent a request of its own.
    last: Arc<LoadingAnswer>,
    // How many loading answers the model gave: a waiter tells its caller of
    // each one it has not heard yet.
    answers: u64,
}

/// The right to probe a cold model; given back (and the next waiter woken)
/// when dropped, whatever ends the probe: an answer, a timeout, the caller
/// dropping its future. A probe given back while nobody waits forgets the
/// model: a cold start every caller gave up on leaves nothing behind.
pub(crate) struct Probe {
    model: Arc<ColdModel>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can panic while holding a lock; recover anyway.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// The key of a request: its scheme, authority and path.
    pub(crate) fn key(&self, uri: &Uri) -> u64 {
        self.key_of(
            uri.scheme_str(),
            uri.authority().map(|a| a.as_str()),
            uri.path_and_query().map(|p| p.path()),
        )
    }

    /// The key of a value from a user's key function.
    pub(crate) fn key_from<K: std::hash::Hash>(&self, key: K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The key from the URI's parts, as [`Head`](crate::head::Head) keeps
    /// them (so that no URI is rebuilt to find it).
    pub(crate) fn key_of(
        &self,
        scheme: Option<&str>,
        authority: Option<&str>,
        path: Option<&str>,
    ) -> u64 {
        self.hasher.hash_one((scheme, authority, path))
    }

    /// Whether any model is cold: one relaxed load, the warm path's only cost.
    pub(crate) fn any_cold(&self) -> bool {
        self.cold.load(Ordering::Relaxed) > 0
    }

    fn bucket(&self, key: u64) -> &AtomicU32 {
        &self.buckets[(key % BUCKETS as u64) as usize]
    }

    /// Whether the model of `key` may be cold: false, without a lock, for
    /// every key while no model is cold, and for most keys while some are.
    fn may_be_cold(&self, key: u64) -> bool {
        self.any_cold() && self.bucket(key).load(Ordering::Relaxed) > 0
    }

    /// The shared state of `key`'s model, if it is cold.
    pub(crate) fn cold_model(&self, key: u64) -> Option<Arc<ColdModel>> {
        if !self.may_be_cold(key) {
            return None;
        }
        lock(&self.models).get(&key).cloned()
    }

    /// Records a loading response for `key`. A new cold model is born probed: the
    /// probe comes back for the caller whose answer created it, so that no
    /// cold model exists that nobody is in charge of. An existing one keeps its
    /// prober (`None`), and its waiters hear of the new answer.
    pub(crate) fn mark_cold(
        self: &Arc<Self>,
        key: u64,
        last: Arc<LoadingAnswer>,
    ) -> (Arc<ColdModel>, Option<Probe>) {
        let mut models = lock(&self.models);
        if let Some(model) = models.get(&key) {
            let mut state = lock(&model.state);
            state.last = last;
            state.answers += 1;
            drop(state);
            model.notify.notify_waiters();
            return (Arc::clone(model), None);
        }
        let model = Arc::new(ColdModel {
            registry: Arc::downgrade(self),
            key,
            state: Mutex::new(ModelState {
                probing: true,
                waiting: 0,
                asked: tokio::time::Instant::now(),
                last,
                answers: 1,
            }),
            notify: Arc::new(Notify::new()),
        });
        models.insert(key, Arc::clone(&model));
        drop(models);
        self.bucket(key).fetch_add(1, Ordering::Relaxed);
        self.cold.fetch_add(1, Ordering::Relaxed);
        let probe = Probe::new(Arc::clone(&model));
        (model, Some(probe))
    }

    /// Forgets `model` if it is still its key's and nobody probes or waits on it.
    /// Locks in the order `mark_cold` does: the registry, then the model's state.
    fn forget_if_idle(&self, model: &Arc<ColdModel>) {
        let mut models = lock(&self.models);
        let current = models
            .get(&model.key)
            .is_some_and(|current| Arc::ptr_eq(current, model));
        if current && lock(&model.state).idle() {
            models.remove(&model.key);
            drop(models);
            self.bucket(model.key).fetch_sub(1, Ordering::Relaxed);
            self.cold.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Records that `key` answered something other than "loading": drops its
    /// model and releases every waiter.
    pub(crate) fn mark_warm(&self, key: u64) {
        if !self.may_be_cold(key) {
            return;
        }
        let removed = lock(&self.models).remove(&key);
        if let Some(model) = removed {
            self.bucket(key).fetch_sub(1, Ordering::Relaxed);
            self.cold.fetch_sub(1, Ordering::Relaxed);
            model.notify.notify_waiters();
        }
    }

    /// How many models are cold.
    pub(crate) fn cold_models(&self) -> usize {
        self.cold.load(Ordering::Relaxed)
    }

    /// How many callers wait behind another caller's probe, and how many
    /// probes are held, over every cold model (its `Debug` shows them too).
    #[cfg(test)]
    pub(crate) fn census(&self) -> (usize, usize) {
        let waiters = self.waiters.load(Ordering::Relaxed);
        (waiters, self.probes.load(Ordering::Relaxed))
    }

    /// Whether the readiness route of `key`'s model may still be used.
    pub(crate) fn trusts_route(&self, key: u64) -> bool {
        !lock(&self.untrusted_routes).contains(&key)
    }

    /// Stops using the readiness route of `key`'s model. The set is bounded:
    /// past [`UNTRUSTED_ROUTES`] models it starts again empty, so that a
    /// client of very many models holds no more than that.
    pub(crate) fn distrust_route(&self, key: u64) {
        let mut untrusted = lock(&self.untrusted_routes);
        if untrusted.len() >= UNTRUSTED_ROUTES {
            untrusted.clear();
        }
        untrusted.insert(key);
    }
}

/// The most models whose readiness route a registry remembers as wrong.
const UNTRUSTED_ROUTES: usize = 4096;

impl ModelState {
    /// Nobody probes the model or waits for it.
    fn idle(&self) -> bool {
        !self.probing && self.waiting == 0
    }
}

impl ColdModel {
    /// Takes the probe if nobody holds it, or else joins the callers waiting
    /// for it: one decision under the lock, so that the model is never seen
    /// idle in between. A waiter listens for the model's next change from
    /// before the decision, so that a probe given back right after it is
    /// heard.
    pub(crate) fn probe_or_join(self: &Arc<Self>) -> Result<Probe, Waiter> {
        let wake = self.wake_up();
        let mut state = lock(&self.state);
        if state.probing {
            state.waiting += 1;
            drop(state);
            return Err(Waiter::new(Arc::clone(self), wake));
        }
        state.probing = true;
        drop(state);
        Ok(Probe::new(Arc::clone(self)))
    }

    /// Counts a probe or a waiter of this model in or out.
    fn count(&self, role: Role, arrives: bool) {
        if let Some(registry) = self.registry.upgrade() {
            let counter = match role {
                Role::Probe => &registry.probes,
                Role::Waiter => &registry.waiters,
            };
            if arrives {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets this model if nobody is left on it.
    fn leave(self: &Arc<Self>, idle: bool) {
        if idle {
            if let Some(registry) = self.registry.upgrade() {
                registry.forget_if_idle(self);
            }
        }
    }

    /// Whether this is still its model's state: a release (a non-loading
    /// answer) removes it, and its probe and waiters then stand for nothing.
    pub(crate) fn is_current(self: &Arc<Self>) -> bool {
        self.registry.upgrade().is_some_and(|registry| {
            registry
                .cold_model(self.key)
                .is_some_and(|current| Arc::ptr_eq(&current, self))
        })
    }

    /// Records that the prober sent a request now.
    pub(crate) fn asked_now(&self) {
        lock(&self.state).asked = tokio::time::Instant::now();
    }

    /// When the model was last asked (first answer or probe).
    pub(crate) fn asked(&self) -> tokio::time::Instant {
        lock(&self.state).asked
    }

    /// The latest loading response.
    pub(crate) fn last(&self) -> Arc<LoadingAnswer> {
        Arc::clone(&lock(&self.state).last)
    }

    /// How many loading answers the model gave, and the latest.
    pub(crate) fn heard(&self) -> (u64, Arc<LoadingAnswer>) {
        let state = lock(&self.state);
        (state.answers, Arc::clone(&state.last))
    }

    /// Whether callers wait for this model's probe.
    pub(crate) fn has_company(&self) -> bool {
        lock(&self.state).waiting > 0
    }

    /// A wake-up for the next change (probe given back, model warm),
    /// registered before the caller checks the state again, so that no
    /// change between the check and the wait is missed.
    pub(crate) fn wake_up(&self) -> Pin<Box<OwnedNotified>> {
        let mut notified = Box::pin(Arc::clone(&self.notify).notified_owned());
        notified.as_mut().enable();
        notified
    }
}

impl Probe {
    /// A probe of `model`, whose state already says it is probed.
    fn new(model: Arc<ColdModel>) -> Self {
        model.count(Role::Probe, true);
        Probe { model }
    }

    /// Whether this probe's model state is still the model's.
    pub(crate) fn is_current(&self) -> bool {
        self.model.is_current()
    }

    /// The model this probe belongs to.
    pub(crate) fn model(&self) -> &Arc<ColdModel> {
        &self.model
    }
}

/// A caller waiting for a model's probe, counted while it lives.
pub(crate) struct Waiter {
    model: Arc<ColdModel>,
    // The model's next change: a probe given back, a new loading answer,
    // its release.
    wake: Pin<Box<OwnedNotified>>,
}

impl Waiter {
    /// A waiter on `model`, already counted in its state.
    fn new(model: Arc<ColdModel>, wake: Pin<Box<OwnedNotified>>) -> Self {
        model.count(Role::Waiter, true);
        Waiter { model, wake }
    }

    /// The model this caller waits on.
    pub(crate) fn model(&self) -> &Arc<ColdModel> {
        &self.model
    }

    /// The model's latest loading answer, if it gave one this waiter has
    /// not heard of (`heard`: how many it has; updated).
    pub(crate) fn news(&self, heard: &mut u64) -> Option<Arc<LoadingAnswer>> {
        let (answers, last) = self.model().heard();
        if answers == *heard {
            return None;
        }
        *heard = answers;
        Some(last)
    }

    /// Ready at the model's next change.
    pub(crate) fn poll_changed(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.wake.as_mut().poll(cx)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.model.count(Role::Waiter, false);
        let idle = {
            let mut state = lock(&self.model.state);
            state.waiting -= 1;
            state.idle()
        };
        self.model.leave(idle);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.model.count(Role::Probe, false);
        let idle = {
            let mut state = lock(&self.model.state);
            state.probing = false;
            state.idle()
        };
        self.model.leave(idle);
        // A waiter takes the probe over.
        self.model.notify.notify_waiters();
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

impl std::fmt::Debug for ColdModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ColdModel")
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Arc<LoadingAnswer> {
        let (head, ()) = http::Response::new(()).into_parts();
        Arc::new(LoadingAnswer {
            head,
            body: Vec::new(),
            trailers: None,
            hold: crate::classifier::Hold::None,
            model: None,
            estimate: None,
            refused: None,
            checkable: false,
            poll: None,
            at: tokio::time::Instant::now(),
        })
    }

    #[test]
    fn keys_ignore_the_query_and_separate_models() {
        let registry = Arc::new(Registry::default());
        let a = registry.key(&"https://h/models/a?x=1".parse().unwrap());
        assert_eq!(a, registry.key(&"https://h/models/a?y=2".parse().unwrap()));
        assert_ne!(a, registry.key(&"https://h/models/b".parse().unwrap()));
        assert_ne!(a, registry.key(&"https://other/models/a".parse().unwrap()));
        assert_ne!(a, registry.key(&"http://h/models/a".parse().unwrap()));
    }

    #[test]
    fn a_new_cold_model_is_born_probed_by_its_creator() {
        let registry = Arc::new(Registry::default());
        let (model, probe) = registry.mark_cold(1, answer());
        assert!(probe.is_some());
        let (again, none) = registry.mark_cold(1, answer());
        assert!(Arc::ptr_eq(&model, &again));
        assert!(none.is_none(), "an existing model keeps its prober");
        assert!(model.probe_or_join().is_err(), "one probe at a time");
    }

    #[test]
    fn one_probe_at_a_time_and_given_back_on_drop() {
        let registry = Arc::new(Registry::default());
        let (model, probe) = registry.mark_cold(1, answer());
        let waiter = model.probe_or_join().expect_err("probed");
        drop(probe);
        let probe = model.probe_or_join().expect("given back");
        drop(waiter);
        assert_eq!(registry.cold_models(), 1, "the prober is still on it");
        drop(probe);
        assert_eq!(registry.cold_models(), 0);
    }

    #[test]
    fn the_last_to_leave_forgets_the_model_prober_or_waiter() {
        let registry = Arc::new(Registry::default());
        // The prober leaves last.
        let (model, probe) = registry.mark_cold(9, answer());
        drop(model.probe_or_join().expect_err("probed"));
        assert_eq!(registry.cold_models(), 1);
        drop(probe);
        assert_eq!(registry.cold_models(), 0);
        assert!(registry.cold_model(9).is_none());
        assert!(!registry.any_cold(), "the warm path is lock-free again");
        // The waiters leave last, unpolled.
        let (model, probe) = registry.mark_cold(9, answer());
        let waiters: Vec<_> = (0..3).map(|_| model.probe_or_join().unwrap_err()).collect();
        drop(probe);
        assert_eq!(registry.cold_models(), 1);
        drop(waiters);
        assert_eq!(registry.cold_models(), 0);
        assert!(registry
            .buckets
            .iter()
            .all(|b| b.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_newer_cold_state_is_not_an_older_probe_to_forget() {
        let registry = Arc::new(Registry::default());
        let (_, old) = registry.mark_cold(9, answer());
        registry.mark_warm(9);
        let (new, new_probe) = registry.mark_cold(9, answer());
        drop(old);
        assert!(registry
            .cold_model(9)
            .is_some_and(|g| Arc::ptr_eq(&g, &new)));
        drop(new_probe);
        assert!(registry.cold_model(9).is_none());
    }

    #[tokio::test]
    async fn warm_drops_the_cold_state_and_wakes_every_waiter() {
        let registry = Arc::new(Registry::default());
        let (model, _probe) = registry.mark_cold(7, answer());
        assert_eq!(registry.cold_models(), 1);
        let waiters: Vec<_> = (0..3).map(|_| model.wake_up()).collect();
        registry.mark_warm(7);
        assert_eq!(registry.cold_models(), 0);
        assert!(registry.cold_model(7).is_none());
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
                .await
                .expect("woken");
        }
    }

    #[test]
    fn a_warm_model_in_another_bucket_is_known_warm_without_the_lock() {
        let registry = Arc::new(Registry::default());
        let cold = 3 * BUCKETS as u64 + 5;
        let _probe = registry.mark_cold(cold, answer());
        assert!(registry.may_be_cold(cold));
        assert!(registry.may_be_cold(5), "same bucket: looked up");
        assert!(registry.cold_model(5).is_none());
        assert!(!registry.may_be_cold(6));
        registry.mark_warm(cold);
        assert!(!registry.may_be_cold(cold));
        assert!(registry
            .buckets
            .iter()
            .all(|b| b.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn company_is_counted_while_it_waits() {
        let registry = Arc::new(Registry::default());
        let (model, _probe) = registry.mark_cold(1, answer());
        assert!(!model.has_company());
        let one = model.probe_or_join().unwrap_err();
        let two = model.probe_or_join().unwrap_err();
        assert!(model.has_company());
        drop(one);
        assert!(model.has_company());
        drop(two);
        assert!(!model.has_company());
    }

    #[tokio::test]
    async fn a_dropped_probe_wakes_the_waiters() {
        let registry = Arc::new(Registry::default());
        let (model, probe) = registry.mark_cold(7, answer());
        let _waiter = model.probe_or_join().unwrap_err();
        let waiter = model.wake_up();
        drop(probe);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken");
    }

    /// A probe given back between a caller's decision to wait and its first
    /// poll is heard: the waiter listens from before it joins (on a
    /// multi-threaded runtime the prober may leave at any moment).
    #[test]
    fn a_probe_given_back_right_after_a_caller_joined_is_heard() {
        let registry = Arc::new(Registry::default());
        let (model, probe) = registry.mark_cold(7, answer());
        let mut waiter = model.probe_or_join().unwrap_err();
        drop(probe);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(
            waiter.poll_changed(&mut cx).is_ready(),
            "the return went unheard"
        );
    }
}
