//! HuggingFace Inference Endpoints scaled to zero.

use std::time::SystemTime;

use http::StatusCode;

use super::retry_after::retry_after;
use super::{Classify, ColdStart, Hint, Hold, ResponseView};

/// HuggingFace Inference Endpoints scaled to zero.
///
/// While a replica boots, the endpoint's proxy answers `503` (older
/// deployments: `502`). Every `503` and `502` is taken as a cold start, so
/// use this only for an endpoint URL. The wait is `Retry-After` when sent,
/// else `default_wait`; retries carry `X-Scale-Up-Timeout` set to the
/// seconds left in the caller's budget, so the proxy holds them until a
/// replica is ready.
///
/// ```
/// use tower_cold_start::classifier::InferenceEndpoints;
/// use tower_cold_start::ColdStartRetryLayer;
/// let layer = ColdStartRetryLayer::new().classifier(InferenceEndpoints);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct InferenceEndpoints;

impl Classify for InferenceEndpoints {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::BAD_GATEWAY
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        if !self.may_be_cold_start(response.status, response.held) {
            return None;
        }
        let hint =
            retry_after(response.headers, SystemTime::now()).map_or(Hint::Unknown, Hint::After);
        Some(ColdStart::new(hint).with_hold(Hold::ScaleUpTimeout))
    }

    fn hold(&self) -> Hold {
        Hold::ScaleUpTimeout
    }

    fn holds_first_request(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::{headers, view};
    use http::HeaderMap;
    use std::time::Duration;

    #[test]
    fn inference_endpoints_take_503_and_502_and_hold_with_the_budget() {
        let h = headers(&[("retry-after", "12")]);
        let cold = InferenceEndpoints
            .classify(&view(502, &h, b"Bad Gateway"))
            .unwrap();
        assert_eq!(cold.hint(), Hint::After(Duration::from_secs(12)));
        assert_eq!(cold.hold(), Hold::ScaleUpTimeout);
        let none = HeaderMap::new();
        assert_eq!(
            InferenceEndpoints
                .classify(&view(503, &none, b""))
                .unwrap()
                .hint(),
            Hint::Unknown
        );
        assert!(InferenceEndpoints
            .classify(&view(500, &none, b""))
            .is_none());
    }
}
