//! Deciding which responses are cold starts, for every server users run.
//!
//! A [`Classify`] looks at a response that is not a success (its status, its
//! headers, and at most the first 4 KiB of its body) and says whether it is a
//! cold start, what wait the server hints, and how to ask the server to hold
//! the retry. [`ColdStartRetryLayer::classifier`](crate::ColdStartRetryLayer::classifier)
//! installs one; the default is [`KnownServers`], every exact marker of the
//! built-ins below (and no refused connections, no readiness routes).
//! Classifiers combine with [`Classify::or`], and [`from_fn`] makes one of a
//! closure.
//!
//! | built-in | recognises | wait | hold header on retries |
//! |---|---|---|---|
//! | [`KnownServers`] (default) | every exact marker below: HuggingFace, KServe, Triton's `503`, vLLM's `Server is unavailable`, TGI, TEI, Ollama, llama.cpp, MLServer, Ray Serve | each server's | HuggingFace's, after its answers |
//! | [`HuggingFace`] | `503` `{"error":"… is currently loading","estimated_time":…}`; `500` `Model too busy` after a hold | `estimated_time` | `x-wait-for-model: true` |
//! | [`InferenceEndpoints`] | `503` or `502` from the endpoint proxy while a replica boots | `Retry-After` if sent | `X-Scale-Up-Timeout: <seconds left>` |
//! | [`TgiOverloaded`] | `429` `{"error_type":"overloaded"}` from text-generation-inference | exponential backoff | none |
//! | [`RetryAfter`] | `503` or `429` with `Retry-After` (seconds, a fraction, an HTTP date) or `retry-after-ms` | the header | none, or `Prefer: wait=N` |
//! | [`KServe`] | `503` `Model with name … is not ready.`; refused connections | poll, via `/v2/models/<name>/ready` | none |
//! | [`Triton`] | `503` `… is not at ready state` (a `404` on request); refused connections | poll, via `/v2/models/<name>/ready` | none |
//! | [`Vllm`] | `503` `Server is unavailable…` or sleeping; refused connections | poll, via `/health` | none |
//! | [`Tei`] | `429` `"error_type":"Overloaded"`; refused connections | exponential backoff | none |
//! | [`Ollama`] | `503` `… maximum pending requests exceeded`; refused connections | exponential backoff | none |
//! | [`LlamaCpp`] | `503` `{"error":{"message":"Loading model",…}}`; refused connections | poll, via `/health` | none |
//! | [`MlServer`] | `400` `… is not ready yet.`; refused connections | poll | none |
//! | [`RayServe`] | `503`/`429` text `Request dropped due to backpressure`; refused connections | poll, or `Retry-After` | none |
//! | [`ErrorText`] | your statuses and text (JSON or `text/plain`) | poll, or your hint | yours |
//!
//! ```
//! use tower_cold_start::classifier::{self, Classify, ColdStart, HuggingFace, Hint, RetryAfter};
//! use tower_cold_start::ColdStartRetryLayer;
//!
//! // HuggingFace's loading marker, else any 503/429 that says Retry-After.
//! let layer = ColdStartRetryLayer::new().classifier(HuggingFace.or(RetryAfter::new()));
//!
//! // A closure: a gateway of ours answers 425 while its model boots.
//! let layer = ColdStartRetryLayer::new().classifier(classifier::from_fn(|response| {
//!     (response.status() == 425).then(|| ColdStart::new(Hint::Unknown))
//! }));
//! ```

use std::fmt;

use http::header::HeaderMap;
use http::StatusCode;

mod adjust;
mod cold_start;
mod endpoints;
mod error_text;
mod huggingface;
mod known;
mod kserve;
mod llama_cpp;
mod mlserver;
mod ollama;
mod ray_serve;
mod retry_after;
mod tei;
mod tgi;
mod triton;
mod vllm;

pub use adjust::Adjusted;
pub use cold_start::{ColdStart, Hint, Hold};
pub use endpoints::InferenceEndpoints;
pub use error_text::ErrorText;
pub use huggingface::HuggingFace;
pub use known::KnownServers;
pub use kserve::KServe;
pub use llama_cpp::LlamaCpp;
pub use mlserver::MlServer;
pub use ollama::Ollama;
pub use ray_serve::RayServe;
pub use retry_after::RetryAfter;
pub use tei::Tei;
pub use tgi::TgiOverloaded;
pub use triton::Triton;
pub use vllm::Vllm;

