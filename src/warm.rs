//! Warming a model before traffic arrives, and keeping it warm.
//!
//! Both send requests through the caller's own service stack, so the base
//! URL, credentials and every other layer are the application's; put a
//! [`ColdStartRetryLayer`](crate::ColdStartRetryLayer) in that stack so a
//! cold answer is waited out rather than reported.

use std::fmt;
use std::future::poll_fn;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_service::Service;

use crate::{BoxError, ColdStartReport};

/// What [`warm_up`] saw.
#[derive(Debug)]
#[non_exhaustive]
pub enum WarmUpOutcome {
    /// The model answered with a success status.
    Warm {
        /// The status of the answer.
        status: StatusCode,
        /// The layer's report of the last call, if the stack has the layer.
        report: Option<ColdStartReport>,
        /// How many calls `warm_up` made (each may have retried inside).
        calls: u32,
    },
    /// The deadline passed before the model answered warm: every call was
    /// answered with a cold start (as the layer's classifier says), a `503`
    /// or a `500`, failed (a refused connection, say), or was still under
    /// way at the deadline.
    TimedOut {
        /// The status of the latest answer, if any call was answered.
        last_status: Option<StatusCode>,
        /// The error of the latest call that failed, if any did: with a
        /// server that never came up, why it could not be reached.
        last_error: Option<BoxError>,
        /// How many calls `warm_up` made.
        calls: u32,
    },
    /// The model answered with a status that waiting will not improve
    /// (neither a success, a cold start, a `503` nor a `500`, e.g. `401` or
    /// `404`); the error names it. A failing call is never this: it is called again
    /// until the deadline.
    Failed(BoxError),
}

/// Whether an answer that is not a success may still turn warm: one the
/// layer's classifier called a cold start and gave up on (its report says
/// so, whatever the status: a TGI `429`, a `425` of the user's own), or,
/// with no layer in the stack, a `503` or `500`.
fn still_cold<B>(response: &Response<B>) -> bool {
    match response.extensions().get::<ColdStartReport>() {
        Some(report) if report.gave_up().is_some() => true,
        _ => {
            let status = response.status();
            status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// Sends `request()` through `service` until the model answers with a
/// success status or `deadline` passes. Made for an application's start-up,
/// before it accepts traffic.
///
/// Each call goes through the whole stack; with a
/// [`ColdStartRetryLayer`](crate::ColdStartRetryLayer) in it, one call
/// already waits out a cold start within the layer's budget, and `warm_up`
/// calls again (a second later) only if the layer's classifier called the
/// answer a cold start and its budget ran out first (whatever the status:
/// a TGI `429`, a `425` of your own classifier), the answer was a `503` or
/// `500`, or the call failed (the server may still be booting); the latest
/// status and error come back in [`WarmUpOutcome::TimedOut`]. Any other
/// answer (a `401`, a `404`) will not improve by waiting: it ends the
/// warm-up at once as [`WarmUpOutcome::Failed`].
///
/// ```
/// # use std::convert::Infallible;
/// # use std::time::Duration;
/// # use bytes::Bytes;
/// # use http::{Request, Response};
/// # use http_body_util::Full;
/// use tower::ServiceBuilder;
/// use tower_cold_start::ColdStartRetryLayer;
/// use tower_cold_start::warm::{warm_up, WarmUpOutcome};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// # let backend = tower::service_fn(|_req: Request<tower_cold_start::RequestBody<Full<Bytes>>>| async {
/// #     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"[]"))))
/// # });
/// let client = ServiceBuilder::new()
///     .layer(ColdStartRetryLayer::new())
///     .service(backend);
/// let outcome = warm_up(
///     client,
///     || Request::post("http://127.0.0.1:8080/models/gpt2")
///         .body(Full::new(Bytes::from_static(br#"{"inputs":"warm up"}"#)))
///         .unwrap(),
///     Duration::from_secs(300),
/// )
/// .await;
/// assert!(matches!(outcome, WarmUpOutcome::Warm { .. }));
/// # }
/// ```
pub async fn warm_up<S, ReqBody, ResBody, F>(
    mut service: S,
    request: F,
    deadline: Duration,
) -> WarmUpOutcome
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    F: Fn() -> Request<ReqBody>,
{
    let until = Instant::now() + deadline;
    let mut calls = 0;
    let mut last_status = None;
    let mut last_error = None;
    loop {
        let call = async {
            poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(request()).await
        };
        let result = match tokio::time::timeout_at(until, call).await {
            Ok(result) => result,
            Err(_) => {
                return WarmUpOutcome::TimedOut {
                    last_status,
                    last_error,
                    calls,
                }
            }
        };
        calls += 1;
        match result {
            Ok(response) if response.status().is_success() => {
                return WarmUpOutcome::Warm {
                    status: response.status(),
                    report: response.extensions().get::<ColdStartReport>().copied(),
                    calls,
                }
            }
            Ok(response) => {
                let status = response.status();
                if !still_cold(&response) {
                    return WarmUpOutcome::Failed(
                        format!("warm-up request answered {status}").into(),
                    );
                }
                last_status = Some(status);
            }
            Err(error) => {
                let error: BoxError = error.into();
                tracing::warn!(
                    error = %crate::report::scrub_urls(&error.to_string()),
                    "warm-up request failed; trying again"
                );
                last_error = Some(error);
            }
        }
        if tokio::time::timeout_at(until, tokio::time::sleep(Duration::from_secs(1)))
            .await
            .is_err()
        {
            return WarmUpOutcome::TimedOut {
                last_status,
                last_error,
                calls,
            };
        }
    }
}

/// Keeps a model warm: spawns a task on the current tokio runtime that
/// sends `request()` through `service`, waits for the answer (pings never
/// overlap; one that takes longer than the interval is abandoned), logs a
/// failure with `tracing` and carries on, then sleeps for the schedule's
/// interval. It stops when the returned [`KeepWarm`] is dropped.
///
/// # Panics
///
/// If called outside a tokio runtime, like `tokio::spawn`.
///
/// ```
/// # use std::convert::Infallible;
/// # use bytes::Bytes;
/// # use http::{Request, Response};
/// # use http_body_util::Full;
/// use tower_cold_start::warm::{keep_warm, KeepWarmSchedule};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// # let client = tower::service_fn(|_req: Request<Full<Bytes>>| async {
/// #     Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
/// # });
/// let handle = keep_warm(
///     client,
///     || Request::post("http://127.0.0.1:8080/models/gpt2")
///         .body(Full::new(Bytes::from_static(br#"{"inputs":"ping"}"#)))
///         .unwrap(),
///     KeepWarmSchedule::new(),
/// );
/// assert!(handle.is_running());
/// drop(handle); // stops the pings
/// # }
/// ```
pub fn keep_warm<S, ReqBody, ResBody, F>(
    mut service: S,
    request: F,
    schedule: KeepWarmSchedule,
) -> KeepWarm
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    F: Fn() -> Request<ReqBody> + Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    let task = tokio::spawn(async move {
        loop {
            let req = request();
            let ping = async {
                poll_fn(|cx| service.poll_ready(cx)).await?;
                service.call(req).await
            };
            // A ping that hangs must not stop the next ones.
            match tokio::time::timeout(schedule.interval, ping).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    tracing::debug!(status = %response.status(), "keep-warm ping answered");
                }
                Ok(Ok(response)) => {
                    tracing::warn!(status = %response.status(), "keep-warm ping answered with an error");
                }
                Ok(Err(error)) => {
                    let error: BoxError = error.into();
                    tracing::warn!(
                        error = %crate::report::scrub_urls(&error.to_string()),
                        "keep-warm ping failed"
                    );
                }
                Err(_) => tracing::warn!("keep-warm ping timed out"),
            }
            tokio::time::sleep(schedule.next_interval()).await;
        }
    });
    KeepWarm { task }
}

