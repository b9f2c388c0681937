//! A self-hosted model server booting, seen through the layer.
//!
//! ```text
//! cargo run --example self_hosted
//! ```
//! starts a KServe-like server on 127.0.0.1 that does what such servers do
//! when they start: its port refuses connections for 2 s (the process is
//! loading), then it answers "not ready" for 2 s more (the model is warming
//! up), then it answers. One request goes in; the layer waits out both
//! phases, sending the small request itself four times a second (a
//! readiness check pays only for a large body), and prints a line each time
//! it waits. It finishes by itself.

#[path = "../tests/support/hf_server.rs"]
mod hf_server;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_cold_start::{classifier, ColdStartReport, ColdStartRetryLayer};

const REFUSED_FOR: Duration = Duration::from_secs(2);
const NOT_READY_FOR: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let start = Instant::now();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ready_at = start + REFUSED_FOR + NOT_READY_FOR;
    let server = tokio::spawn(boot(port, ready_at));
    println!(
        "a KServe-like server on 127.0.0.1:{port}: refuses connections for {} s, \
         then answers \"not ready\" for {} s",
        REFUSED_FOR.as_secs(),
        NOT_READY_FOR.as_secs()
    );

    let layer = ColdStartRetryLayer::new()
        .classifier(classifier::KServe)
        .on_retry(move |event| {
            let what = if event.unreachable() {
                "server unreachable (connection refused)"
            } else {
                "model not ready"
            };
            println!(
                "  [{:.1} s] {what}; next try in {:.1} s",
                start.elapsed().as_secs_f64(),
                event.wait().as_secs_f64()
            );
        });
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build_http());
    let input = Bytes::from_static(
        br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1.0]}]}"#,
    );
    let request = Request::post(format!("http://127.0.0.1:{port}/v2/models/sentiment/infer"))
        .header("content-type", "application/json")
        .body(Full::new(input))?;
    println!("POST {}", request.uri());
    let response = client.oneshot(request).await?;
    let answered = Instant::now();
    let status = response.status();
    let report = *response
        .extensions()
        .get::<ColdStartReport>()
        .expect("every response carries a report");
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "{status} after {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&body)
    );
    let server = server.await??;
    let received = server.received();
    let checks = received
        .iter()
        .filter(|r| r.uri.path().ends_with("/ready"))
        .count();
    println!(
        "answered {} ms after the model was ready; {} request(s) reached the server \
         ({checks} readiness check(s), {} with the body); the layer sent the request {} time(s)",
        answered.saturating_duration_since(ready_at).as_millis(),
        received.len(),
        received.len() - checks,
        report.attempts()
    );
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the server answered {status}").into())
    }
}

/// The server: nothing listens until `REFUSED_FOR` has passed; then
/// "not ready" (503, as KServe says it) until `ready_at`, then answers.
async fn boot(port: u16, ready_at: Instant) -> Result<hf_server::HfServer, BoxError> {
    tokio::time::sleep(REFUSED_FOR).await;
    let not_ready =
        || Bytes::from_static(br#"{"error":"Model with name sentiment is not ready."}"#);
    let ready = move |r: &hf_server::Received| r.at >= ready_at;
    let server = hf_server::HfServer::start_on(
        port,
        [
            (
                "/v2/models/sentiment/infer",
                hf_server::Model::script(move |r, _| {
                    let answer = match ready(r) {
                        true => (
                            200,
                            vec![],
                            Bytes::from_static(
                                br#"{"outputs":[{"name":"label","data":["POSITIVE"]}]}"#,
                            ),
                        ),
                        false => (503, vec![], not_ready()),
                    };
                    (Duration::ZERO, answer)
                }),
            ),
            (
                "/v2/models/sentiment/ready",
                hf_server::Model::script(move |r, _| {
                    let status = if ready(r) { 200 } else { 503 };
                    (Duration::ZERO, (status, vec![], Bytes::new()))
                }),
            ),
        ],
    )
    .await;
    // Keep serving until the example ends.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(server)
}
