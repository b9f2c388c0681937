//! Composition: timeouts outside and inside, tower-http layers, HTTP/1 and HTTP/2,
//! and the request body types users have (including a proxy's).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;

const MODEL: &str = "/models/gpt2";

fn post(url: String) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"inputs\":\"hi\"}")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_is_the_overall_deadline() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(30), 20.0, false),
    )])
    .await;
    let client = ServiceBuilder::new()
        .timeout(Duration::from_secs(25))
        .layer(advised().jitter(false))
        .service(http1());
    let start = tokio::time::Instant::now();
    let error = client.oneshot(post(server.url(MODEL))).await.unwrap_err();
    assert!(error.is::<tower::timeout::error::Elapsed>(), "{error:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(25));
    // Attempts at 0 and 20 s; the deadline cut the wait for the third.
    assert_eq!(server.count(), 2);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(server.count(), 2, "nothing is sent after the deadline");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_that_fits_the_waits_lets_the_cold_start_finish() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let client = ServiceBuilder::new()
        .timeout(Duration::from_secs(180))
        .layer(advised().jitter(false))
        .service(http1());
    let response = client.oneshot(post(server.url(MODEL))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(report(&response).attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_bounds_each_attempt() {
    // The retry is held until 100 s, past the 30 s per-attempt bound.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(50), 20.0, true))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .timeout(Duration::from_secs(15))
        .service(http1());
    let start = tokio::time::Instant::now();
    let error = client.oneshot(post(server.url(MODEL))).await.unwrap_err();
    assert!(error.is::<tower::timeout::error::Elapsed>(), "{error:?}");
    // 20 s asleep, then the held retry is cut after 15 s.
    assert_eq!(start.elapsed(), Duration::from_secs(35));
    assert_eq!(server.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_that_fits_a_held_request_succeeds() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(50), 20.0, true))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .timeout(Duration::from_secs(60))
        .service(http1());
    let start = tokio::time::Instant::now();
    let response = client.oneshot(post(server.url(MODEL))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(start.elapsed(), Duration::from_secs(50));
}

#[tokio::test(start_paused = true)]
async fn tower_http_layers_inside_apply_to_every_attempt_and_outside_once() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(3), 2.0, false))]).await;
    let client = ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer hf_x"),
        ))
        .layer(advised().jitter(false))
        .layer(SetRequestHeaderLayer::appending(
            http::header::HeaderName::from_static("x-attempt-tag"),
            HeaderValue::from_static("inner"),
        ))
        .service(http1());
    let response = client.oneshot(post(server.url(MODEL))).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = server.received();
    assert_eq!(received.len(), 3);
    for r in received {
        assert_eq!(r.headers["authorization"], "Bearer hf_x");
        let tags: Vec<_> = r.headers.get_all("x-attempt-tag").iter().collect();
        assert_eq!(tags, ["inner"], "added once per attempt, not accumulated");
    }
}

#[tokio::test(start_paused = true)]
async fn hyper_util_over_http2_waits_out_a_cold_start() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http2());
    let body = json_input(2048);
    let request = Request::post(server.url(MODEL))
        .header("authorization", "Bearer hf_x")
        .body(Full::new(body.clone()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(bytes(response).await, body);
    let received = server.received();
    assert_eq!(received.len(), 2);
    assert!(received
        .iter()
        .all(|r| r.version == http::Version::HTTP_2 && r.body == body));
    assert_eq!(received[1].headers["x-wait-for-model"], "true");
}

#[tokio::test(start_paused = true)]
async fn empty_and_string_bodies_work_with_the_client_type_inferred() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(1), 1.0, false))]).await;
    let empty = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let response = empty
        .oneshot(
            Request::get(server.url(MODEL))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let string = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let response = string
        .oneshot(
            Request::post(server.url(MODEL))
                .body(String::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "{}"
    );
}

/// The proxy case: an axum handler forwards `axum::body::Body` (and so the
/// server's `Incoming`) through a shared layered client.
#[tokio::test(start_paused = true)]
async fn an_axum_proxy_forwards_incoming_bodies_through_the_layer() {
    use axum::body::Body;
    use axum::extract::State;
    use axum::response::IntoResponse;

    let upstream =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    type Upstream = tower_cold_start::ColdStartRetry<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            tower_cold_start::RequestBody<Body>,
        >,
    >;
    let client: Upstream = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let base = upstream.url("");
    async fn forward(
        State((client, base)): State<(Upstream, String)>,
        request: Request<Body>,
    ) -> axum::response::Response {
        let (mut parts, body) = request.into_parts();
        parts.uri = format!("{base}{}", parts.uri.path()).parse().unwrap();
        match client.oneshot(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(Body::new).into_response(),
            Err(error) => (http::StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/models/{*model}", axum::routing::post(forward))
        .with_state((client, base));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Call the proxy with a plain hyper-util client; the proxy's own
    // Incoming body (chunked here: a channel body) is replayed upstream.
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes>::new(4);
    let input = json_input(4000);
    let chunks: Vec<Bytes> = input.chunks(1000).map(Bytes::copy_from_slice).collect();
    tokio::spawn(async move {
        for c in chunks {
            tx.send_data(c).await.unwrap();
        }
    });
    let response = http1()
        .request(
            Request::post(format!("http://{proxy}{MODEL}"))
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(bytes(response).await, input);
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    assert!(received.iter().all(|r| r.body == input));
}
