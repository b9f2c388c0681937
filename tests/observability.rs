//! Observability: one tracing event and one hook call per wait, with the same facts,
//! and never a header value.
//!
//! The tracing test has this binary (nearly) to itself: tracing caches each
//! call site's interest globally, and a test elsewhere in the same process
//! that hits the call site with no subscriber can race with it.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::capture::Capture;
use support::*;
use tower::{ServiceBuilder, ServiceExt};

const MODEL: &str = "/models/openai-community/gpt2";
const SECRET: &str = "Bearer hf_TopSecretToken0123456789";

#[tokio::test(start_paused = true)]
async fn each_wait_is_traced_and_given_to_the_hook_without_header_values() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(50), 20.0, false),
    )])
    .await;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false).on_retry(move |e| {
            sink.lock().unwrap().push((
                e.uri().to_string(),
                e.model().map(str::to_owned),
                e.attempt(),
                e.wait(),
                e.estimate(),
                e.elapsed(),
            ))
        }))
        .service(http1());
    let request = Request::post(server.url(MODEL))
        .header("authorization", SECRET)
        .header("x-api-key", "another-secret-value")
        .body(Full::new(Bytes::from_static(b"{\"inputs\":\"hi\"}")))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);

    let url = server.url(MODEL);
    let events = events.lock().unwrap().clone();
    let model = Some("openai-community/gpt2".to_owned());
    assert_eq!(
        events,
        [
            (
                url.clone(),
                model.clone(),
                1,
                Duration::from_secs(20),
                Some(20.0),
                Duration::ZERO
            ),
            (
                url.clone(),
                model.clone(),
                2,
                Duration::from_secs(20),
                Some(20.0),
                Duration::from_secs(20)
            ),
            (
                url.clone(),
                model.clone(),
                3,
                Duration::from_secs(20),
                Some(20.0),
                Duration::from_secs(40)
            ),
        ]
    );

    let lines = capture.0.lock().unwrap().clone();
    let ours: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("tower_cold_start"))
        .collect();
    assert_eq!(ours.len(), 3, "{lines:#?}");
    for (i, line) in ours.iter().enumerate() {
        assert!(line.starts_with("INFO tower_cold_start"), "{line}");
        assert!(line.contains(&format!("attempt={}", i + 1)), "{line}");
        assert!(line.contains("wait_ms=20000"), "{line}");
        assert!(line.contains("estimate=20.0"), "{line}");
        assert!(line.contains("openai-community/gpt2"), "{line}");
        assert!(line.contains(&format!("path=\"{MODEL}\"")), "{line}");
    }
    for line in &lines {
        assert!(!line.contains("hf_TopSecretToken"), "secret leaked: {line}");
        assert!(
            !line.contains("another-secret-value"),
            "secret leaked: {line}"
        );
    }
}

#[test]
fn debug_output_never_shows_the_hook_or_header_values() {
    let layer = advised().jitter(false).on_retry(|_| {});
    let text = format!("{layer:?}");
    assert!(text.contains("max_total_wait: 120s"), "{text}");
    assert!(
        text.contains("on_retry: Some(\"Fn(&RetryEvent)\")"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_that_meets_a_cold_start_says_why_it_was_not_retried() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(50), 20.0, false),
    )])
    .await;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let hooked = Arc::new(Mutex::new(0));
    let sink = hooked.clone();
    let client = ServiceBuilder::new()
        .layer(
            tower_cold_start::ColdStartRetryLayer::new()
                .body_limit(1024)
                .on_retry(move |_| *sink.lock().unwrap() += 1),
        )
        .service(http1());
    let input = json_input(4096);
    let request = Request::post(server.url(MODEL))
        .body(Full::new(input.clone()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 503);
    let report = report(&response);
    assert_eq!(report.attempts(), 1);
    assert_eq!(
        report.unbuffered(),
        Some(tower_cold_start::Unbuffered::BodyLimit)
    );
    assert_eq!(
        &bytes(response).await[..],
        &loading_body("openai-community/gpt2", Some("20.0"))[..]
    );
    assert_eq!(server.count(), 1);
    assert_eq!(server.received()[0].body, input, "sent once, whole");
    assert_eq!(*hooked.lock().unwrap(), 0, "no wait, so no retry event");

    let lines = capture.0.lock().unwrap().clone();
    let warned: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("WARN tower_cold_start"))
        .collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(warned[0].contains("status=503"), "{}", warned[0]);
    assert!(warned[0].contains("over body_limit"), "{}", warned[0]);
}
