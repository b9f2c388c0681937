//! Ollama's queue, full.

use http::StatusCode;

use super::error_text::error_says;
use super::{Classify, ColdStart, Hint, ResponseView};

/// What Ollama's `ErrMaxQueue` says.
const QUEUE_FULL: &str = "maximum pending requests exceeded";

/// Ollama over `OLLAMA_MAX_QUEUE` (512 by default): `503`
/// `{"error":"server busy, please try again.  maximum pending requests exceeded"}`
/// (its OpenAI routes nest the same text in `error.message`). This is
/// overload, so the layer backs off exponentially. Loading a model needs no
/// help: Ollama holds the request while it loads. A refused connection is
/// the server starting.
///
/// ```
/// use tower_cold_start::{classifier::Ollama, ColdStartRetryLayer};
/// let layer = ColdStartRetryLayer::new().classifier(Ollama);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Ollama;

impl Classify for Ollama {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        (response.status == StatusCode::SERVICE_UNAVAILABLE && error_says(response, QUEUE_FULL))
            .then(|| ColdStart::new(Hint::Backoff))
    }

    fn retries_refused(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::view;
    use http::HeaderMap;

    /// ollama server/sched.go: `ErrMaxQueue = errors.New("server busy,
    /// please try again.  maximum pending requests exceeded")`;
    /// server/routes.go answers it with `http.StatusServiceUnavailable` and
    /// `gin.H{"error": err.Error()}`; openai/openai.go `NewError` nests a
    /// message as `{"error":{"type":"api_error","message":...}}`.
    #[test]
    fn a_full_queue_backs_off_and_a_missing_model_does_not() {
        let h = HeaderMap::new();
        let native =
            br#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#;
        let cold = Ollama.classify(&view(503, &h, native)).unwrap();
        assert_eq!(cold.hint(), Hint::Backoff);
        let openai = br#"{"error":{"message":"server busy, please try again.  maximum pending requests exceeded","type":"api_error","param":null,"code":null}}"#;
        assert!(Ollama.classify(&view(503, &h, openai)).is_some());
        let missing = br#"{"error":"model \"llama3\" not found, try pulling it first"}"#;
        assert!(Ollama.classify(&view(404, &h, missing)).is_none());
        assert!(Ollama.classify(&view(500, &h, native)).is_none());
    }
}
