//! Shared state for concurrent callers of one cold model.
//!
//! Services made by one layer (and clones of one service) share a
//! [`Registry`]. Once a model (keyed by scheme, authority and path) answers
//! "loading", it gets a [`Gate`]: one request at a time probes the model, the
//! others wait in-process instead of each retrying upstream. The first answer
//! that is not "loading" removes the gate and releases every waiter at once.
//!
//! A gate lives only while somebody needs it: it is born with its probe in
//! the hands of the caller whose answer created it, and the last of its
//! prober and waiters to leave (answered, given up, or dropped unpolled)
//! removes it. Both are decided under the gate's lock, so a gate nobody
//! probes or waits on cannot be left behind.
//!
//! The warm path pays one relaxed atomic load: while no model is cold the
//! registry is not locked and nothing is allocated. While some model is cold,
//! a call for another model pays one more (its key's bucket), and takes the
//! lock only if a cold model shares that bucket (one chance in 32 per cold
//! model).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use bytes::Bytes;
use http::{response, HeaderMap, Uri};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// How many buckets the keys of cold models are counted in.
const BUCKETS: usize = 32;

/// The cold models of one layer.
#[derive(Default)]
pub(crate) struct Registry {
    // How many gates exist; zero on the warm path.
    cold: AtomicUsize,
    // How many gates exist per bucket of keys (`key % BUCKETS`): a model
    // whose bucket is empty is warm, known without the lock.
    buckets: [AtomicU32; BUCKETS],
    gates: Mutex<HashMap<u64, Arc<Gate>>>,
    // Models whose readiness route proved wrong (it answered neither ready
    // nor not ready) or lied (it said ready, then the model answered cold):
    // their probes send the request itself.
    untrusted_routes: Mutex<std::collections::HashSet<u64>>,
    hasher: RandomState,
    // Probes and waiters alive, for the life-cycle tests.
    #[cfg(test)]
    pub(crate) live: Live,
}

/// Who is counted in or out of a gate.
#[derive(Clone, Copy)]
enum Role {
    Probe,
    Waiter,
}

/// Counts of probes and waiters alive (tests only).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) probes: AtomicUsize,
    pub(crate) waiters: AtomicUsize,
    // Requests sent under a probe of a gate that is no longer the model's.
    pub(crate) stale_sends: AtomicUsize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cold_models", &self.cold.load(Ordering::Relaxed))
            .finish()
    }
}

/// A model known to be loading.
pub(crate) struct Gate {
    // Where the gate lives, to forget it when its last caller gives up (weak:
    // the registry owns its gates).
    registry: Weak<Registry>,
    key: u64,
    state: Mutex<GateState>,
    notify: Arc<Notify>,
}

struct GateState {
    probing: bool,
    // Callers waiting for the probe: the prober polls faster for company.
    waiting: usize,
    // When the model was last asked: the first loading answer, then each
    // probe sent. A prober taking over keeps to the strategy's pace.
    asked: tokio::time::Instant,
    // The latest loading response, for a waiter whose budget runs out before
    // it sent a request of its own.
    last: Arc<Snapshot>,
    // How many loading answers the model gave: a waiter tells its caller of
    // each one it has not heard yet.
    answers: u64,
}

/// A loading response, read to its end.
#[derive(Clone)]
pub(crate) struct Snapshot {
    pub(crate) head: response::Parts,
    pub(crate) body: Vec<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
    // How the next request for this model asks the server to hold it.
    pub(crate) hold: crate::classifier::Hold,
    // What the classifier read in it, for the progress of waiting callers.
    pub(crate) model: Option<String>,
    pub(crate) estimate: Option<f64>,
    // Not an answer but a refused connection: the server is still booting.
    // (The head and body are then empty.)
    pub(crate) refused: Option<Arc<dyn std::error::Error + Send + Sync>>,
    // Whether the server's readiness route tells when this state ends: a
    // model not ready, or a server not up; not overload or a quota.
    pub(crate) checkable: bool,
    // The poll interval the classifier gave for this server, if any.
    pub(crate) poll: Option<std::time::Duration>,
    // When it came: the latest of two answers is the one given back.
    pub(crate) at: tokio::time::Instant,
}

/// The right to probe a cold model; given back (and the next waiter woken)
/// when dropped, whatever ends the probe: an answer, a timeout, the caller
/// dropping its future. A probe given back while nobody waits forgets the
/// model: a cold start every caller gave up on leaves nothing behind.
pub(crate) struct Probe {
    gate: Arc<Gate>,
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

    /// The gate of a cold model, if it is cold.
    pub(crate) fn gate(&self, key: u64) -> Option<Arc<Gate>> {
        if !self.may_be_cold(key) {
            return None;
        }
        lock(&self.gates).get(&key).cloned()
    }

