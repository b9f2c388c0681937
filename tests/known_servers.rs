//! What `ColdStartRetryLayer::new()` waits out, and what it passes through,
//! against each server's own bytes over a real socket.
//!
//! The llama.cpp, MLServer and Ray Serve answers are the bytes captured from
//! the real servers run on loopback (llama.cpp commit 0c1e57098 as vendored
//! by llama-cpp-python 0.3.36: `tools/server/server-http.cpp`,
//! `middleware_server_state`; MLServer 1.7.1: `mlserver/errors.py`,
//! `mlserver/rest/errors.py`; Ray Serve 2.60: `serve/exceptions.py`
//! `BackPressureError`, `serve/_private/http_util.py`). MLServer's and Ray
//! Serve's uvicorn add a `Content-Length`, written here too. The other
//! servers' answers are built from their source, as the built-ins cite.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::wire::{echo, raw, refusing_port, Seen, Wire};
use support::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{Classify, KnownServers, LlamaCpp, MlServer, RayServe};
use tower_cold_start::ColdStartRetryLayer;

/// llama-server's head for an error: every status of 400 or more closes
/// the connection (cpp-httplib).
const LLAMA_HEAD: &str = "Server: llama.cpp\nAccess-Control-Allow-Origin: \nContent-Type: application/json; charset=utf-8";
const LLAMA_LOADING_BODY: &[u8] =
    br#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#;

fn llama_loading() -> Vec<u8> {
    assert_eq!(LLAMA_LOADING_BODY.len(), 75, "the captured Content-Length");
    raw(
        &format!(
            "HTTP/1.1 503 Service Unavailable\n{LLAMA_HEAD}\nContent-Length: 75\nConnection: close"
        ),
        LLAMA_LOADING_BODY,
        false,
    )
}

fn llama_no_slot() -> Vec<u8> {
    let body =
        br#"{"error":{"code":503,"message":"no slot available","type":"unavailable_error"}}"#;
    raw(
        &format!(
            "HTTP/1.1 503 Service Unavailable\n{LLAMA_HEAD}\nContent-Length: {}\nConnection: close",
            body.len()
        ),
        body,
        false,
    )
}

fn mlserver(status: &str, body: &[u8]) -> Vec<u8> {
    raw(
        &format!("HTTP/1.1 {status}\ncontent-type: application/json"),
        body,
        true,
    )
}

fn mlserver_not_ready() -> Vec<u8> {
    mlserver(
        "400 Bad Request",
        br#"{"error":"Model slow is not ready yet."}"#,
    )
}

fn ray(status: &str, extra: &str, text: &str) -> Vec<u8> {
    raw(
        &format!("HTTP/1.1 {status}\ncontent-type: text/plain; charset=utf-8{extra}"),
        text.as_bytes(),
        true,
    )
}

const BACKPRESSURE: &str =
    "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).";

fn json(status: &str, body: &str) -> Vec<u8> {
    raw(
        &format!("HTTP/1.1 {status}\nContent-Type: application/json"),
        body.as_bytes(),
        true,
    )
}

/// Every cold answer the default waits out, as each server sends it.
fn cold_answers() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("llama.cpp loading", llama_loading()),
        ("MLServer not ready", mlserver_not_ready()),
        (
            "Ray Serve backpressure 503",
            ray("503 Service Unavailable", "", BACKPRESSURE),
        ),
        (
            "Ray Serve backpressure 429",
            ray("429 Too Many Requests", "\nretry-after: 5", BACKPRESSURE),
        ),
        (
            "HuggingFace loading",
            json(
                "503 Service Unavailable",
                r#"{"error":"Model distilbert/distilbert-base-uncased-finetuned-sst-2-english is currently loading","estimated_time":20.0}"#,
            ),
        ),
        (
            "KServe not ready",
            json(
                "503 Service Unavailable",
                r#"{"error":"Model with name sklearn-iris is not ready."}"#,
            ),
        ),
        (
            "Triton not at ready state",
            json(
                "503 Service Unavailable",
                r#"{"error":"'densenet_onnx' version 1 is not at ready state"}"#,
            ),
        ),
        (
            "vLLM unavailable",
            json(
                "503 Service Unavailable",
                r#"{"error":"Server is unavailable. Please try again later."}"#,
            ),
        ),
        (
            "TGI overloaded",
            json(
                "429 Too Many Requests",
                r#"{"error":"Model is overloaded","error_type":"overloaded"}"#,
            ),
        ),
        (
            "TEI overloaded",
            json(
                "429 Too Many Requests",
                r#"{"error":"Model is overloaded","error_type":"Overloaded"}"#,
            ),
        ),
        (
            "TEI overloaded, OpenAI route",
            json(
                "429 Too Many Requests",
                r#"{"message":"Model is overloaded","code":429,"type":"Overloaded"}"#,
            ),
        ),
        (
            "Ollama queue full",
            json(
                "503 Service Unavailable",
                r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#,
            ),
        ),
    ]
}

