//! What a classifier says of a cold start: the wait it hints, and how a
//! retry asks the server to hold it.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::X_WAIT_FOR_MODEL;

/// How often the self-hosted built-ins let the layer poll their server: a
/// request to a server next to the client costs microseconds, so its model
/// is asked four times a second at most and used at most 250 ms after it is
/// ready.
pub(crate) const SELF_HOSTED_POLL: Duration = Duration::from_millis(250);

/// A cold start, as a classifier saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStart {
    hint: Hint,
    hold: Hold,
    model: Option<String>,
    poll: Option<Duration>,
}

impl ColdStart {
    /// A cold start with this wait hint, no hold header and no model name.
    pub fn new(hint: Hint) -> Self {
        ColdStart {
            hint,
            hold: Hold::None,
            model: None,
            poll: None,
        }
    }

    /// The same, from a server that is cheap to ask (one users run next to
    /// the client): [`WaitStrategy::Adaptive`](crate::WaitStrategy::Adaptive)
    /// polls it every `interval` (100 ms at least), not at a hosted API's
    /// pace of one request every 1 to 2 s. The self-hosted built-ins say
    /// 250 ms.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll = Some(interval);
        self
    }

    /// The poll interval the classifier set, if it set one.
    pub fn poll_interval(&self) -> Option<Duration> {
        self.poll
    }

    /// The same, with retries asking the server to hold them this way.
    pub fn with_hold(mut self, hold: Hold) -> Self {
        self.hold = hold;
        self
    }

    /// The same, naming the model the server named.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The wait the response hints at.
    pub fn hint(&self) -> Hint {
        self.hint
    }

    /// The seconds the server estimated, if its hint is an estimate (for
    /// the facts of a wait's event).
    pub(crate) fn estimate(&self) -> Option<f64> {
        match self.hint {
            Hint::Estimate(secs) => Some(secs),
            _ => None,
        }
    }

    /// How retries ask the server to hold them.
    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// The model the server named, if it named one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// The wait a response hints at. Whatever it says, the layer's bounds
/// (`max_wait`, `max_total_wait`, a 1 s floor) apply, and jitter if enabled.
///
/// [`WaitStrategy::SleepEstimate`](crate::WaitStrategy::SleepEstimate)
/// sleeps every hint as described below; the default,
/// [`Adaptive`](crate::WaitStrategy::Adaptive), follows
/// [`After`](Hint::After) and [`Backoff`](Hint::Backoff) likewise, but polls
/// (or retries a long-held request at once) instead of sleeping an
/// [`Estimate`](Hint::Estimate), [`Soon`](Hint::Soon) or
/// [`Unknown`](Hint::Unknown).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Hint {
    /// Seconds, as the server wrote them (untrusted: negative, NaN, huge are
    /// handled as for HuggingFace's `estimated_time`).
    Estimate(f64),
    /// A wait the server set, e.g. from `Retry-After`.
    After(Duration),
    /// No hint: exponential backoff from 1 s, doubling per attempt.
    Backoff,
    /// The server has just waited (a hold that timed out): retry after the
    /// shortest wait.
    Soon,
    /// No hint: `default_wait`.
    Unknown,
}

/// How a retry asks the server to hold it until the model is ready.
/// [`hold_retries(false)`](crate::ColdStartRetryLayer::hold_retries) turns
/// all of them off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Hold {
    /// No header.
    #[default]
    None,
    /// HuggingFace serverless: `x-wait-for-model: true`.
    WaitForModel,
    /// HuggingFace Inference Endpoints: `X-Scale-Up-Timeout: N`, N the
    /// seconds left in the caller's budget.
    ScaleUpTimeout,
    /// Replicate and others (RFC 7240): `Prefer: wait=N`, N the seconds left,
    /// at most 60.
    PreferWait,
}

impl Hold {
    /// Adds this hold's header to a retry, unless the caller set it.
    pub(crate) fn apply(self, headers: &mut HeaderMap, remaining: Duration) {
        let secs = remaining.as_secs().max(1);
        let (name, value) = match self {
            Hold::None => return,
            Hold::WaitForModel => (X_WAIT_FOR_MODEL.clone(), HeaderValue::from_static("true")),
            Hold::ScaleUpTimeout => (
                HeaderName::from_static("x-scale-up-timeout"),
                HeaderValue::from(secs),
            ),
            Hold::PreferWait => (
                HeaderName::from_static("prefer"),
                HeaderValue::try_from(format!("wait={}", secs.min(60)))
                    .unwrap_or_else(|_| HeaderValue::from_static("wait")),
            ),
        };
        if !headers.contains_key(&name) {
            headers.insert(name, value);
        }
    }
}
