//! Deciding which responses are cold starts, for HuggingFace and beyond.
//!
//! A [`Classify`] looks at a response that is not a success (its status, its
//! headers, and at most the first 4 KiB of its body) and says whether it is a
//! cold start, what wait the server hints, and how to ask the server to hold
//! the retry. [`ColdStartRetryLayer::classifier`](crate::ColdStartRetryLayer::classifier)
//! installs one; the default is [`HuggingFace`]. Classifiers combine with
//! [`Classify::or`], and a closure is a classifier too.
//!
//! | built-in | recognises | wait | hold header on retries |
//! |---|---|---|---|
//! | [`HuggingFace`] | `503` `{"error":"… is currently loading","estimated_time":…}`; `500` `Model too busy` after a hold | `estimated_time` | `x-wait-for-model: true` |
//! | [`InferenceEndpoints`] | `503` or `502` from the endpoint proxy while a replica boots | `Retry-After` if sent, else `default_wait` | `X-Scale-Up-Timeout: <seconds left>` |
//! | [`TgiOverloaded`] | `429` `{"error_type":"overloaded"}` from text-generation-inference | exponential backoff | none |
//! | [`RetryAfter`] | `503` or `429` with a `Retry-After` header | the header (seconds or HTTP date) | none, or `Prefer: wait=N` |
//!
//! ```
//! use tower_cold_start::classifier::{Classify, ColdStart, HuggingFace, Hint, RetryAfter};
//! use tower_cold_start::ColdStartRetryLayer;
//!
//! // HuggingFace's loading marker, else any 503/429 that says Retry-After.
//! let layer = ColdStartRetryLayer::new().classifier(HuggingFace.or(RetryAfter::new()));
//!
//! // A closure: a gateway of ours answers 425 while its model boots.
//! let layer = ColdStartRetryLayer::new().classifier(|response: &tower_cold_start::classifier::ResponseParts<'_>| {
//!     (response.status().as_u16() == 425).then(|| ColdStart::new(Hint::Default))
//! });
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::StatusCode;
use serde::Deserialize;

use crate::classify as hf;

/// What a classifier sees of a response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseParts<'a> {
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: &'a [u8],
    pub(crate) held: bool,
    pub(crate) attempt: u32,
}

impl<'a> ResponseParts<'a> {
    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The response body: all of it, at most 4 KiB (a larger body is never
    /// classified).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// Whether the request asked the server to hold it.
    pub fn held(&self) -> bool {
        self.held
    }

    /// Which attempt this answers (1 for the first request).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// A cold start, as a classifier saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStart {
    pub(crate) hint: Hint,
    pub(crate) hold: Hold,
    pub(crate) model: Option<String>,
}

impl ColdStart {
    /// A cold start with this wait hint, no hold header and no model name.
    pub fn new(hint: Hint) -> Self {
        ColdStart {
            hint,
            hold: Hold::None,
            model: None,
        }
    }

    /// How retries ask the server to hold them.
    pub fn hold(mut self, hold: Hold) -> Self {
        self.hold = hold;
        self
    }

    /// The model the server named.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
}

/// The wait a response hints at. Whatever it says, the layer's bounds
/// (`max_wait`, `max_total_wait`, a 1 s floor) apply, and jitter if enabled.
///
/// How a hint is used depends on the [`WakeUp`](crate::WakeUp) strategy:
/// [`Advised`](crate::WakeUp::Advised) sleeps every hint as described below;
/// the default, [`Adaptive`](crate::WakeUp::Adaptive), follows
/// [`After`](Hint::After) and [`Backoff`](Hint::Backoff) likewise, but polls
/// (or retries a long-held request at once) instead of sleeping an
/// [`Estimate`](Hint::Estimate), [`Soon`](Hint::Soon) or
/// [`Default`](Hint::Default).
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
    Default,
}

/// The header that asks HuggingFace to hold a request until the model is loaded.
pub(crate) static X_WAIT_FOR_MODEL: HeaderName = HeaderName::from_static("x-wait-for-model");

/// How a retry asks the server to hold it until the model is ready.
/// `wait_for_model(false)` turns all of them off.
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

