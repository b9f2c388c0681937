//! The running binary, over real sockets: a cold upstream, a crowd, a
//! streamed answer, trailers and a large upload, an unreachable upstream,
//! hop-by-hop headers, its own routes, a graceful shutdown and bad flags.
//! Real time (the proxy is another process); every wait is short, and no
//! assertion is on how long something took.

#[path = "../../tests/support/hf_server.rs"]
mod hf_server;

use std::convert::Infallible;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use hf_server::{HfServer, Model};
use http::{HeaderMap, Request, Response};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The binary, listening; killed when dropped.
struct Running {
    child: Child,
    base: String,
}

impl Running {
    async fn start(args: &[&str]) -> Running {
        Self::start_logging(args, "warn", Stdio::inherit()).await
    }

    async fn start_logging(args: &[&str], filter: &str, stderr: Stdio) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cold-start-proxy"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("COLD_START_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next_line().await.unwrap().expect("a listening line");
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap()
            .trim_end_matches(',')
            .to_owned();
        Running {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

async fn collect(response: Response<Incoming>) -> (u16, HeaderMap, Bytes, Option<HeaderMap>) {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (
        parts.status.as_u16(),
        parts.headers,
        collected.to_bytes(),
        trailers,
    )
}

/// A hyper server on 127.0.0.1 answering with `answer`.
async fn upstream<F, Fut>(answer: F) -> String
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_cold_upstream_is_waited_out_through_the_running_binary() {
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_secs(1)))]).await;
    let proxy = Running::start(&["--upstream", &server.url("")]).await;
    let request = Request::post(proxy.url("/models/m?wait=1"))
        .header("authorization", "Bearer hf_app")
        .body(full(r#"{"inputs":"hi"}"#))
        .unwrap();
    let (status, _, body, _) = collect(client().request(request).await.unwrap()).await;
    assert_eq!((status, &body[..]), (200, &br#"{"inputs":"hi"}"#[..]));
    let received = server.received();
    assert_eq!(received.len(), 2, "the loading answer, then the held retry");
    for r in &received {
        assert_eq!(r.uri.path_and_query().unwrap().as_str(), "/models/m?wait=1");
        assert_eq!(r.headers["authorization"], "Bearer hf_app");
        assert_eq!(r.body, br#"{"inputs":"hi"}"#[..]);
    }
    assert_eq!(received[1].headers["x-wait-for-model"], "true");
}

#[tokio::test]
async fn a_hundred_callers_cost_about_one_upstream_request_each_with_a_holding_upstream() {
    const N: usize = 100;
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_secs(2)))]).await;
    let proxy = Running::start(&["--upstream", &server.url("")]).await;
    let client = client();
    let call = |i: usize| {
        let client = client.clone();
        let url = proxy.url("/models/m");
        async move {
            let request = Request::post(url).body(full(i.to_string())).unwrap();
            let (status, _, body, _) = collect(client.request(request).await.unwrap()).await;
            assert_eq!((status, body), (200, Bytes::from(i.to_string())));
        }
    };
    // The first caller meets the model cold; the others arrive while it is.
    let first = tokio::spawn(call(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rest: Vec<_> = (1..N).map(|i| tokio::spawn(call(i))).collect();
    first.await.unwrap();
    for caller in rest {
        caller.await.unwrap();
    }
    assert!(
        server.count() <= N + 2,
        "{} upstream requests",
        server.count()
    );
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_client_event_by_event() {
    // The upstream sends its second event only once the client has the
    // first: the proxy must stream, not buffer.
    let (got_first, first_seen) = mpsc::channel::<()>(1);
    let first_seen = std::sync::Arc::new(tokio::sync::Mutex::new(Some(first_seen)));
    let base = upstream(move |_req| {
        let first_seen = first_seen.clone();
        async move {
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
            tokio::spawn(async move {
                let mut seen = first_seen.lock().await.take().unwrap();
                let event = |n: u32| Bytes::from(format!("data: {{\"n\":{n}}}\n\n"));
                tx.send_data(event(1)).await.unwrap();
                seen.recv().await.unwrap();
                tx.send_data(event(2)).await.unwrap();
                tx.send_data(Bytes::from_static(b"data: [DONE]\n\n"))
                    .await
                    .unwrap();
            });
            let body = body.boxed();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let proxy = Running::start(&["--upstream", &base]).await;
    let request = Request::post(proxy.url("/v1/chat/completions"))
        .body(full(r#"{"model":"m","stream":true}"#))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: {\"n\":1}\n\n");
    got_first.send(()).await.unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"data: {\"n\":2}\n\ndata: [DONE]\n\n");
}

#[tokio::test]
async fn trailers_and_a_10_mib_upload_arrive_intact_both_ways() {
    // Echoes the body, with the request's `x-checksum` trailer as a
    // response trailer.
    let base = upstream(|req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let trailer = collected
            .trailers()
            .and_then(|t| t.get("x-checksum").cloned());
        let body = collected.to_bytes();
        let mut trailers = HeaderMap::new();
        if let Some(value) = trailer {
            trailers.insert("x-checksum", value);
        }
        let (mut tx, channel) = Channel::<Bytes, Infallible>::new(2);
        tokio::spawn(async move {
            tx.send_data(body).await.unwrap();
            tx.send_trailers(trailers).await.unwrap();
        });
        Response::builder()
            .header("trailer", "x-checksum")
            .body(channel.boxed())
            .unwrap()
    })
    .await;
    let proxy = Running::start(&["--upstream", &base]).await;
    let upload: Bytes = (0..10 * 1024 * 1024)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "251".parse().unwrap());
    let (mut tx, channel) = Channel::<Bytes, Infallible>::new(2);
    let sent = upload.clone();
    tokio::spawn(async move {
        tx.send_data(sent.slice(..4 << 20)).await.unwrap();
        tx.send_data(sent.slice(4 << 20..)).await.unwrap();
        tx.send_trailers(trailers).await.unwrap();
    });
    let request = Request::post(proxy.url("/upload"))
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .body(channel.boxed())
        .unwrap();
    let (status, _, body, trailers) = collect(client().request(request).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), upload.len());
    assert!(body == upload, "10 MiB, byte for byte");
    assert_eq!(
        trailers.expect("the response's trailers")["x-checksum"],
        "251"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_answers_502_with_the_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let upstream = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["--upstream", upstream.as_str()],
        vec![
            "--upstream",
            upstream.as_str(),
            "--retry-refused",
            "true",
            "--max-total-wait",
            "1s",
        ],
    ] {
        let proxy = Running::start(&args).await;
        let request = Request::get(proxy.url("/v1/models"))
            .body(full(""))
            .unwrap();
        let (status, headers, body, _) = collect(client().request(request).await.unwrap()).await;
        assert_eq!(status, 502, "{args:?}");
        assert_eq!(headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let expected = if args.len() > 2 {
            "upstream unreachable"
        } else {
            "upstream request failed"
        };
        assert_eq!(json["error"], expected, "{json}");
        assert!(
            json["detail"].as_str().unwrap().contains("onnect"),
            "{json}"
        );
        let metrics = Request::get(proxy.url("/_cold_start/metrics"))
            .body(full(""))
            .unwrap();
        let (_, _, text, _) = collect(client().request(metrics).await.unwrap()).await;
        let text = String::from_utf8(text.to_vec()).unwrap();
        assert!(
            text.contains("cold_start_proxy_upstream_errors_total 1"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn an_attempt_past_its_timeout_answers_504() {
    let base = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Response::new(full("late"))
    })
    .await;
    let proxy = Running::start(&["--upstream", &base, "--attempt-timeout", "300ms"]).await;
    let request = Request::post(proxy.url("/v1/x")).body(full("{}")).unwrap();
    let (status, _, body, _) = collect(client().request(request).await.unwrap()).await;
    assert_eq!(status, 504);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "upstream timed out");
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_the_rest_go_as_sent() {
    let base = upstream(|req: Request<Incoming>| async move {
        let mut names: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        names.sort();
        Response::new(full(names.join("\n")))
    })
    .await;
    let proxy = Running::start(&["--upstream", &base]).await;
    let request = Request::post(proxy.url("/v1/x"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "this connection only")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic cHJveHk=")
        .header("upgrade", "h2c")
        .header("authorization", "Bearer t")
        .header("x-request-id", "42")
        .body(full("{}"))
        .unwrap();
    let (status, _, body, _) = collect(client().request(request).await.unwrap()).await;
    assert_eq!(status, 200);
    let seen = String::from_utf8(body.to_vec()).unwrap();
    for gone in ["x-hop", "keep-alive", "proxy-authorization", "upgrade"] {
        assert!(!seen.contains(gone), "{gone} reached the upstream:\n{seen}");
    }
    assert!(seen.contains("authorization: Bearer t"), "{seen}");
    assert!(seen.contains("x-request-id: 42"), "{seen}");
    assert!(
        seen.contains(&format!("host: {}", base.trim_start_matches("http://"))),
        "{seen}"
    );
}

#[tokio::test]
async fn its_own_health_and_metrics_routes_answer() {
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_millis(500)))]).await;
    let proxy = Running::start(&["--upstream", &server.url("")]).await;
    let client = client();
    let health = Request::get(proxy.url("/_cold_start/health"))
        .body(full(""))
        .unwrap();
    let (status, _, body, _) = collect(client.request(health).await.unwrap()).await;
    assert_eq!((status, &body[..]), (200, &br#"{"status":"ok"}"#[..]));
    let cold = Request::post(proxy.url("/models/m"))
        .body(full("{}"))
        .unwrap();
    assert_eq!(client.request(cold).await.unwrap().status(), 200);
    let metrics = Request::get(proxy.url("/_cold_start/metrics"))
        .body(full(""))
        .unwrap();
    let (status, _, body, _) = collect(client.request(metrics).await.unwrap()).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for line in [
        "cold_start_proxy_requests_total 1",
        "cold_start_proxy_cold_starts_total 1",
        "cold_start_proxy_upstream_attempts_total 2",
        "cold_start_proxy_wait_seconds_count 1",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert_eq!(server.count(), 2, "the proxy's own routes go nowhere");
}

#[tokio::test]
async fn an_h2c_client_is_served() {
    let server = HfServer::start([("/models/m", Model::Warm)]).await;
    let proxy = Running::start(&["--upstream", &server.url("")]).await;
    let h2: Client<_, Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::post(proxy.url("/models/m"))
        .body(full("hi"))
        .unwrap();
    let response = h2.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (status, _, body, _) = collect(response).await;
    assert_eq!((status, &body[..]), (200, &b"hi"[..]));
}

#[tokio::test]
async fn sigterm_and_ctrl_c_let_a_call_in_flight_finish_and_take_no_new_ones() {
    let base = upstream(|req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        tokio::time::sleep(Duration::from_millis(800)).await;
        Response::new(full(body))
    })
    .await;
    for signal in ["-TERM", "-INT"] {
        shuts_down_gracefully(&base, signal).await;
    }
}

async fn shuts_down_gracefully(base: &str, signal: &str) {
    let mut proxy = Running::start(&["--upstream", base, "--grace", "10s"]).await;
    let url = proxy.url("/slow");
    let call = tokio::spawn(async move {
        let request = Request::post(url).body(full("in flight")).unwrap();
        collect(client().request(request).await.unwrap()).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = proxy.child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args([signal, pid.as_str()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, _, body, _) = call.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"in flight"[..]));
    let exit = tokio::time::timeout(Duration::from_secs(10), proxy.child.wait())
        .await
        .expect("exits within its grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let after = Request::get(proxy.url("/_cold_start/health"))
        .body(full(""))
        .unwrap();
    assert!(client().request(after).await.is_err(), "no new connections");
}

#[tokio::test]
async fn a_bad_flag_or_url_is_one_line_and_exit_status_2_before_listening() {
    for args in [
        vec!["--upstream", "ftp://h:21"],
        vec!["--upstream", "http://h:1/v1"],
        vec!["--upstream", "http://h:1", "--max-total-wait", "3 parsecs"],
        vec!["--upstream", "http://h:1", "--classifier", "nonsense"],
        vec![],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_cold-start-proxy"))
            .args(&args)
            .env_remove("COLD_START_UPSTREAM")
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}: nothing listened");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("cold-start-proxy: "), "{stderr}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_cold-start-proxy"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8(help.stdout).unwrap();
    for name in [
        "COLD_START_UPSTREAM",
        "COLD_START_CLASSIFIER",
        "COLD_START_MODEL_KEY",
        "llama-cpp",
    ] {
        assert!(text.contains(name), "{name} in --help:\n{text}");
    }
}

#[tokio::test]
async fn a_budget_spent_on_loading_answers_gives_the_last_one_as_it_came() {
    let loading = br#"{"error":"Model with name m is not ready."}"#;
    let server = HfServer::start([(
        "/v2/models/m/infer",
        Model::fixed(503, "application/json", &loading[..]),
    )])
    .await;
    let proxy = Running::start(&["--upstream", &server.url(""), "--max-total-wait", "1s"]).await;
    let request = Request::post(proxy.url("/v2/models/m/infer"))
        .body(full("{}"))
        .unwrap();
    let (status, headers, body, _) = collect(client().request(request).await.unwrap()).await;
    assert_eq!((status, &body[..]), (503, &loading[..]));
    assert_eq!(headers["content-type"], "application/json");
    assert!(server.count() >= 2, "waited out, then given up");
}

#[tokio::test]
async fn no_header_value_userinfo_or_query_reaches_the_log_at_trace() {
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_millis(600)))]).await;
    let mut proxy =
        Running::start_logging(&["--upstream", &server.url("")], "trace", Stdio::piped()).await;
    let request = Request::post(proxy.url("/models/m?api_key=s3cret&token=t0ken"))
        .header("authorization", "Bearer TopSecretToken")
        .body(full("{}"))
        .unwrap();
    assert_eq!(client().request(request).await.unwrap().status(), 200);
    // A refused upstream too: its error text names a URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut refused = Running::start_logging(
        &["--upstream", &format!("http://127.0.0.1:{port}")],
        "trace",
        Stdio::piped(),
    )
    .await;
    let request = Request::post(refused.url("/v1/x?api_key=s3cret"))
        .body(full("{}"))
        .unwrap();
    assert_eq!(client().request(request).await.unwrap().status(), 502);
    let mut text = String::new();
    for running in [&mut proxy, &mut refused] {
        let _ = running.child.start_kill();
        let output = running.child.wait_with_output_ref().await;
        text.push_str(&output);
    }
    assert!(text.contains("cold start"), "{text}");
    for secret in ["s3cret", "t0ken", "TopSecretToken"] {
        assert!(!text.contains(secret), "{secret} in the log:\n{text}");
    }
}

/// Reads what a killed child wrote to its stderr.
trait StderrOf {
    async fn wait_with_output_ref(&mut self) -> String;
}

impl StderrOf for Child {
    async fn wait_with_output_ref(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let _ = self.wait().await;
        let mut text = String::new();
        if let Some(mut stderr) = self.stderr.take() {
            let _ = stderr.read_to_string(&mut text).await;
        }
        text
    }
}

#[tokio::test]
async fn a_model_named_with_warm_is_warmed_at_start_up() {
    let server = HfServer::start([("/models/m", Model::cold(Duration::from_millis(500)))]).await;
    let _proxy = Running::start(&[
        "--upstream",
        &server.url(""),
        "--warm",
        r#"/models/m={"inputs":"ping"}"#,
    ])
    .await;
    // No client calls: the proxy warms the model by itself.
    for _ in 0..50 {
        if server.count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = server.received();
    assert!(
        received.len() >= 2,
        "the cold answer, then the retry: {}",
        received.len()
    );
    assert!(received
        .iter()
        .all(|r| r.body == br#"{"inputs":"ping"}"#[..]));
}

/// An HTTPS upstream on 127.0.0.1, with the test certificate (signed by
/// `tests/tls/ca.pem`, for 127.0.0.1 and localhost), answering the loading
/// 503 once, then echoing.
async fn https_upstream() -> String {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(format!("{dir}/server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/server.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let first = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                        let response = if first {
                            Response::builder()
                                .status(503)
                                .body(full(&br#"{"error":"Model m is currently loading","estimated_time":1.0}"#[..]))
                                .unwrap()
                        } else {
                            Response::new(full(body))
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    format!("https://localhost:{}", addr.port())
}

#[tokio::test]
async fn an_https_upstream_with_an_internal_ca_is_reached_and_waited_out() {
    let upstream = https_upstream().await;
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/ca.pem");
    // Without the CA, the upstream's certificate is not trusted.
    let untrusted = Running::start(&["--upstream", &upstream]).await;
    let request = Request::post(untrusted.url("/models/m"))
        .body(full("{}"))
        .unwrap();
    let (status, _, body, _) = collect(client().request(request).await.unwrap()).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let proxy = Running::start(&["--upstream", &upstream, "--upstream-ca", ca]).await;
    let request = Request::post(proxy.url("/models/m"))
        .body(full("over TLS"))
        .unwrap();
    let (status, _, body, _) = collect(client().request(request).await.unwrap()).await;
    assert_eq!((status, &body[..]), (200, &b"over TLS"[..]));
}
