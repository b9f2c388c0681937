//! KServe's Python model server, both protocol versions.

use http::StatusCode;

use super::error_text::not_ready;
use super::{Classify, ColdStart, ResponseView};

/// KServe's model server while a model loads: `503`
/// `{"error":"Model with name <name> is not ready."}`, on the v1
/// (`POST /v1/models/<name>:predict`) and v2
/// (`POST /v2/models/<name>/infer`) routes alike. Polled, no hint. A refused
/// connection is the server booting. Its readiness route is
/// `GET /v2/models/<name>/ready`.
///
/// ```
/// use tower_cold_start::{classifier, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(classifier::KServe);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct KServe;

/// What KServe's `ModelNotReady` (and its "Server is not ready.") says.
const NOT_READY: &str = "is not ready";

impl Classify for KServe {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        not_ready(response, StatusCode::SERVICE_UNAVAILABLE, NOT_READY)
    }

    fn retries_refused(&self) -> bool {
        true
    }

    fn readiness(&self, uri: &http::Uri) -> Option<http::Uri> {
        super::model_ready_route(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::view;
    use http::HeaderMap;

    /// The bytes of kserve python/kserve/kserve/errors.py: `ModelNotReady`
    /// ("Model with name {name} is not ready.", plus an optional detail) is
    /// answered by `model_not_ready_handler` with 503 `{"error": ...}`.
    #[test]
    fn model_not_ready_is_a_cold_start_and_other_errors_are_not() {
        let h = HeaderMap::new();
        let ready = br#"{"error":"Model with name sklearn-iris is not ready."}"#;
        assert!(KServe.classify(&view(503, &h, ready)).is_some());
        let detail = br#"{"error":"Model with name m is not ready. Loading weights"}"#;
        assert!(KServe.classify(&view(503, &h, detail)).is_some());
        // model_not_found_handler: 404 "does not exist", never a cold start.
        let missing = br#"{"error":"Model with name m does not exist."}"#;
        assert!(KServe.classify(&view(404, &h, missing)).is_none());
        // inference_error_handler: 500.
        assert!(KServe
            .classify(&view(500, &h, br#"{"error":"boom"}"#))
            .is_none());
        assert!(KServe
            .classify(&view(503, &h, b"upstream connect error"))
            .is_none());
        assert!(KServe.retries_refused());
    }
}
