//! The loading answer: a response that says the model is cold, read to its
//! end (from a [`Peek`]) or a refused connection standing for one, kept as
//! the model's latest and turned back into the caller's response when a
//! call gives up.

use std::sync::Arc;

use bytes::Bytes;
use http::{response, HeaderMap, Response};
use http_body::Body;
use tokio::time::Instant;

use crate::classifier::{self, ColdStart, Hint, Hold, ResponseView, SELF_HOSTED_POLL};
use crate::response_body::{End, ResponseBody};
use crate::{BoxError, ColdStartReport, GaveUp, Unreachable};

mod peek;

pub(crate) use peek::{Peek, PEEK_LIMIT};

/// A loading response, read to its end, or a refused connection.
#[derive(Clone)]
pub(crate) struct LoadingAnswer {
    pub(crate) head: response::Parts,
    pub(crate) body: Vec<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
    // How the next request for this model asks the server to hold it.
    pub(crate) hold: Hold,
    // What the classifier read in it, for the progress of waiting callers.
    pub(crate) model: Option<String>,
    pub(crate) estimate: Option<f64>,
    // Not an answer but a refused connection: the server is still booting.
    // (The head and body are then empty.)
    pub(crate) refused: Option<Arc<dyn std::error::Error + Send + Sync>>,
    // Whether the server's readiness route tells when this state ends: a
    // model not ready, or a server not up; not overload or a quota.
    pub(crate) checkable: bool,
    // The poll interval the classifier gave for this server, if any.
    pub(crate) poll: Option<std::time::Duration>,
    // When it came: the latest of two answers is the one given back.
    pub(crate) at: Instant,
}

/// What the classifier says of a peeked response (`end`: how its body
/// ended; a body that did not end, or failed, is no loading answer).
pub(crate) fn classify<B: Body<Data = Bytes>>(
    classifier: &classifier::LayerClassifier,
    peek: &Peek<B>,
    end: &Option<End<B::Error>>,
    held: bool,
    attempt: u32,
) -> Option<ColdStart> {
    match end {
        Some(End::Trailers(_) | End::Eof) => classifier.classify(&ResponseView {
            status: peek.head.status,
            headers: &peek.head.headers,
            body: &peek.bytes(),
            held,
            attempt,
        }),
        Some(End::Error(_)) | None => None,
    }
}

/// Whether an error proves that nothing reached the server: a refused
/// connection, anywhere in its source chain.
pub(crate) fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let io = error.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        next = error.source();
    }
    false
}

impl LoadingAnswer {
    /// A loading response, read to its end, as the classifier saw it.
    pub(crate) fn read<B: Body>(
        peek: Peek<B>,
        end: Option<End<B::Error>>,
        cold: &ColdStart,
    ) -> Self {
        LoadingAnswer {
            head: peek.head,
            body: peek.read,
            trailers: match end {
                Some(End::Trailers(trailers)) => Some(trailers),
                _ => None,
            },
            hold: cold.hold(),
            model: cold.model().map(str::to_owned),
            estimate: cold.estimate(),
            refused: None,
            checkable: !matches!(cold.hint(), Hint::Backoff | Hint::After(_)),
            poll: cold.poll_interval(),
            at: Instant::now(),
        }
    }

    /// A refused connection, as the model's latest "answer".
    pub(crate) fn refused(error: BoxError) -> Self {
        let (head, ()) = Response::new(()).into_parts();
        LoadingAnswer {
            head,
            body: Vec::new(),
            trailers: None,
            hold: Hold::None,
            model: None,
            estimate: None,
            refused: Some(Arc::from(error)),
            checkable: true,
            // A refused connection costs nothing: a server booting next to
            // the client is asked at the self-hosted pace.
            poll: Some(SELF_HOSTED_POLL),
            at: Instant::now(),
        }
    }

    /// What a refused connection tells the pace: a server booting.
    pub(crate) fn booting() -> ColdStart {
        ColdStart::new(Hint::Unknown).with_poll_interval(SELF_HOSTED_POLL)
    }

    /// The newer of two loading answers.
    pub(crate) fn newer(own: Option<Arc<Self>>, shared: Option<Arc<Self>>) -> Option<Arc<Self>> {
        match (own, shared) {
            (Some(own), Some(shared)) if shared.at > own.at => Some(shared),
            (own, shared) => own.or(shared),
        }
    }

    /// The caller's answer once it gave up (`why`): this response exactly as
    /// it came, with `report`, or an [`Unreachable`] error for a refusal.
    pub(crate) fn give_back<B: Body>(
        self: Arc<Self>,
        why: GaveUp,
        report: ColdStartReport,
    ) -> Result<Response<ResponseBody<B>>, BoxError> {
        if let Some(error) = &self.refused {
            return Err(Box::new(Unreachable(Arc::clone(error), why)));
        }
        let LoadingAnswer {
            head,
            body,
            trailers,
            ..
        } = Arc::try_unwrap(self).unwrap_or_else(|shared| (*shared).clone());
        let body = ResponseBody::peeked(body, trailers.map(End::Trailers), None);
        Ok(report.attach(Response::from_parts(head, body)))
    }
}
