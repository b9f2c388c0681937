//! What every call of one layer shares: the user's configuration, plain
//! values, and the runtime state its calls build up together.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::classifier::LayerClassifier;
use crate::coalesce::Registry;
use crate::key::KeyFn;
use crate::pace::WaitBounds;
use crate::report::RetryHook;
use crate::request_body::Pool;
use crate::WaitStrategy;

/// What a layer's services and calls share, behind one `Arc` (one reference
/// count per call).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) runtime: Runtime,
}

/// A copy for a layer configured apart from the one it was cloned from
/// (`Arc::make_mut` makes it): the settings are copied, and the copy starts
/// with a runtime of its own, since its keys and budgets may mean something
/// else.
impl Clone for Shared {
    fn clone(&self) -> Self {
        Shared {
            config: self.config.clone(),
            runtime: Runtime::default(),
        }
    }
}

/// The layer's settings, as its setters left them.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_total_wait: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) default_wait: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) body_limit: usize,
    pub(crate) total_body_limit: usize,
    pub(crate) hold_retries: bool,
    pub(crate) on_retry: Option<RetryHook>,
    pub(crate) classifier: LayerClassifier,
    pub(crate) jitter: bool,
    pub(crate) wait_strategy: WaitStrategy,
    // `None`: scheme, authority and path.
    pub(crate) model_key: Option<KeyFn>,
}

/// The state a layer's calls build up together.
#[derive(Debug, Default)]
pub(crate) struct Runtime {
    /// The models found cold, and their probes and waiters.
    pub(crate) registry: Arc<Registry>,
    /// The request bodies held for replay, against `total_body_limit`.
    pub(crate) pool: Pool,
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
            hold_retries: true,
            on_retry: None,
            classifier: LayerClassifier::default(),
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
