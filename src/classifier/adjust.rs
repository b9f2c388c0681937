//! A classifier with some of its answers set by the user.

use std::fmt;
use std::sync::Arc;

use http::{StatusCode, Uri};

use super::{Classify, ColdStart, Hold, ResponseView};

/// A user's readiness route: the route for a request's URI.
type Route = Arc<dyn Fn(&Uri) -> Option<Uri> + Send + Sync>;

/// A classifier whose answers to [`retries_refused`](Classify::retries_refused),
/// [`holds_first_request`](Classify::holds_first_request) or
/// [`readiness`](Classify::readiness) are the user's: made by
/// [`Classify::with_retry_refused`], [`Classify::with_hold_first_request`]
/// and [`Classify::with_readiness_route`], which chain. It recognises what
/// the classifier it wraps recognises.
///
/// ```
/// use tower_cold_start::classifier::{Classify, KnownServers};
/// use tower_cold_start::ColdStartRetryLayer;
///
/// // Every server's exact marker, and refused connections while ours boots,
/// // checked at its own readiness route.
/// let classifier = KnownServers
///     .with_retry_refused(true)
///     .with_readiness_route(|uri| {
///         let mut parts = uri.clone().into_parts();
///         parts.path_and_query = Some("/ready".parse().ok()?);
///         http::Uri::from_parts(parts).ok()
///     });
/// assert!(classifier.retries_refused());
/// let layer = ColdStartRetryLayer::new().classifier(classifier);
/// ```
#[derive(Clone)]
pub struct Adjusted<C> {
    inner: C,
    retries_refused: Option<bool>,
    holds_first_request: Option<bool>,
    readiness: Option<Route>,
}

impl<C> Adjusted<C> {
    fn new(inner: C) -> Self {
        Adjusted {
            inner,
            retries_refused: None,
            holds_first_request: None,
            readiness: None,
        }
    }

    /// The same, setting whether a refused connection is a server still
    /// booting; see [`Classify::with_retry_refused`].
    pub fn with_retry_refused(mut self, retry_refused: bool) -> Self {
        self.retries_refused = Some(retry_refused);
        self
    }

    /// The same, setting whether the first request asks to be held; see
    /// [`Classify::with_hold_first_request`].
    pub fn with_hold_first_request(mut self, hold_first_request: bool) -> Self {
        self.holds_first_request = Some(hold_first_request);
        self
    }

    /// The same, with this readiness route; see
    /// [`Classify::with_readiness_route`].
    pub fn with_readiness_route<F>(mut self, route: F) -> Self
    where
        F: Fn(&Uri) -> Option<Uri> + Send + Sync + 'static,
    {
        self.readiness = Some(Arc::new(route));
        self
    }

    /// The classifier this one adjusts.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }
}

impl<C: Classify> Classify for Adjusted<C> {
    fn may_be_cold_start(&self, status: StatusCode, held: bool) -> bool {
        self.inner.may_be_cold_start(status, held)
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        self.inner.classify(response)
    }

    fn retries_refused(&self) -> bool {
        self.retries_refused
            .unwrap_or_else(|| self.inner.retries_refused())
    }

    fn hold(&self) -> Hold {
        self.inner.hold()
    }

    fn holds_first_request(&self) -> bool {
        self.holds_first_request
            .unwrap_or_else(|| self.inner.holds_first_request())
    }

    fn readiness(&self, uri: &Uri) -> Option<Uri> {
        match &self.readiness {
            Some(route) => route(uri),
            None => self.inner.readiness(uri),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for Adjusted<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adjusted")
            .field("inner", &self.inner)
            .field("retries_refused", &self.retries_refused)
            .field("holds_first_request", &self.holds_first_request)
            .field(
                "readiness",
                &self.readiness.as_ref().map(|_| "Fn(&Uri) -> Option<Uri>"),
            )
            .finish()
    }
}

/// What the provided methods of [`Classify`] build.
pub(super) fn adjust<C>(inner: C) -> Adjusted<C> {
    Adjusted::new(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::{HuggingFace, KServe, KnownServers};

    #[test]
    fn each_adjustment_sets_one_answer_and_keeps_the_rest() {
        let uri: Uri = "http://h/v2/models/m/infer".parse().unwrap();
        let kserve = KServe.with_hold_first_request(true);
        assert!(kserve.retries_refused(), "KServe's own");
        assert!(kserve.holds_first_request());
        assert_eq!(kserve.readiness(&uri), KServe.readiness(&uri));
        let quiet = KServe
            .with_retry_refused(false)
            .with_readiness_route(|_| None);
        assert!(!quiet.retries_refused());
        assert_eq!(quiet.readiness(&uri), None);
        let known = KnownServers.with_retry_refused(true);
        assert!(known.retries_refused() && !known.holds_first_request());
        assert_eq!(
            HuggingFace.with_retry_refused(true).hold(),
            HuggingFace.hold()
        );
    }
}
