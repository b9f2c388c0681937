//! text-generation-inference over its concurrent-request limit.

use http::StatusCode;
use serde::Deserialize;

use super::{starts_an_object, Classify, ColdStart, Hint, ResponseView};

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
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        if response.status != StatusCode::TOO_MANY_REQUESTS || !starts_an_object(response.body) {
            return None;
        }
        let error: TgiError<'_> = serde_json::from_slice(response.body).ok()?;
        (error.error_type == "overloaded").then(|| ColdStart::new(Hint::Backoff))
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

    #[test]
    fn tgi_overload_is_recognised_and_rate_limits_are_not() {
        let h = HeaderMap::new();
        let overloaded = br#"{"error":"Model is overloaded","error_type":"overloaded"}"#;
        assert_eq!(
            TgiOverloaded
                .classify(&view(429, &h, overloaded))
                .unwrap()
                .hint(),
            Hint::Backoff
        );
        let rate = br#"{"error":"Rate limit reached. Please log in or use a HF access token"}"#;
        assert!(TgiOverloaded.classify(&view(429, &h, rate)).is_none());
        assert!(TgiOverloaded.classify(&view(503, &h, overloaded)).is_none());
        assert!(TgiOverloaded
            .classify(&view(429, &h, b"[\"overloaded\"]"))
            .is_none());
    }
}
