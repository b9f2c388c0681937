//! llama.cpp's `llama-server`.

use http::StatusCode;

use super::error_text::not_ready;
use super::{Classify, ColdStart, ResponseView};

/// What `llama-server` says on every route while its model loads.
const LOADING_MODEL: &str = "Loading model";

/// llama.cpp's `llama-server` while its model loads: `503`
/// `{"error":{"message":"Loading model","type":"unavailable_error","code":503}}`
/// on every route. Polled, no hint. A refused connection is the server
/// starting, or downloading the model it was told to fetch (`-hf`), which
/// happens before its port opens. Its readiness route is `GET /health`,
/// truthful in single-model mode (the loading `503` until the model is
/// loaded, then `200`): it can release the callers waiting on the model
/// before the probe's own completion comes back. In router mode it says
/// `200` whatever the models do, and is dropped after the first time it
/// says ready while the model still answers cold.
///
/// Only the message counts: `503` "no slot available" has the same type
/// (`unavailable_error`) and is not a cold start. In router mode (no `-m`)
/// and after `--sleep-idle-seconds`, the server holds requests while a
/// model loads, so nothing needs recognising.
///
/// Checked against the bytes of a real `llama-server` (llama.cpp commit
/// 0c1e57098, as vendored by llama-cpp-python 0.3.36) and its source
/// (`tools/server/server-http.cpp`, `middleware_server_state`).
///
/// ```
/// use tower_cold_start::{classifier::LlamaCpp, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(LlamaCpp);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaCpp;

impl Classify for LlamaCpp {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        not_ready(response, StatusCode::SERVICE_UNAVAILABLE, LOADING_MODEL)
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
    use crate::classifier::test_support::{headers, view};
    use crate::classifier::Hint;

    /// The bodies captured from a real `llama-server` (single-model mode
    /// while loading; `GET /slots?fail_on_no_slot=1` with every slot busy;
    /// router mode's unknown model and failed load).
    #[test]
    fn loading_model_is_a_cold_start_and_its_lookalikes_are_not() {
        let h = headers(&[("content-type", "application/json; charset=utf-8")]);
        let loading =
            br#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#;
        assert_eq!(
            LlamaCpp.classify(&view(503, &h, loading)).unwrap().hint(),
            Hint::Unknown
        );
        let no_slot =
            br#"{"error":{"code":503,"message":"no slot available","type":"unavailable_error"}}"#;
        assert!(LlamaCpp.classify(&view(503, &h, no_slot)).is_none());
        let unknown = br#"{"error":{"code":400,"message":"model 'x' not found","type":"invalid_request_error"}}"#;
        assert!(LlamaCpp.classify(&view(400, &h, unknown)).is_none());
        let failed = br#"{"error":{"code":500,"message":"model name=x failed to load","type":"server_error"}}"#;
        assert!(LlamaCpp.classify(&view(500, &h, failed)).is_none());
        assert!(LlamaCpp.classify(&view(500, &h, loading)).is_none());
        assert!(LlamaCpp.retries_refused());
    }
}
