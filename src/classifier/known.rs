//! The default: every server's exact cold-start marker, nothing broader.

use http::StatusCode;

use super::error_text::not_ready;
use super::{
    vllm, Classify, ColdStart, Hold, HuggingFace, KServe, LlamaCpp, MlServer, Ollama, RayServe,
    ResponseView, Tei, TgiOverloaded, Triton,
};

/// Every answer a built-in recognises by an exact marker: the layer's
/// default classifier, what `ColdStartRetryLayer::new()` uses.
///
/// | server | waited out | built-in |
/// |---|---|---|
/// | HuggingFace serverless | `503` `… is currently loading` (wait: `estimated_time`); `500` `Model too busy` after a hold | [`HuggingFace`] |
/// | KServe | `503` `… is not ready` | [`KServe`] |
/// | Triton | `503` `… is not at ready state` | [`Triton`] |
/// | vLLM | `503` `Server is unavailable. Please try again later.` | [`Vllm`](super::Vllm) |
/// | TGI | `429` `"error_type":"overloaded"` (backoff) | [`TgiOverloaded`] |
/// | TEI | `429` `"error_type"` or `"type"` `"Overloaded"` (backoff) | [`Tei`] |
/// | Ollama | `503` `… maximum pending requests exceeded` (backoff) | [`Ollama`] |
/// | llama.cpp | `503` `{"error":{"message":"Loading model",…}}` | [`LlamaCpp`] |
/// | MLServer | `400` `… is not ready yet.` | [`MlServer`] |
/// | Ray Serve | `503` or `429` `Request dropped due to backpressure` (wait: `Retry-After` if sent) | [`RayServe`] |
///
/// Everything else passes through after one request: a plain `503`, an
/// HTML error page, llama.cpp's `no slot available`, Ray Serve's `failed to
/// deploy`, a `404` and a `408`. What stays opt-in, and why:
///
/// - refused connections: a wrong URL fails at once; a self-hosted
///   built-in, or [`with_retry_refused(true)`](super::Classify::with_retry_refused),
///   waits them out;
/// - readiness routes: the caller's own request is the probe;
/// - markers that are not exact: vLLM's sleeping `503` (its text is not
///   documented), Triton's `404` while loading (also what a misspelt model
///   gets);
/// - the broad classifiers: [`InferenceEndpoints`](super::InferenceEndpoints)
///   (any `503` or `502`) and [`RetryAfter`](super::RetryAfter) (any
///   `Retry-After`).
///
/// No marker misreads another server's answer: each is matched with its
/// own status, and where two servers share a status the texts differ
/// (KServe's `is not ready` is a `503`, MLServer's `is not ready yet.` a
/// `400`; TGI writes `overloaded`, TEI `Overloaded`, and both back off).
/// Retries after a HuggingFace answer ask to be held
/// (`x-wait-for-model: true`); retries after the others' answers carry no
/// hold header.
///
/// ```
/// use tower_cold_start::classifier::KnownServers;
/// use tower_cold_start::ColdStartRetryLayer;
/// // The same as `ColdStartRetryLayer::new()`.
/// let layer = ColdStartRetryLayer::new().classifier(KnownServers);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct KnownServers;

/// The built-ins whose markers are exact, in the order they are tried.
const EXACT: [&dyn Classify; 9] = [
    &HuggingFace,
    &KServe,
    &Triton::new(),
    &TgiOverloaded,
    &Tei,
    &Ollama,
    &LlamaCpp,
    &MlServer,
    &RayServe,
];

impl Classify for KnownServers {
    fn may_be_cold_start(&self, status: StatusCode, held: bool) -> bool {
        matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_REQUEST
        ) || HuggingFace.may_be_cold_start(status, held)
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        let exact = |c: &&dyn Classify| {
            c.may_be_cold_start(response.status, response.held)
                .then(|| c.classify(response))
                .flatten()
        };
        EXACT
            .iter()
            .find_map(exact)
            .or_else(|| vllm_unavailable(response))
    }

    fn hold(&self) -> Hold {
        // For `with_hold_first_request(true)`: HuggingFace's, as before.
        HuggingFace.hold()
    }
}

/// vLLM's exact marker alone (its sleeping `503` is matched loosely, so
/// only [`Vllm`](super::Vllm) waits it out).
fn vllm_unavailable(response: &ResponseView<'_>) -> Option<ColdStart> {
    not_ready(response, StatusCode::SERVICE_UNAVAILABLE, vllm::UNAVAILABLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::{headers, view};
    use crate::classifier::{Hint, Vllm};
    use http::HeaderMap;

    #[test]
    fn the_default_takes_no_refusals_no_routes_and_no_loose_markers() {
        assert!(!KnownServers.retries_refused());
        assert!(!KnownServers.holds_first_request());
        let chat: http::Uri = "http://h:8000/v1/chat/completions".parse().unwrap();
        assert_eq!(KnownServers.readiness(&chat), None);
        let json = headers(&[("content-type", "application/json")]);
        let asleep = br#"{"error":{"message":"The model is sleeping.","code":503}}"#;
        assert!(Vllm.classify(&view(503, &json, asleep)).is_some());
        assert!(KnownServers.classify(&view(503, &json, asleep)).is_none());
        let triton_404 = br#"{"error":"Request for unknown model: 'm' has no available versions"}"#;
        assert!(!KnownServers.may_be_cold_start(StatusCode::NOT_FOUND, false));
        assert!(KnownServers
            .classify(&view(404, &json, triton_404))
            .is_none());
        let hf = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;
        let cold = KnownServers
            .classify(&view(503, &HeaderMap::new(), hf))
            .unwrap();
        assert_eq!(cold.hint(), Hint::Estimate(20.0));
        assert_eq!(cold.hold(), Hold::WaitForModel);
        let llama =
            br#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#;
        assert_eq!(
            KnownServers
                .classify(&view(503, &json, llama))
                .unwrap()
                .hold(),
            Hold::None,
            "no HuggingFace header for other servers"
        );
    }
}
