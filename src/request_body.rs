//! Request-body replay: buffer the caller's body once, send it on every attempt.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{BoxError, Unbuffered};

/// The bytes that all calls in flight through one layer hold for replay,
/// against the layer's `total_body_limit`.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    used: AtomicUsize,
}

/// A call's share of the [`Pool`]: what it may still take, and what it holds.
pub(crate) struct Allowance<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) cap: usize,
    // Given back to the pool when the call ends.
    pub(crate) held: &'a mut usize,
}

impl Pool {
    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Gives `n` held bytes back.
    pub(crate) fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Allowance<'_> {
    /// Takes `n` more bytes from the pool, if that stays within the cap.
    fn take(&mut self, n: usize) -> bool {
        let before = self.pool.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.cap {
            self.pool.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        *self.held += n;
        true
    }

    /// Gives back everything this call holds.
    fn give_back(&mut self) {
        self.pool.give_back(std::mem::take(self.held));
    }
}

/// The request body the inner service receives.
///
/// Either the caller's body, buffered and replayed identically on every
/// attempt (data and trailers), or, for a body larger than `body_limit`, the
/// caller's body streamed once: the part already read, then the rest.
///
/// It is `Unpin` and `Send` whenever the caller's body is `Send`, as
/// `hyper_util::client::legacy::Client` requires.
pub struct RequestBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// A buffered body: the whole data and the trailers, if any; `asked`,
    /// when the call may retry a refused connection, says whether a client
    /// asked for the body (see [`Asked`]).
    Replay {
        data: Option<Bytes>,
        trailers: Option<Box<HeaderMap>>,
        asked: Option<Asked>,
    },
    /// An unbuffered body: the chunks read before the limit was passed, then
    /// the caller's body itself.
    Stream {
        prefix: VecDeque<Bytes>,
        rest: Option<Pin<Box<B>>>,
    },
}

/// Whether a client asked an attempt's body for its data or its end.
///
/// A client asks only on a connection it has opened, to write the request;
/// so an attempt that failed with its body never asked provably sent no byte
/// of the request, and a refused connection is then the request's own
/// first connection. A client that follows a redirect (reqwest, tower-http's
/// `FollowRedirect`) asks on the first hop, before a later hop can be
/// refused.
#[derive(Clone, Debug, Default)]
pub(crate) struct Asked(Arc<AtomicBool>);

impl Asked {
    /// Whether the body was asked for.
    pub(crate) fn was_asked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Records that a client asked, where the body is watched.
    fn now(asked: &Option<Asked>) {
        if let Some(asked) = asked {
            asked.0.store(true, Ordering::Relaxed);
        }
    }
}

impl<B> RequestBody<B> {
    /// A replay of `buffered`; `asked` records whether a client asked for it.
    pub(crate) fn replay(buffered: &Buffered, asked: Option<Asked>) -> Self {
        RequestBody {
            kind: Kind::Replay {
                data: buffered.data.clone().filter(|d| !d.is_empty()),
                trailers: buffered.trailers.clone(),
                asked,
            },
        }
    }

    /// The whole body as bytes, if it is a buffered one without trailers
    /// (what a client can send as in-memory bytes, with `Content-Length`)
    /// that needs no watching: a body that records whether a client asked
    /// for it must be streamed, so that the asking is seen.
    #[cfg(feature = "reqwest")]
    pub(crate) fn into_bytes(self) -> Result<Bytes, Self> {
        match self.kind {
            Kind::Replay {
                data,
                trailers: None,
                asked: None,
            } => Ok(data.unwrap_or_default()),
            kind => Err(RequestBody { kind }),
        }
    }

    pub(crate) fn stream(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        RequestBody {
            kind: Kind::Stream {
                prefix,
                rest: Some(rest),
            },
        }
    }
}

