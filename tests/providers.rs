//! The built-in classifiers against the test server speaking each provider's
//! responses, and jitter.

mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{
    Classify, HuggingFace, InferenceEndpoints, RetryAfter, TgiOverloaded,
};
use tower_cold_start::ColdStartRetryLayer;

const PATH: &str = "/models/m";

const INPUT: &[u8] = b"{\"inputs\":\"x\"}";

#[tokio::test(start_paused = true)]
async fn inference_endpoints_hold_the_retry_with_the_budget_left() {
    let server = HfServer::start([(
        PATH,
        Model::Endpoint {
            ready_after: Duration::from_secs(45),
            status: 503,
        },
    )])
    .await;
    // The first request held too is the default; this pins the retry.
    let layer = advised()
        .jitter(false)
        .classifier(InferenceEndpoints.with_hold_first_request(false));
    let start = Instant::now();
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 2));
    // default_wait (20 s), then a retry held by the proxy until the replica
    // is up at 45 s.
    assert_eq!(start.elapsed(), Duration::from_secs(45));
    let received = server.received();
    assert_eq!(received[0].headers.get("x-scale-up-timeout"), None);
    assert_eq!(
        received[1].headers["x-scale-up-timeout"], "100",
        "120 s budget less 20 s"
    );
    assert_eq!(received[1].headers.get("x-wait-for-model"), None);
}

#[tokio::test(start_paused = true)]
async fn inference_endpoints_hold_the_first_request_so_a_scaled_to_zero_endpoint_answers_once() {
    // HuggingFace's autoscaling guide documents X-Scale-Up-Timeout for any
    // request: the proxy holds it until a replica is ready.
    let server = HfServer::start([(
        PATH,
        Model::Endpoint {
            ready_after: Duration::from_secs(45),
            status: 503,
        },
    )])
    .await;
    let layer = ColdStartRetryLayer::new().classifier(InferenceEndpoints);
    let start = Instant::now();
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 1));
    assert_eq!(start.elapsed(), Duration::from_secs(45));
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].headers["x-scale-up-timeout"], "120",
        "the whole budget"
    );
}

#[tokio::test(start_paused = true)]
async fn inference_endpoints_retry_a_502_from_an_older_proxy_after_retry_after() {
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![(
            502,
            vec![("retry-after", "7".into())],
            Bytes::from_static(b"Bad Gateway"),
        )]),
    )])
    .await;
    let layer = advised().jitter(false).classifier(InferenceEndpoints);
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 2));
    assert_eq!(server.offsets(), [0.0, 7.0]);
}

#[tokio::test(start_paused = true)]
async fn the_default_classifier_passes_an_endpoint_503_through() {
    let server = HfServer::start([(
        PATH,
        Model::Endpoint {
            ready_after: Duration::from_secs(45),
            status: 503,
        },
    )])
    .await;
    let Outcome {
        status, attempts, ..
    } = post(layered(advised().jitter(false)), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (503, 1));
}

fn overloaded() -> support::hf_server::Canned {
    (
        429,
        vec![("content-type", "application/json".into())],
        Bytes::from_static(br#"{"error":"Model is overloaded","error_type":"overloaded"}"#),
    )
}

#[tokio::test(start_paused = true)]
async fn tgi_overload_backs_off_exponentially() {
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![overloaded(), overloaded(), overloaded()]),
    )])
    .await;
    let layer = advised().jitter(false).classifier(TgiOverloaded);
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 4));
    assert_eq!(server.offsets(), [0.0, 1.0, 3.0, 7.0], "1 s, 2 s, 4 s");
    assert!(server
        .received()
        .iter()
        .all(|r| r.headers.get("x-wait-for-model").is_none()));
}

