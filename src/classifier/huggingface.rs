//! The HuggingFace serverless Inference API: its loading body, and the
//! `500 Model too busy` after a hold. Pure functions of the response, tested
//! (and property-tested) without I/O; malformed JSON, absurd numbers and
//! wrong types are values to classify, never a panic.

use http::header::HeaderName;
use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Classify, ColdStart, Hint, Hold, ResponseView};

/// The header that asks HuggingFace to hold a request until the model is loaded.
pub(crate) static X_WAIT_FOR_MODEL: HeaderName = HeaderName::from_static("x-wait-for-model");

/// The HuggingFace serverless Inference API (part of the default, [`KnownServers`](super::KnownServers)).
///
/// A `503` whose JSON `error` says the model `is currently loading` (wait:
/// its `estimated_time`); and a `500` `Model too busy` for a request that
/// asked to be held (HuggingFace held it for about 60 s and gave up; retry
/// soon). Retries carry `x-wait-for-model: true`.
///
/// ```text
/// HTTP/1.1 503 Service Unavailable
/// {"error":"Model gpt2 is currently loading","estimated_time":20.0}
/// ```
///
/// ```
/// use tower_cold_start::classifier::HuggingFace;
/// use tower_cold_start::ColdStartRetryLayer;
/// // The HuggingFace answers alone (the default also knows other servers').
/// let layer = ColdStartRetryLayer::new().classifier(HuggingFace);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct HuggingFace;

impl Classify for HuggingFace {
    fn may_be_cold_start(&self, status: StatusCode, held: bool) -> bool {
        worth_reading(status, held)
    }

    fn hold(&self) -> Hold {
        Hold::WaitForModel
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        let loading = classify(response.status, response.body, response.held)?;
        let hint = if loading.after_hold {
            Hint::Soon
        } else {
            loading.estimate.map_or(Hint::Unknown, Hint::Estimate)
        };
        let cold = ColdStart::new(hint).with_hold(Hold::WaitForModel);
        Some(match loading.model {
            Some(model) => cold.with_model(model),
            None => cold,
        })
    }
}

/// The phrase HuggingFace puts in `error` while a model loads.
const LOADING_MARKER: &str = "is currently loading";

/// The phrase HuggingFace puts in `error` (with a `500`) when it held a
/// request for its limit (about 60 s) and the model is still not ready.
const TOO_BUSY_MARKER: &str = "Model too busy";

/// What a loading body told us.
#[derive(Debug, Clone, PartialEq)]
struct Loading {
    /// The model named in the message (`Model {id} is currently loading`).
    model: Option<String>,
    /// `estimated_time` when the server sent a JSON number that fits an `f64`
    /// (it may still be negative or absurdly large); `None` when it was
    /// missing, `null`, a string, or any other type.
    estimate: Option<f64>,
    /// The server held the request for its limit and gave up ("Model too
    /// busy"): it has just waited, so the retry goes out after the shortest
    /// wait.
    after_hold: bool,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: std::borrow::Cow<'a, str>,
    // Kept raw: serde_json refuses numbers outside the `f64` range, and such a
    // body is still a loading body whose hint is merely unusable.
    #[serde(default, borrow)]
    estimated_time: Option<&'a RawValue>,
}

/// Whether a response with this status may be a cold start, and so is worth
/// reading; `held` says whether the request asked the server to hold it.
fn worth_reading(status: StatusCode, held: bool) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        || (held && status == StatusCode::INTERNAL_SERVER_ERROR)
}

/// Decides whether a response is a HuggingFace cold start.
///
/// A cold start is a `503` whose body is a JSON object with an `error` string
/// containing `is currently loading`; or, for a request that carried
/// `x-wait-for-model`, a `500` whose `error` contains `Model too busy` (the
/// server held it for its limit and the model is still loading). Anything
/// else (another status, an HTML page, invalid or non-object JSON, duplicate
/// keys, nesting deeper than serde_json accepts) is not a cold start.
fn classify(status: StatusCode, body: &[u8], held: bool) -> Option<Loading> {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return parse_loading_body(body);
    }
    if held && status == StatusCode::INTERNAL_SERVER_ERROR {
        let parsed = parse_error_body(body)?;
        return parsed.error.contains(TOO_BUSY_MARKER).then_some(Loading {
            model: None,
            estimate: None,
            after_hold: true,
        });
    }
    None
}

