//! NVIDIA Triton Inference Server over HTTP.

use http::StatusCode;

use super::error_text::not_ready;
use super::{Classify, ColdStart, ResponseView};

/// What Triton says of a model version that is not ready.
const NOT_AT_READY_STATE: &str = "is not at ready state";

/// Triton while a model (or one version of it) loads: `503`
/// `{"error":"'<model>' version <n> is not at ready state"}`. Polled, no
/// hint. A refused connection is the server booting. Its readiness route is
/// `GET /v2/models/<name>/ready`.
///
/// A model Triton is still loading can also answer `404` ("... has no
/// available versions"), which is what a misspelt model name gets too: it
/// is waited on only with [`not_found_while_loading`](Triton::not_found_while_loading).
///
/// ```
/// use tower_cold_start::{classifier::Triton, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(Triton::new());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Triton {
    not_found: bool,
}

impl Triton {
    /// `503` "is not at ready state"; a `404` passes through.
    pub const fn new() -> Self {
        Triton { not_found: false }
    }

    /// Also waits on a `404` whose error says the model "has no available
    /// versions", for a deployment whose model names are known good.
    pub fn not_found_while_loading(mut self) -> Self {
        self.not_found = true;
        self
    }
}

impl Classify for Triton {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE
            || (self.not_found && status == StatusCode::NOT_FOUND)
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        let not_found = || {
            let text = "has no available versions";
            self.not_found
                .then(|| not_ready(response, StatusCode::NOT_FOUND, text))
                .flatten()
        };
        not_ready(
            response,
            StatusCode::SERVICE_UNAVAILABLE,
            NOT_AT_READY_STATE,
        )
        .or_else(not_found)
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

    /// triton-inference-server/core src/model_lifecycle.cc returns
    /// `Status::Code::UNAVAILABLE` "'<model>' version <n> is not at ready
    /// state"; server src/http_server.cc `HttpCodeFromError` maps UNAVAILABLE
    /// to 503 (EVHTP_RES_SERVUNAVAIL) and NOT_FOUND to 404, and writes the
    /// message as `{"error":"..."}`.
    #[test]
    fn a_version_not_ready_is_a_cold_start_and_a_404_only_when_asked() {
        let h = HeaderMap::new();
        let not_ready = br#"{"error":"'densenet_onnx' version 1 is not at ready state"}"#;
        assert!(Triton::new().classify(&view(503, &h, not_ready)).is_some());
        let unknown =
            br#"{"error":"Request for unknown model: 'densenet' has no available versions"}"#;
        assert!(!Triton::new().may_be_cold_start(StatusCode::NOT_FOUND, false));
        assert!(Triton::new().classify(&view(404, &h, unknown)).is_none());
        let opted = Triton::new().not_found_while_loading();
        assert!(opted.classify(&view(404, &h, unknown)).is_some());
        // A plain 404 (a misspelt route) never is.
        assert!(opted
            .classify(&view(404, &h, br#"{"error":"Not Found"}"#))
            .is_none());
        assert!(Triton::new()
            .classify(&view(400, &h, br#"{"error":"bad input"}"#))
            .is_none());
    }
}