    /// Records a loading response for `key`. A new gate is born probed: the
    /// probe comes back for the caller whose answer created it, so that no
    /// gate exists that nobody is in charge of. An existing gate keeps its
    /// prober (`None`), and its waiters hear of the new answer.
    pub(crate) fn mark_cold(
        self: &Arc<Self>,
        key: u64,
        last: Arc<Snapshot>,
    ) -> (Arc<Gate>, Option<Probe>) {
        let mut gates = lock(&self.gates);
        if let Some(gate) = gates.get(&key) {
            let mut state = lock(&gate.state);
            state.last = last;
            state.answers += 1;
            drop(state);
            gate.notify.notify_waiters();
            return (Arc::clone(gate), None);
        }
        let gate = Arc::new(Gate {
            registry: Arc::downgrade(self),
            key,
            state: Mutex::new(GateState {
                probing: true,
                waiting: 0,
                asked: tokio::time::Instant::now(),
                last,
                answers: 1,
            }),
            notify: Arc::new(Notify::new()),
        });
        gates.insert(key, Arc::clone(&gate));
        drop(gates);
        self.bucket(key).fetch_add(1, Ordering::Relaxed);
        self.cold.fetch_add(1, Ordering::Relaxed);
        let probe = Probe::new(Arc::clone(&gate));
        (gate, Some(probe))
    }

