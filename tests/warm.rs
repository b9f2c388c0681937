//! `warm_up` at start-up and `KeepWarm` in the background, through the
//! caller's own stack, against the test server.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_cold_start::warm::{keep_warm, warm_up, KeepWarmSchedule, WarmUpOutcome};
use tower_cold_start::ColdStartRetryLayer;

const MODEL: &str = "/models/gpt2";

fn ping(url: String) -> impl Fn() -> Request<Full<Bytes>> + Send + 'static {
    move || {
        Request::post(url.as_str())
            .header("authorization", "Bearer hf_app")
            .body(Full::new(Bytes::from_static(br#"{"inputs":"ping"}"#)))
            .unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn warm_up_resolves_when_the_model_answers_warm() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let start = Instant::now();
    let outcome = warm_up(client, ping(server.url(MODEL)), Duration::from_secs(300)).await;
    let WarmUpOutcome::Warm {
        status,
        report,
        calls,
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!((status.as_u16(), calls), (200, 1));
    assert_eq!(report.unwrap().attempts(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(24));
    // Through the caller's stack: its credentials went upstream.
    assert!(server
        .received()
        .iter()
        .all(|r| r.headers["authorization"] == "Bearer hf_app"));
}

#[tokio::test(start_paused = true)]
async fn warm_up_calls_again_when_the_layer_budget_ends_first() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(90), 20.0, false),
    )])
    .await;
    let client = ServiceBuilder::new()
        .layer(
            ColdStartRetryLayer::new()
                .jitter(false)
                .max_total_wait(Duration::from_secs(30)),
        )
        .service(http1());
    let outcome = warm_up(client, ping(server.url(MODEL)), Duration::from_secs(300)).await;
    let WarmUpOutcome::Warm { calls, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(calls >= 2, "{calls}");
}

#[tokio::test(start_paused = true)]
async fn warm_up_keeps_trying_on_whatever_the_layers_classifier_calls_cold() {
    // TEI's overload (a 429), and a gateway of the user's own that answers
    // 425 while its model boots: cold starts to the classifier, not 503s.
    let tei = br#"{"error":"Model is overloaded","error_type":"Overloaded"}"#;
    for (status, body) in [(429, &tei[..]), (425, &b"booting"[..])] {
        let start = Instant::now();
        let ready_at = start + Duration::from_secs(8);
        let server = HfServer::start([(
            MODEL,
            Model::script(move |r, _| match r.at >= ready_at {
                true => (Duration::ZERO, (200, vec![], Bytes::from_static(b"[]"))),
                false => (Duration::ZERO, (status, vec![], Bytes::from_static(body))),
            }),
        )])
        .await;
        let ours = tower_cold_start::classifier::from_fn(|r| {
            (r.status() == 425).then(|| {
                tower_cold_start::classifier::ColdStart::new(
                    tower_cold_start::classifier::Hint::Unknown,
                )
            })
        });
        let layer = ColdStartRetryLayer::new()
            .classifier(tower_cold_start::classifier::Classify::or(
                ours,
                tower_cold_start::classifier::KnownServers,
            ))
            .max_total_wait(Duration::from_secs(3));
        let client = ServiceBuilder::new().layer(layer).service(http1());
        let outcome = warm_up(client, ping(server.url(MODEL)), Duration::from_secs(60)).await;
        let WarmUpOutcome::Warm { calls, .. } = outcome else {
            panic!("{status}: {outcome:?}");
        };
        assert!(calls >= 2, "{status}: {calls} calls");
    }
}

#[tokio::test(start_paused = true)]
async fn warm_up_times_out_at_its_deadline() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let start = Instant::now();
    let outcome = warm_up(client, ping(server.url(MODEL)), Duration::from_secs(45)).await;
    assert!(
        matches!(outcome, WarmUpOutcome::TimedOut { .. }),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(45));
}

#[tokio::test(start_paused = true)]
async fn warm_up_stops_at_once_on_an_answer_waiting_cannot_fix() {
    let server = HfServer::start([(
        MODEL,
        Model::fixed(
            401,
            "application/json",
            &b"{\"error\":\"Invalid credentials\"}"[..],
        ),
    )])
    .await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let start = Instant::now();
    let outcome = warm_up(client, ping(server.url(MODEL)), Duration::from_secs(300)).await;
    let WarmUpOutcome::Failed(error) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(error.to_string().contains("401"), "{error}");
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn keep_warm_pings_at_its_interval_without_overlap_and_stops_when_dropped() {
    let server = HfServer::start([(MODEL, Model::Warm)]).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let schedule = KeepWarmSchedule::new()
        .interval(Duration::from_secs(60))
        .jitter(false);
    let keep = keep_warm(client, ping(server.url(MODEL)), schedule);
    tokio::time::sleep(Duration::from_secs(60 * 10 + 30)).await;
    assert!(keep.is_running());
    // At 0, 60, ..., 600 s.
    assert_eq!(server.count(), 11);
    let received = server.received();
    for pair in received.windows(2) {
        assert_eq!((pair[1].at - pair[0].at).as_secs(), 60);
    }
    drop(keep);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(server.count(), 11, "no ping after the handle is dropped");
}

#[tokio::test(start_paused = true)]
async fn keep_warm_jitters_within_ten_percent() {
    let server = HfServer::start([(MODEL, Model::Warm)]).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let keep = keep_warm(client, ping(server.url(MODEL)), KeepWarmSchedule::new());
    tokio::time::sleep(Duration::from_secs(15 * 60 * 20)).await;
    keep.stop();
    let received = server.received();
    assert!(received.len() >= 18, "{}", received.len());
    let gaps: Vec<f64> = received
        .windows(2)
        .map(|p| (p[1].at - p[0].at).as_secs_f64())
        .collect();
    assert!(gaps.iter().all(|g| (810.0..=990.0).contains(g)), "{gaps:?}");
    assert!(
        gaps.iter().any(|g| (g - 900.0).abs() > 1.0),
        "jittered: {gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn keep_warm_logs_failures_and_carries_on() {
    // Nothing listens here: every ping fails to connect.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}{MODEL}", listener.local_addr().unwrap());
    drop(listener);
    let server = HfServer::start([(MODEL, Model::Warm)]).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let good = server.url(MODEL);
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = n.clone();
    // Fail twice, then reach the server.
    let request = move || {
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let url = if i < 2 { dead.clone() } else { good.clone() };
        Request::post(url)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let schedule = KeepWarmSchedule::new()
        .interval(Duration::from_secs(60))
        .jitter(false);
    let keep = keep_warm(client, request, schedule);
    tokio::time::sleep(Duration::from_secs(60 * 4 + 30)).await;
    assert!(keep.is_running());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(server.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn warm_up_against_a_refused_port_times_out_with_the_last_error() {
    // A port nobody listens on: every connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let url = format!("http://127.0.0.1:{port}{MODEL}");
    let start = Instant::now();
    let outcome = warm_up(client, ping(url), Duration::from_secs(3)).await;
    let WarmUpOutcome::TimedOut {
        last_status: None,
        last_error: Some(error),
        calls,
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(calls >= 3, "called again each second: {calls}");
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    let mut refused = false;
    while let Some(e) = source {
        refused |= e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        source = e.source();
    }
    assert!(refused, "the client's own error: {error:?}");
}
