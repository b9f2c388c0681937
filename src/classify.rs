//! Recognising a cold start, and turning the server's hint into a bounded wait.
//!
//! Both halves are pure functions of their input, so they are tested (and
//! property-tested) without any I/O. Everything here treats the response as
//! untrusted: malformed JSON, absurd numbers and wrong types are values to
//! classify, never a panic.

use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::classifier::Hint;

/// The most bytes of a 503 body that are read to classify it.
///
/// HuggingFace's loading body is about 120 bytes plus the model id, so 4 KiB
/// leaves ample room while bounding what a hostile server can make us buffer.
pub(crate) const PEEK_LIMIT: usize = 4 * 1024;

/// The longest time spent reading a 503 body to classify it.
///
/// HuggingFace sends the loading body with the headers; a body still
/// incomplete after this long is handed to the caller as it is.
pub(crate) const PEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// The phrase HuggingFace puts in `error` while a model loads.
const LOADING_MARKER: &str = "is currently loading";

/// The phrase HuggingFace puts in `error` (with a `500`) when it held a
/// request for its limit (about 60 s) and the model is still not ready.
const TOO_BUSY_MARKER: &str = "Model too busy";

/// The shortest sleep between two attempts, unless `max_wait` is shorter.
///
/// A server that says `"estimated_time": 0` (or 1e-9) must not turn the layer
/// into a busy loop.
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(1);

