//! A [tower] layer that makes HTTP clients survive model cold starts.
//!
//! Hosted model servers unload idle models. The next request meets a *cold
//! start*: the HuggingFace Inference API answers
//!
//! ```text
//! HTTP/1.1 503 Service Unavailable
//! Content-Type: application/json
//!
//! {"error":"Model distilbert/distilbert-base-uncased-finetuned-sst-2-english is currently loading","estimated_time":20.0}
//! ```
//!
//! That is not a failure: the model will answer in a few seconds.
//! [`ColdStartRetryLayer`] recognises this response, sends the request again
//! with the same bytes, asking the server to hold it until the model is
//! ready (`x-wait-for-model: true`), and polls a server that does not hold,
//! all within bounds you set. Everything else passes through untouched.
//!
//! # Example
//!
//! ```
//! # use std::convert::Infallible;
//! # use std::sync::atomic::{AtomicU32, Ordering};
//! # use std::sync::Arc;
//! # use bytes::Bytes;
//! # use http::{Request, Response};
//! # use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_cold_start::{ColdStartReport, ColdStartRetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! # let calls = Arc::new(AtomicU32::new(0));
//! # let backend = tower::service_fn(move |_req: Request<tower_cold_start::RequestBody<Full<Bytes>>>| {
//! #     let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
//! #     async move {
//! #         Ok::<_, Infallible>(if first {
//! #             Response::builder().status(503).body(Full::new(Bytes::from_static(
//! #                 br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#,
//! #             ))).unwrap()
//! #         } else {
//! #             Response::new(Full::new(Bytes::from_static(br#"[{"generated_text":"Hello"}]"#)))
//! #         })
//! #     }
//! # });
//! // `backend` answers 503 "loading" once, then 200. In an application it is
//! // a `hyper_util` client.
//! let client = ServiceBuilder::new()
//!     .layer(ColdStartRetryLayer::new())
//!     .service(backend);
//!
//! let request = Request::post("https://api-inference.huggingface.co/models/gpt2")
//!     .body(Full::new(Bytes::from_static(br#"{"inputs":"Hello"}"#)))?;
//! let response = client.oneshot(request).await?;
//!
//! assert_eq!(response.status(), 200);
//! let report = *response.extensions().get::<ColdStartReport>().unwrap();
//! assert_eq!(report.attempts(), 2);
//! // The retry went out 1 s after the first answer (not the 20 s that
//! // `estimated_time` announced, a poor estimate).
//! assert_eq!(report.waited(), std::time::Duration::from_secs(1));
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], br#"[{"generated_text":"Hello"}]"#);
//! # Ok(())
//! # }
//! ```
//!
//! # Behaviour
//!
//! - **Body replay.** The request body is buffered (up to
//!   [`body_limit`](ColdStartRetryLayer::body_limit)) so that every attempt
//!   sends the same method, URI, version, headers, extensions, bytes and
//!   trailers. A body that is exactly one chunk (`Full<Bytes>`) is never
//!   copied. The server receives nothing until the whole body has been read.
//!   A larger body, or one that would take the bodies held by all calls in
//!   flight past [`total_body_limit`](ColdStartRetryLayer::total_body_limit),
//!   is streamed once, intact, and never retried; its report says why
//!   ([`ColdStartReport::unbuffered`]), and a `WARN` event does too when its
//!   answer may be a cold start. A request body that fails while it is read
//!   fails the call with that error, and nothing is sent.
//! - **Classification.** With the default [`HuggingFace`](classifier::HuggingFace)
//!   classifier (see [`classifier`] for Inference Endpoints, TGI, `Retry-After`
//!   and your own), a response is a cold start when its status is `503`
//!   and its body is a JSON object whose `error` string contains
//!   `is currently loading`. A request that asked the server to hold it
//!   (`x-wait-for-model`) and came back `500` with `Model too busy` (the
//!   server held it for its limit, about 60 s) is still loading too, and is
//!   retried: at once by default, since the hold was the wait. Only such `503` and `500` bodies are
//!   read, up to 4 KiB and for at most 5 s; a larger, slower, unreadable or
//!   non-JSON body is not a cold start. A response that
//!   is not retried reaches the caller with its status, headers and every
//!   body byte (and trailers, or body error) exactly as the server sent them.
//!   `429`, other `503`s and error pages pass through after one request.
//! - **Waiting.** `estimated_time` is a poor estimate (announced 20 s, taken
//!   10 s or 24 s), so by default ([`WaitStrategy::Adaptive`]) the layer does not
//!   sleep it: the first retry goes out 1 s after the first request and
//!   carries `x-wait-for-model: true` (see
//!   [`hold_retries`](ColdStartRetryLayer::hold_retries)); a server that
//!   holds it answers the moment the model is ready. A server that answers
//!   that held retry "loading" at once does not hold, and is polled every
//!   second (every 2 s for a caller alone). A `Retry-After` or a backoff the
//!   classifier asks for is honoured as given. [`WaitStrategy::SleepEstimate`] keeps the
//!   first release's behaviour: sleep `estimated_time`, capped by
//!   [`max_wait`](ColdStartRetryLayer::max_wait), with
//!   [`default_wait`](ColdStartRetryLayer::default_wait) for a missing,
//!   negative, NaN, infinite or non-numeric value, never under one second,
//!   shortened by a random 0–20% ([`jitter`](ColdStartRetryLayer::jitter)).
//!   [`WaitStrategy::FixedInterval`] polls at a fixed interval. No strategy sends a model
//!   more than one request per second, save right after a request the server
//!   held for a second or more, so `"estimated_time": 0` cannot cause a busy
//!   loop.
//! - **Bounds.** No attempt starts, and no sleep runs, later than
//!   [`max_total_wait`](ColdStartRetryLayer::max_total_wait) after the first
//!   loading response, and at most
//!   [`max_attempts`](ColdStartRetryLayer::max_attempts) requests are sent
//!   (no limit by default: the time budget and the pace above bound them).
//!   When either runs out, the caller gets the last loading response exactly
//!   as the server sent it.
//! - **Many callers, one cold model.** Services from one layer, and clones
//!   of one service, share what they learn per model (scheme, authority and
//!   path, or your [`model_key`](ColdStartRetryLayer::model_key)). Once a
//!   model answered "loading", one request at a time probes it (with
//!   `x-wait-for-model`); other calls for it, new or retrying, wait
//!   in-process instead of going upstream, and are all released the moment
//!   any response shows the model is no longer loading (a probe asleep
//!   between polls too). Each keeps its own budget, and gets the latest
//!   loading response when it runs out. A probe whose caller gives up is
//!   taken over at once by a waiter. While no model is cold this costs one
//!   atomic load per call: no lock, no allocation; while some are, a call
//!   for a warm model takes no lock either, but in the rare case (1 in 32
//!   per cold model) where their keys share a bucket.
//! - **Report.** Every response carries a [`ColdStartReport`] extension.
//! - **Observability.** Each wait emits a `tracing` event at `INFO` (URI
//!   authority and path, model, attempt, wait, estimate; never a header
//!   value) and calls the [`on_retry`](ColdStartRetryLayer::on_retry) hook:
//!   the probing call's before each sleep, and a waiting call's when it
//!   starts waiting and at each loading answer of the probe
//!   ([`RetryEvent::behind_probe`]). [`cold_models`](ColdStartRetryLayer::cold_models)
//!   counts the models held as cold.
//! - **Cancellation.** Dropping the response future at any point (while the
//!   body is read, a request is in flight or held, a 503 is read, the layer
//!   sleeps, or waits for another caller's probe) cancels the call: nothing
//!   more is sent, and a probe it held passes to a waiter.
//!
//! # Timeouts
//!
//! Where a [`tower::timeout`] layer sits decides what it bounds:
//!
//! - **outside** (`.timeout(t).layer(ColdStartRetryLayer::new())`): `t` is
//!   the caller's overall deadline, waits and retries included. Give it at
//!   least `max_total_wait` plus one held request (HuggingFace holds a request
//!   for up to about 60 s), e.g. 180 s with the defaults, or it will cut the
//!   wait short.
//! - **inside** (`.layer(ColdStartRetryLayer::new()).timeout(t)`): `t` bounds
//!   each attempt. A held retry lasts until the model is ready, so `t` must be
//!   longer than that (60 s or more); a timeout error is returned to the
//!   caller as it is, not retried.
//!
//! Both together are the usual choice: an overall deadline for the caller, a
//! per-attempt bound against a hung connection.
//!
//! [tower]: https://docs.rs/tower
//! [`tower::timeout`]: https://docs.rs/tower/latest/tower/timeout/index.html

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod body;
mod call;
pub mod classifier;
pub mod future;
mod gate;
mod head;
mod layer;
#[cfg(test)]
mod lifecycle_tests;
mod peek;
mod replay;
mod report;
mod service;
mod wake;
mod warm;

pub use body::ResponseBody;
pub use layer::ColdStartRetryLayer;
pub use replay::RequestBody;
pub use report::{ColdStartReport, RetryEvent, Unbuffered};
pub use service::ColdStartRetry;
pub use wake::WaitStrategy;
pub use warm::{keep_warm, warm_up, KeepWarm, KeepWarmSchedule, WarmUpOutcome};

// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The error type of [`ColdStartRetry`]: the inner service's error, a
/// request-body error, or an error of the layer's own, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
