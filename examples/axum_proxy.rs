//! An axum app that forwards `/models/*` to a model server through one
//! shared, layered client, so its own callers never see a cold start.
//!
//! ```text
//! cargo run --example axum_proxy            # serves on 127.0.0.1:3000
//! curl -d '{"inputs":"hi"}' http://127.0.0.1:3000/models/gpt2
//! cargo run --example axum_proxy -- --once  # sends itself one request, then exits
//! ```
//! At start-up it warms `bert-base-uncased` with `warm_up` before accepting
//! traffic, and keeps it warm with `keep_warm`; `gpt2` is left cold, so the
//! first request shows the layer at work. The upstream is an embedded
//! HuggingFace-like server whose models are cold for 3 s; set `UPSTREAM=http://host:port` to forward elsewhere (plain
//! HTTP; the quickstart shows an HTTPS client).

#[path = "../tests/support/hf_server.rs"]
mod hf_server;

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_cold_start::warm::{keep_warm, warm_up, KeepWarmSchedule, WarmUpOutcome};
use tower_cold_start::{ColdStartReport, ColdStartRetry, ColdStartRetryLayer, RequestBody};

/// The shared client: clones share the connection pool and the configuration.
type Upstream = tower::timeout::Timeout<ColdStartRetry<Client<HttpConnector, RequestBody<Body>>>>;

#[derive(Clone)]
struct App {
    client: Upstream,
    upstream: String,
}

async fn forward(State(app): State<App>, request: Request<Body>) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{path}", app.upstream).parse::<Uri>() {
        Ok(uri) => uri,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad path").into_response(),
    };
    // Hop-by-hop and host headers belong to this hop, not the next.
    parts.headers.remove(http::header::HOST);
    match app.client.oneshot(Request::from_parts(parts, body)).await {
        Ok(response) => {
            if let Some(report) = response.extensions().get::<ColdStartReport>() {
                if report.attempts() > 1 {
                    log_cold_start(report);
                }
            }
            response.map(Body::new).into_response()
        }
        Err(error) => (StatusCode::BAD_GATEWAY, format!("upstream: {error}")).into_response(),
    }
}

fn log_cold_start(report: &ColdStartReport) {
    println!(
        "proxy: upstream was cold: {} attempts, {:.1} s asleep",
        report.attempts(),
        report.waited().as_secs_f64()
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let once = std::env::args().any(|a| a == "--once");
    let upstream = match std::env::var("UPSTREAM") {
        Ok(url) => url.trim_end_matches('/').to_owned(),
        Err(_) => {
            let cold = || hf_server::Model::cold_with(Duration::from_secs(3), 2.0, true);
            let server = hf_server::HfServer::start([
                ("/models/gpt2", cold()),
                ("/models/bert-base-uncased", cold()),
            ])
            .await;
            println!("embedded upstream on {} (models cold for 3 s)", server.addr);
            server.url("")
        }
    };

    let client = ServiceBuilder::new()
        .timeout(Duration::from_secs(180))
        .layer(ColdStartRetryLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http());

    // Before accepting traffic: warm the model the app depends on, through the
    // same stack (and credentials) the handlers use; then keep it warm.
    let warm_request = {
        let url = format!("{upstream}/models/bert-base-uncased");
        move || {
            Request::post(url.as_str())
                .header("content-type", "application/json")
                .body(Body::from(r#"{"inputs":"warm-up"}"#))
                .expect("a valid request")
        }
    };
    let started = std::time::Instant::now();
    match warm_up(
        client.clone(),
        warm_request.clone(),
        Duration::from_secs(300),
    )
    .await
    {
        WarmUpOutcome::Warm { report, .. } => println!(
            "bert-base-uncased warm after {:.1} s ({} attempt(s))",
            started.elapsed().as_secs_f64(),
            report.map_or(1, |r| r.attempts())
        ),
        other => println!("warm-up did not finish: {other:?}; serving anyway"),
    }
    let _keep_warm = keep_warm(client.clone(), warm_request, KeepWarmSchedule::new());

    let app = Router::new()
        .route("/models/{*model}", post(forward))
        .with_state(App { client, upstream });

    let addr = if once {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("proxy listening on http://{local}");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    if !once {
        server.await??;
        return Ok(());
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<String>();
    let request = Request::post(format!("http://{local}/models/gpt2"))
        .header("content-type", "application/json")
        .body(r#"{"inputs":"Hello, cold model"}"#.to_owned())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!("caller got {status}: {}", String::from_utf8_lossy(&body));
    if !status.is_success() {
        return Err(format!("proxy answered {status}").into());
    }
    Ok(())
}
