//! Calls a cold model through `ColdStartRetryLayer` and shows the wait.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//! starts an embedded HuggingFace-like server on 127.0.0.1 whose model is
//! cold for 4 seconds, and calls it. To call a real server that cold-starts
//! today instead, give its URL (and `HF_TOKEN` where it needs one):
//!
//! ```text
//! HF_TOKEN=hf_... cargo run --example quickstart -- https://xyz.us-east-1.aws.endpoints.huggingface.cloud "I like you"
//! cargo run --example quickstart -- http://127.0.0.1:8080/v2/models/sentiment/infer '{"inputs":[]}'
//! ```
//! An Inference Endpoint (scaled to zero) is called with the
//! `InferenceEndpoints` classifier, which asks the proxy to hold the request
//! until a replica is up; any other URL with the built-ins for the servers
//! people run themselves (KServe, Triton, vLLM, TEI, TGI, Ollama), which also
//! wait out a server still booting. (HuggingFace's serverless API has been
//! warm-only since February 2025: it no longer sends the loading answer the
//! embedded server shows.)

#[path = "../tests/support/hf_server.rs"]
mod hf_server;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_cold_start::classifier::{self, Classify};
use tower_cold_start::{ColdStartReport, ColdStartRetryLayer, RequestBody, ResponseBody};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let target = args.next();
    let input = args
        .next()
        .unwrap_or_else(|| "I like you. I love you.".to_owned());
    let body = Bytes::from(serde_json::json!({ "inputs": input }).to_string());

    match target {
        None => {
            let model = "distilbert/distilbert-base-uncased-finetuned-sst-2-english";
            let path = format!("/models/{model}");
            let server = hf_server::HfServer::start([(
                path.as_str(),
                hf_server::Model::cold_with(Duration::from_secs(4), 2.5, true),
            )])
            .await;
            // What the real model answers for a sentiment input.
            server.set_answer(
                r#"[[{"label":"POSITIVE","score":0.9998704791069031},{"label":"NEGATIVE","score":0.00012949648278299719}]]"#,
            );
            println!(
                "embedded HuggingFace-like server on {}: {model} is cold for 4 s",
                server.addr
            );
            let client = Client::builder(TokioExecutor::new()).build_http();
            run(
                client,
                ColdStartRetryLayer::new(),
                &server.url(&path),
                None,
                body,
            )
            .await
        }
        Some(url) => {
            let token = std::env::var("HF_TOKEN")
                .ok()
                .map(|t| format!("Bearer {t}"));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .build();
            let client = Client::builder(TokioExecutor::new()).build(https);
            let layer = if url.contains(".endpoints.huggingface.cloud") {
                ColdStartRetryLayer::new().classifier(classifier::InferenceEndpoints)
            } else {
                let servers = classifier::KServe
                    .or(classifier::Triton::new())
                    .or(classifier::Vllm)
                    .or(classifier::Tei)
                    .or(classifier::TgiOverloaded)
                    .or(classifier::Ollama);
                ColdStartRetryLayer::new().classifier(servers)
            };
            run(client, layer, &url, token, body).await
        }
    }
}

async fn run<S, B>(
    inner: S,
    layer: ColdStartRetryLayer,
    url: &str,
    token: Option<String>,
    body: Bytes,
) -> Result<(), BoxError>
where
    S: Service<Request<RequestBody<Full<Bytes>>>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let client =
        ServiceBuilder::new()
            // The caller's overall deadline: the layer's 120 s budget plus one
            // held request.
            .timeout(Duration::from_secs(180))
            .layer(layer.on_retry(move |event| {
                let what = if event.unreachable() {
                    "the server is unreachable (still booting?)".to_owned()
                } else {
                    format!("{} is loading", event.model().unwrap_or("the model"))
                };
                println!(
                "  {what} (attempt {}, server estimate {}); retrying in {:.1} s [{:.1} s so far]",
                event.attempt(),
                event.estimate().map_or("none".to_owned(), |e| format!("{e} s")),
                event.wait().as_secs_f64(),
                started.elapsed().as_secs_f64(),
            );
            }))
            .service(inner);

    let mut request = Request::post(url).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", token);
    }
    println!("POST {url}");
    let response: http::Response<ResponseBody<B>> =
        client.oneshot(request.body(Full::new(body))?).await?;
    let status = response.status();
    let report = *response
        .extensions()
        .get::<ColdStartReport>()
        .expect("every response carries a report");
    let text = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes();
    println!(
        "{status} after {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&text)
    );
    println!(
        "report: {} attempt(s), {:.1} s asleep",
        report.attempts(),
        report.waited().as_secs_f64()
    );
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the server answered {status}").into())
    }
}