/// An empty body: what tower-http's `FollowRedirect` sends on a redirect
/// that drops the body (`303`, or `301`/`302` after a `POST`).
impl<B> Default for RequestBody<B> {
    fn default() -> Self {
        RequestBody::replay(&Buffered::default(), None)
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Replay { data, trailers, .. } => f
                .debug_struct("RequestBody::Replay")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            Kind::Stream { prefix, rest } => f
                .debug_struct("RequestBody::Stream")
                .field("prefix_len", &prefix.iter().map(Bytes::len).sum::<usize>())
                .field("done", &rest.is_none())
                .finish(),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Replay {
                data,
                trailers,
                asked,
            } => {
                Asked::now(asked);
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            Kind::Stream { prefix, rest } => {
                if let Some(chunk) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                let Some(body) = rest.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = ready!(body.as_mut().poll_frame(cx));
                if frame.is_none() {
                    *rest = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Replay {
                data,
                trailers,
                asked,
            } => {
                Asked::now(asked);
                data.is_none() && trailers.is_none()
            }
            Kind::Stream { prefix, rest } => {
                prefix.is_empty() && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Replay { data, trailers, .. } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_none() {
                    return SizeHint::with_exact(len);
                }
                // An exact size makes an HTTP/1 client frame the request
                // with `Content-Length`, which has no room for trailers:
                // leave the upper bound open so that it sends it chunked.
                let mut hint = SizeHint::new();
                hint.set_lower(len);
                hint
            }
            Kind::Stream { prefix, rest } => {
                let read: u64 = prefix.iter().map(|c| c.len() as u64).sum();
                crate::size_hint::after_read(rest.as_ref().map(|b| b.size_hint()), read)
            }
        }
    }
}

/// A request body read to its end: what every attempt sends.
#[derive(Debug, Clone, Default)]
pub(crate) struct Buffered {
    data: Option<Bytes>,
    // Boxed: rare, and it keeps every response future smaller.
    trailers: Option<Box<HeaderMap>>,
}

impl Buffered {
    /// The body's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}

pin_project! {
    /// Where a body being buffered lives.
    ///
    /// A body whose exact size is known to fit is read in place (no
    /// allocation). A body that may turn out too large is boxed first,
    /// because it must then be handed on, already started, to the inner
    /// service.
    #[project = SourceProj]
    #[project_replace = SourceOwned]
    pub(crate) enum Source<B> {
        /// Nothing to read: replay an empty body.
        Empty,
        /// An exact size within the limit, taken from the pool: read in place.
        Fits { #[pin] body: B },
        /// Read, boxed, to be handed on if it passes a limit.
        MayOverflow { body: Pin<Box<B>> },
        /// Known to be over a limit: stream it once, unread.
        Over { body: Pin<Box<B>>, reason: Unbuffered },
    }
}

/// What reading the body ended in.
pub(crate) enum Buffering<B> {
    /// The whole body is in memory: it can be replayed.
    Done(Buffered),
    /// The body passed a limit: send it once, as it is.
    Overflow(RequestBody<B>, Unbuffered),
}

/// The error for a body whose `size_hint` promised fewer bytes than it sent.
#[derive(Debug)]
pub(crate) struct BodyLongerThanHint;

impl fmt::Display for BodyLongerThanHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body is longer than its size hint")
    }
}

impl std::error::Error for BodyLongerThanHint {}

pin_project! {
    /// Reads a request body into memory, up to a limit.
    #[project = ReaderProj]
    pub(crate) struct Reader<B> {
        #[pin]
        source: Source<B>,
        limit: usize,
        len: usize,
        // The first chunk is kept apart so that a single-chunk body (the
        // common `Full<Bytes>`) is never copied.
        first: Option<Bytes>,
        more: Vec<Bytes>,
        trailers: Option<Box<HeaderMap>>,
    }
}

impl<B> Reader<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    /// Plans how to read `body` (see [`Source`]) within `limit` and the
    /// call's `allowance`. A body of an exact size within `limit` takes that
    /// size from the pool up front (it is read in place, and could not be
    /// handed on half-read); any other takes its chunks as they come.
    pub(crate) fn new(body: B, limit: usize, mut allowance: Allowance<'_>) -> Self {
        let hint = body.size_hint();
        let source = if body.is_end_stream() {
            Source::Empty
        } else if hint.lower() > limit as u64 {
            let reason = Unbuffered::BodyLimit;
            Source::Over {
                body: Box::pin(body),
                reason,
            }
        } else {
            match hint.exact() {
                Some(n) if allowance.take(n as usize) => Source::Fits { body },
                Some(_) => {
                    let reason = Unbuffered::TotalLimit;
                    Source::Over {
                        body: Box::pin(body),
                        reason,
                    }
                }
                None => Source::MayOverflow {
                    body: Box::pin(body),
                },
            }
        };
        Reader {
            source,
            limit,
            len: 0,
            first: None,
            more: Vec::new(),
            trailers: None,
        }
    }

    /// Reads the whole body, or up to the chunk that passes a limit.
    pub(crate) fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut allowance: Allowance<'_>,
    ) -> Poll<Result<Buffering<B>, BoxError>> {
        let mut this = self.project();
        loop {
            let frame = match this.source.as_mut().project() {
                SourceProj::Empty => None,
                SourceProj::Fits { body } => ready!(body.poll_frame(cx)),
                SourceProj::MayOverflow { body } => ready!(body.as_mut().poll_frame(cx)),
                SourceProj::Over { .. } => {
                    let SourceOwned::Over { body, reason } =
                        this.source.project_replace(Source::Empty)
                    else {
                        unreachable!("in the Over state")
                    };
                    let body = RequestBody::stream(VecDeque::new(), body);
                    return Poll::Ready(Ok(Buffering::Overflow(body, reason)));
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers end the body; any other frame kind is
                        // kept out of the replay because http-body defines
                        // none.
                        if let Ok(trailers) = frame.into_trailers() {
                            *this.trailers = Some(Box::new(trailers));
                        }
                        continue;
                    }
                },
            };
            if data.is_empty() {
                continue;
            }
            *this.len = this.len.saturating_add(data.len());
            let boxed = matches!(*this.source, Source::MayOverflow { .. });
            let over = if *this.len > *this.limit {
                Some(Unbuffered::BodyLimit)
            } else if boxed && !allowance.take(data.len()) {
                // (A body read in place took its whole size up front.)
                Some(Unbuffered::TotalLimit)
            } else {
                None
            };
            if let Some(reason) = over {
                return Poll::Ready(overflow(this, data, reason, allowance));
            }
            if this.first.is_none() {
                *this.first = Some(data);
            } else {
                this.more.push(data);
            }
        }
        Poll::Ready(Ok(Buffering::Done(Buffered {
            data: join(this.first.take(), std::mem::take(this.more), *this.len),
            trailers: this.trailers.take(),
        })))
    }
}