/// Decides which responses are cold starts. See the [module docs](self).
///
/// Implemented by the built-ins, by [`Or`], and by any
/// `Fn(&ResponseParts<'_>) -> Option<ColdStart> + Send + Sync + 'static`
/// (which is shown every response that is not a success).
pub trait Classify: Send + Sync + 'static {
    /// Whether a response with this status may be a cold start, so that its
    /// body is worth reading (up to 4 KiB). Successes are never shown.
    fn reads(&self, status: StatusCode, held: bool) -> bool;

    /// Whether `response` is a cold start, and what it hints.
    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart>;

    /// This classifier, or else `other`.
    fn or<B: Classify>(self, other: B) -> Or<Self, B>
    where
        Self: Sized,
    {
        Or { a: self, b: other }
    }
}

impl<F> Classify for F
where
    F: Fn(&ResponseParts<'_>) -> Option<ColdStart> + Send + Sync + 'static,
{
    fn reads(&self, _status: StatusCode, _held: bool) -> bool {
        true
    }

    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart> {
        self(response)
    }
}

/// `a`, or else `b`: see [`Classify::or`].
#[derive(Debug, Clone, Copy)]
pub struct Or<A, B> {
    a: A,
    b: B,
}

impl<A: Classify, B: Classify> Classify for Or<A, B> {
    fn reads(&self, status: StatusCode, held: bool) -> bool {
        self.a.reads(status, held) || self.b.reads(status, held)
    }

    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart> {
        let a = self
            .a
            .reads(response.status, response.held)
            .then(|| self.a.classify(response))
            .flatten();
        a.or_else(|| {
            self.b
                .reads(response.status, response.held)
                .then(|| self.b.classify(response))
                .flatten()
        })
    }
}

/// The HuggingFace serverless Inference API (the default).
///
/// A `503` whose JSON `error` says the model `is currently loading` (wait:
/// its `estimated_time`); and a `500` `Model too busy` for a request that
/// asked to be held (HuggingFace held it for about 60 s and gave up; retry
/// soon). Retries carry `x-wait-for-model: true`.
///
/// ```text
/// HTTP/1.1 503 Service Unavailable
/// {"error":"Model gpt2 is currently loading","estimated_time":20.0}
/// ```
///
/// ```
/// use tower_cold_start::classifier::HuggingFace;
/// use tower_cold_start::ColdStartRetryLayer;
/// // The same as `ColdStartRetryLayer::new()`.
/// let layer = ColdStartRetryLayer::new().classifier(HuggingFace);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct HuggingFace;

impl Classify for HuggingFace {
    fn reads(&self, status: StatusCode, held: bool) -> bool {
        hf::worth_reading(status, held)
    }

    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart> {
        let cold = hf::classify(response.status, response.body, response.held)?;
        let hint = if cold.after_hold {
            Hint::Soon
        } else {
            cold.estimate.map_or(Hint::Default, Hint::Estimate)
        };
        Some(ColdStart {
            hint,
            hold: Hold::WaitForModel,
            model: cold.model,
        })
    }
}

/// HuggingFace Inference Endpoints scaled to zero.
///
/// While a replica boots, the endpoint's proxy answers `503` (older
/// deployments: `502`). Every `503` and `502` is taken as a cold start, so
/// use this only for an endpoint URL. The wait is `Retry-After` when sent,
/// else `default_wait`; retries carry `X-Scale-Up-Timeout` set to the
/// seconds left in the caller's budget, so the proxy holds them until a
/// replica is ready.
///
/// ```
/// use tower_cold_start::classifier::InferenceEndpoints;
/// use tower_cold_start::ColdStartRetryLayer;
/// let layer = ColdStartRetryLayer::new().classifier(InferenceEndpoints);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct InferenceEndpoints;

impl Classify for InferenceEndpoints {
    fn reads(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::BAD_GATEWAY
    }

    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart> {
        if !self.reads(response.status, response.held) {
            return None;
        }
        let hint =
            retry_after(response.headers, SystemTime::now()).map_or(Hint::Default, Hint::After);
        Some(ColdStart::new(hint).hold(Hold::ScaleUpTimeout))
    }
}

/// text-generation-inference over its concurrent-request limit.
///
/// TGI answers `429` `{"error":"Model is overloaded","error_type":"overloaded"}`
/// with no hint; the layer backs off exponentially (1 s, 2 s, 4 s, …, capped
/// by `max_wait`) with jitter. Other `429`s (rate limits) pass through.
///
/// ```
/// use tower_cold_start::classifier::{Classify, HuggingFace, TgiOverloaded};
/// use tower_cold_start::ColdStartRetryLayer;
/// let layer = ColdStartRetryLayer::new().classifier(TgiOverloaded.or(HuggingFace));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TgiOverloaded;

#[derive(Deserialize)]
struct TgiError<'a> {
    #[serde(borrow)]
    error_type: std::borrow::Cow<'a, str>,
}

