//! Sustained load: 100,000 requests from 500 concurrent tasks against the
//! test server, mixing warm, cold, non-retryable and hostile models. Every
//! request is accounted for, every body is byte-exact, and resident memory
//! stays flat between the first and the last quarter of the run.
//!
//! Real time (the waits are shortened with `max_wait`), a multi-threaded
//! runtime, HTTP/1.1 over 127.0.0.1. Counts can be changed with
//! `SOAK_REQUESTS` and `SOAK_TASKS`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::ColdStartRetryLayer;

const HTML_503: &[u8] = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>";
const RATE_LIMITED: &[u8] =
    br#"{"error":"Rate limit reached. Please log in or use a HF access token"}"#;

fn oversized_loading() -> Bytes {
    let mut body =
        br#"{"error":"Model big is currently loading","estimated_time":1.0,"pad":""#.to_vec();
    body.extend(vec![b'p'; 6000]);
    body.extend(br#""}"#);
    body.into()
}

/// What a request to each path must end in.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 200, echoing the request body.
    Echo,
    /// This status and exactly this body, after one request.
    Fixed(u16, &'static [u8]),
    /// The loading 503, once the call's budget (3 attempts, or 300 ms,
    /// spent partly waiting for other callers' probes) is spent.
    Exhausted,
    /// A model that keeps being unloaded: 200 echoing the body, or, if other
    /// callers' requests took the warm slots three times, the loading 503.
    Flaky,
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_hundred_thousand_requests_from_five_hundred_tasks_are_all_accounted_for() {
    let total = env("SOAK_REQUESTS", 100_000);
    let tasks = env("SOAK_TASKS", 500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let oversized: &'static [u8] = Box::leak(oversized_loading().to_vec().into_boxed_slice());
        let models: Vec<(&str, Model, Expect)> = vec![
            ("/models/warm", Model::Warm, Expect::Echo),
            ("/models/warm2", Model::Warm, Expect::Echo),
            ("/models/flaky", Model::Flaky { every: 3, estimate: "0.5".into() }, Expect::Flaky),
            ("/models/rate", Model::fixed(429, "application/json", RATE_LIMITED), Expect::Fixed(429, RATE_LIMITED)),
            ("/models/html", Model::fixed(503, "text/html", HTML_503), Expect::Fixed(503, HTML_503)),
            ("/models/big", Model::fixed(503, "application/json", oversized), Expect::Fixed(503, oversized)),
            ("/models/nan", Model::fixed(503, "application/json", &br#"{"error":"Model nan is currently loading","estimated_time":NaN}"#[..]), Expect::Fixed(503, br#"{"error":"Model nan is currently loading","estimated_time":NaN}"#)),
            ("/models/never", Model::never_loads("1e308"), Expect::Exhausted),
        ];
        let server = HfServer::start(models.iter().map(|(p, m, _)| (*p, m.clone()))).await;
        server.stop_recording();
        let paths: Arc<Vec<(String, Expect)>> =
            Arc::new(models.iter().map(|(p, _, e)| (server.url(p), *e)).collect());

        let client = ServiceBuilder::new()
            .layer(
                ColdStartRetryLayer::new().jitter(false)
                    .max_wait(Duration::from_millis(5))
                    .max_total_wait(Duration::from_millis(300))
                    .max_attempts(3),
            )
            .service(http1());

        let done = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let start = Instant::now();
        let per_task = total / tasks;
        let mut set = tokio::task::JoinSet::new();
        for task in 0..tasks {
            let client = client.clone();
            let paths = paths.clone();
            let done = done.clone();
            let samples = samples.clone();
            set.spawn(async move {
                let mut outcome = [0usize; 4];
                for i in 0..per_task {
                    let n = task * per_task + i;
                    // Warm models take most of the traffic.
                    let (url, expect) = &paths[[0, 1, 0, 1, 2, 0, 3, 1, 4, 0, 5, 1, 6, 0, 7, 2][n % 16]];
                    let body = Bytes::from(format!(r#"{{"inputs":"request {n} from task {task}"}}"#));
                    let request = Request::post(url.as_str())
                        .header("authorization", "Bearer hf_soak")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let response = client.clone().oneshot(request).await.expect("no transport error on loopback");
                    let status = response.status().as_u16();
                    let attempts = report(&response).attempts();
                    let got = response.into_body().collect().await.unwrap().to_bytes();
                    match expect {
                        Expect::Echo => {
                            assert_eq!(status, 200, "{url}");
                            assert_eq!(got, body, "{url}: echo must be byte-exact");
                            outcome[0] += 1;
                        }
                        Expect::Fixed(want, want_body) => {
                            assert_eq!((status, attempts), (*want, 1), "{url}");
                            assert_eq!(&got[..], *want_body, "{url}: body must be as sent");
                            outcome[1] += 1;
                        }
                        Expect::Exhausted => {
                            assert_eq!(status, 503, "{url}");
                            assert!(attempts <= 3, "{url}: {attempts}");
                            assert_eq!(got, loading_body("never", Some("1e308")));
                            outcome[2] += 1;
                        }
                        Expect::Flaky if status == 200 => {
                            assert_eq!(got, body, "{url}: echo must be byte-exact");
                            outcome[0] += 1;
                        }
                        Expect::Flaky => {
                            assert_eq!(status, 503, "{url}");
                            assert!(attempts <= 3, "{url}: {attempts}");
                            assert_eq!(got, loading_body("flaky", Some("0.5")));
                            outcome[3] += 1;
                        }
                    }
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if finished % (total / 40).max(1) == 0 {
                        samples.lock().unwrap().push((finished, rss_kib()));
                    }
                }
                outcome
            });
        }
        let mut outcomes = [0usize; 4];
        while let Some(result) = set.join_next().await {
            let outcome = result.expect("no task panicked");
            for (sum, n) in outcomes.iter_mut().zip(outcome) {
                *sum += n;
            }
        }
        let elapsed = start.elapsed();
        let requests = per_task * tasks;
        assert_eq!(outcomes.iter().sum::<usize>(), requests, "every request accounted for");
        assert_eq!(done.load(Ordering::Relaxed), requests);

        let samples = samples.lock().unwrap().clone();
        let in_quarter = |q: usize| -> Vec<u64> {
            let (lo, hi) = (requests * q / 4, requests * (q + 1) / 4);
            samples.iter().filter(|(n, _)| *n > lo && *n <= hi).map(|s| s.1).collect()
        };
        // The first quarter includes the warm-up (connection pools, allocator
        // arenas): compare the last quarter's mean with the first's peak.
        let first = in_quarter(0).into_iter().max().unwrap_or(0);
        let last_samples = in_quarter(3);
        let last = last_samples.iter().sum::<u64>() / last_samples.len().max(1) as u64;
        if std::env::var_os("SOAK_SAMPLES").is_some() { println!("{samples:?}"); }
        let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
        println!(
            "soak: {requests} requests, {tasks} tasks, {:.1} s, {:.0} req/s; upstream requests {}; \
             outcomes echo/fixed/exhausted/flaky-exhausted {outcomes:?}; RSS first-quarter peak {first} KiB, last-quarter mean {last} KiB, peak {peak} KiB",
            elapsed.as_secs_f64(),
            requests as f64 / elapsed.as_secs_f64(),
            server.count(),
        );
        // Flat: the last quarter within 10% of the first.
        assert!(last <= first + first / 10, "RSS grew from {first} KiB to {last} KiB");
    });
}
