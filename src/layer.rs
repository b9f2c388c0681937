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
/// `ColdStartRetryLayer::new()` (or `Default`) is set for the HuggingFace
/// Inference API; each setter below says its default.
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
    /// A layer with the HuggingFace defaults.
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

    /// The most time spent on one cold start, counted from the first loading
    /// response. No attempt starts later, and no sleep runs past it; when it
    /// runs out the caller gets the last loading response.
    ///
    /// Default: 120 s.
    pub fn max_total_wait(mut self, max_total_wait: Duration) -> Self {
        self.config_mut().max_total_wait = max_total_wait;
        self
    }

    /// The longest single sleep computed from the server's hint, whatever
    /// `estimated_time` or `Retry-After` says.
    ///
    /// Default: 60 s.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config_mut().max_wait = max_wait;
        self
    }

    /// The sleep when the server gives no usable `estimated_time` (missing,
    /// `null`, a string, negative, NaN or infinite), under
    /// [`WaitStrategy::SleepEstimate`] (the default strategy does not sleep estimates).
    /// Capped by `max_wait`.
    ///
    /// Default: 20 s, the figure HuggingFace's own clients assume.
    pub fn default_wait(mut self, default_wait: Duration) -> Self {
        self.config_mut().default_wait = default_wait;
        self
    }

    /// The most requests sent for one call, the first included. `0` is
    /// treated as `1`: the request is always sent once.
    ///
    /// Default: no limit (`u32::MAX`). `max_total_wait` bounds a cold start,
    /// and no [`WaitStrategy`] strategy sends a model more than one request per
    /// second (or per 100 ms with [`WaitStrategy::FixedInterval`] at its floor), except
    /// right after a request the server held for a second or more; so with
    /// the defaults a call sends at most about 120 requests, and in practice
    /// far fewer: two against HuggingFace, which holds the retry.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.config_mut().max_attempts = max_attempts.max(1);
        self
    }

    /// The largest request body, in bytes, that is buffered for replay. A
    /// larger body is streamed once, intact, and never retried (its report
    /// says [`Unbuffered::BodyLimit`](crate::Unbuffered::BodyLimit)).
    ///
    /// Note that buffering delays the upload: the server receives nothing
    /// of a request until its whole body (up to this limit) has arrived, and
    /// each call in flight may hold this much.
    ///
    /// Default: 8 MiB.
    pub fn body_limit(mut self, body_limit: usize) -> Self {
        self.config_mut().body_limit = body_limit;
        self
    }

    /// The most bytes that all calls in flight through this layer's services
    /// hold for replay together. A call whose body would pass it is streamed
    /// once, intact, and never retried (its report says
    /// [`Unbuffered::TotalLimit`](crate::Unbuffered::TotalLimit)); a call
    /// holds its bytes until its response future is dropped.
    ///
    /// Default: 128 MiB: sixteen bodies at the default `body_limit`, or
    /// some 60,000 JSON requests of 2 KiB, so that a proxy's memory stays
    /// bounded however many uploads arrive at once.
    pub fn total_body_limit(mut self, total_body_limit: usize) -> Self {
        self.config_mut().total_body_limit = total_body_limit;
        self
    }

    /// Whether retries carry `x-wait-for-model: true`, asking the server to
    /// hold the request until the model is loaded. The first attempt never
    /// carries it (the header is left as the caller set it), as HuggingFace
    /// advises, so only requests that met a cold start are held.
    ///
    /// Default: `true`.
    pub fn hold_retries(mut self, hold_retries: bool) -> Self {
        self.config_mut().hold_retries = hold_retries;
        self
    }

    /// Which responses are cold starts, what wait they hint, and how retries
    /// ask the server to hold them: see [`classifier`](crate::classifier).
    ///
    /// Default: [`HuggingFace`](crate::classifier::HuggingFace).
    pub fn classifier<C: crate::classifier::Classify>(mut self, classifier: C) -> Self {
        self.config_mut().classifier = crate::classifier::Shared(Arc::new(classifier));
        self
    }

    /// Whether every wait computed from the server's hint is shortened by a
    /// random 0–20% (backoff waits by up to 50%), so that many clients do
    /// not retry in step. The 1 s floor and the budget still apply. Poll
    /// intervals ([`WaitStrategy::Adaptive`] against a server that does not hold,
    /// [`WaitStrategy::FixedInterval`]) are not jittered: they start from each caller's own
    /// first answer, so callers are not in step to begin with.
    ///
    /// Default: `true`.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.config_mut().jitter = jitter;
        self
    }

    /// How a call waits between two requests to a loading model: see
    /// [`WaitStrategy`].
    ///
    /// Default: [`WaitStrategy::Adaptive`].
    pub fn wait_strategy(mut self, wait_strategy: WaitStrategy) -> Self {
        self.config_mut().wait_strategy = wait_strategy;
        self
    }

    /// Which requests share one model's cold-start state (one probe at a
    /// time, the others waiting): those for which `key` returns equal
    /// values. `key` sees the request's URI, headers and buffered body; a
    /// request for which it returns `None` is not coalesced (it still waits
    /// out a cold start, on its own).
    ///
    /// It runs only on the cold path: for a call that meets a loading
    /// answer, or that is made while some model of this layer is loading;
    /// never while every model is warm. A request whose body is too large to
    /// buffer is never retried, and never keyed.
    ///
    /// Default: the URI's scheme, authority and path, which names the model
    /// on HuggingFace's API (`/models/{id}`). Key by a body field where one
    /// URL serves many models, as OpenAI-compatible routers do:
    ///
    /// ```
    /// use tower_cold_start::ColdStartRetryLayer;
    ///
    /// // `POST /v1/chat/completions` with `{"model": "...", ...}`
    /// let layer = ColdStartRetryLayer::new().model_key(|uri, _headers, body| {
    ///     let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    ///     let model = json.get("model")?.as_str()?.to_owned();
    ///     Some((uri.authority()?.to_string(), model))
    /// });
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

    /// A function called before every wait, with the same facts as the
    /// `tracing` event, e.g. to show progress. It runs inside the request's
    /// future, so it must be quick and must not block.
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