impl Classify for TgiOverloaded {
    fn reads(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
    }

    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart> {
        if response.status != StatusCode::TOO_MANY_REQUESTS || !starts_an_object(response.body) {
            return None;
        }
        let error: TgiError<'_> = serde_json::from_slice(response.body).ok()?;
        (error.error_type == "overloaded").then(|| ColdStart::new(Hint::Backoff))
    }
}

/// Any `503` or `429` that carries `Retry-After` (RFC 9110 §10.2.3): delta
/// seconds, or an HTTP date.
///
/// An HTTP date is measured against the response's own `Date` header when it
/// has one (so a clock skew between client and server does not matter), else
/// against this machine's clock; a date in the past means the shortest wait.
/// A missing or unparsable header is not a cold start. Retries carry no hold
/// header, or `Prefer: wait=N` with [`prefer_wait`](RetryAfter::prefer_wait).
///
/// ```
/// use tower_cold_start::classifier::{Classify, HuggingFace, RetryAfter};
/// use tower_cold_start::ColdStartRetryLayer;
/// let layer = ColdStartRetryLayer::new().classifier(HuggingFace.or(RetryAfter::new()));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryAfter {
    hold: Hold,
}

impl RetryAfter {
    /// `Retry-After` on `503` and `429`, no hold header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries carry `Prefer: wait=N` (N the seconds left, at most 60), as
    /// Replicate and other RFC 7240 servers understand.
    pub fn prefer_wait(mut self) -> Self {
        self.hold = Hold::PreferWait;
        self
    }
}

impl Classify for RetryAfter {
    fn reads(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS
    }

    fn classify(&self, response: &ResponseParts<'_>) -> Option<ColdStart> {
        if !self.reads(response.status, response.held) {
            return None;
        }
        let wait = retry_after(response.headers, SystemTime::now())?;
        Some(ColdStart::new(Hint::After(wait)).hold(self.hold))
    }
}

/// Parses `Retry-After`: delta seconds, or an HTTP date measured against the
/// response's `Date` (else `now`). A date in the past is a zero wait.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only; an absurd count saturates and is capped later.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let reference = headers
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(now);
    Some(at.duration_since(reference).unwrap_or(Duration::ZERO))
}

fn starts_an_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The layer's classifier, shared by its services and calls.
#[derive(Clone)]
pub(crate) struct Shared(pub(crate) std::sync::Arc<dyn Classify>);

