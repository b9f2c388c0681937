//! Readiness routes as real deployments have them (missing, slow, hanging,
//! lying, server-wide, slower than the model) over a real socket: a route
//! may make a call cheaper, never later or wrong, and nothing is sent past
//! the budget.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{Classify, KServe, KnownServers};
use tower_cold_start::{ColdStartReport, ColdStartRetryLayer, GaveUp};

const NOT_READY: &[u8] = br#"{"error":"Model with name m is not ready."}"#;
const INFER: &str = "/v2/models/m/infer";
const READY: &str = "/v2/models/m/ready";

/// A large upload: a readiness check pays for it.
fn upload() -> Bytes {
    Bytes::from(vec![7u8; 1024 * 1024])
}

/// KServe's infer route: "not ready" until `ready_at`, then an echo.
fn infer_ready_at(ready_at: Instant) -> Model {
    Model::script(move |r, _| {
        if r.at >= ready_at {
            (Duration::ZERO, (200, vec![], r.body.clone()))
        } else {
            (Duration::ZERO, (503, vec![], Bytes::from_static(NOT_READY)))
        }
    })
}

/// A truthful readiness route: `503` until `ready_at`, then `200`.
fn truthful_route(ready_at: Instant) -> Model {
    Model::script(move |r, _| {
        let status = if r.at >= ready_at { 200 } else { 503 };
        (Duration::ZERO, (status, vec![], Bytes::new()))
    })
}

/// A readiness route that answers `status` after `delay`, always.
fn route(status: u16, delay: Duration) -> Model {
    Model::script(move |_, _| (delay, (status, vec![], Bytes::new())))
}

fn kserve(budget: Duration) -> ColdStartRetryLayer {
    ColdStartRetryLayer::new()
        .jitter(false)
        .classifier(KServe)
        .max_total_wait(budget)
}

/// Posts `body` to the server's infer route; the status, report and body.
async fn post(
    layer: ColdStartRetryLayer,
    server: &HfServer,
    body: Bytes,
) -> (u16, ColdStartReport, Bytes) {
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let request = Request::post(server.url(INFER))
        .body(Full::new(body))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let report = report(&response);
    (status, report, bytes(response).await)
}

fn posts(server: &HfServer) -> Vec<Received> {
    server
        .received()
        .into_iter()
        .filter(|r| r.uri.path() == INFER)
        .collect()
}

