//! The general classifier: a status, and a text the error message contains.

use http::header::CONTENT_TYPE;
use http::StatusCode;
use serde_json::Value;

use super::{starts_an_object, Classify, ColdStart, Hint, Hold, ResponseView};

/// A cold start is an answer with one of these statuses whose error message
/// contains this text, wherever the server puts it: in a JSON object's
/// `error` (a string), `error.message`, `message` or `detail`, or anywhere
/// in a `text/plain` body (Ray Serve's). Covers a server the built-ins do
/// not, in one line.
///
/// The text is matched as written (case and all). Anything else (HTML, a
/// JSON array or string, text that is not UTF-8, a body of no declared
/// type that is not a JSON object) is not a cold start.
///
/// ```
/// use tower_cold_start::classifier::{Classify, ErrorText};
/// use tower_cold_start::ColdStartRetryLayer;
///
/// // Our server answers 503 {"detail":"warming up"} while its model loads,
/// // and refuses connections while it boots.
/// let layer = ColdStartRetryLayer::new()
///     .classifier(ErrorText::new([503], "warming up").with_retry_refused(true));
/// ```
#[derive(Debug, Clone)]
pub struct ErrorText {
    statuses: Vec<StatusCode>,
    text: String,
    hint: Hint,
    hold: Hold,
}

impl ErrorText {
    /// Answers with any of `statuses` (ignored if not valid status codes)
    /// whose error contains `text`; no hint, so the layer polls.
    pub fn new(statuses: impl IntoIterator<Item = u16>, text: impl Into<String>) -> Self {
        ErrorText {
            statuses: statuses
                .into_iter()
                .filter_map(|s| StatusCode::from_u16(s).ok())
                .collect(),
            text: text.into(),
            hint: Hint::Unknown,
            hold: Hold::None,
        }
    }

    /// The wait such an answer hints at, e.g. [`Hint::Backoff`] for overload.
    ///
    /// Default: [`Hint::Unknown`].
    pub fn hint(mut self, hint: Hint) -> Self {
        self.hint = hint;
        self
    }

    /// How retries ask the server to hold them.
    ///
    /// Default: [`Hold::None`].
    pub fn hold(mut self, hold: Hold) -> Self {
        self.hold = hold;
        self
    }
}

/// A self-hosted server's "not ready": an answer with `status` whose error
/// says `text`, polled at the self-hosted pace with no hint. The rule of
/// every built-in for a server users run next to the client.
pub(crate) fn not_ready(
    response: &ResponseView<'_>,
    status: StatusCode,
    text: &str,
) -> Option<ColdStart> {
    (response.status == status && error_says(response, text))
        .then(|| ColdStart::new(Hint::Unknown).with_poll_interval(super::SELF_HOSTED_POLL))
}

/// Whether the response's error message contains `text`: a JSON object's
/// `error` (a string), `error.message`, `message` or `detail`, or a
/// `text/plain` body (UTF-8) as a whole. The one reader of error messages
/// for [`ErrorText`] and the built-ins.
pub(crate) fn error_says(response: &ResponseView<'_>, text: &str) -> bool {
    let body = response.body;
    if starts_an_object(body) {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        let error = object.get("error");
        return [
            error,
            error.and_then(|e| e.get("message")),
            object.get("message"),
            object.get("detail"),
        ]
        .into_iter()
        .any(|value| matches!(value, Some(Value::String(t)) if t.contains(text)));
    }
    plain_text(response).is_some_and(|t| t.contains(text))
}

/// The body of a `text/plain` response, if it is UTF-8.
fn plain_text<'a>(response: &ResponseView<'a>) -> Option<&'a str> {
    let kind = response.headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = kind.split(';').next()?.trim();
    if !essence.eq_ignore_ascii_case("text/plain") {
        return None;
    }
    std::str::from_utf8(response.body).ok()
}

impl Classify for ErrorText {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        self.statuses.contains(&status)
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        (self.statuses.contains(&response.status) && error_says(response, &self.text))
            .then(|| ColdStart::new(self.hint).with_hold(self.hold))
    }

    fn hold(&self) -> Hold {
        self.hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::{headers, view};
    use http::HeaderMap;
    use proptest::prelude::*;

    #[test]
    fn a_plain_text_body_is_read_whole_and_other_types_are_not() {
        let c = ErrorText::new([503], "backpressure");
        let body =
            b"Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).";
        for kind in [
            "text/plain; charset=utf-8",
            "text/plain",
            "Text/Plain;charset=UTF-8",
        ] {
            let h = headers(&[("content-type", kind)]);
            assert!(c.classify(&view(503, &h, body)).is_some(), "{kind}");
        }
        for kind in [None, Some("text/html"), Some("application/octet-stream")] {
            let h = kind.map_or_else(HeaderMap::new, |k| headers(&[("content-type", k)]));
            assert!(c.classify(&view(503, &h, body)).is_none(), "{kind:?}");
        }
        let h = headers(&[("content-type", "text/plain")]);
        let not_utf8 = b"backpressure \xff\xfe";
        assert!(c.classify(&view(503, &h, not_utf8)).is_none());
        assert!(c.classify(&view(503, &h, b"other")).is_none());
    }

    #[test]
    fn the_text_is_found_wherever_servers_put_it() {
        let c = ErrorText::new([503], "not ready");
        let h = HeaderMap::new();
        for body in [
            &br#"{"error":"model is not ready"}"#[..],
            br#"{"error":{"message":"model is not ready","type":"x"}}"#,
            br#"{"message":"not ready yet","code":503}"#,
            br#"{"detail":"server not ready"}"#,
        ] {
            assert!(
                c.classify(&view(503, &h, body)).is_some(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [
            &br#"{"error":"ready"}"#[..],
            br#"{"errors":["not ready"]}"#,
            br#"["not ready"]"#,
            br#""not ready""#,
            b"<html>not ready</html>",
            br#"{"error":{"detail":"not ready"}}"#,
            br#"{"error":"Not Ready"}"#,
        ] {
            assert!(
                c.classify(&view(503, &h, body)).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(c
            .classify(&view(500, &h, br#"{"error":"not ready"}"#))
            .is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_match_only_with_the_text(
            body in prop::collection::vec(any::<u8>(), 0..300),
            status in 100u16..600,
        ) {
            let c = ErrorText::new([503, 429], "is not ready");
            let h = HeaderMap::new();
            let status = StatusCode::from_u16(status).unwrap();
            let got = c.classify(&crate::classifier::ResponseView {
                status, headers: &h, body: &body, held: false, attempt: 1,
            });
            if got.is_some() {
                prop_assert!(status == 503 || status == 429);
                prop_assert!(String::from_utf8_lossy(&body).contains("is not ready"));
            }
        }

        #[test]
        fn arbitrary_json_errors_match_exactly_when_a_field_holds_the_text(
            field in prop_oneof![Just("error"), Just("message"), Just("detail"), Just("other")],
            text in "[a-z ]{0,20}",
            nested in any::<bool>(),
        ) {
            let c = ErrorText::new([503], "not ready");
            let value = if nested && field == "error" {
                serde_json::json!({"error": {"message": text}})
            } else {
                serde_json::json!({ field: text })
            };
            let body = serde_json::to_vec(&value).unwrap();
            let h = HeaderMap::new();
            let got = c.classify(&view(503, &h, &body)).is_some();
            prop_assert_eq!(got, field != "other" && text.contains("not ready"));
        }
    }
}
