//! reqwest users: the adapter under the layer, and the layer as a
//! reqwest-middleware middleware, end to end over loopback with a real
//! reqwest client.
#![cfg(feature = "reqwest")]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::reqwest::ReqwestService;
use tower_cold_start::{ColdStartReport, ColdStartRetryLayer};

const MODEL: &str = "/models/gpt2";

fn adapter(layer: ColdStartRetryLayer) -> tower_cold_start::ColdStartRetry<ReqwestService> {
    ServiceBuilder::new()
        .layer(layer)
        .service(ReqwestService::new(reqwest::Client::new()))
}

#[tokio::test(start_paused = true)]
async fn the_adapter_replays_bodies_byte_for_byte_and_waits_out_a_cold_start() {
    let server = HfServer::start([(MODEL, Model::cold(Duration::from_secs(3)))]).await;
    let client = adapter(ColdStartRetryLayer::new().jitter(false));
    let input = json_input(2048);
    let request = Request::post(server.url(MODEL))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(input.clone()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = *response.extensions().get::<ColdStartReport>().unwrap();
    assert_eq!(report.attempts(), 2);
    assert_eq!(bytes(response).await, input);
    let received = server.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert_eq!(r.body, input);
        // In-memory bytes: framed with Content-Length, as reqwest does.
        assert_eq!(r.headers["content-length"], "2048");
    }
    assert_eq!(received[1].headers["x-wait-for-model"], "true");
}

#[tokio::test(start_paused = true)]
async fn the_adapter_hands_back_a_peeked_503_and_reqwests_own_errors() {
    let not_loading = Bytes::from_static(b"<html>gateway timeout</html>");
    let server =
        HfServer::start([(MODEL, Model::fixed(503, "text/html", not_loading.clone()))]).await;
    let client = adapter(ColdStartRetryLayer::new());
    let request = Request::post(server.url(MODEL))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(bytes(response).await, not_loading);
    assert!(server.received()[0].body.is_empty());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let request = Request::post(format!("http://127.0.0.1:{port}{MODEL}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    let reqwest_error = error
        .downcast_ref::<reqwest::Error>()
        .expect("reqwest's own error");
    assert!(reqwest_error.is_connect());
}

#[tokio::test(start_paused = true)]
async fn the_adapter_streams_a_body_over_the_limit_once() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let client = adapter(ColdStartRetryLayer::new().body_limit(1024));
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes>::new(4);
    let chunks: Vec<Bytes> = (0..4).map(|n| Bytes::from(vec![b'a' + n; 1000])).collect();
    let expected: Vec<u8> = chunks.concat();
    tokio::spawn(async move {
        for chunk in chunks {
            tx.send_data(chunk).await.unwrap();
        }
    });
    let request = Request::post(server.url(MODEL)).body(body).unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 503, "not retried");
    let report = *response.extensions().get::<ColdStartReport>().unwrap();
    assert_eq!(
        report.unbuffered(),
        Some(tower_cold_start::Unbuffered::BodyLimit)
    );
    assert_eq!(server.count(), 1);
    assert_eq!(&server.received()[0].body[..], &expected[..]);
}

#[cfg(feature = "reqwest-middleware")]
mod middleware {
    use std::sync::{Arc, Mutex};

    use super::*;
    use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
    use tower_cold_start::reqwest::ColdStartMiddleware;

    fn client(layer: ColdStartRetryLayer) -> ClientWithMiddleware {
        ClientBuilder::new(reqwest::Client::new())
            .with(ColdStartMiddleware::new(layer))
            .build()
    }

