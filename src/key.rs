//! Ready-made keys for [`ColdStartRetryLayer::model_key`](crate::ColdStartRetryLayer::model_key).

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::{HeaderMap, Uri};
use serde_json::value::RawValue;

use crate::coalesce::Registry;

/// A user's model key function, hashing its key with the registry's hasher.
pub(crate) type KeyFn =
    std::sync::Arc<dyn Fn(&Registry, &Uri, &HeaderMap, &[u8]) -> Option<u64> + Send + Sync>;

/// Groups requests by a top-level string field of their JSON body, such as
/// the `"model"` of an OpenAI-style request, on the same server: callers of
/// one model share its cold start whichever route they post to
/// (`/v1/chat/completions`, `/v1/completions`, …), and callers of another
/// model of the same server do not wait behind it.
///
/// A request without that field (not JSON, not an object, the field
/// missing or not a string) is grouped by its URI's scheme, authority and
/// path, as the default does. The body is read only on the cold path, and
/// only its top level is decoded.
///
/// ```
/// use tower_cold_start::{key, ColdStartRetryLayer};
///
/// let layer = ColdStartRetryLayer::new().model_key(key::json_field("model"));
/// ```
pub fn json_field(
    field: impl Into<String>,
) -> impl Fn(&Uri, &HeaderMap, &[u8]) -> Option<JsonFieldKey> + Send + Sync + 'static {
    let field = field.into();
    move |uri, _headers, body| {
        // Host and port only: no userinfo is kept.
        let server = uri
            .scheme_str()
            .zip(uri.authority())
            .map(|(scheme, a)| match a.port_u16() {
                Some(port) => format!("{scheme}://{}:{port}", a.host()),
                None => format!("{scheme}://{}", a.host()),
            });
        Some(match field_of(body, &field) {
            Some(value) => JsonFieldKey {
                server,
                value: Some(value),
                path: String::new(),
            },
            None => JsonFieldKey {
                server,
                value: None,
                path: uri.path().to_owned(),
            },
        })
    }
}

/// The key [`json_field`] gives a request: its server, and the field's
/// value, or its path when the body has no such field. Its `Debug` shows
/// no query and no userinfo.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonFieldKey {
    server: Option<String>,
    value: Option<String>,
    path: String,
}

/// A top-level string field of a JSON object body.
fn field_of(body: &[u8], field: &str) -> Option<String> {
    if !crate::classifier::starts_an_object(body) {
        return None;
    }
    let object: BTreeMap<Cow<'_, str>, &RawValue> = serde_json::from_slice(body).ok()?;
    let value: Cow<'_, str> = serde_json::from_str(object.get(field)?.get()).ok()?;
    Some(value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str, body: &[u8]) -> Option<JsonFieldKey> {
        json_field("model")(&uri.parse().unwrap(), &HeaderMap::new(), body)
    }

    #[test]
    fn one_model_of_one_server_is_one_key_whatever_the_route() {
        let chat = key(
            "http://h:8000/v1/chat/completions",
            br#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#,
        );
        let completion = key(
            "http://h:8000/v1/completions",
            br#"{"prompt":"hi","model":"llama"}"#,
        );
        assert_eq!(chat, completion);
        assert_ne!(
            chat,
            key("http://h:8000/v1/completions", br#"{"model":"qwen"}"#)
        );
        assert_ne!(
            chat,
            key("http://other:8000/v1/completions", br#"{"model":"llama"}"#)
        );
        let secret = key("http://user:hunter2@h:8000/v1/x", br#"{"model":"llama"}"#);
        assert_eq!(chat, secret);
        assert!(!format!("{secret:?}").contains("hunter2"));
        // Escapes are decoded: the same name either way.
        assert_eq!(chat, key("http://h:8000/x", br#"{"model":"ll\u0061ma"}"#));
    }

    #[test]
    fn a_body_without_the_field_is_keyed_by_its_path() {
        let by_path = |path: &str| JsonFieldKey {
            server: Some("http://h:8000".to_owned()),
            value: None,
            path: path.to_owned(),
        };
        for body in [
            &b""[..],
            b"not json",
            br#"["model"]"#,
            br#"{"model":7}"#,
            br#"{"model":null}"#,
            br#"{"inputs":{"model":"nested"}}"#,
            br#"{"model":"unterminated"#,
        ] {
            assert_eq!(
                key("http://h:8000/v1/chat/completions?x=1", body).unwrap(),
                by_path("/v1/chat/completions"),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