    /// Drops `gate` if it is still `key`'s and nobody probes or waits on it.
    /// Locks in the order `mark_cold` does: the registry, then the gate.
    fn forget_if_idle(&self, gate: &Arc<Gate>) {
        let mut gates = lock(&self.gates);
        let current = gates
            .get(&gate.key)
            .is_some_and(|current| Arc::ptr_eq(current, gate));
        if current && lock(&gate.state).idle() {
            gates.remove(&gate.key);
            drop(gates);
            self.bucket(gate.key).fetch_sub(1, Ordering::Relaxed);
            self.cold.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Records that `key` answered something other than "loading": drops its
    /// gate and releases every waiter.
    pub(crate) fn mark_warm(&self, key: u64) {
        if !self.may_be_cold(key) {
            return;
        }
        let removed = lock(&self.gates).remove(&key);
        if let Some(gate) = removed {
            self.bucket(key).fetch_sub(1, Ordering::Relaxed);
            self.cold.fetch_sub(1, Ordering::Relaxed);
            gate.notify.notify_waiters();
        }
    }

    /// How many models are cold.
    pub(crate) fn cold_models(&self) -> usize {
        self.cold.load(Ordering::Relaxed)
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

impl GateState {
    /// Nobody probes the model or waits for it.
    fn idle(&self) -> bool {
        !self.probing && self.waiting == 0
    }
}

impl Gate {
    /// Takes the probe if nobody holds it, or else joins the callers waiting
    /// for it: one decision under the lock, so that the gate is never seen
    /// idle in between.
    pub(crate) fn probe_or_join(self: &Arc<Self>) -> Result<Probe, Company> {
        let mut state = lock(&self.state);
        if state.probing {
            state.waiting += 1;
            drop(state);
            return Err(Company::new(Arc::clone(self)));
        }
        state.probing = true;
        drop(state);
        Ok(Probe::new(Arc::clone(self)))
    }

    /// Counts a probe or a waiter of this gate in or out (tests only: the
    /// life-cycle test reads the counts; elsewhere this is nothing).
    #[cfg(test)]
    fn count(&self, role: Role, arrives: bool) {
        if let Some(registry) = self.registry.upgrade() {
            let counter = match role {
                Role::Probe => &registry.live.probes,
                Role::Waiter => &registry.live.waiters,
            };
            if arrives {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    #[cfg(not(test))]
    fn count(&self, _: Role, _: bool) {}

    /// Forgets this gate if nobody is left on it.
    fn leave(self: &Arc<Self>, idle: bool) {
        if idle {
            if let Some(registry) = self.registry.upgrade() {
                registry.forget_if_idle(self);
            }
        }
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
    pub(crate) fn last(&self) -> Arc<Snapshot> {
        Arc::clone(&lock(&self.state).last)
    }

    /// How many loading answers the model gave, and the latest.
    pub(crate) fn heard(&self) -> (u64, Arc<Snapshot>) {
        let state = lock(&self.state);
        (state.answers, Arc::clone(&state.last))
    }

    /// Whether callers wait for this gate's probe.
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
    /// A probe of `gate`, whose state already says it is probed.
    fn new(gate: Arc<Gate>) -> Self {
        gate.count(Role::Probe, true);
        Probe { gate }
    }

    /// Whether this probe's gate is still its model's: a release (a
    /// non-loading answer) removes the gate, and the probe then stands for
    /// nothing.
    pub(crate) fn is_current(&self) -> bool {
        self.gate.registry.upgrade().is_some_and(|registry| {
            registry
                .gate(self.gate.key)
                .is_some_and(|current| Arc::ptr_eq(&current, &self.gate))
        })
    }

    /// The gate this probe belongs to.
    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

/// A caller waiting for a gate's probe, counted while it lives.
pub(crate) struct Company {
    gate: Arc<Gate>,
}

impl Company {
    /// A waiter on `gate`, already counted in its state.
    fn new(gate: Arc<Gate>) -> Self {
        gate.count(Role::Waiter, true);
        Company { gate }
    }

    /// The gate this caller waits on.
    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

impl Drop for Company {
    fn drop(&mut self) {
        self.gate.count(Role::Waiter, false);
        let idle = {
            let mut state = lock(&self.gate.state);
            state.waiting -= 1;
            state.idle()
        };
        self.gate.leave(idle);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.gate.count(Role::Probe, false);
        let idle = {
            let mut state = lock(&self.gate.state);
            state.probing = false;
            state.idle()
        };
        self.gate.leave(idle);
        // A waiter takes the probe over.
        self.gate.notify.notify_waiters();
    }
}

impl std::fmt::Debug for Company {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Company")
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

    fn snapshot() -> Arc<Snapshot> {
        let (head, ()) = http::Response::new(()).into_parts();
        Arc::new(Snapshot {
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
    fn a_new_gate_is_born_probed_by_its_creator() {
        let registry = Arc::new(Registry::default());
        let (gate, probe) = registry.mark_cold(1, snapshot());
        assert!(probe.is_some());
        let (again, none) = registry.mark_cold(1, snapshot());
        assert!(Arc::ptr_eq(&gate, &again));
        assert!(none.is_none(), "an existing gate keeps its prober");
        assert!(gate.probe_or_join().is_err(), "one probe at a time");
    }

    #[test]
    fn one_probe_at_a_time_and_given_back_on_drop() {
        let registry = Arc::new(Registry::default());
        let (gate, probe) = registry.mark_cold(1, snapshot());
        let waiter = gate.probe_or_join().expect_err("probed");
        drop(probe);
        let probe = gate.probe_or_join().expect("given back");
        drop(waiter);
        assert_eq!(registry.cold_models(), 1, "the prober is still on it");
        drop(probe);
        assert_eq!(registry.cold_models(), 0);
    }

    #[test]
    fn the_last_to_leave_forgets_the_model_prober_or_waiter() {
        let registry = Arc::new(Registry::default());
        // The prober leaves last.
        let (gate, probe) = registry.mark_cold(9, snapshot());
        drop(gate.probe_or_join().expect_err("probed"));
        assert_eq!(registry.cold_models(), 1);
        drop(probe);
        assert_eq!(registry.cold_models(), 0);
        assert!(registry.gate(9).is_none());
        assert!(!registry.any_cold(), "the warm path is lock-free again");
        // The waiters leave last, unpolled.
        let (gate, probe) = registry.mark_cold(9, snapshot());
        let waiters: Vec<_> = (0..3).map(|_| gate.probe_or_join().unwrap_err()).collect();
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
    fn a_newer_gate_is_not_an_older_probe_to_forget() {
        let registry = Arc::new(Registry::default());
        let (_, old) = registry.mark_cold(9, snapshot());
        registry.mark_warm(9);
        let (new, new_probe) = registry.mark_cold(9, snapshot());
        drop(old);
        assert!(registry.gate(9).is_some_and(|g| Arc::ptr_eq(&g, &new)));
        drop(new_probe);
        assert!(registry.gate(9).is_none());
    }

    #[tokio::test]
    async fn warm_drops_the_gate_and_wakes_every_waiter() {
        let registry = Arc::new(Registry::default());
        let (gate, _probe) = registry.mark_cold(7, snapshot());
        assert_eq!(registry.cold_models(), 1);
        let waiters: Vec<_> = (0..3).map(|_| gate.wake_up()).collect();
        registry.mark_warm(7);
        assert_eq!(registry.cold_models(), 0);
        assert!(registry.gate(7).is_none());
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
        let _probe = registry.mark_cold(cold, snapshot());
        assert!(registry.may_be_cold(cold));
        assert!(registry.may_be_cold(5), "same bucket: looked up");
        assert!(registry.gate(5).is_none());
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
        let (gate, _probe) = registry.mark_cold(1, snapshot());
        assert!(!gate.has_company());
        let one = gate.probe_or_join().unwrap_err();
        let two = gate.probe_or_join().unwrap_err();
        assert!(gate.has_company());
        drop(one);
        assert!(gate.has_company());
        drop(two);
        assert!(!gate.has_company());
    }

    #[tokio::test]
    async fn a_dropped_probe_wakes_the_waiters() {
        let registry = Arc::new(Registry::default());
        let (gate, probe) = registry.mark_cold(7, snapshot());
        let _waiter = gate.probe_or_join().unwrap_err();
        let waiter = gate.wake_up();
        drop(probe);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken");
    }
}