    #[tokio::test(start_paused = true)]
    async fn a_cold_start_is_waited_out_with_the_report_and_url_on_the_response() {
        let server = HfServer::start([(MODEL, Model::cold(Duration::from_secs(3)))]).await;
        let client = client(ColdStartRetryLayer::new().jitter(false));
        let input = json_input(512);
        let response = client
            .post(server.url(MODEL))
            .header("authorization", "Bearer hf_x")
            .body(input.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.url().as_str(), server.url(MODEL));
        let report = *response.extensions().get::<ColdStartReport>().unwrap();
        assert_eq!(
            (report.attempts(), report.waited()),
            (2, Duration::from_secs(1))
        );
        assert_eq!(response.bytes().await.unwrap(), input);
        let received = server.received();
        assert_eq!(received.len(), 2);
        assert!(received
            .iter()
            .all(|r| r.body == input && r.headers["authorization"] == "Bearer hf_x"));
        assert_eq!(received[1].headers["x-wait-for-model"], "true");
        assert_eq!(received[0].headers.get("x-wait-for-model"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_peeked_503_is_handed_back_byte_for_byte_and_an_empty_body_replays_empty() {
        let loading = loading_body("gpt2", Some("20.0"));
        let server = HfServer::start([
            (MODEL, Model::never_loads("20.0")),
            (
                "/models/html",
                Model::fixed(503, "text/html", &b"<html>busy</html>"[..]),
            ),
        ])
        .await;
        let client = client(ColdStartRetryLayer::new().max_total_wait(Duration::from_secs(3)));
        let response = client.post(server.url(MODEL)).send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(
            response.bytes().await.unwrap(),
            loading,
            "the last loading answer, as sent"
        );
        assert!(server.received().iter().all(|r| r.body.is_empty()));
        let response = client
            .post(server.url("/models/html"))
            .send()
            .await
            .unwrap();
        assert_eq!(&response.bytes().await.unwrap()[..], b"<html>busy</html>");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_callers_through_one_client_wait_behind_one_probe() {
        const N: usize = 100;
        let server = HfServer::start([(MODEL, Model::cold(Duration::from_secs(10)))]).await;
        let client = client(ColdStartRetryLayer::new().jitter(false));
        let first = {
            let client = client.clone();
            let url = server.url(MODEL);
            tokio::spawn(async move { client.post(url).body("0").send().await.unwrap().status() })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut callers = Vec::new();
        for n in 1..N {
            // Spread over the model's first second.
            tokio::time::sleep(Duration::from_millis(9)).await;
            let client = client.clone();
            let url = server.url(MODEL);
            callers.push(tokio::spawn(async move {
                let response = client.post(url).body(n.to_string()).send().await.unwrap();
                (
                    response.status(),
                    response.text().await.unwrap() == n.to_string(),
                )
            }));
        }
        assert_eq!(first.await.unwrap(), 200);
        for caller in callers {
            assert_eq!(caller.await.unwrap(), (http::StatusCode::OK, true));
        }
        assert_eq!(
            server.count(),
            N + 1,
            "N first requests plus one held probe"
        );
    }

    /// KServe's infer route, "not ready" until `ready_after`, then an echo.
    fn kserve_ready_after(ready_after: Duration) -> Model {
        let ready_at = tokio::time::Instant::now() + ready_after;
        let not_ready = Bytes::from_static(br#"{"error":"Model with name m is not ready."}"#);
        Model::script(move |r, _| match r.at >= ready_at {
            true => (Duration::ZERO, (200, vec![], r.body.clone())),
            false => (Duration::ZERO, (503, vec![], not_ready.clone())),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_requests_timeout_bounds_the_whole_call_waits_included() {
        let server = HfServer::start([(MODEL, kserve_ready_after(Duration::from_secs(10)))]).await;
        let client = client(ColdStartRetryLayer::new());
        let start = tokio::time::Instant::now();
        let error = client
            .post(server.url(MODEL))
            .timeout(Duration::from_secs(2))
            .body("{}")
            .send()
            .await
            .unwrap_err();
        // reqwest's own timeout error, at the deadline, not after it.
        assert!(error.is_timeout(), "{error:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Nothing was sent at (or after) the deadline.
        let received = server.received();
        assert!(received
            .iter()
            .all(|r| r.at < start + Duration::from_secs(2)));
        assert!(
            received.len() >= 2,
            "polled within the 2 s: {}",
            received.len()
        );

        // The middleware's own deadline, for requests that set none.
        let bounded = ClientBuilder::new(reqwest::Client::new())
            .with(
                ColdStartMiddleware::new(ColdStartRetryLayer::new())
                    .timeout(Duration::from_secs(3)),
            )
            .build();
        let start = tokio::time::Instant::now();
        let error = bounded
            .post(server.url(MODEL))
            .body("{}")
            .send()
            .await
            .unwrap_err();
        assert!(error.is_timeout(), "{error:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(3));

        // Within the timeout, a cold start is waited out as usual.
        let server = HfServer::start([(MODEL, kserve_ready_after(Duration::from_secs(1)))]).await;
        let response = client
            .post(server.url(MODEL))
            .timeout(Duration::from_secs(2))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_server_is_found_by_downcast_and_by_the_error_chain() {
        let port = support::wire::refusing_port();
        let layer = ColdStartRetryLayer::new()
            .classifier(tower_cold_start::classifier::Classify::with_retry_refused(
                tower_cold_start::classifier::KnownServers,
                true,
            ))
            .max_total_wait(Duration::from_secs(1));
        let error = client(layer)
            .post(format!("http://127.0.0.1:{port}/"))
            .body("{}")
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(inner) = &error else {
            panic!("{error:?}");
        };
        let unreachable = inner
            .downcast_ref::<tower_cold_start::Unreachable>()
            .expect("found by downcast_ref, as on the layer's boxed error");
        assert_eq!(unreachable.gave_up(), tower_cold_start::GaveUp::Budget);
        assert!(inner
            .chain()
            .any(|e| e.is::<tower_cold_start::Unreachable>()));
        // And its source is the client's own error for the refusal.
        let source = std::error::Error::source(unreachable).unwrap();
        assert!(
            source.to_string().contains("error sending request"),
            "{source}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_and_a_transport_error_reach_the_caller_as_reqwest_errors() {
        let server = HfServer::start([(MODEL, Model::Warm)]).await;
        let client = client(ColdStartRetryLayer::new());
        let (tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
        tx.abort(std::io::Error::other("the upload broke"));
        let error = client
            .post(server.url(MODEL))
            .body(reqwest::Body::wrap(body))
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(error, reqwest_middleware::Error::Reqwest(ref e) if e.is_body() || e.is_request()),
            "{error:?}"
        );
        assert_eq!(server.count(), 0, "nothing sent");

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = client
            .post(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(error, reqwest_middleware::Error::Reqwest(ref e) if e.is_connect()),
            "{error:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn inside_reqwest_retry_a_cold_start_is_waited_out_once_outside_it_is_cut_short() {
        use reqwest_retry::policies::ExponentialBackoff;
        use reqwest_retry::RetryTransientMiddleware;
        let policy = || ExponentialBackoff::builder().build_with_max_retries(3);

        // The right order: reqwest-retry first, the layer inside it.
        let server = HfServer::start([(
            MODEL,
            Model::cold_with(Duration::from_secs(20), 20.0, false),
        )])
        .await;
        let inside = ClientBuilder::new(reqwest::Client::new())
            .with(RetryTransientMiddleware::new_with_policy(policy()))
            .with(ColdStartMiddleware::new(
                ColdStartRetryLayer::new().jitter(false),
            ))
            .build();
        let response = inside.post(server.url(MODEL)).send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "waited out within one of reqwest-retry's attempts"
        );
        let report = *response.extensions().get::<ColdStartReport>().unwrap();
        assert!(report.attempts() > 1);

        // The other way round (the layer outside, reqwest-retry inside):
        // reqwest-retry sees every loading 503 first and retries it on its
        // own short backoff, so each request the layer sends becomes four,
        // and the layer's pace and coalescing are undone.
        let events = Arc::new(Mutex::new(0));
        let sink = events.clone();
        let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
        let outside = ClientBuilder::new(reqwest::Client::new())
            .with(ColdStartMiddleware::new(
                ColdStartRetryLayer::new()
                    .max_total_wait(Duration::from_secs(5))
                    .on_retry(move |_| *sink.lock().unwrap() += 1),
            ))
            .with(RetryTransientMiddleware::new_with_policy(policy()))
            .build();
        let response = outside.post(server.url(MODEL)).send().await.unwrap();
        assert_eq!(response.status(), 503);
        // reqwest-retry below the layer retried each of the layer's
        // attempts 3 more times: four requests per attempt reach the server.
        let layer_attempts = *response
            .extensions()
            .get::<ColdStartReport>()
            .map(|r| r.attempts())
            .as_ref()
            .unwrap();
        assert_eq!(server.count() as u32, 4 * layer_attempts);
        assert!(*events.lock().unwrap() >= 1);
    }
}