fn checks(server: &HfServer) -> Vec<Received> {
    server
        .received()
        .into_iter()
        .filter(|r| r.uri.path() == READY)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn no_attempt_or_check_starts_after_the_budget_when_checks_are_slow() {
    // The route answers 200 after 4 s; the budget is 3 s; the model never
    // gets ready.
    let start = Instant::now();
    let server = HfServer::start([
        (INFER, infer_ready_at(start + Duration::from_secs(3600))),
        (READY, route(200, Duration::from_secs(4))),
    ])
    .await;
    let (status, report, body) = post(kserve(Duration::from_secs(3)), &server, upload()).await;
    assert_eq!(
        (status, &body[..]),
        (503, NOT_READY),
        "the latest answer, as it came"
    );
    assert_eq!(report.gave_up(), Some(GaveUp::Budget));
    assert!(
        start.elapsed() <= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let first = posts(&server)[0].at;
    for r in server.received() {
        assert!(
            r.at - first <= Duration::from_secs(3),
            "{} at {:?}",
            r.uri,
            r.at - first
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_hanging_check_has_a_deadline_and_the_request_goes_instead() {
    let start = Instant::now();
    let server = HfServer::start([
        (INFER, infer_ready_at(start + Duration::from_millis(100))),
        (READY, route(200, Duration::from_secs(3600))),
    ])
    .await;
    let (status, report, body) = post(kserve(Duration::from_secs(4)), &server, upload()).await;
    assert_eq!((status, body), (200, upload()));
    // One check, cut at 2 s; the request then goes at once.
    assert_eq!((report.checks(), report.attempts()), (1, 2));
    assert!(
        start.elapsed() <= Duration::from_millis(2300),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_route_that_never_answers_ready_or_not_ready_is_dropped_and_the_request_goes() {
    // 404 (no such route), 401 (wants what the route does not get), 302, 500
    // and MLServer's 400 with no body.
    for status in [404, 401, 302, 500, 400] {
        let start = Instant::now();
        let server = HfServer::start([
            (INFER, infer_ready_at(start + Duration::from_millis(1))),
            (READY, route(status, Duration::ZERO)),
        ])
        .await;
        let (got, report, body) = post(kserve(Duration::from_secs(6)), &server, upload()).await;
        assert_eq!((got, body), (200, upload()), "{status}");
        assert_eq!((report.checks(), report.attempts()), (1, 2), "{status}");
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "{status}: {:?}",
            start.elapsed()
        );
        // Dropped for this model: a second call sends no check at all.
        let (_, again, _) = post(kserve(Duration::from_secs(6)), &server, upload()).await;
        assert_eq!(again.checks(), 0, "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_carries_the_callers_query_where_credentials_travel() {
    let start = Instant::now();
    let server = HfServer::start([
        (INFER, infer_ready_at(start + Duration::from_millis(400))),
        (
            READY,
            Model::script(|r, _| match r.uri.query() == Some("api_key=secret") {
                true => (Duration::ZERO, (200, vec![], Bytes::new())),
                false => (Duration::ZERO, (401, vec![], Bytes::new())),
            }),
        ),
    ])
    .await;
    let client = ServiceBuilder::new()
        .layer(kserve(Duration::from_secs(6)))
        .service(http1());
    let request = Request::post(server.url(&format!("{INFER}?api_key=secret")))
        .body(Full::new(upload()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let checks = checks(&server);
    assert!(!checks.is_empty());
    assert!(checks
        .iter()
        .all(|c| c.uri.query() == Some("api_key=secret")));
}

#[tokio::test(start_paused = true)]
async fn after_a_boot_a_missing_route_does_not_stall_a_server_that_answers() {
    // Refused for 1 s, then the model answers 200 at once and /ready is 404.
    let port = support::wire::refusing_port();
    let boot = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        HfServer::start_on(
            port,
            vec![(INFER, Model::Warm), (READY, route(404, Duration::ZERO))],
        )
        .await
    });
    let start = Instant::now();
    let client = ServiceBuilder::new()
        .layer(kserve(Duration::from_secs(6)))
        .service(http1());
    let request = Request::post(format!("http://127.0.0.1:{port}{INFER}"))
        .body(Full::new(upload()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(report(&response).unreachable());
    assert!(
        start.elapsed() < Duration::from_millis(1600),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(bytes(response).await, upload());
    let server = boot.await.unwrap();
    assert_eq!(posts(&server).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_route_that_says_ready_while_the_model_is_not_is_trusted_no_more() {
    // Server-wide health (vLLM) or a model route ready while the version
    // asked for loads (Triton): 200 from the route, "not ready" from the
    // model for 10 s.
    let start = Instant::now();
    let ready_at = start + Duration::from_secs(10);
    let server = HfServer::start([
        (INFER, infer_ready_at(ready_at)),
        (READY, route(200, Duration::ZERO)),
    ])
    .await;
    let (status, report, body) = post(kserve(Duration::from_secs(30)), &server, upload()).await;
    assert_eq!((status, body), (200, upload()));
    // One check, then never again: the route lied once.
    assert_eq!(report.checks(), 1);
    assert_eq!(checks(&server).len(), 1);
    // Without a route a large body is resent at the usual pace (at most
    // one a second), not the self-hosted pace.
    let posts = posts(&server);
    assert!(posts.len() <= 12, "{} uploads in 10 s", posts.len());
    assert!(posts.iter().all(|r| r.body == upload()));
    let lag = posts.last().unwrap().at - ready_at;
    assert!(lag <= Duration::from_secs(2), "{lag:?}");
}

#[tokio::test(start_paused = true)]
async fn with_a_truthful_route_a_large_upload_goes_out_twice_at_most() {
    let start = Instant::now();
    let ready_at = start + Duration::from_secs(10);
    let server = HfServer::start([
        (INFER, infer_ready_at(ready_at)),
        (READY, truthful_route(ready_at)),
    ])
    .await;
    let (status, report, _) = post(kserve(Duration::from_secs(30)), &server, upload()).await;
    assert_eq!(status, 200);
    assert_eq!(report.attempts(), 2);
    assert_eq!(posts(&server).len(), 2);
    // Checked at the self-hosted pace: used within 250 ms of ready.
    assert!(posts(&server)[1].at - ready_at <= Duration::from_millis(250));
    assert!(
        report.checks() <= 4 * 10 + 1,
        "{} checks in 10 s",
        report.checks()
    );
}

/// LitServe with two workers: refused until the first is up (1 s), then
/// `/predict` answers while `/health` says `503 not ready` until every
/// worker is (8 s).
async fn litserve(n: usize) -> (Vec<Duration>, usize) {
    let port = support::wire::refusing_port();
    let start = Instant::now();
    let up = start + Duration::from_secs(1);
    let all_up = start + Duration::from_secs(8);
    let boot = tokio::spawn(async move {
        tokio::time::sleep_until(up).await;
        HfServer::start_on(
            port,
            vec![
                ("/predict", Model::Warm),
                (
                    "/health",
                    Model::script(move |r, _| match r.at >= all_up {
                        true => (Duration::ZERO, (200, vec![], Bytes::from_static(b"ok"))),
                        false => (
                            Duration::ZERO,
                            (503, vec![], Bytes::from_static(b"not ready")),
                        ),
                    }),
                ),
            ],
        )
        .await
    });
    let classifier = KnownServers
        .with_retry_refused(true)
        .with_readiness_route(move |uri| {
            format!("http://{}/health", uri.authority()?).parse().ok()
        });
    let layer = ColdStartRetryLayer::new().classifier(classifier);
    let client = layered(layer);
    let calls: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(send(
                client.clone(),
                format!("http://127.0.0.1:{port}/predict"),
                i.to_string(),
            ))
        })
        .collect();
    let mut lags = Vec::new();
    for call in calls {
        let (status, at, _) = call.await.unwrap();
        assert_eq!(status, 200);
        lags.push(at - up);
    }
    let server = boot.await.unwrap();
    (lags, server.count())
}

#[tokio::test(start_paused = true)]
async fn a_route_slower_than_the_model_does_not_delay_one_caller_or_twenty() {
    for n in [1, 20] {
        let (lags, requests) = litserve(n).await;
        let worst = lags.iter().max().unwrap();
        assert!(
            *worst <= Duration::from_millis(500),
            "{n} callers: {worst:?} after the model could serve"
        );
        println!("LitServe-like, {n} callers: worst lag {worst:?}, {requests} requests reached the server");
    }
}

#[tokio::test(start_paused = true)]
async fn the_event_attempt_moves_with_every_poll_checks_included() {
    let start = Instant::now();
    let ready_at = start + Duration::from_secs(3);
    let server = HfServer::start([
        (INFER, infer_ready_at(ready_at)),
        (READY, truthful_route(ready_at)),
    ])
    .await;
    let attempts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = attempts.clone();
    let layer =
        kserve(Duration::from_secs(30)).on_retry(move |e| sink.lock().unwrap().push(e.attempt()));
    let (status, report, _) = post(layer, &server, upload()).await;
    assert_eq!(status, 200);
    let attempts = attempts.lock().unwrap().clone();
    assert!(attempts.len() >= 3, "{attempts:?}");
    assert!(
        attempts.windows(2).all(|w| w[1] == w[0] + 1),
        "{attempts:?}"
    );
    // The first request, then every check but the last (which said ready).
    assert_eq!(*attempts.last().unwrap(), report.checks());
}
/// 20 callers of a llama.cpp in single-model mode (every route answers the
/// loading 503 until the model is loaded at `ready_after`; a completion then
/// takes 1 s to generate): when each caller's answered request left, after
/// ready.
async fn llama_crowd(ready_after: Duration) -> Vec<Duration> {
    const N: usize = 20;
    let loading = Bytes::from_static(
        br#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#,
    );
    let ready_at = Instant::now() + ready_after;
    let answer = move |generation: Duration| {
        let loading = loading.clone();
        Model::script(move |r, _| match r.at >= ready_at {
            true => (generation, (200, vec![], r.body.clone())),
            false => (Duration::ZERO, (503, vec![], loading.clone())),
        })
    };
    let server = HfServer::start([
        ("/v1/completions", answer(Duration::from_secs(1))),
        ("/health", answer(Duration::ZERO)),
    ])
    .await;
    let client =
        layered(ColdStartRetryLayer::new().classifier(tower_cold_start::classifier::LlamaCpp));
    let calls: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(send(
                client.clone(),
                server.url("/v1/completions"),
                i.to_string(),
            ))
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().0, 200);
    }
    let sent: Vec<_> = server
        .received()
        .into_iter()
        .filter(|r| r.uri.path() == "/v1/completions" && r.at >= ready_at)
        .map(|r| r.at - ready_at)
        .collect();
    assert_eq!(sent.len(), N, "each caller once, once ready");
    sent
}

#[tokio::test(start_paused = true)]
async fn a_truthful_route_releases_a_crowd_before_the_probes_own_slow_answer() {
    // With company, checks and requests alternate (every 250 ms here). When
    // the first probe after ready is a check, /health releases everyone at
    // once, without waiting for the probe's own 1 s generation.
    let mut phases = Vec::new();
    for ms in [3900, 4000, 4100, 4200] {
        let sent = llama_crowd(Duration::from_millis(ms)).await;
        phases.push(*sent.iter().max().unwrap());
    }
    println!("llama.cpp-like crowd, 20 callers, latest send after ready per phase: {phases:?}");
    assert!(
        phases.iter().any(|lag| *lag <= Duration::from_millis(250)),
        "{phases:?}"
    );
    // When it is the request, its own answer releases them, as without a
    // route: never later.
    assert!(
        phases.iter().all(|lag| *lag <= Duration::from_millis(1350)),
        "{phases:?}"
    );
}
