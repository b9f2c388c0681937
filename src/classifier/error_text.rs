//! The general classifier: a status, and a text the JSON error contains.

use http::StatusCode;
use serde_json::Value;

use super::{starts_an_object, Classify, ColdStart, Hint, Hold, ResponseView};

/// A cold start is an answer with one of these statuses whose JSON error
/// contains this text, wherever the server puts it: `error` (a string),
/// `error.message`, `message` or `detail`. Covers a server the built-ins do
/// not, in one line.
///
/// The text is matched as written (case and all). Anything that is not a
/// JSON object, or says something else, is not a cold start.
///
/// ```
/// use tower_cold_start::classifier::ErrorText;
/// use tower_cold_start::ColdStartRetryLayer;
///
/// // Our gateway answers 503 {"detail":"warming up"} while its model loads.
/// let layer = ColdStartRetryLayer::new()
///     .classifier(ErrorText::new([503], "warming up").retries_refused(true));
/// ```
#[derive(Debug, Clone)]
pub struct ErrorText {
    statuses: Vec<StatusCode>,
    text: String,
    hint: Hint,
    hold: Hold,
    refused: bool,
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
            refused: false,
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

    /// Whether a refused connection is the server booting (see
    /// [`Classify::retries_refused`]).
    ///
    /// Default: `false`.
    pub fn retries_refused(mut self, refused: bool) -> Self {
        self.refused = refused;
        self
    }

    /// Whether `body`'s error contains the text.
    pub(crate) fn says(&self, body: &[u8]) -> bool {
        error_texts(body)
            .iter()
            .any(|t| t.contains(self.text.as_str()))
    }
}

/// The strings a JSON error puts where servers put their message:
/// `error` (a string), `error.message`, `message`, `detail`. Empty for
/// anything that is not a JSON object.
pub(crate) fn error_texts(body: &[u8]) -> Vec<String> {
    if !starts_an_object(body) {
        return Vec::new();
    }
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let mut texts = Vec::new();
    let mut push = |value: Option<&Value>| {
        if let Some(Value::String(text)) = value {
            texts.push(text.clone());
        }
    };
    push(object.get("error"));
    push(object.get("error").and_then(|e| e.get("message")));
    push(object.get("message"));
    push(object.get("detail"));
    texts
}

impl Classify for ErrorText {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        self.statuses.contains(&status)
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        (self.statuses.contains(&response.status) && self.says(response.body))
            .then(|| ColdStart::new(self.hint).with_hold(self.hold))
    }

    fn retries_refused(&self) -> bool {
        self.refused
    }

    fn hold(&self) -> Hold {
        self.hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::view;
    use http::HeaderMap;
    use proptest::prelude::*;

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
