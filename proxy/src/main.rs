//! `cold-start-proxy`: tower-cold-start's layer as a sidecar, for every
//! client that cannot take a tower layer (Python, JavaScript, async-openai).
//! See `--help`.

#![forbid(unsafe_code)]

mod args;
mod forward;

use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower_cold_start::classifier::{self, Classify};
use tower_cold_start::warm::KeepWarmSchedule;
use tower_cold_start::{key, ColdStartRetryLayer};

use crate::args::{Args, Classifier};
use crate::forward::{Layered, Proxy};

fn main() {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) if !error.use_stderr() => {
            // --help, --version.
            let _ = error.print();
            std::process::exit(0);
        }
        Err(error) => {
            // One line, before anything listens.
            let text = error.to_string();
            let line = text.lines().next().unwrap_or("bad arguments");
            eprintln!("cold-start-proxy: {}", line.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    // One line per cold start (the proxy's own), not one per wait (the
    // layer's), unless COLD_START_LOG asks for more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COLD_START_LOG")
                .unwrap_or_else(|_| "info,tower_cold_start=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(error) = runtime.block_on(run(args)) {
        eprintln!("cold-start-proxy: {error}");
        std::process::exit(1);
    }
}

/// `layer` with `classifier`, whose answer on refused connections `--retry-refused`
/// overrides where given.
fn install<C: Classify>(
    layer: ColdStartRetryLayer,
    classifier: C,
    retry_refused: Option<bool>,
) -> ColdStartRetryLayer {
    match retry_refused {
        Some(retry) => layer.classifier(classifier.with_retry_refused(retry)),
        None => layer.classifier(classifier),
    }
}

/// The layer the flags describe.
fn layer(args: &Args) -> ColdStartRetryLayer {
    let layer = ColdStartRetryLayer::new();
    let refused = args.retry_refused;
    let layer = match args.classifier {
        Classifier::Known => install(layer, classifier::KnownServers, refused),
        Classifier::Huggingface => install(layer, classifier::HuggingFace, refused),
        Classifier::InferenceEndpoints => install(layer, classifier::InferenceEndpoints, refused),
        Classifier::RetryAfter => install(layer, classifier::RetryAfter::new(), refused),
        Classifier::Kserve => install(layer, classifier::KServe, refused),
        Classifier::Triton => install(layer, classifier::Triton::new(), refused),
        Classifier::Vllm => install(layer, classifier::Vllm, refused),
        Classifier::Tgi => install(layer, classifier::TgiOverloaded, refused),
        Classifier::Tei => install(layer, classifier::Tei, refused),
        Classifier::Ollama => install(layer, classifier::Ollama, refused),
        Classifier::LlamaCpp => install(layer, classifier::LlamaCpp, refused),
        Classifier::Mlserver => install(layer, classifier::MlServer, refused),
        Classifier::RayServe => install(layer, classifier::RayServe, refused),
    };
    let layer = layer
        .max_total_wait(args.max_total_wait)
        .body_limit(args.body_limit)
        .total_body_limit(args.total_body_limit);
    match &args.model_key {
        Some(field) => layer.model_key(key::json_field(field.clone())),
        None => layer,
    }
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// HTTP and HTTPS (rustls; the Mozilla roots and `--upstream-ca`; HTTP/2
/// where the server offers it).
fn connector(args: &Args) -> Result<Connector, Box<dyn std::error::Error>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &args.upstream_ca {
        use rustls_pki_types::pem::PemObject;
        let mut added = 0;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("--upstream-ca {}: no certificate in it", path.display()).into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build())
}

fn client(args: &Args, layer: &ColdStartRetryLayer, connector: Connector) -> Layered {
    let upstream =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
    let upstream = forward::with_attempt_timeout(upstream, args.attempt_timeout);
    tower::ServiceBuilder::new().layer(layer).service(upstream)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let connector = connector(&args)?;
    // One layer for the proxy's calls and its warm-ups: one registry of
    // cold models, so a caller arriving during a warm-up waits behind it.
    let layer = layer(&args);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let listener = TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    let proxy = Arc::new(Proxy {
        client: client(&args, &layer, connector.clone()),
        upstream: args.upstream.clone(),
        metrics,
    });
    warm(&args, &layer, &connector);
    // The line a supervisor (or a test) waits for.
    println!(
        "cold-start-proxy listening on {local}, forwarding to {}",
        args.upstream
    );
    tracing::info!(%local, upstream = %args.upstream, "listening");

    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                };
                let proxy = Arc::clone(&proxy);
                let service = forward::Service(Arc::clone(&proxy));
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = &mut stop => break,
        }
    }
    // No new connections; those open finish their requests, or are cut at
    // the grace period.
    drop(listener);
    tracing::info!(grace_ms = args.grace.as_millis() as u64, "shutting down");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("every request finished"),
        () = tokio::time::sleep(args.grace) => tracing::warn!("grace period over; cutting requests in flight"),
    }
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Warms each `--warm` model now, then keeps it warm, in the background.
fn warm(args: &Args, layer: &ColdStartRetryLayer, connector: &Connector) {
    for model in &args.warm {
        let uri = format!(
            "{}{}",
            args.upstream.to_string().trim_end_matches('/'),
            model.path
        );
        let body = Bytes::from(model.body.clone());
        let ping = move || {
            Request::post(uri.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .expect("a valid warm-up request")
        };
        // The warm-up pings through a client of their own body type, over
        // the same layer and upstream settings.
        let warm_client = tower::ServiceBuilder::new().layer(layer).service(
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build(connector.clone()),
        );
        let path = model.path.clone();
        let every = args.keep_warm_every;
        tokio::spawn(async move {
            let outcome = tower_cold_start::warm::warm_up(
                warm_client.clone(),
                ping.clone(),
                std::time::Duration::from_secs(600),
            )
            .await;
            tracing::info!(path, outcome = ?outcome_name(&outcome), "warm-up");
            let keep = tower_cold_start::warm::keep_warm(
                warm_client,
                ping,
                KeepWarmSchedule::new().interval(every),
            );
            // Kept for the life of the process.
            std::mem::forget(keep);
        });
    }
}

fn outcome_name(outcome: &tower_cold_start::warm::WarmUpOutcome) -> &'static str {
    match outcome {
        tower_cold_start::warm::WarmUpOutcome::Warm { .. } => "warm",
        tower_cold_start::warm::WarmUpOutcome::TimedOut { .. } => "timed out",
        tower_cold_start::warm::WarmUpOutcome::Failed(_) => "failed",
        _ => "other",
    }
}
