//! Hostile servers over a real socket: each misbehaviour has a defined
//! outcome, and none hangs the caller or panics.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::ColdStartRetryLayer;

const LOADING: &[u8] = br#"{"error":"Model gpt2 is currently loading","estimated_time":20.0}"#;

/// What a scripted server does after reading a request.
#[derive(Clone)]
enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Writes `chunk` forever, as chunked encoding, one chunk per 10 ms.
    Endless(Vec<u8>),
    /// Closes the connection.
    Close,
}

/// A raw HTTP/1.1 server that answers every request with `script`, and
/// counts the requests it read.
async fn scripted(
    script: Vec<Step>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let script = script.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut read = 0;
                // Read up to the end of the request head and its small body.
                loop {
                    let n = socket.read(&mut buf[read..]).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    read += n;
                    if let Some(end) = buf[..read].windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if read >= end + 4 + len {
                            break;
                        }
                    }
                }
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                for step in script {
                    match step {
                        Step::Write(bytes) => {
                            if socket.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Step::Sleep(d) => tokio::time::sleep(d).await,
                        Step::Endless(chunk) => loop {
                            let framed = [
                                format!("{:x}\r\n", chunk.len()).into_bytes(),
                                chunk.clone(),
                                b"\r\n".to_vec(),
                            ]
                            .concat();
                            if socket.write_all(&framed).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        },
                        Step::Close => return,
                    }
                }
                // Keep the connection open, as a server that stalls would.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        }
    });
    (addr, count)
}

fn head(status: &str, extra: &str) -> Step {
    Step::Write(
        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}\r\n").into_bytes(),
    )
}

async fn call(
    addr: std::net::SocketAddr,
) -> http::Response<tower_cold_start::ResponseBody<hyper::body::Incoming>> {
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    client
        .oneshot(
            Request::post(format!("http://{addr}/models/gpt2"))
                .body(Full::new(Bytes::from_static(b"{\"inputs\":\"x\"}")))
                .unwrap(),
        )
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_endless_503_body_is_handed_on_at_once_not_read_to_its_end() {
    let (addr, count) = scripted(vec![
        head("503 Service Unavailable", "transfer-encoding: chunked\r\n"),
        Step::Endless(b"{\"error\":\"Model gpt2 is currently loading\",\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".repeat(20)),
    ])
    .await;
    let start = tokio::time::Instant::now();
    let response = call(addr).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(response.status(), 503);
    assert_eq!(report(&response).attempts(), 1);
    // The caller reads on, from the first byte the server sent.
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"{\"error\":\"Model gpt2 is currently loading\""));
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_503_reset_mid_body_reaches_the_caller_as_bytes_then_an_error() {
    let (addr, count) = scripted(vec![
        head(
            "503 Service Unavailable",
            &format!("content-length: {}\r\n", LOADING.len()),
        ),
        Step::Write(LOADING[..30].to_vec()),
        Step::Close,
    ])
    .await;
    let response = call(addr).await;
    assert_eq!(response.status(), 503);
    assert_eq!(report(&response).attempts(), 1);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], &LOADING[..30]);
    assert!(
        body.frame().await.unwrap().is_err(),
        "the cut reaches the caller as an error"
    );
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_content_length_shorter_than_the_body_truncates_it_and_is_not_a_cold_start() {
    let (addr, count) = scripted(vec![
        head("503 Service Unavailable", "content-length: 20\r\n"),
        Step::Write(LOADING.to_vec()),
    ])
    .await;
    let response = call(addr).await;
    assert_eq!(response.status(), 503);
    assert_eq!(report(&response).attempts(), 1);
    let got = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &got[..],
        &LOADING[..20],
        "framed by content-length, as HTTP says"
    );
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_compressed_loading_503_is_not_decoded_and_arrives_as_sent() {
    // gzip of LOADING, made with Python's gzip module (mtime 0).
    let gzipped: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xab, 0x56, 0x4a, 0x2d, 0x2a,
        0xca, 0x2f, 0x52, 0xb2, 0x52, 0xf2, 0xcd, 0x4f, 0x49, 0xcd, 0x51, 0x48, 0x2f, 0x28, 0x31,
        0x52, 0xc8, 0x2c, 0x56, 0x48, 0x2e, 0x2d, 0x2a, 0x4a, 0xcd, 0x2b, 0xc9, 0xa9, 0x54, 0xc8,
        0xc9, 0x4f, 0x4c, 0xc9, 0xcc, 0x4b, 0x57, 0xd2, 0x51, 0x4a, 0x2d, 0x2e, 0xc9, 0xcc, 0x4d,
        0x2c, 0x49, 0x4d, 0x89, 0x07, 0xd2, 0xa9, 0x4a, 0x56, 0x46, 0x06, 0x7a, 0x06, 0xb5, 0x00,
        0x11, 0xc5, 0x92, 0xb3, 0x41, 0x00, 0x00, 0x00,
    ];
    let (addr, count) = scripted(vec![
        head(
            "503 Service Unavailable",
            &format!(
                "content-encoding: gzip\r\ncontent-length: {}\r\n",
                gzipped.len()
            ),
        ),
        Step::Write(gzipped.to_vec()),
    ])
    .await;
    let response = call(addr).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(report(&response).attempts(), 1);
    let got = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&got[..], gzipped);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_closes_without_answering_is_an_error_after_one_request() {
    let (addr, count) = scripted(vec![Step::Close]).await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let result = client
        .oneshot(
            Request::post(format!("http://{addr}/"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await;
    assert!(result.is_err());
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_while_a_503_body_is_read_sends_nothing_more() {
    let (addr, count) = scripted(vec![
        head(
            "503 Service Unavailable",
            &format!("content-length: {}\r\n", LOADING.len()),
        ),
        Step::Write(LOADING[..10].to_vec()),
        Step::Sleep(Duration::from_secs(3600)),
    ])
    .await;
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false))
        .service(http1());
    let call = client.oneshot(
        Request::post(format!("http://{addr}/"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    );
    // The peek gives up after 5 s; drop the call before that.
    assert!(tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .is_err());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}
