//! No userinfo, query string or header value reaches a log line at any
//! level, nor `RetryEvent`'s `Debug`: credentials travel in all three. A
//! binary of its own, as tracing caches each call site's interest
//! process-wide.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::capture::Capture;
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{Classify, KnownServers};
use tower_cold_start::warm::warm_up;
use tower_cold_start::ColdStartRetryLayer;

const SECRETS: [&str; 4] = ["hunter2", "s3cret", "t0ken", "TopSecretToken"];

fn assert_no_secret(texts: &[String]) {
    assert!(!texts.is_empty());
    for text in texts {
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} in: {text}");
        }
    }
}

/// The lines of this crate's own events.
fn ours(capture: &Capture) -> Vec<String> {
    capture
        .lines()
        .into_iter()
        .filter(|line| line.contains("tower_cold_start"))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn waits_are_logged_and_shown_without_userinfo_query_or_header_values() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_secs(3)))]).await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let layer = ColdStartRetryLayer::new()
        .hold_retries(false)
        .on_retry(move |e| sink.lock().unwrap().push(format!("{e:?}")));
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let url = server
        .url("/models/m?api_key=s3cret&token=t0ken")
        .replace("http://", "http://user:hunter2@");
    let request = Request::post(url)
        .header("authorization", "Bearer TopSecretToken")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let lines = ours(&capture);
    assert!(lines.iter().any(|l| l.starts_with("INFO")), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("127.0.0.1:")),
        "the host and port stay: {lines:#?}"
    );
    assert_no_secret(&lines);
    let events = events.lock().unwrap().clone();
    assert!(
        events.iter().any(|e| e.contains("/models/m")),
        "{events:#?}"
    );
    assert_no_secret(&events);
}

#[tokio::test(start_paused = true)]
async fn a_refused_unbuffered_body_says_why_it_was_not_retried() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let port = support::wire::refusing_port();
    let client = ServiceBuilder::new()
        .layer(
            ColdStartRetryLayer::new()
                .classifier(KnownServers.with_retry_refused(true))
                .body_limit(16),
        )
        .service(http1());
    let request = Request::post(format!("http://127.0.0.1:{port}/v1/x?api_key=s3cret"))
        .body(Full::new(Bytes::from(vec![b'x'; 64])))
        .unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    assert!(error.is::<hyper_util::client::legacy::Error>(), "{error}");
    let lines = ours(&capture);
    let warned: Vec<_> = lines.iter().filter(|l| l.starts_with("WARN")).collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(
        warned[0].contains("not buffered") && warned[0].contains("body_limit"),
        "{warned:?}"
    );
    assert_no_secret(&lines);
}

#[cfg(feature = "reqwest")]
#[tokio::test(start_paused = true)]
async fn warm_up_and_keep_warm_log_reqwests_errors_without_the_urls_secrets() {
    use tower_cold_start::reqwest::ReqwestService;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let port = support::wire::refusing_port();
    let url = format!("http://user:hunter2@127.0.0.1:{port}/models/m?api_key=s3cret&token=t0ken");
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new())
        .service(ReqwestService::new(reqwest::Client::new()));
    let ping = {
        let url = url.clone();
        move || {
            Request::post(url.as_str())
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        }
    };
    let outcome = warm_up(client.clone(), ping.clone(), Duration::from_secs(2)).await;
    assert!(
        matches!(
            outcome,
            tower_cold_start::warm::WarmUpOutcome::TimedOut { .. }
        ),
        "{outcome:?}"
    );
    let keep = tower_cold_start::warm::keep_warm(
        client,
        ping,
        tower_cold_start::warm::KeepWarmSchedule::new().interval(Duration::from_secs(1)),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(keep);
    let lines = ours(&capture);
    let warned: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("WARN"))
        .cloned()
        .collect();
    assert!(
        warned.iter().any(|l| l.contains("warm-up request failed")),
        "{lines:#?}"
    );
    assert!(
        warned.iter().any(|l| l.contains("keep-warm ping failed")),
        "{lines:#?}"
    );
    // The error text is kept, its URL redacted.
    assert!(
        warned.iter().any(|l| l.contains("127.0.0.1")),
        "{warned:#?}"
    );
    assert_no_secret(&lines);
}
