//! A refused connection is retried only when it is the request's own first
//! connection: never when a client followed a redirect to a port that
//! refuses, after the first server had processed the request.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::wire::{echo, raw, refusing_port, Wire};
use support::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{Classify, KnownServers};
use tower_cold_start::ColdStartRetryLayer;

const INPUT: &[u8] = br#"{"job":"resize","image":"cat.png"}"#;

/// A port that refuses for `refused`, then echoes.
fn refusing_for(refused: Duration) -> u16 {
    let port = refusing_port();
    tokio::spawn(async move {
        tokio::time::sleep(refused).await;
        let wire = Wire::start_on(port, Arc::new(|seen, _| echo(seen))).await;
        // Keep the server for the test's life.
        std::mem::forget(wire);
    });
    port
}

/// `POST /jobs` answered `status` with a `Location` on a port that refuses
/// for 4 s.
async fn redirecting(status: &'static str) -> (Wire, u16) {
    let target = refusing_for(Duration::from_secs(4));
    let server = Wire::start(move |_, _| {
        raw(
            &format!("HTTP/1.1 {status}\nLocation: http://127.0.0.1:{target}/jobs/1"),
            b"",
            true,
        )
    })
    .await;
    (server, target)
}

/// The layer that waits out refusals, with a budget that covers the 4 s.
fn waiting_out_refusals() -> ColdStartRetryLayer {
    ColdStartRetryLayer::new()
        .classifier(KnownServers.with_retry_refused(true))
        .max_total_wait(Duration::from_secs(10))
}

#[tokio::test(start_paused = true)]
async fn a_redirect_hop_that_is_refused_under_tower_http_follow_redirect_is_not_retried() {
    for status in ["303 See Other", "302 Found"] {
        let (server, _) = redirecting(status).await;
        let client = ServiceBuilder::new()
            .layer(waiting_out_refusals())
            .layer(tower_http::follow_redirect::FollowRedirectLayer::new())
            .service(http1());
        let start = Instant::now();
        let request = Request::post(server.url("/jobs"))
            .body(Full::new(Bytes::from_static(INPUT)))
            .unwrap();
        let error = client.oneshot(request).await.unwrap_err();
        assert_eq!(server.count(), 1, "{status}: the job was processed once");
        assert_eq!(start.elapsed(), Duration::ZERO, "{status}: failed at once");
        let client_error = error
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .expect("the client's own error");
        assert!(client_error.is_connect(), "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_requests_own_refused_connection_is_still_waited_out_under_follow_redirect() {
    let port = refusing_for(Duration::from_secs(3));
    let client = ServiceBuilder::new()
        .layer(waiting_out_refusals().jitter(false))
        .layer(tower_http::follow_redirect::FollowRedirectLayer::new())
        .service(http1());
    let request = Request::post(format!("http://127.0.0.1:{port}/jobs"))
        .body(Full::new(Bytes::from_static(INPUT)))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(report(&response).unreachable());
    assert_eq!(&bytes(response).await[..], INPUT);
}

#[cfg(feature = "reqwest")]
mod through_reqwest {
    use super::*;
    use tower_cold_start::reqwest::ReqwestService;

    fn adapter() -> tower_cold_start::ColdStartRetry<ReqwestService> {
        ServiceBuilder::new()
            .layer(waiting_out_refusals())
            .service(ReqwestService::new(reqwest::Client::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_redirect_hop_is_not_retried_by_reqwest_service() {
        for status in ["303 See Other", "307 Temporary Redirect"] {
            let (server, _) = redirecting(status).await;
            let start = Instant::now();
            let request = Request::post(server.url("/jobs"))
                .body(Full::new(Bytes::from_static(INPUT)))
                .unwrap();
            let answer = adapter().oneshot(request).await;
            assert_eq!(server.count(), 1, "{status}: the job was processed once");
            assert_eq!(start.elapsed(), Duration::ZERO, "{status}: at once");
            match answer {
                // A 303 is followed with a GET, whose refusal is reqwest's error.
                Err(error) => {
                    let error = error.downcast_ref::<reqwest::Error>().expect("reqwest's");
                    assert!(error.is_connect(), "{status}");
                }
                // A 307 would resend the body: reqwest hands it back instead.
                Ok(response) => assert_eq!(response.status(), 307, "{status}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reqwest_services_own_refused_connection_is_still_waited_out() {
        let port = refusing_for(Duration::from_secs(3));
        let request = Request::post(format!("http://127.0.0.1:{port}/jobs"))
            .body(Full::new(Bytes::from_static(INPUT)))
            .unwrap();
        let response = adapter().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(report(&response).unreachable());
        assert_eq!(&bytes(response).await[..], INPUT);
    }
}

#[cfg(feature = "reqwest-middleware")]
mod through_the_middleware {
    use super::*;
    use tower_cold_start::reqwest::ColdStartMiddleware;

    fn client() -> reqwest_middleware::ClientWithMiddleware {
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(ColdStartMiddleware::new(waiting_out_refusals()))
            .build()
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_redirect_hop_is_not_retried_by_the_middleware() {
        for status in ["303 See Other", "307 Temporary Redirect"] {
            let (server, _) = redirecting(status).await;
            let start = Instant::now();
            let answer = client().post(server.url("/jobs")).body(INPUT).send().await;
            assert_eq!(server.count(), 1, "{status}: the job was processed once");
            assert_eq!(start.elapsed(), Duration::ZERO, "{status}: at once");
            match answer {
                Err(error) => assert!(error.is_connect(), "{status}: {error}"),
                Ok(response) => assert_eq!(response.status(), 307, "{status}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_middlewares_own_refused_connection_is_still_waited_out() {
        let port = refusing_for(Duration::from_secs(3));
        let response = client()
            .post(format!("http://127.0.0.1:{port}/jobs"))
            .body(INPUT)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(&response.bytes().await.unwrap()[..], INPUT);
    }
}
