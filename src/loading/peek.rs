//! Reading the start of a response that may be a cold start.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::response;
use http_body::Body;
use tokio::time::{sleep, Sleep};

use crate::response_body::End;

/// The most bytes of a response body that are read to classify it.
///
/// HuggingFace's loading body is about 120 bytes plus the model id, so 4 KiB
/// leaves ample room while bounding what a hostile server can make us buffer.
pub(crate) const PEEK_LIMIT: usize = 4 * 1024;

/// The longest time spent reading a response body to classify it: a loading
/// body comes with the headers, so one still incomplete after this long is
/// handed to the caller as it is.
pub(crate) const PEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// A response whose body is being read, up to a size and a time.
pub(crate) struct Peek<B> {
    pub(crate) head: response::Parts,
    pub(crate) body: Pin<Box<B>>,
    pub(crate) read: Vec<Bytes>,
    len: usize,
    // A loading body comes with the headers; one that trickles is not one,
    // and must not hold the caller.
    deadline: Pin<Box<Sleep>>,
}

impl<B: Body<Data = Bytes>> Peek<B> {
    pub(crate) fn new(head: response::Parts, body: B) -> Self {
        Peek {
            head,
            body: Box::pin(body),
            read: Vec::new(),
            len: 0,
            deadline: Box::pin(sleep(PEEK_TIMEOUT)),
        }
    }

    /// Reads until the body ends (`Some`: how it ended), or passes
    /// [`PEEK_LIMIT`] or [`PEEK_TIMEOUT`] (`None`: not a loading body).
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<End<B::Error>>> {
        loop {
            let frame = match self.body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    ready!(self.deadline.as_mut().poll(cx));
                    return Poll::Ready(None);
                }
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Some(End::Error(error))),
                None => return Poll::Ready(Some(End::Eof)),
            };
            match frame.into_data() {
                Ok(data) => {
                    self.len = self.len.saturating_add(data.len());
                    self.read.push(data);
                    if self.len > PEEK_LIMIT {
                        return Poll::Ready(None);
                    }
                }
                Err(frame) => {
                    // Trailers end the body; no other frame kind exists.
                    if let Ok(trailers) = frame.into_trailers() {
                        return Poll::Ready(Some(End::Trailers(trailers)));
                    }
                }
            }
        }
    }

    /// The bytes read, as one slice (copied only when they came in pieces).
    pub(crate) fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.read[..] {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(one),
            many => Cow::Owned(many.concat()),
        }
    }
}
