//! A compact copy of a request head, kept for retries.
//!
//! Cloning `http::request::Parts` costs several allocations: the header map's
//! two tables, and one per `Bytes` it holds (URI, each header value), because
//! a `Bytes` made from a `Vec` must be promoted to a shared buffer on its first
//! clone. The warm path pays that on every request although it almost never
//! retries. This copy instead writes the URI and every header name and value
//! into one buffer (one allocation), and rebuilds a `Parts` only when a retry
//! is actually sent.

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{request, Extensions, HeaderMap, Method, Request, Uri, Version};

/// What a retry needs of the original request head.
pub(crate) struct Head {
    method: Method,
    version: Version,
    extensions: Extensions,
    encoded: Box<[u8]>,
}

/// Marks an absent URI component.
const NONE: u32 = u32::MAX;

impl Head {
    /// Copies `parts`: one allocation, whatever the head holds (plus the
    /// extensions' own clone, free when there are none).
    pub(crate) fn copy(parts: &request::Parts) -> Self {
        let uri = &parts.uri;
        let scheme = uri.scheme_str();
        let authority = uri.authority().map(|a| a.as_str());
        let path = uri.path_and_query().map(|p| p.as_str());
        let mut len = 12 + scheme.map_or(0, str::len) + authority.map_or(0, str::len);
        len += path.map_or(0, str::len);
        for (name, value) in &parts.headers {
            len += 9 + name.as_str().len() + value.len();
        }
        let mut buf = Vec::with_capacity(len);
        put_opt(&mut buf, scheme);
        put_opt(&mut buf, authority);
        put_opt(&mut buf, path);
        for (name, value) in &parts.headers {
            put(&mut buf, name.as_str().as_bytes());
            put(&mut buf, value.as_bytes());
            buf.push(u8::from(value.is_sensitive()));
        }
        Head {
            method: parts.method.clone(),
            version: parts.version,
            extensions: parts.extensions.clone(),
            encoded: buf.into_boxed_slice(),
        }
    }

    /// Rebuilds the request head. `None` only if a part no longer parses,
    /// which a head built through `http`'s safe constructors cannot cause.
    pub(crate) fn rebuild(&self) -> Option<request::Parts> {
        let (uri, mut rest) = self.raw_uri()?;
        let uri = build_uri(uri)?;
        let mut headers = HeaderMap::new();
        while !rest.is_empty() {
            let name = HeaderName::from_bytes(take(&mut rest)??).ok()?;
            let mut value = HeaderValue::from_bytes(take(&mut rest)??).ok()?;
            let (sensitive, tail) = rest.split_first()?;
            rest = tail;
            value.set_sensitive(*sensitive == 1);
            headers.append(name, value);
        }
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = uri;
        parts.version = self.version;
        parts.headers = headers;
        parts.extensions = self.extensions.clone();
        Some(parts)
    }

    /// The URI's scheme, authority and path (without the query), read from
    /// the copy without rebuilding anything.
    pub(crate) fn uri_parts(&self) -> Option<(Option<&str>, Option<&str>, Option<&str>)> {
        let ([scheme, authority, path], _) = self.raw_uri()?;
        // As `PathAndQuery::path` does: the part before `?`, "/" if empty.
        let path = path.map(|p| match p.split_once('?').map_or(p, |(path, _)| path) {
            "" => "/",
            path => path,
        });
        Some((scheme, authority, path))
    }

    /// The request's URI, rebuilt (for reports on the cold path).
    pub(crate) fn uri(&self) -> Uri {
        self.raw_uri()
            .and_then(|(uri, _)| build_uri(uri))
            .unwrap_or_default()
    }

    /// The URI's scheme, authority and path-and-query as written, and what
    /// follows them (the headers).
    fn raw_uri(&self) -> Option<([Option<&str>; 3], &[u8])> {
        let mut rest: &[u8] = &self.encoded;
        let mut part = || -> Option<Option<&str>> {
            match take(&mut rest)? {
                Some(p) => Some(Some(std::str::from_utf8(p).ok()?)),
                None => Some(None),
            }
        };
        let parts = [part()?, part()?, part()?];
        Some((parts, rest))
    }
}