#[tokio::test(start_paused = true)]
async fn tgi_backoff_with_jitter_stays_within_half_to_full_steps() {
    let server = HfServer::start([(PATH, Model::Sequence(vec![overloaded(); 5]))]).await;
    let layer = advised().classifier(TgiOverloaded);
    let Outcome { status, .. } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!(status, 200);
    let at = server.offsets();
    let gaps: Vec<f64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let step = 2f64.powi(i as i32);
        assert!(
            *gap >= (step / 2.0).max(1.0) - 1e-3 && *gap <= step + 1e-3,
            "{gaps:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_429_is_not_overload_and_passes_through() {
    let body = Bytes::from_static(
        br#"{"error":"Rate limit reached. Please log in or use a HF access token"}"#,
    );
    let server =
        HfServer::start([(PATH, Model::fixed(429, "application/json", body.clone()))]).await;
    let layer = advised().classifier(TgiOverloaded.or(HuggingFace));
    let Outcome {
        status,
        body: got,
        attempts,
        ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (429, 1));
    assert_eq!(got, body);
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_on_a_503_and_a_429() {
    for status in [503, 429] {
        let server = HfServer::start([(
            PATH,
            Model::Sequence(vec![(
                status,
                vec![("retry-after", "12".into())],
                Bytes::from_static(b"busy"),
            )]),
        )])
        .await;
        let layer = advised().jitter(false).classifier(RetryAfter::new());
        let Outcome {
            status: got,
            attempts,
            ..
        } = post(layered(layer), server.url(PATH), INPUT).await;
        assert_eq!((got, attempts), (200, 2), "{status}");
        assert_eq!(server.offsets(), [0.0, 12.0], "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_dates_follow_the_server_clock_not_ours() {
    // The server's clock is a day behind ours: only the difference between
    // its Date and its Retry-After counts.
    let server_now = SystemTime::now() - Duration::from_secs(86_400);
    let headers = vec![
        ("date", httpdate::fmt_http_date(server_now)),
        (
            "retry-after",
            httpdate::fmt_http_date(server_now + Duration::from_secs(30)),
        ),
    ];
    let server =
        HfServer::start([(PATH, Model::Sequence(vec![(503, headers, Bytes::new())]))]).await;
    let layer = advised().jitter(false).classifier(RetryAfter::new());
    let Outcome { status, .. } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!(status, 200);
    assert_eq!(server.offsets(), [0.0, 30.0]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_dates_in_the_past_and_absurd_delays_stay_in_bounds() {
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![
            (503, vec![("retry-after", past)], Bytes::new()),
            (
                503,
                vec![("retry-after", "99999999999999999999".into())],
                Bytes::new(),
            ),
        ]),
    )])
    .await;
    let layer = advised().jitter(false).classifier(RetryAfter::new());
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    // A past date: the 1 s floor. An absurd delay, past the budget: not
    // slept at all, the answer goes back at once.
    assert_eq!((status, attempts), (503, 2));
    assert_eq!(server.offsets(), [0.0, 1.0]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_budget_hands_the_answer_back_at_once() {
    // A quota that says "in three hours", as seconds, a fraction, in
    // milliseconds, and as a date.
    let in_three_hours = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3 * 3600));
    for header in [
        ("retry-after", "10800".to_owned()),
        ("retry-after", "10800.5".to_owned()),
        ("retry-after-ms", "10800000".to_owned()),
        ("retry-after", in_three_hours),
    ] {
        let server = HfServer::start([(
            PATH,
            Model::Sequence(vec![(
                429,
                vec![header.clone()],
                Bytes::from_static(b"quota"),
            )]),
        )])
        .await;
        let layer = ColdStartRetryLayer::new().classifier(RetryAfter::new());
        let start = Instant::now();
        let Outcome {
            status,
            body,
            attempts,
            ..
        } = post(layered(layer), server.url(PATH), INPUT).await;
        assert_eq!((status, attempts), (429, 1), "{header:?}");
        assert_eq!(&body[..], b"quota", "as the server sent it");
        assert_eq!(start.elapsed(), Duration::ZERO, "{header:?}: not slept");
    }
}

#[tokio::test(start_paused = true)]
async fn fractional_and_millisecond_retry_afters_are_waited_as_written() {
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![
            (429, vec![("retry-after", "1.5".into())], Bytes::new()),
            (
                429,
                vec![
                    ("retry-after-ms", "2250".into()),
                    ("retry-after", "9".into()),
                ],
                Bytes::new(),
            ),
        ]),
    )])
    .await;
    let layer = advised().jitter(false).classifier(RetryAfter::new());
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 3));
    // retry-after-ms wins over retry-after when both are sent.
    assert_eq!(server.offsets(), [0.0, 1.5, 3.75]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_with_prefer_wait_asks_to_be_held() {
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![(503, vec![("retry-after", "5".into())], Bytes::new())]),
    )])
    .await;
    let layer = advised()
        .jitter(false)
        .classifier(RetryAfter::new().prefer_wait());
    let Outcome { status, .. } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!(status, 200);
    let received = server.received();
    assert_eq!(received[0].headers.get("prefer"), None);
    assert_eq!(
        received[1].headers["prefer"], "wait=60",
        "115 s left, capped at 60"
    );
}

