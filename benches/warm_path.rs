//! The warm path: what the layer costs when the model is already loaded.
//!
//! Both halves measure the layered client against the bare one in the same
//! run, on the same requests, and print the ratios at the end:
//!
//! - `in_process`: a `service_fn` backend that reads the 2 KiB JSON body and
//!   answers at once, so the difference is the layer's own cost per request;
//! - `loopback`: hyper-util's client to a hyper server on 127.0.0.1, 32
//!   concurrent callers, 2 KiB JSON bodies (the issue's target: the layered
//!   client keeps at least 97% of the bare client's throughput).
//!
//! ```text
//! cargo bench --bench warm_path
//! ```
//!
//! With `-- --count <service> <requests> [spawn|loop]` it instead sends that many
//! requests through one service (`bare`, `identity`, `tower_retry`,
//! `follow_redirect` or `layered`; with `--features reqwest` also
//! `reqwest_bare` and `reqwest_layered`) on a current-thread runtime and exits:
//! `scripts/warm_path_instructions.sh` runs that under callgrind and prints
//! the instructions per request that `BENCHMARKS.md` quotes.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_cold_start::ColdStartRetryLayer;

const CALLERS: usize = 32;

fn input() -> Bytes {
    let mut s = String::from(r#"{"inputs":""#);
    while s.len() < 2046 {
        s.push_str("I like you. ");
    }
    s.truncate(2046);
    s.push_str(r#""}"#);
    Bytes::from(s)
}

const ANSWER: &[u8] = br#"[[{"label":"POSITIVE","score":0.9998704791069031},{"label":"NEGATIVE","score":0.00012949648278299719}]]"#;

fn request(url: &str, body: &Bytes) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer hf_benchmarktoken")
        .body(Full::new(body.clone()))
        .unwrap()
}

/// A backend that reads the whole body, as a server would, and answers 200.
async fn backend<B: Body<Data = Bytes>>(
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req.into_body().collect().await.ok().map(|c| c.to_bytes());
    black_box(body);
    Ok(Response::new(Full::new(Bytes::from_static(ANSWER))))
}

async fn call<S, B>(service: S, req: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service.oneshot(req).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

fn in_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let body = input();
    let url = "http://model.test/models/distilbert";
    let bare = tower::service_fn(backend::<Full<Bytes>>);
    let layered = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new())
        .service(tower::service_fn(backend));
    // No retry possible, so no copy of the request head is kept: shows what
    // that copy costs.
    let single = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().max_attempts(1))
        .service(tower::service_fn(backend));

    let mut group = c.benchmark_group("in_process");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| call(bare, black_box(request(url, &body))))
    });
    group.bench_function("layered", |b| {
        b.to_async(&rt)
            .iter(|| call(layered.clone(), black_box(request(url, &body))))
    });
    group.bench_function("layered_one_attempt", |b| {
        b.to_async(&rt)
            .iter(|| call(single.clone(), black_box(request(url, &body))))
    });
    group.finish();
}

async fn start_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(backend::<hyper::body::Incoming>);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// `CALLERS` concurrent requests through clones of `client`.
async fn burst<S, B>(client: &S, url: &'static str, body: &'static Bytes) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        tasks.spawn(call(client.clone(), request(url, body)));
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    total
}

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(start_server());
    let url: &'static str = Box::leak(format!("http://{addr}/models/distilbert").into_boxed_str());
    let body: &'static Bytes = Box::leak(Box::new(input()));
    let bare = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let layered = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http());
    // Warm both connection pools.
    rt.block_on(async {
        burst(&bare, url, body).await;
        burst(&layered, url, body).await;
    });

    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Elements(CALLERS as u64));
    group.bench_function("bare", |b| b.to_async(&rt).iter(|| burst(&bare, url, body)));
    group.bench_function("layered", |b| {
        b.to_async(&rt).iter(|| burst(&layered, url, body))
    });
    // The same, interleaved burst by burst with the order rotating, so that
    // the drift of a shared 2-core machine hits all alike. Criterion times
    // the rounds; the split between the clients is summed in `INTERLEAVED`.
    let naive = Naive(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let retry = ServiceBuilder::new()
        .retry(RetryUnavailable(0))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    rt.block_on(async {
        burst(&naive, url, body).await;
        burst(&retry, url, body).await;
    });
    group.bench_function("interleaved", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut round = Duration::ZERO;
                for i in 0..iters {
                    let mut times = [Duration::ZERO; 4];
                    for k in 0..4 {
                        let which = (i as usize + k) % 4;
                        let t = Instant::now();
                        match which {
                            0 => burst(&bare, url, body).await,
                            1 => burst(&layered, url, body).await,
                            2 => burst(&naive, url, body).await,
                            _ => burst(&retry, url, body).await,
                        };
                        times[which] = t.elapsed();
                    }
                    let mut totals = INTERLEAVED.lock().unwrap();
                    for (total, time) in totals.iter_mut().zip(times) {
                        *total += time;
                        round += time;
                    }
                }
                round
            })
        })
    });
    group.finish();
}

