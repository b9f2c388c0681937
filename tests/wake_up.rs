//! The wake-up strategies and the model key, on the wire with paused time.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_cold_start::classifier::RetryAfter;
use tower_cold_start::{ColdStartRetryLayer, WaitStrategy};

const MODEL: &str = "/models/gpt2";

fn millis(offsets: &[f64]) -> Vec<u64> {
    offsets
        .iter()
        .map(|s| (s * 1000.0).round() as u64)
        .collect()
}

fn held(server: &HfServer) -> Vec<bool> {
    server
        .received()
        .iter()
        .map(|r| r.headers.get("x-wait-for-model").is_some())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn adaptive_sends_a_held_retry_after_1s_and_a_holding_server_answers_when_ready() {
    // Recorded pair: 20 s announced, 24 s taken.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let start = Instant::now();
    let (status, at, attempts) =
        send(layered(ColdStartRetryLayer::new()), server.url(MODEL), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(at - start, Duration::from_secs(24), "no lag");
    assert_eq!(attempts, 2);
    assert_eq!(millis(&server.offsets()), [0, 1000]);
    assert_eq!(held(&server), [false, true]);
}

#[tokio::test(start_paused = true)]
async fn adaptive_polls_a_server_that_does_not_hold_1s_then_1_5s_then_every_2s() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(10), 20.0, false),
    )])
    .await;
    let start = Instant::now();
    let (status, at, attempts) =
        send(layered(ColdStartRetryLayer::new()), server.url(MODEL), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(
        millis(&server.offsets()),
        [0, 1000, 2500, 4500, 6500, 8500, 10500]
    );
    assert_eq!(at - start, Duration::from_millis(10_500));
    assert_eq!(attempts, 7);
    // Every retry still asks to be held: harmless here, and the server may
    // start holding.
    assert_eq!(held(&server), [false, true, true, true, true, true, true]);
}

#[tokio::test(start_paused = true)]
async fn a_hold_that_times_out_with_model_too_busy_is_followed_at_once() {
    // Loads for 100 s; the server holds a request for at most 60 s, then
    // answers 500 "Model too busy".
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(100), 20.0, true),
    )])
    .await;
    let start = Instant::now();
    let (status, at, attempts) =
        send(layered(ColdStartRetryLayer::new()), server.url(MODEL), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(at - start, Duration::from_secs(100));
    assert_eq!(attempts, 3);
    assert_eq!(millis(&server.offsets()), [0, 1000, 61000]);
}

#[tokio::test(start_paused = true)]
async fn adaptive_honours_a_retry_after_as_given() {
    let loading = || {
        (
            503,
            vec![("retry-after", "7".to_owned())],
            Bytes::from_static(b"starting"),
        )
    };
    let server = HfServer::start([(MODEL, Model::Sequence(vec![loading(), loading()]))]).await;
    let layer = ColdStartRetryLayer::new()
        .classifier(RetryAfter::new())
        .jitter(false);
    let (status, _, attempts) = send(layered(layer), server.url(MODEL), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(attempts, 3);
    assert_eq!(millis(&server.offsets()), [0, 7000, 14000]);
}

#[tokio::test(start_paused = true)]
async fn poll_sends_one_request_per_interval_and_is_floored_at_100ms() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(2), 20.0, false))]).await;
    let layer = ColdStartRetryLayer::new()
        .wait_strategy(WaitStrategy::FixedInterval(Duration::from_millis(500)));
    let (status, _, _) = send(layered(layer), server.url(MODEL), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(millis(&server.offsets()), [0, 500, 1000, 1500, 2000]);

    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_millis(300), 20.0, false),
    )])
    .await;
    let layer =
        ColdStartRetryLayer::new().wait_strategy(WaitStrategy::FixedInterval(Duration::ZERO));
    let (status, _, _) = send(layered(layer), server.url(MODEL), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(millis(&server.offsets()), [0, 100, 200, 300]);
}

#[tokio::test(start_paused = true)]
async fn by_default_a_model_that_never_loads_is_polled_within_the_budget() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let start = Instant::now();
    let (status, at, attempts) =
        send(layered(ColdStartRetryLayer::new()), server.url(MODEL), "{}").await;
    assert_eq!(status, 503, "the last loading answer");
    assert!(at - start <= Duration::from_secs(120));
    let offsets = server.offsets();
    assert_eq!(attempts as usize, offsets.len());
    // Alone, against a server that does not hold: 0, 1, 2.5 s, then every
    // 2 s to 118.5 s, and a last one as the budget ends at 120 s; never more
    // than one request per second.
    assert_eq!(offsets.len(), 62);
    assert_eq!(offsets[60..], [118.5, 120.0]);
    assert!(offsets.windows(2).all(|w| w[1] - w[0] >= 1.0));
    assert!(*offsets.last().unwrap() <= 120.0);
}