impl Default for Shared {
    fn default() -> Self {
        Shared(std::sync::Arc::new(HuggingFace))
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Classify")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(status: u16, headers: &'a HeaderMap, body: &'a [u8]) -> ResponseParts<'a> {
        ResponseParts {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body,
            held: false,
            attempt: 1,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[("retry-after", "120")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        let h = headers(&[("retry-after", "  7 ")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let h = headers(&[("retry-after", "99999999999999999999999")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(u64::MAX)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &later)]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        for bad in ["", "-5", "1.5", "soon", "Mon, 99 Foo 2024 99:99:99 GMT"] {
            let h = headers(&[("retry-after", bad)]);
            assert_eq!(retry_after(&h, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_dates_use_the_server_clock_and_past_dates_mean_now() {
        // Our clock is an hour fast: the server's Date header decides.
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ours = server + Duration::from_secs(3600);
        let h = headers(&[
            ("date", &httpdate::fmt_http_date(server)),
            (
                "retry-after",
                &httpdate::fmt_http_date(server + Duration::from_secs(45)),
            ),
        ]);
        assert_eq!(retry_after(&h, ours), Some(Duration::from_secs(45)));
        let h = headers(&[(
            "retry-after",
            &httpdate::fmt_http_date(server - Duration::from_secs(10)),
        )]);
        assert_eq!(retry_after(&h, server), Some(Duration::ZERO));
        // All three date formats RFC 9110 requires.
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            let h = headers(&[
                ("retry-after", date),
                ("date", "Sun, 06 Nov 1994 08:49:07 GMT"),
            ]);
            assert_eq!(
                retry_after(&h, ours),
                Some(Duration::from_secs(30)),
                "{date}"
            );
        }
    }

    #[test]
    fn huggingface_keeps_the_first_release_rules() {
        let h = HeaderMap::new();
        let body = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;
        let cold = HuggingFace.classify(&parts(503, &h, body)).unwrap();
        assert_eq!(cold.hint, Hint::Estimate(20.0));
        assert_eq!(cold.hold, Hold::WaitForModel);
        assert_eq!(cold.model.as_deref(), Some("gpt2"));
        assert!(HuggingFace.classify(&parts(429, &h, body)).is_none());
        assert!(!HuggingFace.reads(StatusCode::TOO_MANY_REQUESTS, true));
    }

    #[test]
    fn tgi_overload_is_recognised_and_rate_limits_are_not() {
        let h = HeaderMap::new();
        let overloaded = br#"{"error":"Model is overloaded","error_type":"overloaded"}"#;
        assert_eq!(
            TgiOverloaded
                .classify(&parts(429, &h, overloaded))
                .unwrap()
                .hint,
            Hint::Backoff
        );
        let rate = br#"{"error":"Rate limit reached. Please log in or use a HF access token"}"#;
        assert!(TgiOverloaded.classify(&parts(429, &h, rate)).is_none());
        assert!(TgiOverloaded
            .classify(&parts(503, &h, overloaded))
            .is_none());
        assert!(TgiOverloaded
            .classify(&parts(429, &h, b"[\"overloaded\"]"))
            .is_none());
    }

    #[test]
    fn inference_endpoints_take_503_and_502_and_hold_with_the_budget() {
        let h = headers(&[("retry-after", "12")]);
        let cold = InferenceEndpoints
            .classify(&parts(502, &h, b"Bad Gateway"))
            .unwrap();
        assert_eq!(cold.hint, Hint::After(Duration::from_secs(12)));
        assert_eq!(cold.hold, Hold::ScaleUpTimeout);
        let none = HeaderMap::new();
        assert_eq!(
            InferenceEndpoints
                .classify(&parts(503, &none, b""))
                .unwrap()
                .hint,
            Hint::Default
        );
        assert!(InferenceEndpoints
            .classify(&parts(500, &none, b""))
            .is_none());
        let mut out = HeaderMap::new();
        Hold::ScaleUpTimeout.apply(&mut out, Duration::from_millis(95_600));
        assert_eq!(out["x-scale-up-timeout"], "95");
        let mut out = HeaderMap::new();
        Hold::PreferWait.apply(&mut out, Duration::from_secs(600));
        assert_eq!(out["prefer"], "wait=60");
    }

    #[test]
    fn or_tries_each_in_turn_and_closures_classify() {
        let h = headers(&[("retry-after", "3")]);
        let loading = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;
        let both = HuggingFace.or(RetryAfter::new());
        assert_eq!(
            both.classify(&parts(503, &h, loading)).unwrap().hint,
            Hint::Estimate(20.0)
        );
        assert_eq!(
            both.classify(&parts(503, &h, b"<html>")).unwrap().hint,
            Hint::After(Duration::from_secs(3))
        );
        assert!(both
            .classify(&parts(503, &HeaderMap::new(), b"<html>"))
            .is_none());
        let custom = |r: &ResponseParts<'_>| {
            (r.status().as_u16() == 425).then(|| ColdStart::new(Hint::Soon))
        };
        let chained = custom.or(HuggingFace);
        assert_eq!(
            chained.classify(&parts(425, &h, b"")).unwrap().hint,
            Hint::Soon
        );
        assert!(chained.classify(&parts(404, &h, b"")).is_none());
    }
}