/// A server that answers `cold` to its first `times` requests, then echoes.
async fn cold_then_echo(cold: Vec<u8>, times: usize) -> Wire {
    Wire::start(move |seen, n| if n < times { cold.clone() } else { echo(seen) }).await
}

/// Posts `body` to `url` through `layer`; the status, body and report.
async fn post(layer: ColdStartRetryLayer, url: String, body: &'static [u8]) -> (u16, Bytes, u32) {
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let request = Request::post(url)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let attempts = report(&response).attempts();
    (status, bytes(response).await, attempts)
}

const INPUT: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(start_paused = true)]
async fn the_default_waits_out_every_known_servers_cold_answer() {
    for (name, cold) in cold_answers() {
        let server = cold_then_echo(cold, 2).await;
        let (status, body, attempts) =
            post(ColdStartRetryLayer::new(), server.url("/v1/x"), INPUT).await;
        assert_eq!((status, &body[..], attempts), (200, INPUT, 3), "{name}");
        let received = server.received();
        assert_eq!(received.len(), 3, "{name}");
        assert!(
            received.iter().all(|r| r.body == INPUT),
            "{name}: the same bytes each time"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn huggingfaces_too_busy_after_a_hold_is_waited_out_by_the_default() {
    let loading = cold_answers().remove(4).1;
    let busy = json(
        "500 Internal Server Error",
        r#"{"error":"Model too busy, unable to get response in less than 60 second(s)"}"#,
    );
    let server = Wire::start(move |seen, n| match n {
        0 => loading.clone(),
        1 => busy.clone(),
        _ => echo(seen),
    })
    .await;
    let (status, body, attempts) =
        post(ColdStartRetryLayer::new(), server.url("/models/m"), INPUT).await;
    assert_eq!((status, &body[..], attempts), (200, INPUT, 3));
    let received = server.received();
    assert!(!received[0].head.contains("x-wait-for-model"));
    assert!(
        received[1].head.contains("x-wait-for-model: true"),
        "retries are held"
    );
}

#[tokio::test(start_paused = true)]
async fn ray_serves_retry_after_sets_the_wait() {
    let cold = ray("429 Too Many Requests", "\nretry-after: 5", BACKPRESSURE);
    let server = cold_then_echo(cold, 1).await;
    let layer = ColdStartRetryLayer::new().jitter(false);
    let (status, _, attempts) = post(layer, server.url("/app"), INPUT).await;
    assert_eq!((status, attempts), (200, 2));
    let received = server.received();
    assert_eq!(received[1].at - received[0].at, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn retries_after_other_servers_answers_carry_no_huggingface_header() {
    let server = cold_then_echo(llama_loading(), 1).await;
    let (status, _, _) = post(ColdStartRetryLayer::new(), server.url("/completion"), INPUT).await;
    assert_eq!(status, 200);
    assert!(server
        .received()
        .iter()
        .all(|r| !r.head.contains("x-wait-for-model")));
}

/// Answers that look like cold starts and are not.
fn not_cold() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "a plain 503",
            raw("HTTP/1.1 503 Service Unavailable", b"", true),
        ),
        (
            "an HTML 503",
            raw(
                "HTTP/1.1 503 Service Unavailable\nContent-Type: text/html",
                b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
                true,
            ),
        ),
        ("llama.cpp no slot available", llama_no_slot()),
        (
            "Ray Serve failed to deploy",
            ray(
                "503 Service Unavailable",
                "",
                "app1_Model is unavailable because it failed to deploy.",
            ),
        ),
        (
            "Ray Serve request timed out",
            ray(
                "408 Request Timeout",
                "",
                "Request 1f3c timed out after 3.0s.",
            ),
        ),
        (
            "MLServer not found",
            mlserver("404 Not Found", br#"{"error":"Model slow not found"}"#),
        ),
        (
            "Triton unknown model",
            json(
                "404 Not Found",
                r#"{"error":"Request for unknown model: 'm' has no available versions"}"#,
            ),
        ),
        (
            "vLLM sleeping (no exact marker)",
            json(
                "503 Service Unavailable",
                r#"{"error":{"message":"The model is sleeping.","type":"ServiceUnavailableError","code":503}}"#,
            ),
        ),
        (
            "a rate limit",
            json(
                "429 Too Many Requests",
                r#"{"error":"Rate limit reached. Please log in or use a HF access token"}"#,
            ),
        ),
        (
            "a validation error",
            json(
                "400 Bad Request",
                r#"{"error":"Input validation error: `inputs` must be non-empty"}"#,
            ),
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn the_default_passes_everything_else_through_after_one_request() {
    for (name, answer) in not_cold() {
        let sent = answer.clone();
        let server = Wire::start(move |_, _| sent.clone()).await;
        let client = ServiceBuilder::new()
            .layer(ColdStartRetryLayer::new())
            .service(http1());
        let request = Request::post(server.url("/v1/x"))
            .body(Full::new(Bytes::from_static(INPUT)))
            .unwrap();
        let response = client.oneshot(request).await.unwrap();
        let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status_line = String::from_utf8_lossy(&answer[..head_end]).into_owned();
        assert!(
            status_line.starts_with(&format!("HTTP/1.1 {}", response.status().as_u16())),
            "{name}"
        );
        let report = report(&response);
        assert_eq!(
            &bytes(response).await[..],
            &answer[head_end + 4..],
            "{name}: byte for byte"
        );
        assert_eq!((server.count(), report.attempts()), (1, 1), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn refused_connections_fail_at_once_under_the_default() {
    let port = refusing_port();
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new())
        .service(http1());
    let start = Instant::now();
    let request = Request::post(format!("http://127.0.0.1:{port}/v1/x"))
        .body(Full::new(Bytes::from_static(INPUT)))
        .unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(error.is::<hyper_util::client::legacy::Error>(), "{error}");
}

#[tokio::test(start_paused = true)]
async fn each_new_built_in_waits_out_its_own_servers_answer_and_says_it_waits_out_refusals() {
    let cases = [
        (
            "llama.cpp",
            ColdStartRetryLayer::new().classifier(LlamaCpp),
            llama_loading(),
        ),
        (
            "MLServer",
            ColdStartRetryLayer::new().classifier(MlServer),
            mlserver_not_ready(),
        ),
        (
            "Ray Serve",
            ColdStartRetryLayer::new().classifier(RayServe),
            ray("503 Service Unavailable", "", BACKPRESSURE),
        ),
    ];
    assert!(LlamaCpp.retries_refused() && MlServer.retries_refused() && RayServe.retries_refused());
    assert!(!KnownServers.retries_refused());
    for (name, layer, cold) in cases {
        let server = cold_then_echo(cold, 2).await;
        let (status, body, attempts) = post(layer, server.url("/x"), INPUT).await;
        assert_eq!((status, &body[..], attempts), (200, INPUT, 3), "{name}");
        assert_eq!(server.count(), 3, "{name}");
    }
}

/// A server that refuses connections for `refused`, then answers `cold`
/// on every route until `ready`, then echoes.
async fn booting(
    refused: Duration,
    ready: Duration,
    cold: Vec<u8>,
) -> (u16, tokio::task::JoinHandle<Wire>) {
    let port = refusing_port();
    let start = Instant::now();
    let boot = tokio::spawn(async move {
        tokio::time::sleep(refused).await;
        let answer = move |seen: &Seen, _| {
            if seen.at < start + ready {
                cold.clone()
            } else {
                echo(seen)
            }
        };
        Wire::start_on(port, Arc::new(answer)).await
    });
    (port, boot)
}

async fn callers_of_a_booting_server(
    layer: ColdStartRetryLayer,
    n: usize,
    cold: Vec<u8>,
    path: &str,
) -> Wire {
    let (port, boot) = booting(Duration::from_secs(1), Duration::from_secs(3), cold).await;
    let client = layered(layer);
    let url = format!("http://127.0.0.1:{port}{path}");
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let body = format!(r#"{{"model":"m","prompt":"caller {i}"}}"#);
            tokio::spawn(send(client.clone(), url.clone(), body))
        })
        .collect();
    for call in calls {
        // `send` checks that a 200 echoes the caller's own bytes.
        let (status, at, _) = call.await.unwrap();
        assert_eq!(status, 200);
        assert!(at.elapsed() < Duration::from_secs(120), "within the budget");
    }
    let server = boot.await.unwrap();
    let reached: std::collections::HashSet<_> = server
        .received()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.body)
        .collect();
    assert_eq!(reached.len(), n, "every caller's bytes reached the server");
    server
}

/// The two ways to wait out refusals: on the default, and by the built-in.
fn booting_layers(built_in: impl Classify) -> [ColdStartRetryLayer; 2] {
    [
        ColdStartRetryLayer::new().classifier(KnownServers.with_retry_refused(true)),
        ColdStartRetryLayer::new().classifier(built_in),
    ]
}

#[tokio::test(start_paused = true)]
async fn a_booting_then_loading_llama_cpp_serves_one_and_twenty_callers_byte_exact() {
    for layer in booting_layers(LlamaCpp) {
        for n in [1, 20] {
            let path = "/v1/chat/completions";
            let server = callers_of_a_booting_server(layer.clone(), n, llama_loading(), path).await;
            println!(
                "llama.cpp-like, {n} callers: {} requests reached the server",
                server.count()
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_booting_then_loading_mlserver_serves_one_and_twenty_callers_byte_exact() {
    for layer in booting_layers(MlServer) {
        for n in [1, 20] {
            let path = "/v2/models/slow/infer";
            let server =
                callers_of_a_booting_server(layer.clone(), n, mlserver_not_ready(), path).await;
            println!(
                "MLServer-like, {n} callers: {} requests reached the server",
                server.count()
            );
        }
    }
}