/// Parses a JSON object with an `error` string.
fn parse_error_body(body: &[u8]) -> Option<ErrorBody<'_>> {
    // Only an object counts: serde would also accept `["...", 20]` for a struct.
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Parses a loading body; see [`classify`].
fn parse_loading_body(body: &[u8]) -> Option<Loading> {
    let parsed = parse_error_body(body)?;
    if !parsed.error.contains(LOADING_MARKER) {
        return None;
    }
    let estimate = parsed.estimated_time.and_then(|raw| {
        let text = raw.get();
        // A JSON number starts with a digit or '-'; strings, null, bools,
        // arrays and objects are not a usable hint.
        match text.as_bytes().first() {
            Some(b'-' | b'0'..=b'9') => text.parse::<f64>().ok(),
            _ => None,
        }
    });
    let model = parsed
        .error
        .strip_prefix("Model ")
        .and_then(|rest| rest.split_once(" is currently loading"))
        .map(|(model, _)| model.to_owned())
        .filter(|model| !model.is_empty());
    Some(Loading {
        model,
        estimate,
        after_hold: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::view;
    use http::HeaderMap;

    #[test]
    fn huggingface_keeps_the_first_release_rules() {
        let h = HeaderMap::new();
        let body = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;
        let cold = HuggingFace.classify(&view(503, &h, body)).unwrap();
        assert_eq!(cold.hint(), Hint::Estimate(20.0));
        assert_eq!(cold.hold(), Hold::WaitForModel);
        assert_eq!(cold.model(), Some("gpt2"));
        assert!(HuggingFace.classify(&view(429, &h, body)).is_none());
        assert!(!HuggingFace.may_be_cold_start(StatusCode::TOO_MANY_REQUESTS, true));
    }

    const HF: &[u8] = br#"{"error":"Model distilbert/distilbert-base-uncased-finetuned-sst-2-english is currently loading","estimated_time":20.0}"#;

    #[test]
    fn recorded_huggingface_body_is_a_cold_start() {
        let got = classify(StatusCode::SERVICE_UNAVAILABLE, HF, false);
        assert_eq!(
            got,
            Some(Loading {
                model: Some("distilbert/distilbert-base-uncased-finetuned-sst-2-english".into()),
                estimate: Some(20.0),
                after_hold: false,
            })
        );
    }

    #[test]
    fn only_503_is_a_cold_start() {
        for status in [200, 429, 500, 502, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify(status, HF, true), None, "{status}");
        }
    }

    #[test]
    fn marker_must_be_in_the_error_string_of_an_object() {
        for body in [
            &br#"{"error":"Service Unavailable"}"#[..],
            br#"{"message":"Model x is currently loading"}"#,
            br#"{"error":["Model x is currently loading"]}"#,
            br#"["Model x is currently loading", 20.0]"#,
            br#""Model x is currently loading""#,
            b"<html><body>Model x is currently loading</body></html>",
            br#"{"error":"Model x is currently loading""#,
            b"",
            b"   ",
            b"\xff\xfe{\"error\"",
        ] {
            assert_eq!(
                parse_loading_body(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn too_busy_after_a_hold_is_still_loading() {
        let body =
            br#"{"error":"Model too busy, unable to get response in less than 60 second(s)"}"#;
        let got = classify(StatusCode::INTERNAL_SERVER_ERROR, body, true).unwrap();
        assert!(got.after_hold);
        assert_eq!(got.estimate, None);
        // Without a hold it is the server's own error, passed on.
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, body, false),
            None
        );
        assert_eq!(classify(StatusCode::BAD_GATEWAY, body, true), None);
        let other = br#"{"error":"Internal Server Error"}"#;
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, other, true),
            None
        );
    }

    #[test]
    fn duplicate_keys_are_not_a_cold_start() {
        let body = br#"{"error":"Model x is currently loading","error":"other"}"#;
        assert_eq!(parse_loading_body(body), None);
    }

    #[test]
    fn deep_nesting_is_rejected_without_overflowing_the_stack() {
        let mut body = String::from(r#"{"error":"Model x is currently loading","x":"#);
        body.push_str(&"[".repeat(100_000));
        assert_eq!(parse_loading_body(body.as_bytes()), None);
    }

    #[test]
    fn unusable_estimates_still_mean_loading() {
        for (estimated_time, expected) in [
            ("null", None),
            (r#""20""#, None),
            ("true", None),
            ("[20]", None),
            ("{}", None),
            ("-3.5", Some(-3.5)),
            ("1e308", Some(1e308)),
            ("0", Some(0.0)),
        ] {
            let body = format!(
                r#"{{"error":"Model x is currently loading","estimated_time":{estimated_time}}}"#
            );
            let got = parse_loading_body(body.as_bytes()).expect("still loading");
            assert_eq!(got.estimate, expected, "{estimated_time}");
        }
    }

    #[test]
    fn estimate_beyond_f64_is_infinite_not_an_error() {
        let body = br#"{"error":"Model x is currently loading","estimated_time":1e400}"#;
        let got = parse_loading_body(body).unwrap().estimate.unwrap();
        assert!(got.is_infinite());
    }

    #[test]
    fn missing_estimate_is_loading_without_hint() {
        let body = br#"{"error":"Model x is currently loading"}"#;
        let got = parse_loading_body(body).unwrap();
        assert_eq!(
            got,
            Loading {
                model: Some("x".into()),
                estimate: None,
                after_hold: false,
            }
        );
    }

    #[test]
    fn other_wordings_of_the_marker_are_loading_without_a_model() {
        let body = br#"{"error":"the model is currently loading, retry later"}"#;
        assert_eq!(parse_loading_body(body).unwrap().model, None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("Model x is currently loading")),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("error".to_owned()),
                            Just("estimated_time".to_owned()),
                            ".{0,8}"
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), status in 100u16..600) {
                let status = StatusCode::from_u16(status).unwrap();
                let got = classify(status, &body, false);
                if status != StatusCode::SERVICE_UNAVAILABLE {
                    prop_assert!(got.is_none());
                }
            }

            #[test]
            fn arbitrary_json_is_a_cold_start_only_with_the_marker(value in json_value()) {
                let body = serde_json::to_vec(&value).unwrap();
                let got = parse_loading_body(&body);
                let expected = value
                    .as_object()
                    .and_then(|o| o.get("error"))
                    .and_then(|e| e.as_str())
                    .is_some_and(|e| e.contains(LOADING_MARKER));
                prop_assert_eq!(got.is_some(), expected, "{}", String::from_utf8_lossy(&body));
            }

            #[test]
            fn any_estimate_text_is_handled(text in "[-+0-9eE.a-zA-Z\"]{0,30}") {
                let body = format!(r#"{{"error":"Model m is currently loading","estimated_time":{text}}}"#);
                // Whatever the server wrote, the outcome is a value, never a panic.
                let _ = parse_loading_body(body.as_bytes());
            }

        }
    }
}
