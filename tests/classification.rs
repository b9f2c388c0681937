//! Only a cold-start answer is retried; everything else reaches the caller
//! exactly as the server sent it, after one request.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::ColdStartRetryLayer;

const MODEL: &str = "/models/gpt2";

async fn one_call(model: Model) -> (HfServer, Response<Bytes>) {
    let server = HfServer::start([(MODEL, model)]).await;
    let client = layered(ColdStartRetryLayer::new().jitter(false));
    let got = post(client, server.url(MODEL), &b"{\"inputs\":\"x\"}"[..]).await;
    (server, got.response)
}

async fn assert_passes_through(status: u16, content_type: &str, body: &'static [u8]) {
    let (server, response) = one_call(Model::fixed(status, content_type, body)).await;
    assert_eq!(server.count(), 1, "{status}: exactly one request");
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], content_type);
    assert_eq!(
        response.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(&response.body()[..], body, "{status}: body intact");
    let report = report(&response);
    assert_eq!((report.attempts(), report.waited()), (1, Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn rate_limit_429_passes_through_untouched() {
    assert_passes_through(
        429,
        "application/json",
        br#"{"error":"Rate limit reached. Please log in or use a HF access token"}"#,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_400_that_is_read_for_a_marker_and_has_none_passes_through_untouched() {
    // The default reads 400s (MLServer's "not ready" is one): any other 400
    // comes back whole.
    assert_passes_through(
        400,
        "application/json",
        br#"{"error":"Invalid input: expected 4 features, got 3"}"#,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_503_without_the_marker_passes_through_untouched() {
    assert_passes_through(
        503,
        "application/json",
        br#"{"error":"Service Unavailable"}"#,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_html_503_page_passes_through_untouched() {
    assert_passes_through(
        503,
        "text/html",
        b"<html><head><title>503</title></head><body>Model gpt2 is currently loading</body></html>",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_marker_on_another_status_passes_through_untouched() {
    for status in [200, 500, 502, 504] {
        assert_passes_through(
            status,
            "application/json",
            br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#,
        )
        .await;
    }
}

#[tokio::test(start_paused = true)]
async fn validation_errors_pass_through_untouched() {
    assert_passes_through(422, "application/json", br#"{"error":"Input validation error: `inputs` must be non-empty","error_type":"validation"}"#).await;
}

#[tokio::test(start_paused = true)]
async fn malformed_json_503s_pass_through_untouched() {
    for body in [
        &br#"{"error":"Model gpt2 is currently loading","estimated_time":NaN}"#[..],
        br#"{"error":"Model gpt2 is currently loading","#,
        br#"["Model gpt2 is currently loading"]"#,
        b"\xff\xfe\xfd not utf-8 is currently loading",
        br#"{"error":"Model gpt2 is currently loading","error":"dup"}"#,
    ] {
        let (server, response) = one_call(Model::fixed(503, "application/json", body)).await;
        assert_eq!(server.count(), 1);
        assert_eq!(response.status(), 503);
        assert_eq!(&response.body()[..], body);
    }
}

#[tokio::test(start_paused = true)]
async fn a_deeply_nested_503_passes_through_untouched() {
    let mut body = String::from(r#"{"error":"Model gpt2 is currently loading","x":"#);
    body.push_str(&"[".repeat(3000));
    body.push_str(&"]".repeat(3000));
    body.push('}');
    let body: &'static [u8] = Box::leak(body.into_bytes().into_boxed_slice());
    let (server, response) = one_call(Model::fixed(503, "application/json", body)).await;
    assert_eq!(server.count(), 1);
    assert_eq!(&response.body()[..], body);
}

#[tokio::test(start_paused = true)]
async fn an_oversized_loading_503_is_not_a_cold_start_and_arrives_whole() {
    // The marker is at the start, but the body is far over the 4 KiB cap.
    let mut body =
        br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0,"pad":""#.to_vec();
    body.extend(vec![b'x'; 200_000]);
    body.extend(br#""}"#);
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    let (server, response) = one_call(Model::fixed(503, "application/json", body)).await;
    assert_eq!(server.count(), 1);
    assert_eq!(response.body().len(), body.len());
    assert_eq!(&response.body()[..], body);
}

/// A backend whose 503 body arrives in pieces, for the peek's edge cases.
fn chunked_503(
    frames: Vec<Result<Frame<Bytes>, std::io::Error>>,
) -> impl tower::Service<
    Request<tower_cold_start::RequestBody<Full<Bytes>>>,
    Response = Response<Chunks>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let frames = std::sync::Arc::new(frames);
    tower::service_fn(move |_req| {
        let frames = frames.iter().map(clone_frame).collect();
        async move {
            let mut response = Response::new(Chunks(frames));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
                .headers_mut()
                .insert("x-origin", "edge".parse().unwrap());
            Ok::<_, Infallible>(response)
        }
    })
}

fn clone_frame(f: &Result<Frame<Bytes>, std::io::Error>) -> Result<Frame<Bytes>, std::io::Error> {
    match f {
        Ok(frame) => Ok(match frame.data_ref() {
            Some(d) => Frame::data(d.clone()),
            None => Frame::trailers(frame.trailers_ref().unwrap().clone()),
        }),
        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
    }
}

/// A response body made of the given frames (no size hint).
struct Chunks(std::collections::VecDeque<Result<Frame<Bytes>, std::io::Error>>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(self.0.pop_front())
    }
}

async fn call_chunked(
    frames: Vec<Result<Frame<Bytes>, std::io::Error>>,
) -> Response<tower_cold_start::ResponseBody<Chunks>> {
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false).max_attempts(3))
        .service(chunked_503(frames));
    client
        .oneshot(
            Request::post("http://m.test/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_503_body_that_fails_mid_read_reaches_the_caller_with_its_bytes_then_the_error() {
    let response = call_chunked(vec![
        Ok(Frame::data(Bytes::from_static(
            b"{\"error\":\"Model gpt2 is cur",
        ))),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset mid-body",
        )),
    ])
    .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-origin"], "edge");
    assert_eq!(report(&response).attempts(), 1);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"{\"error\":\"Model gpt2 is cur");
    let error = body.frame().await.unwrap().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test(start_paused = true)]
async fn trailers_of_a_503_that_is_not_retried_reach_the_caller() {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "14".parse().unwrap());
    let response = call_chunked(vec![
        Ok(Frame::data(Bytes::from_static(b"upstream "))),
        Ok(Frame::data(Bytes::from_static(b"unavailable"))),
        Ok(Frame::trailers(trailers.clone())),
    ])
    .await;
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers));
    assert_eq!(&collected.to_bytes()[..], b"upstream unavailable");
}

#[tokio::test(start_paused = true)]
async fn a_loading_body_in_pieces_is_recognised_and_returned_whole_when_the_budget_ends() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-end", "1".parse().unwrap());
    let response = call_chunked(vec![
        Ok(Frame::data(Bytes::from_static(
            b"{\"error\":\"Model gpt2 is ",
        ))),
        Ok(Frame::data(Bytes::from_static(
            b"currently loading\",\"estimated_time\":2}",
        ))),
        Ok(Frame::trailers(trailers.clone())),
    ])
    .await;
    let report = report(&response);
    assert_eq!(
        report.attempts(),
        3,
        "recognised as loading: retried to max_attempts"
    );
    // The last attempt's 503 is handed on as it came, chunks and trailers.
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap());
    }
    assert_eq!(frames.len(), 3);
    assert_eq!(
        frames[0].data_ref().unwrap(),
        &b"{\"error\":\"Model gpt2 is "[..]
    );
    assert_eq!(frames[2].trailers_ref(), Some(&trailers));
}