pub(crate) use cold_start::SELF_HOSTED_POLL;
pub(crate) use huggingface::X_WAIT_FOR_MODEL;

/// What a classifier sees of a response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseView<'a> {
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: &'a [u8],
    pub(crate) held: bool,
    pub(crate) attempt: u32,
}

impl<'a> ResponseView<'a> {
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

/// Decides which responses are cold starts. See the [module docs](self).
///
/// Implemented by the built-ins, by [`Or`] and by [`FromFn`]. A closure is
/// not a classifier by itself: wrap it in [`from_fn`].
///
/// ```compile_fail
/// use tower_cold_start::classifier::{ColdStart, Hint};
/// use tower_cold_start::ColdStartRetryLayer;
///
/// // error[E0282]: type annotations needed; wrap the closure in `classifier::from_fn`.
/// let layer = ColdStartRetryLayer::new()
///     .classifier(|response| (response.status() == 425).then(|| ColdStart::new(Hint::Unknown)));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cold-start classifier",
    label = "not a `Classify`",
    note = "a closure becomes one with `tower_cold_start::classifier::from_fn(|response| ...)`",
    note = "the built-ins (`KnownServers`, `HuggingFace`, `LlamaCpp`, ...) combine with `.or(...)`"
)]
pub trait Classify: Send + Sync + 'static {
    /// Whether a response with this status may be a cold start, so that its
    /// body is worth reading (up to 4 KiB). Successes are never shown.
    ///
    /// Default: `true` for every status.
    fn may_be_cold_start(&self, status: StatusCode, held: bool) -> bool {
        let _ = (status, held);
        true
    }

    /// Whether `response` is a cold start, and what it hints.
    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart>;

    /// Whether a refused connection means the server is still booting, so
    /// that the call waits and retries as for a loading answer. A refused
    /// connection proves the request never reached the server.
    ///
    /// Default: `false` (a hosted API refusing connections has a wrong URL:
    /// fail fast). The built-ins for servers users run say `true`.
    fn retries_refused(&self) -> bool {
        false
    }

    /// How this server's requests ask to be held until the model is ready,
    /// when no answer has said so yet (for the first request).
    ///
    /// Default: [`Hold::None`].
    fn hold(&self) -> Hold {
        Hold::None
    }

    /// Whether the first request already asks to be held ([`hold`](Self::hold)),
    /// as the server's documentation advises.
    ///
    /// Default: `false`.
    fn holds_first_request(&self) -> bool {
        false
    }

    /// The server's readiness route for a request to `uri`: while the model
    /// is cold, the probing call polls it with an empty `GET` and sends its
    /// real request (and body) only once it answers with a success.
    ///
    /// Default: `None` (the real request is the probe).
    fn readiness(&self, uri: &http::Uri) -> Option<http::Uri> {
        let _ = uri;
        None
    }

    /// This classifier, with refused connections waited out (`true`) or
    /// failing at once (`false`), whatever it says itself.
    ///
    /// Note that only a refusal of the request's own first connection proves
    /// it never reached a server; a refused redirect hop, a timeout or a reset
    /// reaches the caller as it is.
    ///
    /// ```
    /// use tower_cold_start::classifier::{Classify, KnownServers};
    /// use tower_cold_start::ColdStartRetryLayer;
    ///
    /// // Every known marker, and a server of ours that refuses connections
    /// // while it boots.
    /// let layer = ColdStartRetryLayer::new().classifier(KnownServers.with_retry_refused(true));
    /// ```
    fn with_retry_refused(self, retry_refused: bool) -> Adjusted<Self>
    where
        Self: Sized,
    {
        adjust::adjust(self).with_retry_refused(retry_refused)
    }

    /// This classifier, with the first request asking to be held (with
    /// [`hold`](Self::hold)'s header) or not, whatever it says itself.
    ///
    /// Note that callers arriving together on a cold model that holds then
    /// cost one request each, not two.
    fn with_hold_first_request(self, hold_first_request: bool) -> Adjusted<Self>
    where
        Self: Sized,
    {
        adjust::adjust(self).with_hold_first_request(hold_first_request)
    }

    /// This classifier, with `route` as the server's readiness route for a
    /// request (`None`: no route), whatever it says itself.
    ///
    /// Note that the route is only a hint (see the crate docs): it is used
    /// for bodies of 64 KiB or more (which then go out twice at most) and
    /// while other callers wait, and dropped for a model where it answers
    /// wrong, slowly or untruly.
    fn with_readiness_route<F>(self, route: F) -> Adjusted<Self>
    where
        Self: Sized,
        F: Fn(&http::Uri) -> Option<http::Uri> + Send + Sync + 'static,
    {
        adjust::adjust(self).with_readiness_route(route)
    }

    /// This classifier, or else `other`.
    fn or<B: Classify>(self, other: B) -> Or<Self, B>
    where
        Self: Sized,
    {
        Or { a: self, b: other }
    }
}