#[tokio::test(start_paused = true)]
async fn a_503_without_retry_after_is_not_a_cold_start_for_retry_after() {
    let server = HfServer::start([(
        PATH,
        Model::fixed(503, "text/html", &b"<html>down</html>"[..]),
    )])
    .await;
    let layer = advised().classifier(RetryAfter::new());
    let Outcome {
        status,
        body,
        attempts,
        ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (503, 1));
    assert_eq!(&body[..], b"<html>down</html>");
}

#[tokio::test(start_paused = true)]
async fn huggingface_or_retry_after_covers_both_and_keeps_each_hold() {
    let loading = loading_body("m", Some("4.0"));
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![
            (
                503,
                vec![("content-type", "application/json".into())],
                loading,
            ),
            (
                503,
                vec![("retry-after", "2".into())],
                Bytes::from_static(b"<html>"),
            ),
        ]),
    )])
    .await;
    let layer = advised()
        .jitter(false)
        .classifier(HuggingFace.or(RetryAfter::new()));
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 3));
    assert_eq!(server.offsets(), [0.0, 4.0, 6.0]);
    let received = server.received();
    assert_eq!(
        received[1].headers["x-wait-for-model"], "true",
        "after HuggingFace's verdict"
    );
    assert_eq!(
        received[2].headers.get("x-wait-for-model"),
        None,
        "after Retry-After's verdict"
    );
}

#[tokio::test(start_paused = true)]
async fn a_closure_classifies() {
    let server = HfServer::start([(
        PATH,
        Model::Sequence(vec![(425, vec![], Bytes::from_static(b"booting"))]),
    )])
    .await;
    // The closure's parameter type is inferred.
    let layer = advised()
        .jitter(false)
        .classifier(tower_cold_start::classifier::from_fn(|r| {
            (r.status().as_u16() == 425 && r.body() == b"booting").then(|| {
                tower_cold_start::classifier::ColdStart::new(
                    tower_cold_start::classifier::Hint::After(Duration::from_secs(3)),
                )
            })
        }));
    let Outcome {
        status, attempts, ..
    } = post(layered(layer), server.url(PATH), INPUT).await;
    assert_eq!((status, attempts), (200, 2));
    assert_eq!(server.offsets(), [0.0, 3.0]);
}

#[tokio::test(start_paused = true)]
async fn jitter_is_on_by_default_and_spreads_callers() {
    let paths: Vec<String> = (0..8).map(|i| format!("/models/m{i}")).collect();
    let models: Vec<(&str, Model)> = paths
        .iter()
        .map(|p| {
            (
                p.as_str(),
                Model::cold_with(Duration::from_secs(5), 20.0, false),
            )
        })
        .collect();
    let server = HfServer::start(models).await;
    let client = ServiceBuilder::new().layer(advised()).service(http1());
    let mut tasks = tokio::task::JoinSet::new();
    for path in &paths {
        let client = client.clone();
        let url = server.url(path);
        tasks.spawn(async move {
            client
                .oneshot(Request::post(url).body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap()
                .status()
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let received = server.received();
    let first = received[0].at;
    let mut retries: Vec<f64> = received
        .iter()
        .filter(|r| r.headers.get("x-wait-for-model").is_some())
        .map(|r| (r.at - first).as_secs_f64())
        .collect();
    assert_eq!(retries.len(), 8);
    assert!(
        retries.iter().all(|t| (16.0..=20.0).contains(t)),
        "{retries:?}"
    );
    retries.dedup_by(|a, b| (*a - *b).abs() < 1e-3);
    assert!(retries.len() > 1, "not all in step: {retries:?}");
}
