//! The layer and its configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Uri};
use tower_layer::Layer;

use crate::gate::Registry;
use crate::wake::WaitBounds;
use crate::{ColdStartRetry, RetryEvent, WaitStrategy};

pub(crate) type RetryHook = Arc<dyn Fn(&RetryEvent<'_>) + Send + Sync>;

/// A user's readiness route: the route for a request's URI.
pub(crate) type ReadinessRoute = Arc<dyn Fn(&Uri) -> Option<Uri> + Send + Sync>;

/// A user's model key function, hashing its key with the registry's hasher.
pub(crate) type ModelKey =
    Arc<dyn Fn(&Registry, &Uri, &HeaderMap, &[u8]) -> Option<u64> + Send + Sync>;

/// Everything a [`ColdStartRetry`] needs to know, shared by its clones and
/// its calls behind one `Arc` (one reference count per call).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_total_wait: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) default_wait: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) body_limit: usize,
    pub(crate) total_body_limit: usize,
    // Shared by every service this layer makes (and their clones).
    pub(crate) pool: Arc<crate::replay::Pool>,
    pub(crate) hold_retries: bool,
    // `None`: as the classifier says.
    pub(crate) hold_first_request: Option<bool>,
    pub(crate) retry_refused: Option<bool>,
    // Resolved from the two above and the classifier, once per setter
    // rather than once per call.
    pub(crate) first_hold: crate::classifier::Hold,
    pub(crate) retries_refused: bool,
    // `None`: the classifier's.
    pub(crate) readiness: Option<ReadinessRoute>,
    pub(crate) on_retry: Option<RetryHook>,
    // Shared by every service this layer makes (and their clones).
    pub(crate) registry: Arc<Registry>,
    pub(crate) classifier: crate::classifier::Shared,
    pub(crate) jitter: bool,
    pub(crate) wait_strategy: WaitStrategy,
    // `None`: scheme, authority and path.
    pub(crate) model_key: Option<ModelKey>,
}

impl Config {
    /// Settles what depends on the classifier and the overrides.
    fn resolve(&mut self) {
        let classifier = &self.classifier.0;
        let first = self
            .hold_first_request
            .unwrap_or_else(|| classifier.holds_first_request());
        self.first_hold = if first && self.hold_retries {
            classifier.hold()
        } else {
            crate::classifier::Hold::None
        };
        self.retries_refused = self
            .retry_refused
            .unwrap_or_else(|| classifier.retries_refused());
    }

