//! text-embeddings-inference over its concurrent-request limit.

use http::StatusCode;
use serde_json::Value;

use super::{starts_an_object, Classify, ColdStart, Hint, ResponseView};

/// text-embeddings-inference over `max_concurrent_requests`: `429`
/// `{"error":"Model is overloaded","error_type":"Overloaded"}`, and on its
/// OpenAI-style route `{"message":...,"code":429,"type":"Overloaded"}`, with
/// a capital O (where TGI writes `overloaded`). The layer backs off
/// exponentially. A refused connection is the server starting: TEI opens
/// its port only once the model is loaded. Its readiness route is
/// `GET /health`.
///
/// ```
/// use tower_cold_start::{classifier::Tei, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(Tei);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Tei;

impl Classify for Tei {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        if response.status != StatusCode::TOO_MANY_REQUESTS || !starts_an_object(response.body) {
            return None;
        }
        let Ok(Value::Object(error)) = serde_json::from_slice::<Value>(response.body) else {
            return None;
        };
        let kind = error.get("error_type").or_else(|| error.get("type"));
        (kind.and_then(Value::as_str) == Some("Overloaded")).then(|| ColdStart::new(Hint::Backoff))
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

    /// text-embeddings-inference router/src/lib.rs: `ErrorResponse { error,
    /// error_type }` with `enum ErrorType { Unhealthy, Backend, Overloaded,
    /// .. }` under a plain `#[derive(Serialize)]` (so "Overloaded");
    /// router/src/http/server.rs maps `Overloaded` to 429 and builds
    /// `OpenAICompatErrorResponse { message, code, type }`
    /// (router/src/http/types.rs); core's message is "Model is overloaded".
    #[test]
    fn overloaded_backs_off_on_both_routes_and_other_429s_pass() {
        let h = HeaderMap::new();
        let native = br#"{"error":"Model is overloaded","error_type":"Overloaded"}"#;
        assert_eq!(
            Tei.classify(&view(429, &h, native)).unwrap().hint(),
            Hint::Backoff
        );
        let openai = br#"{"message":"Model is overloaded","code":429,"type":"Overloaded"}"#;
        assert!(Tei.classify(&view(429, &h, openai)).is_some());
        // TGI's lowercase spelling is TgiOverloaded's, not this one's.
        let tgi = br#"{"error":"Model is overloaded","error_type":"overloaded"}"#;
        assert!(Tei.classify(&view(429, &h, tgi)).is_none());
        let rate = br#"{"error":"Rate limit reached"}"#;
        assert!(Tei.classify(&view(429, &h, rate)).is_none());
        assert!(Tei.classify(&view(503, &h, native)).is_none());
    }
}