/// A background task that keeps a model warm by sending it a request at an
/// interval; made by [`keep_warm`].
///
/// It stops when this handle is dropped or [`stop`](KeepWarm::stop) is
/// called, so it never outlives its owner.
pub struct KeepWarm {
    task: JoinHandle<()>,
}

impl fmt::Debug for KeepWarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepWarm")
            .field("running", &!self.task.is_finished())
            .finish()
    }
}

/// How [`KeepWarm`] paces its pings.
#[derive(Debug, Clone, Copy)]
pub struct KeepWarmSchedule {
    interval: Duration,
    jitter: bool,
}

impl Default for KeepWarmSchedule {
    fn default() -> Self {
        KeepWarmSchedule {
            interval: Duration::from_secs(15 * 60),
            jitter: true,
        }
    }
}

impl KeepWarmSchedule {
    /// Every 15 minutes, with jitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time between the end of one ping and the start of the next.
    ///
    /// Default: 15 minutes, well inside the idle time after which hosted
    /// models are unloaded (HuggingFace Inference Endpoints scale to zero
    /// after an hour by default).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Whether each interval is varied by up to ±10%, so that a fleet of
    /// replicas started together does not ping in step.
    ///
    /// Default: `true`.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    fn next_interval(&self) -> Duration {
        if !self.jitter {
            return self.interval;
        }
        self.interval
            .mul_f64(0.9 + 0.2 * crate::pace::random_unit())
    }
}

impl KeepWarm {
    /// Stops the task now (also done on drop).
    pub fn stop(self) {
        drop(self);
    }

    /// Whether the task is still running.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for KeepWarm {
    fn drop(&mut self) {
        self.task.abort();
    }
}