fn build_uri([scheme, authority, path]: [Option<&str>; 3]) -> Option<Uri> {
    let mut uri = Uri::builder();
    if let Some(scheme) = scheme {
        uri = uri.scheme(Scheme::try_from(scheme).ok()?);
    }
    if let Some(authority) = authority {
        uri = uri.authority(Authority::try_from(authority).ok()?);
    }
    if let Some(path) = path {
        uri = uri.path_and_query(PathAndQuery::try_from(path).ok()?);
    }
    uri.build().ok()
}

#[inline]
fn put(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

#[inline]
fn put_opt(buf: &mut Vec<u8>, part: Option<&str>) {
    match part {
        Some(part) => put(buf, part.as_bytes()),
        None => buf.extend_from_slice(&NONE.to_le_bytes()),
    }
}

/// Reads one length-prefixed field: `Some(None)` for an absent one, `None`
/// when the buffer is cut short.
fn take<'a>(rest: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let tail = &rest[4..];
    if len == NONE {
        *rest = tail;
        return Some(None);
    }
    let field = tail.get(..len as usize)?;
    *rest = &tail[field.len()..];
    Some(Some(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Tag(u32);

    fn round_trip(parts: &request::Parts) -> request::Parts {
        Head::copy(parts).rebuild().expect("a valid head rebuilds")
    }

    fn assert_same(a: &request::Parts, b: &request::Parts) {
        assert_eq!(a.method, b.method);
        assert_eq!(a.uri, b.uri);
        assert_eq!(a.uri.to_string(), b.uri.to_string());
        assert_eq!(a.version, b.version);
        assert_eq!(a.headers, b.headers);
        let order = |p: &request::Parts| {
            p.headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(a), order(b));
    }

    #[test]
    fn a_full_head_rebuilds_identically() {
        let mut auth = HeaderValue::from_static("Bearer hf_secret");
        auth.set_sensitive(true);
        let (mut parts, ()) =
            Request::put("https://user@api.example.com:8443/models/a%20b?x=1&y=%2F")
                .version(Version::HTTP_2)
                .header("authorization", auth)
                .header("x-multi", "one")
                .header("content-type", "application/json")
                .header("x-multi", "two")
                .header("x-Custom-Name", "\tobs-text \u{e9}")
                .header("x-empty", "")
                .body(())
                .unwrap()
                .into_parts();
        parts.extensions.insert(Tag(7));
        let copy = round_trip(&parts);
        assert_same(&parts, &copy);
        assert!(copy.headers["authorization"].is_sensitive());
        assert_eq!(copy.extensions.get::<Tag>(), Some(&Tag(7)));
    }

    #[test]
    fn origin_form_authority_form_and_extension_methods_rebuild() {
        for (method, uri) in [
            ("GET", "/models/gpt2"),
            ("CONNECT", "example.com:443"),
            ("PURGE", "http://h/"),
            ("OPTIONS", "*"),
            ("POST", "http://h"),
        ] {
            let (parts, ()) = Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap()
                .into_parts();
            assert_same(&parts, &round_trip(&parts));
        }
    }

    #[test]
    fn the_registry_key_is_the_same_from_the_uri_and_from_the_copy() {
        let registry = crate::coalesce::Registry::default();
        for uri in [
            "https://api.example.com/models/a?x=1",
            "http://h",
            "http://h?x",
            "/models/gpt2",
            "/",
            "*",
            "example.com:443",
            "https://h/a%20b/?",
        ] {
            let (parts, ()) = Request::get(uri).body(()).unwrap().into_parts();
            let head = Head::copy(&parts);
            let (scheme, authority, path) = head.uri_parts().unwrap();
            assert_eq!(
                registry.key(&parts.uri),
                registry.key_of(scheme, authority, path),
                "{uri}"
            );
        }
    }

    #[test]
    fn an_empty_head_rebuilds() {
        let (parts, ()) = Request::new(()).into_parts();
        assert_same(&parts, &round_trip(&parts));
        assert_eq!(Head::copy(&parts).uri(), parts.uri);
    }
}
