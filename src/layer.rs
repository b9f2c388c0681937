//! The layer, and its setters.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Uri};

use crate::classifier::LayerClassifier;
use crate::coalesce::Registry;
use crate::config::{Config, Shared};
use crate::{RetryEvent, WaitStrategy};

/// Wraps a service in [`ColdStartRetry`](crate::ColdStartRetry): it waits out model cold starts.
///
/// `ColdStartRetryLayer::new()` (or `Default`) waits out the cold-start
/// answers of every server in [`KnownServers`](crate::classifier::KnownServers)
/// and passes everything else through; each setter below says its default.
///
/// ```
/// use std::time::Duration;
/// use tower_cold_start::ColdStartRetryLayer;
///
/// let layer = ColdStartRetryLayer::new()
///     .max_total_wait(Duration::from_secs(300))
///     .on_retry(|event| {
///         eprintln!("{} is loading, retrying in {:?}", event.uri(), event.wait());
///     });
/// ```
#[derive(Clone, Debug, Default)]
pub struct ColdStartRetryLayer {
    pub(crate) shared: Arc<Shared>,
}

impl ColdStartRetryLayer {
    /// A layer with the defaults: every known server's cold-start answer is
    /// waited out, refused connections fail at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// The configuration, to change. A configuration shared with a clone of
    /// this layer (or a service it made) is copied first, and the copy gets
    /// its own cold-model registry and body pool: a layer configured apart
    /// shares no state with the one it was cloned from, whose keys and
    /// budgets may mean something else.
    fn config_mut(&mut self) -> &mut Config {
        &mut Arc::make_mut(&mut self.shared).config
    }

    /// How many models the services of this layer hold as cold now: each
    /// one has callers probing it or waiting for it. A gauge for metrics;
    /// `0` while every model is warm.
    pub fn cold_models(&self) -> usize {
        self.shared.runtime.registry.cold_models()
    }

    /// Sets the most time one call spends on a cold start, from its first loading answer.
    ///
    /// Note that no attempt starts and no wait runs past it: the caller then gets the
    /// latest loading response as it came.
    ///
    /// Default: 120 s.
    pub fn max_total_wait(mut self, max_total_wait: Duration) -> Self {
        self.config_mut().max_total_wait = max_total_wait;
        self
    }

