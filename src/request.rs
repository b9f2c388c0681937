//! Building the requests a call sends: the first (the caller's own head),
//! each retry (from the copy kept of it), and readiness checks.

use std::marker::PhantomData;
use std::time::Duration;

use http::{request, Request, Uri};

use crate::classifier::{Hold, X_WAIT_FOR_MODEL};
use crate::coalesce::Registry;
use crate::head::Head;
use crate::key::KeyFn;
use crate::request_body::{Asked, Buffered};
use crate::RequestBody;

/// The caller's request as far as the call has got, and the body every
/// attempt sends.
pub(crate) struct Requests<B> {
    head: Original,
    body: Buffered,
    _body: PhantomData<fn() -> B>,
}

/// The caller's request head.
enum Original {
    /// Not sent yet.
    Unsent(request::Parts),
    /// Sent; a copy is kept for retries.
    KeptForRetries(Head),
    /// Sent, and no retry can follow (an unbuffered body, or the last
    /// possible attempt went out).
    Gone,
}

/// A request to send, and what it asked of the server.
pub(crate) struct Outgoing<B> {
    pub(crate) request: Request<RequestBody<B>>,
    /// Whether it asks the server to hold it (the layer's hold header, or
    /// the caller's own `x-wait-for-model`).
    pub(crate) held: bool,
}

impl<B> Requests<B> {
    pub(crate) fn new(parts: request::Parts) -> Self {
        Requests {
            head: Original::Unsent(parts),
            body: Buffered::default(),
            _body: PhantomData,
        }
    }

    /// The buffered body, now read.
    #[inline]
    pub(crate) fn set_body(&mut self, body: Buffered) {
        self.body = body;
    }

    /// The buffered body's length.
    pub(crate) fn body_len(&self) -> usize {
        self.body.bytes().len()
    }

    /// Whether the first request went out.
    #[inline]
    pub(crate) fn sent(&self) -> bool {
        !matches!(self.head, Original::Unsent(_))
    }

    /// Whether another request can follow the one in flight.
    pub(crate) fn can_retry(&self) -> bool {
        matches!(self.head, Original::KeptForRetries(_))
    }

    /// The request's URI, while a request can still be built of it.
    pub(crate) fn uri(&self) -> Option<Uri> {
        match &self.head {
            Original::Unsent(parts) => Some(parts.uri.clone()),
            Original::KeptForRetries(head) => Some(head.uri()),
            Original::Gone => None,
        }
    }

    /// The model's key in `registry`: the user's `key` of the URI, headers
    /// and body, or else the URI's scheme, authority and path. `None`: the
    /// key function gave none, or no request can follow.
    pub(crate) fn key(&self, registry: &Registry, key: Option<&KeyFn>) -> Option<u64> {
        match (key, &self.head) {
            (Some(key), Original::Unsent(parts)) => {
                key(registry, &parts.uri, &parts.headers, self.body.bytes())
            }
            (Some(key), Original::KeptForRetries(head)) => {
                let parts = head.rebuild()?;
                key(registry, &parts.uri, &parts.headers, self.body.bytes())
            }
            (None, Original::Unsent(parts)) => Some(registry.key(&parts.uri)),
            (None, Original::KeptForRetries(head)) => head
                .uri_parts()
                .map(|(scheme, authority, path)| registry.key_of(scheme, authority, path)),
            (_, Original::Gone) => None,
        }
    }

    /// The next request: the first, or a retry, with `hold`'s header (for
    /// the `remaining` budget). `last`: no request can follow it, so no copy
    /// is kept; `asked`: watches whether a client asks for its body. `None`
    /// when no request can be built.
    #[inline]
    pub(crate) fn next(
        &mut self,
        hold: Hold,
        remaining: Duration,
        last: bool,
        asked: Option<Asked>,
    ) -> Option<Outgoing<B>> {
        let parts = match std::mem::replace(&mut self.head, Original::Gone) {
            Original::Unsent(parts) => {
                if !last {
                    self.head = Original::KeptForRetries(Head::copy(&parts));
                }
                parts
            }
            Original::KeptForRetries(head) => {
                let parts = head.rebuild()?;
                if !last {
                    self.head = Original::KeptForRetries(head);
                }
                parts
            }
            Original::Gone => return None,
        };
        let mut request = Request::from_parts(parts, RequestBody::replay(&self.body, asked));
        hold.apply(request.headers_mut(), remaining);
        let held = hold != Hold::None || request.headers().contains_key(&X_WAIT_FOR_MODEL);
        Some(Outgoing { request, held })
    }

    /// An empty `GET` of the readiness `route`, with the caller's headers
    /// and query (credentials included) but not its body.
    pub(crate) fn check(&self, route: Uri) -> Option<Request<RequestBody<B>>> {
        let Original::KeptForRetries(head) = &self.head else {
            return None;
        };
        let mut parts = head.rebuild()?;
        parts.method = http::Method::GET;
        parts.uri = with_query_of(route, &parts.uri);
        for name in [
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_TYPE,
            http::header::TRANSFER_ENCODING,
            http::header::TRAILER,
        ] {
            parts.headers.remove(name);
        }
        Some(Request::from_parts(parts, RequestBody::default()))
    }

    /// The one request of a body that is not buffered, sent as it is.
    pub(crate) fn once(&mut self, body: RequestBody<B>) -> Option<Request<RequestBody<B>>> {
        let Original::Unsent(parts) = std::mem::replace(&mut self.head, Original::Gone) else {
            return None;
        };
        Some(Request::from_parts(parts, body))
    }
}

/// `route` with the query of the caller's `uri` (where credentials may
/// travel, as `?api_key=`), unless the route has its own.
fn with_query_of(route: Uri, uri: &Uri) -> Uri {
    let (None, Some(query)) = (route.query(), uri.query()) else {
        return route;
    };
    let mut parts = route.into_parts();
    let path = parts.path_and_query.as_ref().map_or("/", |p| p.path());
    // A query that would not parse again is left off.
    if let Ok(path_and_query) = format!("{path}?{query}").parse() {
        parts.path_and_query = Some(path_and_query);
    }
    Uri::from_parts(parts).unwrap_or_default()
}