/// Time spent in bare, layered, naive and tower::retry bursts by
/// `loopback/interleaved`.
static INTERLEAVED: Mutex<[Duration; 4]> = Mutex::new([Duration::ZERO; 4]);

/// A naive retry layer, as a reference point: a boxed future, a copy of the
/// body, the whole request rebuilt by cloning for each attempt.
#[derive(Clone)]
struct Naive<S>(S);

impl<S, B> Service<Request<Full<Bytes>>> for Naive<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let clone = self.0.clone();
        let mut inner = std::mem::replace(&mut self.0, clone);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let collected = body.collect().await.unwrap().to_bytes();
            let body = Bytes::copy_from_slice(&collected);
            let mut attempt = 1;
            loop {
                let req = Request::from_parts(parts.clone(), Full::new(body.clone()));
                let response = inner.call(req).await?;
                if response.status() != http::StatusCode::SERVICE_UNAVAILABLE || attempt == 10 {
                    return Ok(response);
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            }
        })
    }
}

/// Reads criterion's point estimate of one iteration (ns): the slope of its
/// linear fit where there is one (what criterion prints as `time`), else the mean.
fn mean_ns(path: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let text =
        std::fs::read_to_string(format!("{dir}/criterion/{path}/new/estimates.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| json["mean"]["point_estimate"].as_f64())
}

fn summary() {
    println!("\nwarm path, layered vs bare (same run):");
    if let (Some(bare), Some(layered), Some(single)) = (
        mean_ns("in_process/bare"),
        mean_ns("in_process/layered"),
        mean_ns("in_process/layered_one_attempt"),
    ) {
        println!(
            "  in-process: bare {bare:.0} ns, layered {layered:.0} ns per request (+{:.0} ns); with max_attempts(1), so no head copy kept: {single:.0} ns (+{:.0} ns)",
            layered - bare,
            single - bare,
        );
    }
    if let (Some(b), Some(l)) = (mean_ns("loopback/bare"), mean_ns("loopback/layered")) {
        println!(
            "  loopback, {CALLERS} callers, 2 KiB JSON, criterion one after the other: bare {:.0} req/s, layered {:.0} req/s, ratio {:.1}%",
            CALLERS as f64 * 1e9 / b,
            CALLERS as f64 * 1e9 / l,
            100.0 * b / l
        );
    }
    let [bare, layered, naive, retry] = *INTERLEAVED.lock().unwrap();
    if !layered.is_zero() {
        let ratio = |d: Duration| 100.0 * bare.as_secs_f64() / d.as_secs_f64();
        println!(
            "  loopback, {CALLERS} callers, 2 KiB JSON, interleaved burst by burst: layered {:.1}%, tower::retry {:.1}%, naive retry layer {:.1}% of the bare client's throughput",
            ratio(layered),
            ratio(retry),
            ratio(naive)
        );
    }
}

/// A `tower::retry` policy as its users write one for cold starts: clone
/// the request up front, retry a `503` once a second, ten times at most.
#[derive(Clone)]
struct RetryUnavailable(u32);

impl<B, E> tower::retry::Policy<Request<Full<Bytes>>, Response<B>, E> for RetryUnavailable {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        let unavailable =
            matches!(result, Ok(r) if r.status() == http::StatusCode::SERVICE_UNAVAILABLE);
        (unavailable && self.0 < 10).then(|| {
            self.0 += 1;
            tokio::time::sleep(Duration::from_secs(1))
        })
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

/// Sends `n` requests through `client`, `CALLERS` at a time.
async fn send_all<S, B>(client: S, url: &'static str, body: &'static Bytes, n: usize) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    if LOOP.load(std::sync::atomic::Ordering::Relaxed) {
        return loops(&client, url, body, n).await;
    }
    let mut total = 0;
    for _ in 0..n / CALLERS {
        total += burst(&client, url, body).await;
    }
    total
}

/// Whether `--count` runs the other pattern: each of `CALLERS` tasks loops
/// over its share of the requests, instead of a task spawned per request.
static LOOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `CALLERS` tasks, each sending `n / CALLERS` requests one after another
/// through its own clone of `client`.
async fn loops<S, B>(client: &S, url: &'static str, body: &'static Bytes, n: usize) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let client = client.clone();
        tasks.spawn(async move {
            let mut read = 0;
            for _ in 0..n / CALLERS {
                read += call(client.clone(), request(url, body)).await;
            }
            read
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    total
}

/// `--count <service> <requests>`: one service, then exit (for callgrind).
fn count(service: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let read = rt.block_on(async {
        let addr = start_server().await;
        let url: &'static str =
            Box::leak(format!("http://{addr}/models/distilbert").into_boxed_str());
        let body: &'static Bytes = Box::leak(Box::new(input()));
        let client = || Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        match service {
            "bare" => send_all(client(), url, body, n).await,
            "identity" => {
                let identity = ServiceBuilder::new()
                    .map_response(|r: Response<hyper::body::Incoming>| r)
                    .service(client());
                send_all(identity, url, body, n).await
            }
            "tower_retry" => {
                let retry = ServiceBuilder::new()
                    .retry(RetryUnavailable(0))
                    .service(client());
                send_all(retry, url, body, n).await
            }
            "follow_redirect" => {
                let follow = ServiceBuilder::new()
                    .layer(tower_http::follow_redirect::FollowRedirectLayer::new())
                    .service(client());
                send_all(follow, url, body, n).await
            }
            "layered" => {
                let layered = ServiceBuilder::new()
                    .layer(ColdStartRetryLayer::new())
                    .service(Client::builder(TokioExecutor::new()).build_http());
                send_all(layered, url, body, n).await
            }
            #[cfg(feature = "reqwest")]
            "reqwest_bare" => {
                let client = reqwest::Client::new();
                let bare = tower::service_fn(move |req: Request<Full<Bytes>>| {
                    let client = client.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let req = Request::from_parts(parts, reqwest::Body::from(body));
                        let response = client.execute(reqwest::Request::try_from(req)?).await?;
                        Ok::<_, reqwest::Error>(http::Response::<reqwest::Body>::from(response))
                    }
                });
                send_all(bare, url, body, n).await
            }
            #[cfg(feature = "reqwest")]
            "reqwest_layered" => {
                let layered = ServiceBuilder::new()
                    .layer(ColdStartRetryLayer::new())
                    .service(tower_cold_start::reqwest::ReqwestService::new(
                        reqwest::Client::new(),
                    ));
                send_all(layered, url, body, n).await
            }
            other => panic!("no service {other:?}"),
        }
    });
    black_box(read);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--count") {
        let service = args.get(at + 1).expect("--count <service> <requests>");
        let n = args
            .get(at + 2)
            .and_then(|n| n.parse().ok())
            .expect("--count <service> <requests> [spawn|loop]");
        if args.get(at + 3).is_some_and(|p| p == "loop") {
            LOOP.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        return count(service, n);
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    in_process(&mut c);
    loopback(&mut c);
    c.final_summary();
    summary();
}
