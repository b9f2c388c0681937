//! Rules 3 (waiting), 4 (bounds) and 5 (report), on the wire with paused time.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tower::{ServiceBuilder, ServiceExt};

const MODEL: &str = "/models/distilbert/distilbert-base-uncased-finetuned-sst-2-english";

const INPUT: &[u8] = br#"{"inputs":"I like you."}"#;

fn secs(v: &[f64]) -> Vec<u64> {
    v.iter().map(|s| s.round() as u64).collect()
}

#[tokio::test(start_paused = true)]
async fn warm_model_costs_one_request_and_reports_no_wait() {
    let server = HfServer::start([(MODEL, Model::Warm)]).await;
    let Outcome {
        response, report, ..
    } = post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.body(),
        &Bytes::from_static(br#"{"inputs":"I like you."}"#)
    );
    assert_eq!(server.count(), 1);
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.waited(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn sleeps_estimated_time_then_retries_with_the_hold_header() {
    // Ready after 10 s, estimate 20 s: the retry goes out at 20 s and succeeds.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(10), 20.0, true))]).await;
    let Outcome {
        response, report, ..
    } = post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 200);
    assert_eq!(secs(&server.offsets()), [0, 20]);
    let received = server.received();
    assert_eq!(received[0].headers.get("x-wait-for-model"), None);
    assert_eq!(received[1].headers["x-wait-for-model"], "true");
    assert_eq!(report.attempts(), 2);
    assert_eq!(report.waited(), Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn a_holding_server_answers_the_retry_the_moment_the_model_is_ready() {
    // Recorded pair: estimate 20, actual 24. The retry at 20 s is held for 4 s.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let start = tokio::time::Instant::now();
    let Outcome {
        response, report, ..
    } = post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 200);
    assert_eq!(start.elapsed().as_secs(), 24);
    assert_eq!(server.count(), 2);
    assert_eq!(report.attempts(), 2);
    assert_eq!(report.waited(), Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn without_the_hold_header_a_slow_model_takes_another_round() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let Outcome {
        response, report, ..
    } = post(
        layered(advised().jitter(false).hold_retries(false)),
        server.url(MODEL),
        INPUT,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(secs(&server.offsets()), [0, 20, 40]);
    assert!(server
        .received()
        .iter()
        .all(|r| r.headers.get("x-wait-for-model").is_none()));
    assert_eq!(report.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_hold_header_set_by_the_caller_is_left_as_it_is() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(5), 20.0, false))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let request = Request::post(server.url(MODEL))
        .header("x-wait-for-model", "1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = server.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        let values: Vec<_> = r.headers.get_all("x-wait-for-model").iter().collect();
        assert_eq!(values, ["1"]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_large_estimate_is_capped_by_max_wait() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(30), 1809.18, false),
    )])
    .await;
    let Outcome { response, .. } =
        post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 200);
    assert_eq!(secs(&server.offsets()), [0, 60]);
}

#[tokio::test(start_paused = true)]
async fn fractional_estimates_are_followed_to_the_millisecond() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(30), 32.137, false),
    )])
    .await;
    let Outcome { report, .. } =
        post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    let at = server.offsets()[1];
    assert!((at - 32.137).abs() < 0.002, "retry at {at}");
    assert_eq!(report.waited().as_millis(), 32137);
}