    /// Sets the longest single wait taken from a server's hint (`estimated_time`, `Retry-After`).
    ///
    /// Default: 60 s.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config_mut().max_wait = max_wait;
        self
    }

    /// Sets the wait under [`WaitStrategy::SleepEstimate`] when the server gives no usable hint.
    ///
    /// Note that it is capped by `max_wait`, and unused by the other strategies.
    ///
    /// Default: 20 s, what HuggingFace's own clients assume.
    pub fn default_wait(mut self, default_wait: Duration) -> Self {
        self.config_mut().default_wait = default_wait;
        self
    }

    /// Sets the most requests sent for one call, the first included (`0` means `1`).
    ///
    /// Note that the budget and the strategies' pace (one request per second) already bound a
    /// call, to about 120 requests with the defaults.
    ///
    /// Default: no limit.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.config_mut().max_attempts = max_attempts.max(1);
        self
    }

    /// Sets the largest request body buffered for replay; a larger one is sent once, unbuffered.
    ///
    /// Note that the server receives nothing of a request until its body (up to this limit)
    /// has been read, and that each call in flight may hold this much.
    ///
    /// Default: 8 MiB.
    pub fn body_limit(mut self, body_limit: usize) -> Self {
        self.config_mut().body_limit = body_limit;
        self
    }

    /// Sets the most bytes all calls in flight through this layer hold for replay together.
    ///
    /// Note that a call whose body would pass it is sent once, unbuffered, and says so in its
    /// [`ColdStartReport::unbuffered`](crate::ColdStartReport::unbuffered).
    ///
    /// Default: 128 MiB (sixteen bodies at the default `body_limit`).
    pub fn total_body_limit(mut self, total_body_limit: usize) -> Self {
        self.config_mut().total_body_limit = total_body_limit;
        self
    }

    /// Sets whether retries ask the server to hold them until the model is ready.
    ///
    /// Note that this covers every hold header a classifier names (`x-wait-for-model`,
    /// `X-Scale-Up-Timeout`, `Prefer: wait`), the first request's too where the classifier
    /// [holds the first request](crate::classifier::Classify::holds_first_request)
    /// (`InferenceEndpoints` does).
    ///
    /// Default: `true`.
    pub fn hold_retries(mut self, hold_retries: bool) -> Self {
        self.config_mut().hold_retries = hold_retries;
        self
    }

    /// Sets what the servers need: which responses are cold starts, what wait they hint, how
    /// to ask for a hold, whether a refused connection is a server booting, and its readiness
    /// route.
    ///
    /// Note that the classifier is the one home of those answers; each built-in gives its
    /// server's, and [`with_retry_refused`](crate::classifier::Classify::with_retry_refused),
    /// [`with_hold_first_request`](crate::classifier::Classify::with_hold_first_request) and
    /// [`with_readiness_route`](crate::classifier::Classify::with_readiness_route) change them:
    ///
    /// ```
    /// use tower_cold_start::classifier::{Classify, KnownServers};
    /// use tower_cold_start::ColdStartRetryLayer;
    ///
    /// let layer = ColdStartRetryLayer::new().classifier(KnownServers.with_retry_refused(true));
    /// ```
    ///
    /// Default: [`KnownServers`](crate::classifier::KnownServers), every server's exact marker,
    /// no refused connections and no readiness routes; see [`classifier`](crate::classifier)
    /// for the others.
    pub fn classifier<C: crate::classifier::Classify>(mut self, classifier: C) -> Self {
        self.config_mut().classifier = LayerClassifier::new(classifier);
        self
    }

    /// Sets whether each wait taken from a hint is shortened by a random 0–20% (backoff: 50%).
    ///
    /// Note that poll intervals are not jittered: they count from each caller's own first answer.
    ///
    /// Default: `true`.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.config_mut().jitter = jitter;
        self
    }

    /// Sets how a call paces its requests to a loading model.
    ///
    /// Default: [`WaitStrategy::Adaptive`].
    pub fn wait_strategy(mut self, wait_strategy: WaitStrategy) -> Self {
        self.config_mut().wait_strategy = wait_strategy;
        self
    }

    /// Sets which requests share one model's cold-start state: those whose `key` is equal.
    ///
    /// Note that `key` (of the URI, headers and buffered body) runs only on the cold path,
    /// and that a request for which it returns `None` waits out a cold start alone.
    ///
    /// Default: the URI's scheme, authority and path (HuggingFace's `/models/{id}`).
    /// Key by the body's `model` where one URL serves many models, as OpenAI-style servers do,
    /// with [`key::json_field`](crate::key::json_field):
    ///
    /// ```
    /// use tower_cold_start::{key, ColdStartRetryLayer};
    ///
    /// // `POST /v1/chat/completions` with `{"model": "...", ...}`
    /// let layer = ColdStartRetryLayer::new().model_key(key::json_field("model"));
    /// ```
    pub fn model_key<F, K>(mut self, key: F) -> Self
    where
        F: Fn(&Uri, &HeaderMap, &[u8]) -> Option<K> + Send + Sync + 'static,
        K: std::hash::Hash,
    {
        self.config_mut().model_key = Some(Arc::new(
            move |registry: &Registry, uri: &Uri, headers: &HeaderMap, body: &[u8]| {
                key(uri, headers, body).map(|key| registry.key_from(key))
            },
        ));
        self
    }

    /// Sets a function told of every wait, with the facts of its `tracing` event.
    ///
    /// Note that it runs inside the request's future, so it must be quick and must not block.
    ///
    /// Default: none.
    pub fn on_retry<F>(mut self, on_retry: F) -> Self
    where
        F: Fn(&RetryEvent<'_>) + Send + Sync + 'static,
    {
        self.config_mut().on_retry = Some(Arc::new(on_retry));
        self
    }
}