/// A classifier made of a closure: see [`from_fn`].
#[derive(Clone, Copy)]
pub struct FromFn<F>(F);

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFn")
    }
}

/// A classifier of a closure, shown every response that is not a success;
/// the closure's parameter type is inferred.
///
/// ```
/// use tower_cold_start::classifier::{self, Classify, ColdStart, Hint, HuggingFace};
///
/// let ours = classifier::from_fn(|response| {
///     (response.status() == 425).then(|| ColdStart::new(Hint::Soon))
/// });
/// let both = ours.or(HuggingFace);
/// # let _ = both;
/// ```
pub fn from_fn<F>(f: F) -> FromFn<F>
where
    F: Fn(&ResponseView<'_>) -> Option<ColdStart> + Send + Sync + 'static,
{
    FromFn(f)
}

impl<F> Classify for FromFn<F>
where
    F: Fn(&ResponseView<'_>) -> Option<ColdStart> + Send + Sync + 'static,
{
    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        (self.0)(response)
    }
}

/// `a`, or else `b`: see [`Classify::or`].
#[derive(Debug, Clone, Copy)]
pub struct Or<A, B> {
    a: A,
    b: B,
}

impl<A: Classify, B: Classify> Classify for Or<A, B> {
    fn may_be_cold_start(&self, status: StatusCode, held: bool) -> bool {
        self.a.may_be_cold_start(status, held) || self.b.may_be_cold_start(status, held)
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        let try_one = |c: &dyn Classify| {
            c.may_be_cold_start(response.status, response.held)
                .then(|| c.classify(response))
                .flatten()
        };
        try_one(&self.a).or_else(|| try_one(&self.b))
    }

    fn retries_refused(&self) -> bool {
        self.a.retries_refused() || self.b.retries_refused()
    }

    fn hold(&self) -> Hold {
        match self.a.hold() {
            Hold::None => self.b.hold(),
            hold => hold,
        }
    }

    fn holds_first_request(&self) -> bool {
        self.a.holds_first_request() || self.b.holds_first_request()
    }

    fn readiness(&self, uri: &http::Uri) -> Option<http::Uri> {
        self.a.readiness(uri).or_else(|| self.b.readiness(uri))
    }
}

/// `uri` with its path replaced by `path` and no query.
pub(crate) fn same_server(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = uri.scheme().cloned();
    parts.authority = uri.authority().cloned();
    parts.path_and_query = Some(path.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The v2 protocol's model readiness route (`/v2/models/<name>/ready`) for
/// a request to `/v1/models/<name>:predict` or `/v2/models/<name>/...`.
pub(crate) fn model_ready_route(uri: &http::Uri) -> Option<http::Uri> {
    let rest = uri.path().split_once("/models/")?.1;
    let name = rest.split(['/', ':']).next().filter(|n| !n.is_empty())?;
    same_server(uri, &format!("/v2/models/{name}/ready"))
}

/// Whether a body starts a JSON object: serde would also accept an array
/// for a struct, which no server sends for an error.
pub(crate) fn starts_an_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The layer's classifier, shared by its services and calls, with what it
/// says of every request (its first request's hold, refused connections)
/// read once, when it is installed.
#[derive(Clone)]
pub(crate) struct LayerClassifier {
    classify: std::sync::Arc<dyn Classify>,
    first_hold: Hold,
    retries_refused: bool,
}

impl LayerClassifier {
    pub(crate) fn new<C: Classify>(classifier: C) -> Self {
        LayerClassifier {
            first_hold: if classifier.holds_first_request() {
                classifier.hold()
            } else {
                Hold::None
            },
            retries_refused: classifier.retries_refused(),
            classify: std::sync::Arc::new(classifier),
        }
    }

    /// Whether a response with this status may be a cold start: never a
    /// success, else as the classifier says. The one place that decides
    /// whether a response is worth reading (with the size of its body).
    pub(crate) fn may_be_cold_start(&self, status: StatusCode, held: bool) -> bool {
        !status.is_success() && self.classify.may_be_cold_start(status, held)
    }

    /// Whether `response` is a cold start.
    pub(crate) fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        self.classify.classify(response)
    }

    /// The readiness route for a request to `uri`.
    pub(crate) fn readiness(&self, uri: &http::Uri) -> Option<http::Uri> {
        self.classify.readiness(uri)
    }

    /// How the first request asks to be held ([`Hold::None`]: it does not).
    pub(crate) fn first_hold(&self) -> Hold {
        self.first_hold
    }

    /// Whether a refused connection is waited out.
    pub(crate) fn retries_refused(&self) -> bool {
        self.retries_refused
    }
}

impl Default for LayerClassifier {
    fn default() -> Self {
        LayerClassifier::new(KnownServers)
    }
}

impl fmt::Debug for LayerClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerClassifier")
            .field("first_hold", &self.first_hold)
            .field("retries_refused", &self.retries_refused)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use http::header::{HeaderName, HeaderValue};

    use super::*;

    pub(crate) fn view<'a>(
        status: u16,
        headers: &'a HeaderMap,
        body: &'a [u8],
    ) -> ResponseView<'a> {
        ResponseView {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body,
            held: false,
            attempt: 1,
        }
    }

    pub(crate) fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::test_support::*;
    use super::*;

    #[test]
    fn or_tries_each_in_turn_and_closures_classify() {
        let h = headers(&[("retry-after", "3")]);
        let loading = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;
        let both = HuggingFace.or(RetryAfter::new());
        assert_eq!(
            both.classify(&view(503, &h, loading)).unwrap().hint(),
            Hint::Estimate(20.0)
        );
        assert_eq!(
            both.classify(&view(503, &h, b"<html>")).unwrap().hint(),
            Hint::After(Duration::from_secs(3))
        );
        assert!(both
            .classify(&view(503, &HeaderMap::new(), b"<html>"))
            .is_none());
        let custom = from_fn(|r| (r.status().as_u16() == 425).then(|| ColdStart::new(Hint::Soon)));
        let chained = custom.or(HuggingFace);
        assert_eq!(
            chained.classify(&view(425, &h, b"")).unwrap().hint(),
            Hint::Soon
        );
        assert!(chained.classify(&view(404, &h, b"")).is_none());
    }

    #[test]
    fn holds_are_written_from_the_budget_left() {
        let mut out = HeaderMap::new();
        Hold::ScaleUpTimeout.apply(&mut out, Duration::from_millis(95_600));
        assert_eq!(out["x-scale-up-timeout"], "95");
        let mut out = HeaderMap::new();
        Hold::PreferWait.apply(&mut out, Duration::from_secs(600));
        assert_eq!(out["prefer"], "wait=60");
        let mut out = headers(&[("x-wait-for-model", "false")]);
        Hold::WaitForModel.apply(&mut out, Duration::from_secs(1));
        assert_eq!(out["x-wait-for-model"], "false", "the caller's own stays");
    }

    #[test]
    fn a_cold_start_tells_what_it_was_built_with() {
        let cold = ColdStart::new(Hint::Backoff)
            .with_hold(Hold::PreferWait)
            .with_model("m");
        assert_eq!(cold.hint(), Hint::Backoff);
        assert_eq!(cold.hold(), Hold::PreferWait);
        assert_eq!(cold.model(), Some("m"));
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn readiness_routes_follow_the_request() {
        let uri: http::Uri = "http://h:8080/v2/models/densenet/infer?x=1"
            .parse()
            .unwrap();
        assert_eq!(
            KServe.readiness(&uri).unwrap(),
            "http://h:8080/v2/models/densenet/ready"
        );
        let v1: http::Uri = "https://h/v1/models/iris:predict".parse().unwrap();
        assert_eq!(
            Triton::new().readiness(&v1).unwrap(),
            "https://h/v2/models/iris/ready"
        );
        let chat: http::Uri = "http://h:8000/v1/chat/completions".parse().unwrap();
        assert_eq!(Vllm.readiness(&chat).unwrap(), "http://h:8000/health");
        assert_eq!(KServe.readiness(&chat), None, "no model in the path");
        assert_eq!(HuggingFace.readiness(&chat), None);
        assert_eq!(Ollama.readiness(&chat), None, "Ollama holds instead");
        assert_eq!(
            HuggingFace.or(Tei).readiness(&chat).unwrap(),
            "http://h:8000/health"
        );
    }
}
