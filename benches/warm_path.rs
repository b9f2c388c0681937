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

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_cold_start::ColdStartRetryLayer;

const CALLERS: usize = 32;
/// Loopback rounds, alternating bare and layered.
const ROUNDS: usize = 4;

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
async fn burst<S, B>(client: &S, url: &str, body: &Bytes) -> usize
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
    let url = format!("http://{addr}/models/distilbert");
    let body = input();
    let bare = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let layered = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http());
    // Warm both connection pools.
    rt.block_on(async {
        burst(&bare, &url, &body).await;
        burst(&layered, &url, &body).await;
    });

    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Elements(CALLERS as u64));
    // Alternate the two so that drift of a shared machine hits both alike.
    for round in 0..ROUNDS {
        group.bench_function(BenchmarkId::new("bare", round), |b| {
            b.to_async(&rt).iter(|| burst(&bare, &url, &body))
        });
        group.bench_function(BenchmarkId::new("layered", round), |b| {
            b.to_async(&rt).iter(|| burst(&layered, &url, &body))
        });
    }
    group.finish();
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
    if let (Some(bare), Some(layered)) = (mean_ns("in_process/bare"), mean_ns("in_process/layered"))
    {
        println!(
            "  in-process: bare {bare:.0} ns, layered {layered:.0} ns per request: +{:.0} ns, throughput ratio {:.1}%",
            layered - bare,
            100.0 * bare / layered
        );
    }
    let (mut bare, mut layered) = (0.0, 0.0);
    for round in 0..ROUNDS {
        let (Some(b), Some(l)) = (
            mean_ns(&format!("loopback/bare/{round}")),
            mean_ns(&format!("loopback/layered/{round}")),
        ) else {
            return;
        };
        println!(
            "  loopback round {round}: bare {:.0} req/s, layered {:.0} req/s, ratio {:.1}%",
            CALLERS as f64 * 1e9 / b,
            CALLERS as f64 * 1e9 / l,
            100.0 * b / l
        );
        bare += b;
        layered += l;
    }
    println!(
        "  loopback, {CALLERS} callers, 2 KiB JSON, all rounds: throughput ratio {:.1}%",
        100.0 * bare / layered
    );
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    in_process(&mut c);
    loopback(&mut c);
    c.final_summary();
    summary();
}
