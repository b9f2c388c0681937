//! What the proxy costs on loopback, against a direct call in the same run:
//! added latency (p50, p99) and throughput for a warm model, and the memory
//! of a caller waiting out a cold start.
//!
//! ```text
//! cargo bench -p cold-start-proxy --bench overhead
//! ```
//! Wall-clock figures on a shared machine: compare the rows of one run, not
//! runs with each other.

#[path = "../../tests/support/hf_server.rs"]
mod hf_server;

use std::convert::Infallible;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

type Http = Client<HttpConnector, Full<Bytes>>;

/// A warm upstream: echoes the request body.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn proxy(upstream: &str, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cold-start-proxy"))
        .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
        .args(extra)
        .env("COLD_START_LOG", "error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap()
        .trim_end_matches(',')
        .to_owned();
    (child, format!("http://{addr}"))
}

fn body() -> Bytes {
    let mut text = String::from(r#"{"model":"m","prompt":""#);
    while text.len() < 2046 {
        text.push_str("I like you. ");
    }
    text.truncate(2046);
    text.push_str(r#""}"#);
    Bytes::from(text)
}

async fn once(client: &Http, url: &str, body: &Bytes) {
    let request = Request::post(url).body(Full::new(body.clone())).unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let got = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), body.len());
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// The proxy's resident memory, in bytes.
fn rss(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id().unwrap())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = echo_server().await;
        let (_child, via) = proxy(&upstream, &[]).await;
        let direct = format!("{upstream}/v1/completions");
        let proxied = format!("{via}/v1/completions");
        let client: Http = Client::builder(TokioExecutor::new()).build_http();
        let body = body();
        for url in [&direct, &proxied] {
            for _ in 0..200 {
                once(&client, url, &body).await;
            }
        }

        // Latency, one request at a time, interleaved in blocks.
        let (mut d, mut p) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            for (url, out) in [(&direct, &mut d), (&proxied, &mut p)] {
                for _ in 0..100 {
                    let start = Instant::now();
                    once(&client, url, &body).await;
                    out.push(start.elapsed());
                }
            }
        }
        d.sort();
        p.sort();
        println!("## cold-start-proxy on loopback (2 KiB JSON bodies, a warm echo upstream)\n");
        println!("| | p50 | p99 |\n|---|---|---|");
        println!("| direct | {} | {} |", micros(percentile(&d, 50.0)), micros(percentile(&d, 99.0)));
        println!("| through the proxy | {} | {} |", micros(percentile(&p, 50.0)), micros(percentile(&p, 99.0)));
        println!(
            "| added by the proxy | {} | {} |",
            micros(percentile(&p, 50.0).saturating_sub(percentile(&d, 50.0))),
            micros(percentile(&p, 99.0).saturating_sub(percentile(&d, 99.0)))
        );

        // Throughput: 32 callers at once, 2 s a round, interleaved.
        let mut rates = [0f64; 2];
        for _ in 0..2 {
            for (i, url) in [&direct, &proxied].into_iter().enumerate() {
                let stop = Instant::now() + Duration::from_secs(2);
                let tasks: Vec<_> = (0..32)
                    .map(|_| {
                        let (client, url, body) = (client.clone(), url.clone(), body.clone());
                        tokio::spawn(async move {
                            let mut n = 0u64;
                            while Instant::now() < stop {
                                once(&client, &url, &body).await;
                                n += 1;
                            }
                            n
                        })
                    })
                    .collect();
                let mut total = 0;
                for task in tasks {
                    total += task.await.unwrap();
                }
                rates[i] += total as f64 / 4.0;
            }
        }
        println!(
            "\n| 32 callers at once | requests / s |\n|---|---|\n| direct | {:.0} |\n| through the proxy | {:.0} ({:.0}% of direct) |",
            rates[0],
            rates[1],
            100.0 * rates[1] / rates[0]
        );

        // Memory: callers waiting behind one probe of a model that never
        // loads (KServe's not-ready), each on its own connection.
        const WAITING: usize = 400;
        let cold = hf_server::HfServer::start([(
            "/v2/models/m/infer",
            hf_server::Model::fixed(503, "application/json", &br#"{"error":"Model with name m is not ready."}"#[..]),
        )])
        .await;
        let (child, via) = proxy(&cold.url(""), &["--max-total-wait", "20s"]).await;
        let url = format!("{via}/v2/models/m/infer");
        let warm_client: Http = Client::builder(TokioExecutor::new()).build_http();
        let _ = warm_client
            .request(Request::get(format!("{via}/_cold_start/health")).body(Full::default()).unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss(&child);
        // The first caller meets the model cold; the others then wait
        // behind its probe, sending nothing.
        let first = {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                let client: Http = Client::builder(TokioExecutor::new()).build_http();
                let _ = client.request(Request::post(url).body(Full::new(body)).unwrap()).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let callers: Vec<_> = (0..WAITING)
            .map(|_| {
                // A client each: a connection each, as separate processes would.
                let client: Http = Client::builder(TokioExecutor::new()).build_http();
                let (url, body) = (url.clone(), body.clone());
                tokio::spawn(async move {
                    let request = Request::post(url).body(Full::new(body)).unwrap();
                    let _ = client.request(request).await;
                })
            })
            .collect();
        // Until every caller is in the proxy, waiting.
        let metrics = format!("{via}/_cold_start/metrics");
        let expected = format!("cold_start_proxy_requests_total {}", WAITING + 1);
        loop {
            let response = warm_client
                .request(Request::get(metrics.as_str()).body(Full::default()).unwrap())
                .await
                .unwrap();
            let text = response.into_body().collect().await.unwrap().to_bytes();
            if String::from_utf8_lossy(&text).contains(&expected) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = rss(&child);
        let per = (during.saturating_sub(before)) as f64 / WAITING as f64;
        println!(
            "\n| memory | bytes |\n|---|---|\n| proxy resident, idle | {before} |\n| with {WAITING} callers waiting out a cold start | {during} |\n| per waiting caller (its connection, buffered 2 KiB body and wait included) | {per:.0} |",
        );
        println!(
            "\nupstream requests during the wait: {} for {} callers",
            cold.count(),
            WAITING + 1
        );
        first.abort();
        for caller in callers {
            caller.abort();
        }
    });
}
