//! An OpenAI-compatible server that cold-starts, called through
//! reqwest-middleware with the layer in it.
//!
//! ```text
//! cargo run --example openai_compatible --features reqwest-middleware
//! ```
//! starts a vLLM-like chat server on 127.0.0.1 whose model `small` cannot
//! serve for 3 s (`503 {"error":"Server is unavailable. Please try again
//! later."}`), while `tiny` is warm. Six callers share one client: the four
//! asking for `small` wait behind one probe (they are told apart from
//! `tiny`'s by the body's `model` field), the two asking for `tiny` are
//! answered at once. It prints a line per wait and finishes by itself.

#[path = "../tests/support/hf_server.rs"]
mod hf_server;

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tower::BoxError;
use tower_cold_start::reqwest::ColdStartMiddleware;
use tower_cold_start::{classifier, key, ColdStartReport, ColdStartRetryLayer};

const COLD_FOR: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let start = Instant::now();
    let server = hf_server::HfServer::start([
        (
            // vLLM's readiness route, which the probing caller polls.
            "/health",
            hf_server::Model::script(move |request, _| {
                let status = if request.at < start + COLD_FOR { 503 } else { 200 };
                (Duration::ZERO, (status, vec![], Bytes::new()))
            }),
        ),
        (
        "/v1/chat/completions",
        hf_server::Model::script(move |request, _| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let model = body["model"].as_str().unwrap_or("?").to_owned();
            if model == "small" && request.at < start + COLD_FOR {
                let busy = br#"{"error":"Server is unavailable. Please try again later."}"#;
                return (Duration::ZERO, (503, vec![], Bytes::from_static(busy)));
            }
            let answer = serde_json::json!({
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
            });
            (Duration::ZERO, (200, vec![("content-type", "application/json".into())], answer.to_string().into()))
        }),
        ),
    ])
    .await;
    println!(
        "an OpenAI-compatible server on {}: model `small` is cold for {} s, `tiny` is warm",
        server.addr,
        COLD_FOR.as_secs()
    );

    let layer = ColdStartRetryLayer::new()
        .classifier(classifier::Vllm)
        // One URL serves many models: coalesce by the body's `model`.
        .model_key(key::json_field("model"))
        .on_retry(move |event| {
            let at = start.elapsed().as_secs_f64();
            if event.behind_probe() {
                println!("  [{at:.1} s] a caller waits behind the probe of its model");
            } else {
                let next = event.wait().as_secs_f64();
                println!("  [{at:.1} s] the probing caller polls again in {next:.1} s");
            }
        });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(ColdStartMiddleware::new(layer))
        .build();

    let url = server.url("/v1/chat/completions");
    let mut calls = tokio::task::JoinSet::new();
    for (n, model) in ["small", "tiny", "small", "small", "tiny", "small"]
        .into_iter()
        .enumerate()
    {
        let client = client.clone();
        let url = url.clone();
        calls.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100 * n as u64)).await;
            let request = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]});
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(request.to_string())
                .send()
                .await?;
            let report = *response.extensions().get::<ColdStartReport>().expect("a report");
            let status = response.status();
            let answer: serde_json::Value = serde_json::from_slice(&response.bytes().await?)?;
            Ok::<_, BoxError>((model, status, report, answer["choices"][0]["message"]["content"].clone()))
        });
    }
    while let Some(call) = calls.join_next().await {
        let (model, status, report, content) = call??;
        println!(
            "{model}: {status} after {:.1} s, {} request(s) sent, {content}",
            start.elapsed().as_secs_f64(),
            report.attempts()
        );
        if !status.is_success() {
            return Err(format!("{model} answered {status}").into());
        }
    }
    let received = server.received();
    let chats = received
        .iter()
        .filter(|r| r.uri.path() == "/v1/chat/completions")
        .count();
    println!(
        "{chats} chat requests and {} readiness checks reached the server for 6 callers",
        received.len() - chats
    );
    Ok(())
}
