//! Ray Serve's HTTP proxy.

use std::time::SystemTime;

use http::StatusCode;

use super::error_text::error_says;
use super::retry_after::retry_after;
use super::{Classify, ColdStart, Hint, ResponseView, SELF_HOSTED_POLL};

/// What Ray Serve's `BackPressureError` says.
const BACKPRESSURE: &str = "Request dropped due to backpressure";

/// Ray Serve when a deployment's queue is full (`max_queued_requests`),
/// as it fills while replicas scale up from zero: `503` `text/plain`
/// `Request dropped due to backpressure (...)`, or the same text with `429`
/// and `Retry-After` under a `BackpressureConfig`. Polled, or the
/// `Retry-After` it sends. A refused connection is its proxy starting.
///
/// Scaling from zero itself needs nothing: the proxy holds the request
/// until a replica is up. Not cold starts: `503` "… is unavailable because
/// it failed to deploy." and `408` "Request … timed out" (the request may
/// have reached a replica).
///
/// Checked against the bytes of a real Ray Serve 2.60 and its source
/// (`serve/_private/router.py`, `serve/exceptions.py`,
/// `serve/_private/http_util.py`).
///
/// ```
/// use tower_cold_start::{classifier::RayServe, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(RayServe);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RayServe;

impl Classify for RayServe {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        if !self.may_be_cold_start(response.status, response.held)
            || !error_says(response, BACKPRESSURE)
        {
            return None;
        }
        let hint =
            retry_after(response.headers, SystemTime::now()).map_or(Hint::Unknown, Hint::After);
        Some(ColdStart::new(hint).with_poll_interval(SELF_HOSTED_POLL))
    }

    fn retries_refused(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::{headers, view};
    use std::time::Duration;

    /// The answers captured from a real Ray Serve 2.60.
    #[test]
    fn backpressure_is_a_cold_start_and_a_failed_deploy_is_not() {
        let text = headers(&[("content-type", "text/plain; charset=utf-8")]);
        let dropped =
            b"Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).";
        assert_eq!(
            RayServe
                .classify(&view(503, &text, dropped))
                .unwrap()
                .hint(),
            Hint::Unknown
        );
        let advised = headers(&[
            ("content-type", "text/plain; charset=utf-8"),
            ("retry-after", "5"),
        ]);
        assert_eq!(
            RayServe
                .classify(&view(429, &advised, dropped))
                .unwrap()
                .hint(),
            Hint::After(Duration::from_secs(5))
        );
        let failed = b"app1_Model is unavailable because it failed to deploy.";
        assert!(RayServe.classify(&view(503, &text, failed)).is_none());
        let timed_out = b"Request 4f2c timed out after 3.0s.";
        assert!(RayServe.classify(&view(408, &text, timed_out)).is_none());
        assert!(RayServe.classify(&view(500, &text, dropped)).is_none());
        assert!(RayServe.retries_refused());
    }
}
