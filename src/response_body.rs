//! The response body handed to the caller.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body the caller receives.
    ///
    /// On the warm path it is the inner service's body, untouched. When the
    /// layer read the start of a `503` body to classify it and then decided
    /// not to retry, it yields exactly those bytes first and then the rest of
    /// the inner body, so the caller sees every byte the server sent, in
    /// order, followed by its trailers or its error.
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        Passthrough {
            #[pin]
            body: B,
        },
        Peeked {
            prefix: std::vec::IntoIter<Bytes>,
            // What ended the read, if the body ended while it was read.
            // Boxed (trailers are a whole header map): the warm path's
            // passthrough body, and every move of a response, stay small.
            end: Option<Box<End<B::Error>>>,
            // The rest of the body, if it did not.
            rest: Option<Pin<Box<B>>>,
        },
    }
}

/// How a body that was read to its end ended.
pub(crate) enum End<E> {
    Trailers(HeaderMap),
    Error(E),
    Eof,
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        ResponseBody {
            kind: Kind::Passthrough { body },
        }
    }

    /// The chunks already read, then how the body ended (if it did), then
    /// the rest of it (if it did not).
    pub(crate) fn peeked(
        prefix: Vec<Bytes>,
        end: Option<End<B::Error>>,
        rest: Option<Pin<Box<B>>>,
    ) -> Self {
        ResponseBody {
            kind: Kind::Peeked {
                prefix: prefix.into_iter(),
                end: end.filter(|e| !matches!(e, End::Eof)).map(Box::new),
                rest,
            },
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B>
where
    B: Body + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Passthrough { body } => f.debug_tuple("ResponseBody").field(body).finish(),
            Kind::Peeked { prefix, rest, .. } => f
                .debug_struct("ResponseBody")
                .field(
                    "prefix_len",
                    &prefix.as_slice().iter().map(Bytes::len).sum::<usize>(),
                )
                .field("rest", rest)
                .finish(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Peeked { prefix, end, rest } => {
                if let Some(chunk) = prefix.next() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(end) = end.take() {
                    return Poll::Ready(match *end {
                        End::Trailers(t) => Some(Ok(Frame::trailers(t))),
                        End::Error(e) => Some(Err(e)),
                        End::Eof => None,
                    });
                }
                match rest {
                    Some(body) => body.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Peeked { prefix, end, rest } => {
                prefix.len() == 0
                    && end.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Peeked { prefix, rest, .. } => {
                let read = prefix.as_slice().iter().map(|c| c.len() as u64).sum();
                crate::size_hint::after_read(rest.as_ref().map(|b| b.size_hint()), read)
            }
        }
    }
}