#[tokio::test(start_paused = true)]
async fn with_company_the_probe_polls_every_second_and_releases_everyone() {
    // Does not hold; ready 10.3 s after the first request.
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_millis(10_300), 20.0, false),
    )])
    .await;
    let client = layered(ColdStartRetryLayer::new());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(send(client.clone(), server.url(MODEL), "caller 0"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 1..50 {
        tasks.spawn(send(
            client.clone(),
            server.url(MODEL),
            format!("caller {n}"),
        ));
    }
    let mut done = Vec::new();
    while let Some(result) = tasks.join_next().await {
        done.push(result.unwrap());
    }
    assert!(done.iter().all(|(status, _, _)| *status == 200));
    let offsets = millis(&server.offsets());
    // The first request, polls at 1..=11 s (the last finds the model
    // ready), then each of the 49 waiters once.
    let polls: Vec<u64> = (1..=11).map(|s| s * 1000).collect();
    assert_eq!(offsets[..12], [&[0][..], &polls[..]].concat()[..]);
    assert_eq!(offsets.len(), 1 + 11 + 49);
    assert!(offsets[12..].iter().all(|&ms| ms == 11_000));
    for (_, at, _) in &done {
        assert_eq!(*at - start, Duration::from_secs(11));
    }
}

#[tokio::test(start_paused = true)]
async fn a_sleeping_probe_wakes_when_another_request_finds_the_model_warm() {
    // The prober sleeps 20 s (`Advised`); another request, held by the
    // server since before the model was known cold, comes back 200 at 10 s.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(10), 20.0, true))]).await;
    let client = layered(
        ColdStartRetryLayer::new()
            .wait_strategy(WaitStrategy::SleepEstimate)
            .jitter(false),
    );
    let start = Instant::now();
    let prober = tokio::spawn(send(client.clone(), server.url(MODEL), "a"));
    tokio::task::yield_now().await;
    let held_request = Request::post(server.url(MODEL))
        .header("x-wait-for-model", "true")
        .body(Full::new(Bytes::from_static(b"b")))
        .unwrap();
    let other = tokio::spawn(client.clone().oneshot(held_request));
    let (status, at, attempts) = prober.await.unwrap();
    assert_eq!(other.await.unwrap().unwrap().status(), 200);
    assert_eq!(status, 200);
    assert_eq!(attempts, 2);
    assert_eq!(
        at - start,
        Duration::from_secs(10),
        "woken by the other answer, not by its 20 s timer"
    );
}

fn by_model_field(layer: ColdStartRetryLayer) -> ColdStartRetryLayer {
    layer.model_key(|_uri, _headers, body| {
        let json: serde_json::Value = serde_json::from_slice(body).ok()?;
        Some(json.get("model")?.as_str()?.to_owned())
    })
}

#[tokio::test(start_paused = true)]
async fn a_model_key_separates_models_behind_one_url_and_groups_each() {
    const CHAT: &str = "/v1/chat/completions";
    let server =
        HfServer::start([(CHAT, Model::cold_with(Duration::from_secs(5), 20.0, false))]).await;
    let client = layered(by_model_field(ColdStartRetryLayer::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let body = |model: &str, n: u32| format!(r#"{{"model":"{model}","n":{n}}}"#);
    tasks.spawn(send(client.clone(), server.url(CHAT), body("a", 0)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.count(), 1);
    // Model "a" is cold: these wait for its probe.
    for n in 1..5 {
        tasks.spawn(send(client.clone(), server.url(CHAT), body("a", n)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.count(), 1, "callers of model a wait");
    // Model "b", same URL, is not known cold: it goes upstream. So does a
    // request the key function cannot key.
    tasks.spawn(send(client.clone(), server.url(CHAT), body("b", 9)));
    tasks.spawn(send(client.clone(), server.url(CHAT), "not json"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.count(), 3, "model b and the unkeyed request went up");
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().0, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_model_key_one_url_is_one_model() {
    const CHAT: &str = "/v1/chat/completions";
    let server =
        HfServer::start([(CHAT, Model::cold_with(Duration::from_secs(5), 20.0, false))]).await;
    let client = layered(ColdStartRetryLayer::new());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(send(client.clone(), server.url(CHAT), r#"{"model":"a"}"#));
    tokio::time::sleep(Duration::from_millis(100)).await;
    tasks.spawn(send(client.clone(), server.url(CHAT), r#"{"model":"b"}"#));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.count(), 1, "model b waits: same URL");
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().0, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn a_crowd_asks_a_model_that_never_loads_once_a_second_even_as_probers_give_up() {
    let server = HfServer::start([(MODEL, Model::never_loads("1809.18"))]).await;
    let client = layered(ColdStartRetryLayer::new().max_total_wait(Duration::from_secs(30)));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..20u64 {
        let client = client.clone();
        let url = server.url(MODEL);
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * n)).await;
            send(client, url, format!("caller {n}")).await
        });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().0, 503, "the last loading answer");
    }
    let offsets = millis(&server.offsets());
    // One request per second while the first prober's budget lasts (to
    // 30 s); as each later caller's budget ends (30.05 s, 30.1 s, ...) it
    // takes the probe over, and keeps to the pace: it gives up without a
    // request when its budget ends before the next second is due.
    assert!(
        offsets.windows(2).all(|w| w[1] - w[0] >= 1000),
        "{offsets:?}"
    );
    assert!(offsets.len() <= 32, "{}", offsets.len());
}