    pub(crate) fn wait_bounds(&self) -> WaitBounds {
        WaitBounds {
            default_wait: self.default_wait,
            max_wait: self.max_wait,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_total_wait: Duration::from_secs(120),
            max_wait: Duration::from_secs(60),
            default_wait: Duration::from_secs(20),
            max_attempts: u32::MAX,
            body_limit: 8 * 1024 * 1024,
            total_body_limit: 128 * 1024 * 1024,
            pool: Arc::default(),
            hold_retries: true,
            hold_first_request: None,
            retry_refused: None,
            first_hold: crate::classifier::Hold::None,
            retries_refused: false,
            readiness: None,
            on_retry: None,
            registry: Arc::default(),
            classifier: crate::classifier::Shared::default(),
            jitter: true,
            wait_strategy: WaitStrategy::default(),
            model_key: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("max_total_wait", &self.max_total_wait)
            .field("max_wait", &self.max_wait)
            .field("default_wait", &self.default_wait)
            .field("max_attempts", &self.max_attempts)
            .field("body_limit", &self.body_limit)
            .field("total_body_limit", &self.total_body_limit)
            .field("hold_retries", &self.hold_retries)
            .field("hold_first_request", &self.first_hold)
            .field("retries_refused", &self.retries_refused)
            .field(
                "readiness",
                &self.readiness.as_ref().map(|_| "Fn(&Uri) -> Option<Uri>"),
            )
            .field(
                "on_retry",
                &self.on_retry.as_ref().map(|_| "Fn(&RetryEvent)"),
            )
            .field("classifier", &self.classifier)
            .field("jitter", &self.jitter)
            .field("wait_strategy", &self.wait_strategy)
            .field(
                "model_key",
                &self
                    .model_key
                    .as_ref()
                    .map(|_| "Fn(&Uri, &HeaderMap, &[u8])"),
            )
            .finish()
    }
}

/// Wraps a service in [`ColdStartRetry`]: it waits out model cold starts.
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
    pub(crate) config: Arc<Config>,
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
        if Arc::get_mut(&mut self.config).is_none() {
            let mut config = Config::clone(&self.config);
            config.registry = Arc::default();
            config.pool = Arc::default();
            self.config = Arc::new(config);
        }
        // Unique now: no copy is made.
        Arc::make_mut(&mut self.config)
    }

    /// How many models the services of this layer hold as cold now: each
    /// one has callers probing it or waiting for it. A gauge for metrics;
    /// `0` while every model is warm.
    pub fn cold_models(&self) -> usize {
        self.config.registry.cold_models()
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
    /// `X-Scale-Up-Timeout`, `Prefer: wait`), the first request's too where
    /// [`hold_first_request`](Self::hold_first_request) asks for it (`InferenceEndpoints` does).
    ///
    /// Default: `true`.
    pub fn hold_retries(mut self, hold_retries: bool) -> Self {
        let config = self.config_mut();
        config.hold_retries = hold_retries;
        config.resolve();
        self
    }

    /// Sets which responses are cold starts, what wait they hint and how to ask for a hold.
    ///
    /// Default: [`KnownServers`](crate::classifier::KnownServers), every server's exact marker; see
    /// [`classifier`](crate::classifier) for the others.
    pub fn classifier<C: crate::classifier::Classify>(mut self, classifier: C) -> Self {
        let config = self.config_mut();
        config.classifier = crate::classifier::Shared(Arc::new(classifier));
        config.resolve();
        self
    }

    /// Sets whether the first request already asks to be held until the
    /// model is ready, with the classifier's hold header.
    ///
    /// Note that callers arriving together on a cold model that holds then
    /// cost one request each, not two.
    ///
    /// Default: as the classifier says (`InferenceEndpoints`: yes, as its
    /// docs advise `X-Scale-Up-Timeout` on every request; `HuggingFace`: no).
    pub fn hold_first_request(mut self, hold_first_request: bool) -> Self {
        let config = self.config_mut();
        config.hold_first_request = Some(hold_first_request);
        config.resolve();
        self
    }

    /// Sets the server's readiness route for a request: while its model is cold, the probing call
    /// may check that route with an empty `GET` instead of resending its request.
    ///
    /// Note that the route is only a hint (see the crate docs): it is used for bodies of 64 KiB
    /// or more (which then go out twice at most) and while other callers wait, and dropped for a
    /// model where it answers wrong, slowly or untruly.
    ///
    /// Default: the classifier's (`/health` for TGI, TEI and vLLM;
    /// `/v2/models/<name>/ready` for KServe and Triton; none for the rest,
    /// the default `KnownServers` included).
    pub fn readiness_route<F>(mut self, route: F) -> Self
    where
        F: Fn(&Uri) -> Option<Uri> + Send + Sync + 'static,
    {
        self.config_mut().readiness = Some(Arc::new(route));
        self
    }

    /// Sets whether a refused connection is waited out and retried, as a
    /// server that is still booting.
    ///
    /// Note that only a refusal of the request's own first connection proves
    /// it never reached a server; a refused redirect hop, a timeout or a reset
    /// reaches the caller as it is.
    ///
    /// Default: as the classifier says (the built-ins for servers users run:
    /// yes; the default `KnownServers`, `HuggingFace` and
    /// `InferenceEndpoints`: no, so a wrong URL fails fast).
    pub fn retry_refused(mut self, retry_refused: bool) -> Self {
        let config = self.config_mut();
        config.retry_refused = Some(retry_refused);
        config.resolve();
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

impl<S> Layer<S> for ColdStartRetryLayer {
    type Service = ColdStartRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ColdStartRetry::with_config(inner, Arc::clone(&self.config))
    }
}