#[tokio::test(start_paused = true)]
async fn a_503_that_grows_past_the_cap_mid_read_is_handed_on_whole() {
    let big = Bytes::from(vec![b'y'; 5000]);
    let response = call_chunked(vec![
        Ok(Frame::data(Bytes::from_static(
            b"{\"error\":\"Model gpt2 is currently loading\",\"p\":\"",
        ))),
        Ok(Frame::data(big.clone())),
        Ok(Frame::data(Bytes::from_static(b"\"}"))),
    ])
    .await;
    assert_eq!(report(&response).attempts(), 1);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let mut expected = b"{\"error\":\"Model gpt2 is currently loading\",\"p\":\"".to_vec();
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b"\"}");
    assert_eq!(&body[..], &expected[..]);
}

/// A raw server that sends a 503 with a loading body one byte a second.
async fn trickling_server(body: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = socket.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                socket.write_all(head.as_bytes()).await.unwrap();
                for byte in body {
                    socket.write_all(&[*byte]).await.unwrap();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(start_paused = true)]
async fn a_503_body_that_trickles_is_handed_on_after_five_seconds_with_every_byte() {
    let body = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;
    let addr = trickling_server(body).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let start = tokio::time::Instant::now();
    let response = client
        .oneshot(
            Request::post(format!("http://{addr}/models/gpt2"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    // Not classified in time: handed on, not retried.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    assert_eq!(response.status(), 503);
    assert_eq!(report(&response).attempts(), 1);
    // The caller still reads the whole body, byte for byte.
    let got = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&got[..], &body[..]);
}
