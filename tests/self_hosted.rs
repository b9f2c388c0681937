//! Servers users run themselves: each built-in against that server's own
//! bytes over a real socket, a server still booting (connection refused),
//! and the first request held.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{
    self, Classify, ErrorText, KServe, KnownServers, Ollama, Tei, Triton, Vllm,
};
use tower_cold_start::ColdStartRetryLayer;

const JSON: &str = "application/json";

/// A model that answers `times` times with `status` and `body`, then 200.
fn answers(times: usize, status: u16, body: &'static [u8]) -> Model {
    Model::Sequence(vec![
        (
            status,
            vec![("content-type", JSON.to_owned())],
            Bytes::from_static(body)
        );
        times
    ])
}

/// Calls `path` through `classifier`; the status, attempts and body. The
/// readiness route is left out: these pin what each server's answers mean
/// (the route is pinned below).
async fn through<C: Classify>(server: &HfServer, path: &str, classifier: C) -> (u16, u32, Bytes) {
    let layer = ColdStartRetryLayer::new()
        .jitter(false)
        .classifier(classifier.with_readiness_route(|_| None));
    let got = post(layered(layer), server.url(path), &br#"{"inputs":[1]}"#[..]).await;
    (got.status, got.attempts, got.body)
}

#[tokio::test(start_paused = true)]
async fn kserve_v1_and_v2_not_ready_answers_are_waited_out() {
    // kserve python/kserve/kserve/errors.py: ModelNotReady, 503.
    let body = br#"{"error":"Model with name sklearn-iris is not ready."}"#;
    let server = HfServer::start([
        ("/v1/models/sklearn-iris:predict", answers(2, 503, body)),
        ("/v2/models/sklearn-iris/infer", answers(2, 503, body)),
    ])
    .await;
    for path in [
        "/v1/models/sklearn-iris:predict",
        "/v2/models/sklearn-iris/infer",
    ] {
        let (status, attempts, _) = through(&server, path, KServe).await;
        assert_eq!((status, attempts), (200, 3), "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn triton_waits_out_a_version_not_ready_but_not_a_404() {
    // triton core src/model_lifecycle.cc, server src/http_server.cc.
    let not_ready = br#"{"error":"'densenet_onnx' version 1 is not at ready state"}"#;
    let unknown =
        br#"{"error":"Request for unknown model: 'densenet_onnx' has no available versions"}"#;
    let server = HfServer::start([
        ("/v2/models/densenet_onnx/infer", answers(1, 503, not_ready)),
        ("/v2/models/densenet/infer", answers(1, 404, unknown)),
        ("/v2/models/loading/infer", answers(1, 404, unknown)),
    ])
    .await;
    let (status, attempts, _) =
        through(&server, "/v2/models/densenet_onnx/infer", Triton::new()).await;
    assert_eq!((status, attempts), (200, 2));
    let (status, attempts, body) =
        through(&server, "/v2/models/densenet/infer", Triton::new()).await;
    assert_eq!(
        (status, attempts, &body[..]),
        (404, 1, &unknown[..]),
        "a misspelt model fails fast"
    );
    let opted = Triton::new().not_found_while_loading();
    let (status, attempts, _) = through(&server, "/v2/models/loading/infer", opted).await;
    assert_eq!((status, attempts), (200, 2));
}

#[tokio::test(start_paused = true)]
async fn vllm_unavailable_and_sleeping_answers_are_waited_out() {
    // vllm entrypoints/serve/elastic_ep/middleware.py; sleep-mode docs.
    let server = HfServer::start([
        (
            "/v1/completions",
            answers(1, 503, br#"{"error":"Server is unavailable. Please try again later."}"#),
        ),
        (
            "/v1/chat/completions",
            answers(1, 503, br#"{"error":{"message":"Model is sleeping","type":"ServiceUnavailableError","code":503}}"#),
        ),
    ])
    .await;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let (status, attempts, _) = through(&server, path, Vllm).await;
        assert_eq!((status, attempts), (200, 2), "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn ollama_queue_full_backs_off_on_both_routes() {
    // ollama server/sched.go ErrMaxQueue, server/routes.go, openai/openai.go.
    let native =
        br#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#;
    let openai = br#"{"error":{"message":"server busy, please try again.  maximum pending requests exceeded","type":"api_error","param":null,"code":null}}"#;
    let server = HfServer::start([
        ("/api/chat", answers(2, 503, native)),
        ("/v1/chat/completions", answers(2, 503, openai)),
    ])
    .await;
    for path in ["/api/chat", "/v1/chat/completions"] {
        let before = server.received().len();
        let (status, attempts, _) = through(&server, path, Ollama).await;
        assert_eq!((status, attempts), (200, 3), "{path}");
        let offsets: Vec<f64> = server.received()[before..]
            .iter()
            .map(|r| (r.at - server.received()[before].at).as_secs_f64())
            .collect();
        assert_eq!(offsets, [0.0, 1.0, 3.0], "{path}: backoff 1 s, then 2 s");
    }
}

#[tokio::test(start_paused = true)]
async fn tei_overloaded_backs_off_on_both_routes() {
    // text-embeddings-inference router/src/lib.rs ErrorType,
    // router/src/http/types.rs OpenAICompatErrorResponse.
    let server = HfServer::start([
        (
            "/embed",
            answers(
                1,
                429,
                br#"{"error":"Model is overloaded","error_type":"Overloaded"}"#,
            ),
        ),
        (
            "/v1/embeddings",
            answers(
                1,
                429,
                br#"{"message":"Model is overloaded","code":429,"type":"Overloaded"}"#,
            ),
        ),
        (
            "/rate",
            answers(1, 429, br#"{"error":"Rate limit reached"}"#),
        ),
    ])
    .await;
    for path in ["/embed", "/v1/embeddings"] {
        let (status, attempts, _) = through(&server, path, Tei).await;
        assert_eq!((status, attempts), (200, 2), "{path}");
    }
    let (status, attempts, _) = through(&server, "/rate", Tei).await;
    assert_eq!((status, attempts), (429, 1));
}

#[tokio::test(start_paused = true)]
async fn a_general_classifier_covers_another_server_in_one_line() {
    let server =
        HfServer::start([("/predict", answers(1, 503, br#"{"detail":"warming up"}"#))]).await;
    let (status, attempts, _) =
        through(&server, "/predict", ErrorText::new([503], "warming up")).await;
    assert_eq!((status, attempts), (200, 2));
}

/// A port that refuses connections until `up_after`, then serves `models`.
async fn booting(
    up_after: Duration,
    models: Vec<(&'static str, Model)>,
) -> (String, tokio::task::JoinHandle<HfServer>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let boot = tokio::spawn(async move {
        tokio::time::sleep(up_after).await;
        HfServer::start_on(port, models).await
    });
    (format!("http://127.0.0.1:{port}"), boot)
}

#[tokio::test(start_paused = true)]
async fn a_server_still_booting_is_waited_out_and_said_to_be_unreachable() {
    let (base, boot) = booting(
        Duration::from_secs(3),
        vec![
            ("/v2/models/m/infer", Model::Warm),
            ("/v2/models/m/ready", Model::Warm),
        ],
    )
    .await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let layer = ColdStartRetryLayer::new()
        .jitter(false)
        .classifier(KServe)
        .on_retry(move |e| {
            sink.lock()
                .unwrap()
                .push((e.unreachable(), e.behind_probe()))
        });
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let start = Instant::now();
    let request = Request::post(format!("{base}/v2/models/m/infer"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = report(&response);
    assert!(report.unreachable());
    // A small body is its own probe (a check would cost as much), sent at
    // the self-hosted pace: answered within 250 ms of the server coming up.
    assert!(
        start.elapsed() <= Duration::from_millis(3250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(report.checks(), 0);
    assert!(report.attempts() >= 12, "{}", report.attempts());
    let server = boot.await.unwrap();
    let reached: Vec<_> = server
        .received()
        .iter()
        .map(|r| (r.method.clone(), r.uri.path().to_owned()))
        .collect();
    assert_eq!(
        reached,
        [(http::Method::POST, "/v2/models/m/infer".to_owned())],
        "refused attempts reach nothing"
    );
    assert_eq!(&bytes(response).await[..], b"{}");
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .all(|(unreachable, behind)| *unreachable && !*behind));
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_fails_at_once_with_the_clients_own_error_where_it_is_off() {
    let (base, boot) = booting(Duration::from_secs(3), vec![]).await;
    for layer in [
        ColdStartRetryLayer::new(),
        ColdStartRetryLayer::new().classifier(KServe.with_retry_refused(false)),
    ] {
        let client = ServiceBuilder::new().layer(layer).service(http1());
        let start = Instant::now();
        let request = Request::post(format!("{base}/models/m"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let error = client.oneshot(request).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        let client_error = error
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .expect("hyper-util's own error");
        assert!(client_error.is_connect());
    }
    boot.abort();
}

#[tokio::test(start_paused = true)]
async fn a_budget_that_runs_out_while_the_server_is_down_ends_in_unreachable() {
    let (base, boot) = booting(Duration::from_secs(600), vec![]).await;
    let layer = ColdStartRetryLayer::new()
        .classifier(KServe)
        .max_total_wait(Duration::from_secs(5));
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let request = Request::post(format!("{base}/v2/models/m/infer"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    assert!(error.is::<tower_cold_start::Unreachable>(), "{error}");
    let source = std::error::Error::source(&*error).unwrap();
    assert!(source
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some());
    boot.abort();
}

#[tokio::test(start_paused = true)]
async fn callers_of_a_booting_server_wait_behind_one_probe() {
    const N: usize = 20;
    let (base, boot) = booting(
        Duration::from_secs(4),
        vec![
            ("/v2/models/m/infer", Model::Warm),
            ("/v2/models/m/ready", Model::Warm),
        ],
    )
    .await;
    let probes = Arc::new(Mutex::new(0));
    let sink = probes.clone();
    let layer = ColdStartRetryLayer::new()
        .jitter(false)
        .classifier(KServe)
        .on_retry(move |e| {
            if !e.behind_probe() {
                *sink.lock().unwrap() += 1;
            }
        });
    let client = layered(layer);
    let first = tokio::spawn(send(
        client.clone(),
        format!("{base}/v2/models/m/infer"),
        "0",
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rest: Vec<_> = (1..N)
        .map(|n| {
            tokio::spawn(send(
                client.clone(),
                format!("{base}/v2/models/m/infer"),
                n.to_string(),
            ))
        })
        .collect();
    assert_eq!(first.await.unwrap().0, 200);
    for caller in rest {
        assert_eq!(caller.await.unwrap().0, 200);
    }
    let server = boot.await.unwrap();
    // One request per caller once it is up, and at most one readiness
    // check (with company, checks and requests alternate); before, one
    // probe at a time, at most four a second.
    let infer = server
        .received()
        .iter()
        .filter(|r| r.uri.path().ends_with("/infer"))
        .count();
    assert_eq!(infer, N);
    assert!(server.count() <= N + 1, "{}", server.count());
    assert!(
        *probes.lock().unwrap() <= 4 * 4 + 1,
        "{} probes in 4 s",
        probes.lock().unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn callers_arriving_together_on_a_holding_model_cost_one_request_each_when_the_first_is_held()
{
    const N: usize = 50;
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_secs(10)))]).await;
    let client =
        layered(ColdStartRetryLayer::new().classifier(KnownServers.with_hold_first_request(true)));
    let calls: Vec<_> = (0..N)
        .map(|n| tokio::spawn(send(client.clone(), server.url("/models/m"), n.to_string())))
        .collect();
    for call in calls {
        let (status, _, attempts) = call.await.unwrap();
        assert_eq!((status, attempts), (200, 1));
    }
    assert_eq!(server.count(), N, "N requests, not 2N");
    assert!(server
        .received()
        .iter()
        .all(|r| r.headers["x-wait-for-model"] == "true"));
    let _ = classifier::HuggingFace;
}

/// A KServe model loading for 20 s: its infer route answers "not ready",
/// its readiness route 503, until then.
fn kserve_loading(ready_at: Instant) -> Vec<(&'static str, Model)> {
    let not_ready = || Bytes::from_static(br#"{"error":"Model with name m is not ready."}"#);
    vec![
        (
            "/v2/models/m/infer",
            Model::script(move |r, _| match r.at >= ready_at {
                true => (
                    Duration::ZERO,
                    (200, vec![], Bytes::from_static(b"{\"outputs\":[]}")),
                ),
                false => (Duration::ZERO, (503, vec![], not_ready())),
            }),
        ),
        (
            "/v2/models/m/ready",
            Model::script(move |r, _| match r.at >= ready_at {
                true => (Duration::ZERO, (200, vec![], Bytes::new())),
                false => (Duration::ZERO, (503, vec![], Bytes::new())),
            }),
        ),
    ]
}

/// Bytes of request bodies the server received, and its requests.
async fn upload_during_a_20_s_load(layer: ColdStartRetryLayer) -> (usize, Vec<Received>) {
    let start = Instant::now();
    let server = HfServer::start(kserve_loading(start + Duration::from_secs(20))).await;
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let upload = Bytes::from(vec![7u8; 1024 * 1024]);
    let request = Request::post(server.url("/v2/models/m/infer"))
        .header("authorization", "Bearer t")
        .body(Full::new(upload.clone()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = server.received();
    let infer: Vec<_> = received
        .iter()
        .filter(|r| r.uri.path().ends_with("/infer"))
        .collect();
    assert!(
        infer.iter().all(|r| r.body == upload),
        "the upload, byte for byte"
    );
    (received.iter().map(|r| r.body.len()).sum(), received)
}

#[tokio::test(start_paused = true)]
async fn a_readiness_route_is_polled_so_a_large_upload_is_not_resent_every_second() {
    let layer = ColdStartRetryLayer::new().jitter(false).classifier(KServe);
    let (with_route, received) = upload_during_a_20_s_load(layer.clone()).await;
    let without = ColdStartRetryLayer::new()
        .jitter(false)
        .classifier(KServe.with_readiness_route(|_| None));
    let (without_route, resent) = upload_during_a_20_s_load(without).await;
    println!(
        "1 MiB upload, 20 s load: {with_route} body bytes upstream with the readiness route \
         ({} requests), {without_route} without ({} requests)",
        received.len(),
        resent.len()
    );
    // The upload goes out twice: the first request, and once the route
    // answers ready. The polls in between are empty GETs with the caller's
    // credentials.
    assert_eq!(with_route, 2 * 1024 * 1024);
    let checks: Vec<_> = received
        .iter()
        .filter(|r| r.uri.path().ends_with("/ready"))
        .collect();
    assert!(!checks.is_empty());
    for check in &checks {
        assert_eq!(check.method, http::Method::GET);
        assert!(check.body.is_empty());
        assert_eq!(check.headers["authorization"], "Bearer t");
        assert!(!check.headers.contains_key("content-length"));
    }
    assert!(
        without_route >= 10 * 1024 * 1024,
        "resent at every poll: {without_route}"
    );
    // Used the moment it is ready, either way: the real request follows
    // the first ready answer at once.
    let last_check = checks.last().unwrap().at;
    assert_eq!(received.last().unwrap().at, last_check);
}
