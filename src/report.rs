//! What the layer tells the caller and the application about its work.

use std::time::Duration;

use http::Uri;

/// How a response was obtained, attached to every response as an extension.
///
/// On the warm path it says one attempt and no wait.
///
/// ```
/// # use tower_cold_start::ColdStartReport;
/// # let response = http::Response::new(());
/// if let Some(report) = response.extensions().get::<ColdStartReport>() {
///     println!("{} attempt(s), {:?} asleep", report.attempts(), report.waited());
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdStartReport {
    attempts: u32,
    checks: u32,
    waited: Duration,
    unbuffered: Option<Unbuffered>,
    unreachable: bool,
    gave_up: Option<GaveUp>,
}

/// Why a call stopped waiting for a cold model: its answer is then the
/// latest cold-start answer the model gave, as it came (or an
/// [`Unreachable`] error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GaveUp {
    /// [`max_total_wait`](crate::ColdStartRetryLayer::max_total_wait) ran
    /// out, or the wait the server asked for would have outlasted it.
    Budget,
    /// [`max_attempts`](crate::ColdStartRetryLayer::max_attempts) requests
    /// were sent.
    Attempts,
}

impl GaveUp {
    /// The reason in a few words, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            GaveUp::Budget => "the cold-start budget ran out",
            GaveUp::Attempts => "the attempts ran out",
        }
    }
}

/// Why a call's request body was not buffered, so that the call could not be
/// retried: its request was sent once, as it came, whatever the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unbuffered {
    /// The body is larger than
    /// [`body_limit`](crate::ColdStartRetryLayer::body_limit).
    BodyLimit,
    /// The bodies that calls in flight hold already fill
    /// [`total_body_limit`](crate::ColdStartRetryLayer::total_body_limit).
    TotalLimit,
}

impl Unbuffered {
    /// The reason in a few words, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Unbuffered::BodyLimit => "request body over body_limit",
            Unbuffered::TotalLimit => "buffered request bodies at total_body_limit",
        }
    }
}

impl ColdStartReport {
    pub(crate) fn new(
        attempts: u32,
        waited: Duration,
        unbuffered: Option<Unbuffered>,
        unreachable: bool,
    ) -> Self {
        ColdStartReport {
            attempts,
            checks: 0,
            waited,
            unbuffered,
            unreachable,
            gave_up: None,
        }
    }

    pub(crate) fn with_checks(mut self, checks: u32, gave_up: Option<GaveUp>) -> Self {
        self.checks = checks;
        self.gave_up = gave_up;
        self
    }

    /// `response`, carrying this report.
    pub(crate) fn attach<B>(self, mut response: http::Response<B>) -> http::Response<B> {
        response.extensions_mut().insert(self);
        response
    }

    /// How many readiness checks (empty `GET`s of the server's readiness
    /// route) this call sent while its model was cold; they are not among
    /// [`attempts`](Self::attempts).
    pub fn checks(&self) -> u32 {
        self.checks
    }

    /// Why this call stopped waiting, if it did: its response is then the
    /// model's latest cold-start answer. `None` when the response is not a
    /// cold start (or was not read as one).
    pub fn gave_up(&self) -> Option<GaveUp> {
        self.gave_up
    }

    /// Whether this call found the model's server unreachable (it refused
    /// connections: still booting) and waited for it; see
    /// [`with_retry_refused`](crate::classifier::Classify::with_retry_refused).
    pub fn unreachable(&self) -> bool {
        self.unreachable
    }

    /// How many times this call's own request was sent upstream, the first
    /// included (readiness checks are counted apart, in [`checks`](Self::checks)).
    ///
    /// `0` when the call found its model cold, waited for another caller's
    /// probe, and ran out of budget before sending anything: its response is
    /// then the latest loading response another call received.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How long this call spent with no request in flight: asleep between
    /// attempts, or waiting for another caller's probe of the same model.
    ///
    /// Time a server spent holding a request (`x-wait-for-model: true`) is part
    /// of an attempt, not of this figure.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Why this call could not retry, if its request body was not buffered:
    /// a cold-start answer to it reached the caller after one attempt.
    /// `None` when the body was buffered (or empty).
    pub fn unbuffered(&self) -> Option<Unbuffered> {
        self.unbuffered
    }
}

/// A URI's host and port, for logs: never its userinfo.
pub(crate) struct HostPort<'a>(pub(crate) &'a Uri);

impl std::fmt::Display for HostPort<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(host) = self.0.host() {
            f.write_str(host)?;
        }
        match self.0.port_u16() {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// A URI for logs and `Debug`: scheme, host, port and path, never its
/// userinfo nor its query.
pub(crate) struct Redacted<'a>(pub(crate) &'a Uri);

impl std::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(scheme) = self.0.scheme_str() {
            write!(f, "{scheme}://")?;
        }
        write!(f, "{}{}", HostPort(self.0), self.0.path())?;
        if self.0.query().is_some() {
            f.write_str("?…")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `text` (an error's message) with every URL in it redacted: userinfo and
/// queries removed, as from reqwest's "error sending request for url (…)".
pub(crate) fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let Some(start) = word.find("://").and_then(|at| {
            word[..at]
                .rfind(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '-' && c != '.')
                .map_or(Some(0), |p| Some(p + 1))
        }) else {
            out.push_str(word);
            continue;
        };
        let end = word[start..]
            .find(['(', ')', '"', '\'', ',', '<', '>'])
            .map_or(word.len(), |e| start + e);
        out.push_str(&word[..start]);
        match word[start..end].parse::<Uri>() {
            Ok(uri) => out.push_str(&Redacted(&uri).to_string()),
            Err(_) => out.push_str("<url>"),
        }
        out.push_str(&word[end..]);
    }
    out
}