/// What a loading response told us.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ColdStart {
    /// The model named in the message (`Model {id} is currently loading`).
    pub(crate) model: Option<String>,
    /// `estimated_time` when the server sent a JSON number that fits an `f64`
    /// (it may still be negative or absurdly large); `None` when it was
    /// missing, `null`, a string, or any other type.
    pub(crate) estimate: Option<f64>,
    /// The server held the request for its limit and gave up ("Model too
    /// busy"): it has just waited, so the retry goes out after the shortest
    /// wait.
    pub(crate) after_hold: bool,
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
pub(crate) fn worth_reading(status: StatusCode, held: bool) -> bool {
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
pub(crate) fn classify(status: StatusCode, body: &[u8], held: bool) -> Option<ColdStart> {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return parse_loading_body(body);
    }
    if held && status == StatusCode::INTERNAL_SERVER_ERROR {
        let parsed = parse_error_body(body)?;
        return parsed.error.contains(TOO_BUSY_MARKER).then_some(ColdStart {
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
pub(crate) fn parse_loading_body(body: &[u8]) -> Option<ColdStart> {
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
    Some(ColdStart {
        model,
        estimate,
        after_hold: false,
    })
}

/// A number in [0, 1) from std's randomly keyed hasher (fresh keys on every
/// call): enough to spread retries and pings, with no dependency.
pub(crate) fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The bounds that shape one wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitBounds {
    pub(crate) default_wait: Duration,
    pub(crate) max_wait: Duration,
}

/// How long to sleep after a cold start whose hint is `estimate`.
///
/// - a finite, non-negative estimate is used, capped at `max_wait`;
/// - a missing, negative, NaN or infinite one means `default_wait` (capped);
/// - the result is never below [`MIN_WAIT`] unless `max_wait` itself is.
///
/// The caller further caps it by the time left in its budget.
pub(crate) fn advised_wait(estimate: Option<f64>, bounds: WaitBounds) -> Duration {
    let hinted = match estimate {
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            if secs >= bounds.max_wait.as_secs_f64() {
                bounds.max_wait
            } else {
                // `secs` is finite, non-negative and below a `Duration`, so
                // this cannot fail; the fallback keeps it panic-free anyway.
                Duration::try_from_secs_f64(secs).unwrap_or(bounds.max_wait)
            }
        }
        _ => bounds.default_wait,
    };
    hinted.max(MIN_WAIT).min(bounds.max_wait)
}

/// The sleep before attempt `attempt + 1` after a cold start that hinted
/// `hint`: the advised wait, shortened by `jitter` (a number in [0, 1), or
/// `None` for no jitter) but never below the floor, then cut to the time left
/// in the budget. `None` when no time is left.
pub(crate) fn planned_wait(
    hint: Hint,
    attempt: u32,
    bounds: WaitBounds,
    jitter: Option<f64>,
    remaining: Duration,
) -> Option<Duration> {
    if remaining.is_zero() {
        return None;
    }
    let advised = match hint {
        Hint::Estimate(secs) => advised_wait(Some(secs), bounds),
        Hint::After(wait) => advised_wait(Some(wait.as_secs_f64()), bounds),
        Hint::Backoff => {
            let doubling = attempt.saturating_sub(1).min(62) as i32;
            advised_wait(Some(2f64.powi(doubling)), bounds)
        }
        Hint::Soon => advised_wait(Some(0.0), bounds),
        Hint::Default => advised_wait(None, bounds),
    };
    let wait = match jitter {
        Some(unit) if unit.is_finite() => {
            let share = if hint == Hint::Backoff { 0.5 } else { 0.2 };
            let factor = 1.0 - share * unit.clamp(0.0, 1.0);
            advised.mul_f64(factor).max(MIN_WAIT.min(bounds.max_wait))
        }
        _ => advised,
    };
    Some(wait.min(remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HF: &[u8] = br#"{"error":"Model distilbert/distilbert-base-uncased-finetuned-sst-2-english is currently loading","estimated_time":20.0}"#;

    fn bounds() -> WaitBounds {
        WaitBounds {
            default_wait: Duration::from_secs(20),
            max_wait: Duration::from_secs(60),
        }
    }

    #[test]
    fn recorded_huggingface_body_is_a_cold_start() {
        let got = classify(StatusCode::SERVICE_UNAVAILABLE, HF, false);
        assert_eq!(
            got,
            Some(ColdStart {
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
            ColdStart {
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

    #[test]
    fn advised_wait_follows_the_hint_within_bounds() {
        let b = bounds();
        assert_eq!(advised_wait(Some(20.0), b), Duration::from_secs(20));
        assert_eq!(
            advised_wait(Some(32.137), b),
            Duration::from_secs_f64(32.137)
        );
        assert_eq!(advised_wait(Some(1809.18), b), Duration::from_secs(60));
        assert_eq!(advised_wait(Some(1e308), b), Duration::from_secs(60));
        assert_eq!(advised_wait(Some(f64::MAX), b), Duration::from_secs(60));
    }

    #[test]
    fn advised_wait_uses_the_default_for_unusable_hints() {
        let b = bounds();
        for hint in [
            None,
            Some(-1.0),
            Some(-0.0001),
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
        ] {
            assert_eq!(advised_wait(hint, b), Duration::from_secs(20), "{hint:?}");
        }
    }

    #[test]
    fn advised_wait_never_busy_loops() {
        let b = bounds();
        for hint in [0.0, 1e-9, 0.5, f64::MIN_POSITIVE] {
            assert_eq!(advised_wait(Some(hint), b), MIN_WAIT, "{hint}");
        }
    }

    #[test]
    fn advised_wait_respects_a_cap_below_the_floor() {
        let b = WaitBounds {
            default_wait: Duration::from_secs(20),
            max_wait: Duration::from_millis(10),
        };
        assert_eq!(advised_wait(Some(5.0), b), Duration::from_millis(10));
        assert_eq!(advised_wait(None, b), Duration::from_millis(10));
    }

    #[test]
    fn advised_wait_with_the_largest_cap_does_not_panic() {
        let b = WaitBounds {
            default_wait: Duration::MAX,
            max_wait: Duration::MAX,
        };
        assert_eq!(advised_wait(Some(1e300), b), Duration::MAX);
        assert_eq!(advised_wait(Some(f64::MAX), b), Duration::MAX);
        assert_eq!(advised_wait(None, b), Duration::MAX);
        assert_eq!(advised_wait(Some(30.0), b), Duration::from_secs(30));
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

            #[test]
            fn no_sleep_runs_past_the_budget(
                hint in prop_oneof![
                    any::<f64>().prop_map(Hint::Estimate),
                    any::<u64>().prop_map(|s| Hint::After(Duration::from_secs(s))),
                    Just(Hint::Backoff),
                    Just(Hint::Soon),
                    Just(Hint::Default),
                ],
                attempt in any::<u32>(),
                jitter in prop_oneof![Just(None), any::<f64>().prop_map(Some)],
                default_ms in any::<u64>(),
                max_ms in any::<u64>(),
                remaining_ns in any::<u64>(),
            ) {
                let bounds = WaitBounds {
                    default_wait: Duration::from_millis(default_ms),
                    max_wait: Duration::from_millis(max_ms),
                };
                let remaining = Duration::from_nanos(remaining_ns);
                match planned_wait(hint, attempt, bounds, jitter, remaining) {
                    None => prop_assert!(remaining.is_zero()),
                    Some(wait) => {
                        prop_assert!(wait <= remaining);
                        prop_assert!(wait <= bounds.max_wait);
                        prop_assert!(wait >= MIN_WAIT.min(bounds.max_wait).min(remaining));
                    }
                }
            }

            #[test]
            fn advised_wait_stays_within_its_bounds(
                estimate in prop_oneof![any::<f64>().prop_map(Some), Just(None)],
                default_ms in any::<u64>(),
                max_ms in any::<u64>(),
            ) {
                let bounds = WaitBounds {
                    default_wait: Duration::from_millis(default_ms),
                    max_wait: Duration::from_millis(max_ms),
                };
                let wait = advised_wait(estimate, bounds);
                prop_assert!(wait <= bounds.max_wait);
                prop_assert!(wait >= MIN_WAIT.min(bounds.max_wait));
                if let Some(secs) = estimate.filter(|s| s.is_finite() && *s >= 1.0) {
                    if secs >= bounds.max_wait.as_secs_f64() {
                        prop_assert_eq!(wait, bounds.max_wait);
                    } else {
                        let error = (wait.as_secs_f64() - secs).abs();
                        prop_assert!(error <= 1e-6 + secs * 1e-12, "{wait:?} vs {secs}");
                    }
                }
            }
        }
    }
}