/// The body passed a limit with `data`: what was read, then the rest, goes
/// out once as it is.
fn overflow<B>(
    this: ReaderProj<'_, B>,
    data: Bytes,
    reason: Unbuffered,
    mut allowance: Allowance<'_>,
) -> Result<Buffering<B>, BoxError> {
    let SourceOwned::MayOverflow { body: rest } = this.source.project_replace(Source::Empty) else {
        // Only a body with an exact hint within the limit is read in place,
        // and it just broke that promise.
        return Err(BodyLongerThanHint.into());
    };
    // Streamed out from here on: no longer held for replay.
    allowance.give_back();
    let mut prefix: VecDeque<Bytes> = this.first.take().into_iter().collect();
    prefix.extend(this.more.drain(..));
    prefix.push_back(data);
    Ok(Buffering::Overflow(
        RequestBody::stream(prefix, rest),
        reason,
    ))
}

/// The chunks read, as one `Bytes` (copied only when there are several).
fn join(first: Option<Bytes>, more: Vec<Bytes>, len: usize) -> Option<Bytes> {
    let first = first?;
    if more.is_empty() {
        return Some(first);
    }
    let mut all = BytesMut::with_capacity(len);
    all.extend_from_slice(&first);
    for chunk in more {
        all.extend_from_slice(&chunk);
    }
    Some(all.freeze())
}
