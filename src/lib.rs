//! A [tower] layer that makes HTTP clients survive model cold starts.
//!
//! Model servers unload idle models and endpoints scale to zero. The next
//! request meets a *cold start*; llama.cpp's `llama-server`, for one,
//! answers every route while its model loads with
//!
//! ```text
//! HTTP/1.1 503 Service Unavailable
//! Content-Type: application/json; charset=utf-8
//!
//! {"error":{"message":"Loading model","type":"unavailable_error","code":503}}
//! ```
//!
//! and the HuggingFace serverless API with `503 {"error":"Model … is
//! currently loading","estimated_time":20.0}`. That is not a failure: the
//! model will answer in a few seconds. [`ColdStartRetryLayer`] recognises
//! the answers of every server in [`classifier::KnownServers`] (HuggingFace,
//! KServe, Triton, vLLM, TGI, TEI, Ollama, llama.cpp, MLServer, Ray Serve),
//! sends the request again with the same bytes, asking the server to hold
//! it where it can, and polls a server that does not hold, all within
//! bounds you set. Everything else passes through untouched.
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
//! - **Replay.** The request body is read into memory (up to
//!   [`body_limit`](ColdStartRetryLayer::body_limit), and
//!   [`total_body_limit`](ColdStartRetryLayer::total_body_limit) for all calls
//!   together) before the first attempt; every attempt sends the same method,
//!   URI, version, headers, extensions, bytes and trailers. A larger body is
//!   sent once, unbuffered, and its report says why
//!   ([`ColdStartReport::unbuffered`]). A body that fails while it is read
//!   fails the call, and nothing is sent.
//! - **Recognition.** The [`classifier`] decides what is a cold start; only a
//!   response it may call one has its body read, at most 4 KiB for at most
//!   5 s. Any response that is not retried reaches the caller byte for byte,
//!   trailers or body error included.
//! - **Waiting.** The [`WaitStrategy`] paces the retries: by default the first
//!   retry asks the server to hold it, and a server that does not hold is
//!   polled, a hosted API at 1, 1.5, then every 2 s (every second while
//!   other callers wait), a server the classifier calls self-hosted every
//!   250 ms. No model is asked more often than that, save right after a
//!   held request. A wait the server sets that the budget cannot cover is
//!   not slept: the answer goes back at once.
//! - **Readiness routes.** The caller's request is the truth; a readiness
//!   route (an empty `GET`) only makes a call cheaper or releases waiters
//!   sooner. It is checked instead of resending a body of 64 KiB or more,
//!   and every other probe while other callers wait: half the probes can
//!   then release them all before the probe's own answer (which an LLM
//!   server gives only after its generation), and the other half keep a
//!   route slower than the model from delaying anyone. A route that answers
//!   neither ready (`2xx`) nor not ready (`503`, `429`, refused), or no
//!   answer within 2 s, is dropped for that model and the request goes at
//!   once; one that said ready while the model still answered cold is not
//!   trusted again for that model. With a truthful route a large body goes
//!   out twice at most.
//! - **Unreachable.** Where the classifier (or
//!   [`with_retry_refused`](classifier::Classify::with_retry_refused)) says so, a
//!   refused connection is a server still booting, waited out like a
//!   loading answer, but only the request's own first connection: one for
//!   which the client never asked the request body for a byte, so nothing
//!   reached any server. A refused redirect hop (the first server processed
//!   the request), a timeout, a reset, and every other error of the inner
//!   service reach the caller as they are.
//! - **Bounds.** No attempt starts and no wait runs later than
//!   [`max_total_wait`](ColdStartRetryLayer::max_total_wait) after the first
//!   loading answer, nor past [`max_attempts`](ColdStartRetryLayer::max_attempts);
//!   then the caller gets the latest loading response as it came. Hostile
//!   hints (negative, NaN, huge, a string) are values, never a panic.
//! - **Many callers.** Calls through one layer share what they learn per model
//!   ([`model_key`](ColdStartRetryLayer::model_key)): one probes a cold model,
//!   the others wait in-process, each within its own budget, and all are
//!   released by the first answer that is not "loading". The model's state
//!   lives exactly as long as its prober and waiters. While no model is cold
//!   this costs one atomic load.
//! - **Telling.** Every response carries a [`ColdStartReport`]; every wait, the
//!   prober's and each waiter's, emits an `INFO` `tracing` event and calls
//!   [`on_retry`](ColdStartRetryLayer::on_retry). No header value is logged.
//! - **tower.** `poll_ready` forwards to the inner service; `call` takes the
//!   ready service and leaves a clone; each retry polls it ready again.
//!   Dropping the response future at any point cancels the call, and a probe
//!   it held passes to a waiter. Errors of the inner service reach the caller
//!   as they are, save the refused first connection above.
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
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod classifier;
mod coalesce;
mod config;
pub mod future;
mod head;
pub mod key;
mod layer;
#[cfg(test)]
mod lifecycle_tests;
mod loading;
mod pace;
mod policy;
mod report;
mod request;
mod request_body;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod response_body;
#[cfg(test)]
mod schedule_tests;
mod service;
mod size_hint;
mod wait;
pub mod warm;

pub use layer::ColdStartRetryLayer;
pub use pace::WaitStrategy;
pub use report::{ColdStartReport, GaveUp, RetryEvent, Unbuffered, Unreachable};
pub use request_body::RequestBody;
pub use response_body::ResponseBody;
pub use service::ColdStartRetry;

// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The error type of [`ColdStartRetry`]: the inner service's error, a
/// request-body error, or an error of the layer's own, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