#[tokio::test(start_paused = true)]
async fn unusable_estimates_mean_the_default_wait() {
    for estimate in [
        None,
        Some("null"),
        Some(r#""20""#),
        Some("-5"),
        Some("1e400"),
        Some("true"),
        Some("{}"),
    ] {
        let server = HfServer::start([(
            MODEL,
            Model::Cold {
                ready_after: Duration::from_secs(1),
                estimate: estimate.map(Into::into),
                holds: false,
            },
        )])
        .await;
        let layer = advised().jitter(false).default_wait(Duration::from_secs(7));
        let Outcome {
            response, report, ..
        } = post(layered(layer), server.url(MODEL), INPUT).await;
        assert_eq!(response.status(), 200, "{estimate:?}");
        assert_eq!(secs(&server.offsets()), [0, 7], "{estimate:?}");
        assert_eq!(report.waited(), Duration::from_secs(7), "{estimate:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_absurd_estimate_means_the_cap() {
    let server = HfServer::start([(MODEL, Model::never_loads("1e308"))]).await;
    let layer = advised()
        .jitter(false)
        .max_attempts(2)
        .max_wait(Duration::from_secs(45));
    let Outcome { response, .. } = post(layered(layer), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 503);
    assert_eq!(secs(&server.offsets()), [0, 45]);
}

#[tokio::test(start_paused = true)]
async fn a_zero_estimate_does_not_become_a_busy_loop() {
    for estimate in ["0", "0.0", "1e-9", "0.2"] {
        let server = HfServer::start([(MODEL, Model::never_loads(estimate))]).await;
        let layer = advised()
            .jitter(false)
            .max_total_wait(Duration::from_secs(5));
        let Outcome {
            response, report, ..
        } = post(layered(layer), server.url(MODEL), INPUT).await;
        assert_eq!(response.status(), 503);
        // One request a second: at 0, 1, 2, 3, 4 and 5 s.
        assert_eq!(secs(&server.offsets()), [0, 1, 2, 3, 4, 5], "{estimate}");
        assert_eq!(report.attempts(), 6);
    }
}

#[tokio::test(start_paused = true)]
async fn max_attempts_bounds_the_requests_and_returns_the_last_503_as_sent() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let Outcome {
        response, report, ..
    } = post(
        layered(advised().jitter(false).max_attempts(3)),
        server.url(MODEL),
        INPUT,
    )
    .await;
    assert_eq!(server.count(), 3);
    assert_eq!(secs(&server.offsets()), [0, 20, 40]);
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-request-id"], "Ab3dE5gH7jK9mN1pQ3sT5");
    let len = response.body().len().to_string();
    assert_eq!(response.headers()["content-length"], len.as_str());
    assert_eq!(
        response.body(),
        &loading_body(
            "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
            Some("20.0")
        )
    );
    assert_eq!(report.attempts(), 3);
    assert_eq!(report.waited(), Duration::from_secs(40));
}

#[tokio::test(start_paused = true)]
async fn max_total_wait_bounds_sleeps_and_the_last_attempt() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let start = tokio::time::Instant::now();
    let layer = advised()
        .jitter(false)
        .max_total_wait(Duration::from_secs(50));
    let Outcome {
        response, report, ..
    } = post(layered(layer), server.url(MODEL), INPUT).await;
    // Sleeps of 20, 20, then the 10 s left; nothing after 50 s.
    assert_eq!(secs(&server.offsets()), [0, 20, 40, 50]);
    assert_eq!(start.elapsed(), Duration::from_secs(50));
    assert_eq!(response.status(), 503);
    assert_eq!(response.body(), &loading_body(&MODEL[8..], Some("20.0")));
    assert_eq!(report.attempts(), 4);
    assert_eq!(report.waited(), Duration::from_secs(50));
}

#[tokio::test(start_paused = true)]
async fn a_zero_budget_returns_the_first_503_after_one_request() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let layer = advised().jitter(false).max_total_wait(Duration::ZERO);
    let Outcome {
        response, report, ..
    } = post(layered(layer), server.url(MODEL), INPUT).await;
    assert_eq!(server.count(), 1);
    assert_eq!(response.status(), 503);
    assert_eq!(report.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_of_one_or_zero_sends_exactly_once() {
    for n in [0, 1] {
        let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
        let Outcome {
            response, report, ..
        } = post(
            layered(advised().jitter(false).max_attempts(n)),
            server.url(MODEL),
            INPUT,
        )
        .await;
        assert_eq!(server.count(), 1);
        assert_eq!(response.status(), 503);
        assert_eq!(report.attempts(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn recorded_cold_starts_all_succeed_within_the_defaults() {
    // (estimate, actual) pairs recorded against api-inference.huggingface.co.
    for (estimate, actual) in support::hf_server::RECORDED_COLD_STARTS {
        let server = HfServer::start([(
            MODEL,
            Model::cold_with(Duration::from_secs(actual), estimate, true),
        )])
        .await;
        let start = tokio::time::Instant::now();
        let Outcome {
            response, report, ..
        } = post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
        assert_eq!(response.status(), 200, "{estimate}/{actual}");
        assert_eq!(report.attempts(), 2, "{estimate}/{actual}");
        // The held retry answers at max(estimate, actual).
        let expected = estimate.max(actual as f64);
        assert!(
            (start.elapsed().as_secs_f64() - expected).abs() < 0.01,
            "{estimate}/{actual}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn model_too_busy_after_a_hold_is_retried_as_still_loading() {
    // Ready after 100 s. The retry at 20 s is held for the server's 60 s
    // limit and answered 500 "Model too busy" at 80 s; the layer retries a
    // second later, and that request is held until the model is ready.
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(100), 20.0, true),
    )])
    .await;
    let start = tokio::time::Instant::now();
    let Outcome {
        response, report, ..
    } = post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 200);
    assert_eq!(start.elapsed(), Duration::from_secs(100));
    assert_eq!(secs(&server.offsets()), [0, 20, 81]);
    assert_eq!(report.attempts(), 3);
    assert_eq!(report.waited(), Duration::from_secs(21));
}

#[tokio::test(start_paused = true)]
async fn model_too_busy_without_a_hold_passes_through() {
    let body = br#"{"error":"Model too busy, unable to get response in less than 60 second(s)"}"#;
    let server = HfServer::start([(MODEL, Model::fixed(500, "application/json", &body[..]))]).await;
    let Outcome {
        response, report, ..
    } = post(layered(advised().jitter(false)), server.url(MODEL), INPUT).await;
    assert_eq!(response.status(), 500);
    assert_eq!(response.body(), &Bytes::from_static(body));
    assert_eq!(report.attempts(), 1);
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn model_too_busy_after_a_hold_ends_in_that_500_when_the_budget_is_spent() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(1000), 20.0, true),
    )])
    .await;
    let Outcome {
        response, report, ..
    } = post(
        layered(advised().jitter(false).max_attempts(2)),
        server.url(MODEL),
        INPUT,
    )
    .await;
    // The second and last attempt is held 60 s and answered "too busy":
    // passed on as sent.
    assert_eq!(response.status(), 500);
    assert!(String::from_utf8_lossy(response.body()).contains("Model too busy"));
    assert_eq!(report.attempts(), 2);
}
