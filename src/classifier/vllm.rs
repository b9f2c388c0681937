//! vLLM's OpenAI-compatible server.

use http::StatusCode;

use super::error_text::not_ready;
use super::{Classify, ColdStart, ResponseView};

/// What vLLM's `ServiceUnavailableMiddleware` says.
pub(super) const UNAVAILABLE: &str = "Server is unavailable. Please try again later.";

/// vLLM while it cannot serve yet: `503`
/// `{"error":"Server is unavailable. Please try again later."}` while it
/// scales, and a `503` whose error says the model is sleeping (sleep mode).
/// Polled, no hint. A refused connection is the server starting (it opens
/// its port before the engine is ready in some versions, after in others).
/// Its readiness route is `GET /health`.
///
/// ```
/// use tower_cold_start::{classifier::Vllm, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(Vllm);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Vllm;

impl Classify for Vllm {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        let unavailable = |text| not_ready(response, StatusCode::SERVICE_UNAVAILABLE, text);
        unavailable(UNAVAILABLE).or_else(|| unavailable("sleeping"))
    }

    fn retries_refused(&self) -> bool {
        true
    }

    fn readiness(&self, uri: &http::Uri) -> Option<http::Uri> {
        super::same_server(uri, "/health")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::view;
    use http::HeaderMap;

    /// vllm vllm/entrypoints/serve/elastic_ep/middleware.py
    /// (`ServiceUnavailableMiddleware`) answers 503 `{"error": "Server is
    /// unavailable. Please try again later."}` while it rejects requests;
    /// docs/source/features/sleep_mode.md: model endpoints answer 503 "with a
    /// message indicating that the model is sleeping" (the docs give no
    /// exact text, so any 503 error that says "sleeping" counts). Errors on
    /// the OpenAI routes nest the text in `error.message`.
    #[test]
    fn unavailable_and_sleeping_are_cold_starts_and_other_503s_are_not() {
        let h = HeaderMap::new();
        let scaling = br#"{"error":"Server is unavailable. Please try again later."}"#;
        assert!(Vllm.classify(&view(503, &h, scaling)).is_some());
        let asleep = br#"{"error":{"message":"The model is sleeping. Wake it up first.","type":"ServiceUnavailableError","code":503}}"#;
        assert!(Vllm.classify(&view(503, &h, asleep)).is_some());
        let other =
            br#"{"error":{"message":"The engine died.","type":"InternalServerError","code":503}}"#;
        assert!(Vllm.classify(&view(503, &h, other)).is_none());
        assert!(Vllm.classify(&view(500, &h, scaling)).is_none());
    }
}
