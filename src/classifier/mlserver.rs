//! Seldon's MLServer (also KServe's MLServer runtime).

use http::StatusCode;

use super::error_text::not_ready;
use super::{Classify, ColdStart, ResponseView};

/// What MLServer's `ModelNotReady` says.
const NOT_READY_YET: &str = "is not ready yet.";

/// MLServer while a model loads: `400` `{"error":"Model <name> is not ready
/// yet."}` from its infer route (MLServer answers "not ready" with a `400`,
/// not a `503`). Polled, no hint. A refused connection is the server
/// starting: it opens its port about 1.5 s after start, or only once its
/// models are loaded with `parallel_workers=0`.
///
/// Not a cold start: `404` `{"error":"Model <name> not found"}`, which is
/// what an unloaded model (nothing is loading it) and a misspelt name get.
/// Its ready routes answer `400` with no body while loading, so they are not
/// used as readiness routes.
///
/// Checked against the bytes of a real MLServer 1.7.1 and its source
/// (`mlserver/errors.py`, `mlserver/handlers/dataplane.py`,
/// `mlserver/rest/errors.py`).
///
/// ```
/// use tower_cold_start::{classifier::MlServer, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(MlServer);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MlServer;

impl Classify for MlServer {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::BAD_REQUEST
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        not_ready(response, StatusCode::BAD_REQUEST, NOT_READY_YET)
    }

    fn retries_refused(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::{headers, view};

    /// The bodies captured from a real MLServer 1.7.1 while `slow` loads,
    /// and after it was unloaded.
    #[test]
    fn not_ready_yet_is_a_cold_start_and_not_found_is_not() {
        let h = headers(&[("content-type", "application/json")]);
        let loading = br#"{"error":"Model slow is not ready yet."}"#;
        assert!(MlServer.classify(&view(400, &h, loading)).is_some());
        let missing = br#"{"error":"Model slow not found"}"#;
        assert!(MlServer.classify(&view(404, &h, missing)).is_none());
        // The ready routes' empty 400, and other 400s.
        assert!(MlServer.classify(&view(400, &h, b"")).is_none());
        let invalid = br#"{"error":"Invalid input: shape mismatch"}"#;
        assert!(MlServer.classify(&view(400, &h, invalid)).is_none());
        assert!(MlServer.classify(&view(503, &h, loading)).is_none());
        assert!(MlServer.retries_refused());
    }
}
