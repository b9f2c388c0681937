//! tower semantics: readiness, clone-and-swap, cancellation.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::*;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_cold_start::{ColdStartRetry, RequestBody};

const MODEL: &str = "/models/gpt2";

fn post(url: String) -> Request<Full<Bytes>> {
    Request::post(url)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn poll_ready_forwards_to_the_inner_service() {
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<RequestBody<Full<Bytes>>>, Response<Full<Bytes>>>();
    let mut service = tokio_test::task::spawn(ColdStartRetry::new(mock));
    handle.allow(0);
    assert_pending!(service.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
    handle.allow(1);
    assert!(service.is_woken());
    assert_ready_ok!(service.enter(|cx, mut s| s.as_mut().get_mut().poll_ready(cx)));
}

#[tokio::test]
async fn inner_errors_reach_the_caller_boxed() {
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<RequestBody<Full<Bytes>>>, Response<Full<Bytes>>>();
    let client = ColdStartRetry::new(mock);
    let call = tokio::spawn(client.oneshot(post("http://m.test/".into())));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("connection refused"));
    let error = call.await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "connection refused");
}

/// A service that must be polled ready before every call, and counts how
/// often it was; clones start not ready.
#[derive(Default)]
struct Strict {
    ready: bool,
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Strict {
            ready: false,
            polls: self.polls.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl Service<Request<RequestBody<Full<Bytes>>>> for Strict {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        assert!(self.ready, "called without poll_ready");
        self.ready = false;
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(if n < 2 {
                hf_server::loading("gpt2", Some("1.0"))
            } else {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn the_ready_service_is_used_and_polled_ready_again_before_each_retry() {
    let strict = Strict::default();
    let (polls, calls) = (strict.polls.clone(), strict.calls.clone());
    let mut client = ColdStartRetry::new(strict);
    // One poll_ready by the caller, then a call; the future polls its own
    // (cloned, not ready) service before each of the two retries.
    let response = client
        .ready()
        .await
        .unwrap()
        .call(post("http://m.test/".into()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(polls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_it_sleeps_sends_nothing_more() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let mut call = Box::pin(client.oneshot(post(server.url(MODEL))));
    // Run until the first loading response is in and the layer sleeps.
    tokio::select! {
        _ = &mut call => panic!("should still be waiting"),
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    assert_eq!(server.count(), 1);
    drop(call);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_during_a_held_request_cancels_it() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(50), 20.0, true))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let mut call = Box::pin(client.oneshot(post(server.url(MODEL))));
    tokio::select! {
        _ = &mut call => panic!("should still be held"),
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
    assert_eq!(server.count(), 2, "the retry is held by the server");
    drop(call);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(server.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_the_body_is_read_sends_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let backend = tower::service_fn(
        move |_req: Request<RequestBody<http_body_util::channel::Channel<Bytes>>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new()))) }
        },
    );
    let client = ColdStartRetry::new(backend);
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes>::new(1);
    tx.send_data(Bytes::from_static(b"partial")).await.unwrap();
    let call = client.oneshot(Request::post("http://m.test/").body(body).unwrap());
    let result = tokio::time::timeout(Duration::from_secs(1), call).await;
    assert!(result.is_err(), "still reading the body");
    drop(tx);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn the_service_and_its_future_are_send_when_their_parts_are() {
    fn assert_send<T: Send>(_: &T) {}
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    assert_send(&client);
    let future = client.clone().oneshot(post("http://127.0.0.1:1/".into()));
    assert_send(&future);
}

/// A backend that answers "loading" first, then becomes not ready for
/// `stall` (or fails its readiness check), then answers 200.
#[derive(Clone)]
struct Stalling {
    calls: Arc<AtomicUsize>,
    stall: Duration,
    fail_ready: bool,
    sleep: Option<Arc<tokio::sync::Mutex<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Service<Request<RequestBody<Full<Bytes>>>> for Stalling {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.fail_ready {
            return Poll::Ready(Err(std::io::Error::other("backend gone")));
        }
        let sleep = self
            .sleep
            .get_or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Box::pin(tokio::time::sleep(
                    self.stall,
                ))))
            })
            .clone();
        let mut sleep = sleep.try_lock().unwrap();
        sleep.as_mut().poll(cx).map(Ok)
    }

    fn call(&mut self, _: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(if n == 0 {
                hf_server::loading("gpt2", Some("10.0"))
            } else {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            })
        })
    }
}

fn stalling(stall: Duration, fail_ready: bool) -> (Stalling, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = Stalling {
        calls: calls.clone(),
        stall,
        fail_ready,
        sleep: None,
    };
    (service, calls)
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_not_ready_past_the_budget_gets_the_last_503_and_no_retry() {
    let (backend, calls) = stalling(Duration::from_secs(200), false);
    let client = ServiceBuilder::new()
        .layer(
            advised()
                .jitter(false)
                .max_total_wait(Duration::from_secs(60)),
        )
        .service(backend);
    let start = tokio::time::Instant::now();
    let response = client.oneshot(post("http://m.test/".into())).await.unwrap();
    // Slept 10 s, then the service kept us waiting until 210 s: past the
    // 60 s budget, so the last loading response comes back, unretried.
    assert_eq!(start.elapsed(), Duration::from_secs(210));
    assert_eq!(response.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let report = report(&response);
    assert_eq!(report.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_not_ready_within_the_budget_is_waited_for() {
    let (backend, calls) = stalling(Duration::from_secs(5), false);
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(backend);
    let start = tokio::time::Instant::now();
    let response = client.oneshot(post("http://m.test/".into())).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_inner_readiness_error_before_a_retry_reaches_the_caller() {
    let (backend, calls) = stalling(Duration::ZERO, true);
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(backend);
    let error = client
        .oneshot(post("http://m.test/".into()))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "backend gone");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