/// The facts about one wait, given to the [`on_retry`] hook before the layer
/// sleeps.
///
/// The call that probes a cold model gets one before each sleep. A call
/// waiting behind another caller's probe of the same model
/// ([`behind_probe`](Self::behind_probe)) gets one when it starts waiting
/// and one for each loading answer the probe brings, so that every caller
/// can show progress.
///
/// [`on_retry`]: crate::ColdStartRetryLayer::on_retry
#[derive(Clone, Copy)]
pub struct RetryEvent<'a> {
    pub(crate) uri: &'a Uri,
    pub(crate) model: Option<&'a str>,
    pub(crate) attempt: u32,
    pub(crate) wait: Duration,
    pub(crate) estimate: Option<f64>,
    pub(crate) elapsed: Duration,
    pub(crate) behind_probe: bool,
    pub(crate) unreachable: bool,
}

impl std::fmt::Debug for RetryEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URI without userinfo or query: credentials travel there.
        f.debug_struct("RetryEvent")
            .field("uri", &Redacted(self.uri))
            .field("model", &self.model)
            .field("attempt", &self.attempt)
            .field("wait", &self.wait)
            .field("estimate", &self.estimate)
            .field("elapsed", &self.elapsed)
            .field("behind_probe", &self.behind_probe)
            .field("unreachable", &self.unreachable)
            .finish()
    }
}

impl<'a> RetryEvent<'a> {
    /// The request's URI, whole: userinfo and query included (this event's
    /// `Debug` shows neither).
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The model the server named in its loading message, if it named one.
    ///
    /// This is the server's canonical id, which may differ in case from the
    /// id in the URI.
    pub fn model(&self) -> Option<&'a str> {
        self.model
    }

    /// The probe that was answered "loading": the requests and readiness
    /// checks this call sent so far (1 for the first request), so that it
    /// moves with every poll. For a call waiting behind another's probe: the
    /// requests it sent so far, `0` if it has sent none.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How long the layer is about to sleep before the next attempt. For a
    /// call waiting behind another's probe: the longest it may still wait
    /// (what is left of its budget); the probe's answer may end it sooner.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Whether this call waits behind another caller's probe of the same
    /// model, sending nothing itself, rather than sleeping before a request
    /// of its own. The model and the estimate are then those of the probe's
    /// latest loading answer.
    pub fn behind_probe(&self) -> bool {
        self.behind_probe
    }

    /// Whether the server refused the connection (still booting) rather
    /// than answered "loading": nothing reached it.
    pub fn unreachable(&self) -> bool {
        self.unreachable
    }

    /// The server's `estimated_time` in seconds, as sent, when it was a
    /// number; it may be negative, huge or non-finite.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate
    }

    /// Time since the first loading response for this call.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

/// The error a call ends with when its model's server stayed unreachable
/// (it refused connections) until the cold-start budget or the attempts ran
/// out; its [`source`](std::error::Error::source) is the client's own error
/// for the latest refused connection.
#[derive(Debug, Clone)]
pub struct Unreachable(
    pub(crate) std::sync::Arc<dyn std::error::Error + Send + Sync>,
    pub(crate) GaveUp,
);

impl Unreachable {
    /// Why the call stopped waiting.
    pub fn gave_up(&self) -> GaveUp {
        self.1
    }
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model server unreachable until {}", self.1.as_str())
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// A user's function told of every wait.
pub(crate) type RetryHook = std::sync::Arc<dyn Fn(&RetryEvent<'_>) + Send + Sync>;

/// Tells tracing and the hook of a wait.
pub(crate) fn announce(hook: Option<&RetryHook>, event: &RetryEvent<'_>) {
    let uri = event.uri;
    let message = match (event.unreachable, event.behind_probe) {
        (false, true) => "model is loading; waiting for another request's probe of it",
        (false, false) => "model is loading; waiting before retrying",
        (true, true) => "model server unreachable; waiting for another request's probe of it",
        (true, false) => "model server unreachable; waiting before retrying",
    };
    tracing::info!(
        // Host and port: never userinfo, nor the query (credentials travel
        // in both).
        authority = %HostPort(uri),
        path = uri.path(),
        model = event.model,
        attempt = event.attempt,
        wait_ms = event.wait.as_millis() as u64,
        estimate = event.estimate,
        behind_probe = event.behind_probe,
        unreachable = event.unreachable,
        "{message}"
    );
    if let Some(hook) = hook {
        hook(event);
    }
}

/// A call that could not be retried met what may be a cold start.
pub(crate) fn warn_unbuffered(status: http::StatusCode, reason: Unbuffered) {
    tracing::warn!(
        status = status.as_u16(),
        reason = reason.as_str(),
        "response may be a cold start, but the request body was not buffered; not retried"
    );
}

/// A refused connection that could have been a booting server, but the
/// request body was not buffered.
pub(crate) fn warn_refused_unbuffered(reason: Unbuffered) {
    tracing::warn!(
        reason = reason.as_str(),
        "connection refused (the server may be booting), but the request body was not \
         buffered; not retried"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_error_text_lose_userinfo_and_query() {
        let text = "error sending request for url (http://user:hunter2@h.test:8080/v1/x?api_key=s3cret&token=t0k)";
        let scrubbed = scrub_urls(text);
        assert_eq!(
            scrubbed,
            "error sending request for url (http://h.test:8080/v1/x?…)"
        );
        assert_eq!(scrub_urls("connection refused"), "connection refused");
        assert_eq!(scrub_urls("to https://h/p, then"), "to https://h/p, then");
        assert!(!scrub_urls("x http://u:p@[bad?k=s3cret").contains("s3cret"));
    }
}
