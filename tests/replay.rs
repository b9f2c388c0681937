//! Replay: every attempt sends the same request; a body over the limit is
//! sent once, intact.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::{BoxError, RequestBody};

const MODEL: &str = "/models/gpt2";

fn cold_server_models() -> [(&'static str, Model); 1] {
    [(MODEL, Model::cold_with(Duration::from_secs(3), 2.0, false))]
}

#[tokio::test(start_paused = true)]
async fn every_attempt_sends_identical_method_uri_version_headers_and_body() {
    let server = HfServer::start(cold_server_models()).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let body = json_input(2048);
    let request = Request::put(format!("{}?wait=1&x=%20y", server.url(MODEL)))
        .header("authorization", "Bearer hf_secret_token")
        .header("content-type", "application/json")
        .header("x-custom", "a")
        .header("x-custom", "b")
        .body(Full::new(body.clone()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(bytes(response).await, body);

    let received = server.received();
    assert_eq!(received.len(), 3, "cold for 3 s, polled at 0, 2 and 4 s");
    for r in &received {
        assert_eq!(r.method, http::Method::PUT);
        assert_eq!(r.uri, received[0].uri);
        assert_eq!(r.uri.query(), Some("wait=1&x=%20y"));
        assert_eq!(r.version, Version::HTTP_11);
        assert_eq!(r.body, body);
        assert_eq!(r.headers["authorization"], "Bearer hf_secret_token");
        let custom: Vec<_> = r.headers.get_all("x-custom").iter().collect();
        assert_eq!(custom, ["a", "b"]);
        let mut headers = r.headers.clone();
        headers.remove("x-wait-for-model");
        let mut first = received[0].headers.clone();
        first.remove("x-wait-for-model");
        assert_eq!(headers, first);
    }
}

type Seen = Arc<Mutex<Vec<(http::request::Parts, Bytes, Option<HeaderMap>)>>>;

/// A backend that records what it receives and answers "loading" `cold` times.
fn recording_backend<B>(
    cold: usize,
) -> (
    Seen,
    impl tower::Service<
            Request<RequestBody<B>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone,
)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let service = tower::service_fn(move |req: Request<RequestBody<B>>| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let collected = body.collect().await.expect("replayed body never fails");
            let trailers = collected.trailers().cloned();
            let n = {
                let mut seen = record.lock().unwrap();
                seen.push((parts, collected.to_bytes(), trailers));
                seen.len()
            };
            let response = if n <= cold {
                hf_server::loading("gpt2", Some("1.0"))
            } else {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            };
            Ok::<_, Infallible>(response)
        }
    });
    (seen, service)
}

#[derive(Clone, Debug, PartialEq)]
struct Tag(&'static str);

#[tokio::test(start_paused = true)]
async fn extensions_and_trailers_are_replayed_on_every_attempt() {
    let (seen, backend) = recording_backend(2);
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(backend);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames = vec![
        Frame::data(Bytes::from_static(b"hello ")),
        Frame::data(Bytes::from_static(b"cold ")),
        Frame::data(Bytes::from_static(b"world")),
        Frame::trailers(trailers.clone()),
    ];
    let mut request = Request::post("http://model.test/models/gpt2")
        .body(Frames::new(frames))
        .unwrap();
    request.extensions_mut().insert(Tag("caller"));
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for (parts, body, got_trailers) in seen.iter() {
        assert_eq!(&body[..], b"hello cold world");
        assert_eq!(got_trailers.as_ref(), Some(&trailers));
        assert_eq!(parts.extensions.get::<Tag>(), Some(&Tag("caller")));
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_cut_into_many_chunks_is_replayed_whole() {
    let (seen, backend) = recording_backend(1);
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(backend);
    let input = json_input(10_000);
    let frames = input
        .chunks(7)
        .map(|c| Frame::data(Bytes::copy_from_slice(c)))
        .collect();
    let request = Request::post("http://model.test/")
        .body(Frames::new(frames))
        .unwrap();
    client.oneshot(request).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|(_, body, trailers)| body == &input && trailers.is_none()));
}

#[tokio::test(start_paused = true)]
async fn an_empty_body_is_replayed_empty() {
    let server = HfServer::start(cold_server_models()).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let request = Request::get(server.url(MODEL))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = server.received();
    assert_eq!(received.len(), 3);
    assert!(received
        .iter()
        .all(|r| r.body.is_empty() && r.method == http::Method::GET));
    assert!(received
        .iter()
        .all(|r| r.headers.get("content-length").is_none()));
}

#[tokio::test(start_paused = true)]
async fn a_string_body_is_replayed() {
    let server = HfServer::start(cold_server_models()).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(http1());
    let request = Request::post(server.url(MODEL))
        .body(String::from(r#"{"inputs":"héllo"}"#))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(server
        .received()
        .iter()
        .all(|r| r.body == r#"{"inputs":"héllo"}"#.as_bytes()));
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_over_the_limit_is_sent_once_intact_and_not_retried() {
    let server = HfServer::start([(MODEL, Model::never_loads("1.0"))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false).body_limit(1024))
        .service(http1());
    let input: Bytes = (0..64 * 1024)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let chunks: Vec<Bytes> = input.chunks(1000).map(Bytes::copy_from_slice).collect();
    tokio::spawn(async move {
        for chunk in chunks {
            tx.send_data(chunk).await.unwrap();
        }
    });
    let request = Request::post(server.url(MODEL)).body(body).unwrap();
    let response = client.oneshot(request).await.unwrap();
    // Not retried: the loading 503 comes back as the server sent it.
    assert_eq!(response.status(), 503);
    assert_eq!(report(&response).attempts(), 1);
    assert_eq!(bytes(response).await, loading_body("gpt2", Some("1.0")));
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, input);
}

#[tokio::test(start_paused = true)]
async fn a_body_known_to_be_over_the_limit_is_sent_once_unread() {
    let server = HfServer::start([(MODEL, Model::never_loads("1.0"))]).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false).body_limit(1024))
        .service(http1());
    let input = json_input(1025);
    let request = Request::post(server.url(MODEL))
        .body(Full::new(input.clone()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 503);
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, input);
    assert_eq!(received[0].headers["content-length"], "1025");
}

#[tokio::test(start_paused = true)]
async fn a_body_exactly_at_the_limit_is_replayed() {
    let server = HfServer::start(cold_server_models()).await;
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false).body_limit(1024))
        .service(http1());
    let input = json_input(1024);
    assert_eq!(input.len(), 1024);
    let request = Request::post(server.url(MODEL))
        .body(Full::new(input.clone()))
        .unwrap();
    assert_eq!(client.oneshot(request).await.unwrap().status(), 200);
    assert_eq!(server.count(), 3);
    assert!(server.received().iter().all(|r| r.body == input));
}

#[tokio::test(start_paused = true)]
async fn a_request_body_error_reaches_the_caller_and_nothing_is_sent() {
    let (seen, backend) = recording_backend(0);
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false))
        .service(backend);
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
    tokio::spawn(async move {
        tx.send_data(Bytes::from_static(b"{\"inputs\":"))
            .await
            .unwrap();
        tx.abort(std::io::Error::other("upload cut off"));
    });
    let request = Request::post("http://model.test/").body(body).unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    assert!(error.is::<std::io::Error>(), "{error:?}");
    assert_eq!(error.to_string(), "upload cut off");
    assert!(seen.lock().unwrap().is_empty());
}

/// A body whose size hint promises less than it sends.
struct Liar(Option<Bytes>);

impl Body for Liar {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(10)
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_lies_about_its_size_past_the_limit_is_an_error() {
    let (seen, backend) = recording_backend(0);
    let client = ServiceBuilder::new()
        .layer(advised().jitter(false).body_limit(100))
        .service(backend);
    let request = Request::post("http://model.test/")
        .body(Liar(Some(Bytes::from(vec![b'x'; 1000]))))
        .unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "request body is longer than its size hint"
    );
    assert!(seen.lock().unwrap().is_empty());
}

/// A streaming upload with data, trailers and a `Trailer` header, as the
/// server must receive it, through `client` over HTTP/1 to `url`.
/// (A channel body: no size hint, and `Unpin`, as the bare client needs.)
fn upload_with_trailers(
    url: String,
    data: &[&'static [u8]],
) -> (Request<http_body_util::channel::Channel<Bytes>>, HeaderMap) {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "sha256-abc123".parse().unwrap());
    let (mut tx, body) = http_body_util::channel::Channel::new(data.len() + 1);
    for d in data {
        tx.try_send(Frame::data(Bytes::from_static(d))).unwrap();
    }
    tx.try_send(Frame::trailers(trailers.clone())).unwrap();
    let request = Request::post(url)
        .header("trailer", "x-checksum")
        .body(body)
        .unwrap();
    (request, trailers)
}

#[tokio::test(start_paused = true)]
async fn request_trailers_reach_the_server_over_http1_on_the_warm_path_and_every_retry() {
    let server = HfServer::start([
        ("/models/warm", Model::Warm),
        (
            "/models/cold",
            Model::cold_with(Duration::from_secs(3), 2.0, false),
        ),
    ])
    .await;
    // The bare client delivers them: the layer must not do worse.
    let (request, trailers) = upload_with_trailers(server.url("/models/warm"), &[b"a", b"b"]);
    http1().oneshot(request).await.unwrap();
    let layer = ServiceBuilder::new().layer(advised().jitter(false));
    let (request, _) = upload_with_trailers(server.url("/models/warm"), &[b"a", b"b"]);
    layer
        .clone()
        .service(http1())
        .oneshot(request)
        .await
        .unwrap();
    let (request, _) = upload_with_trailers(server.url("/models/cold"), &[b"a", b"b"]);
    let response = layer.service(http1()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);

    let received = server.received();
    assert_eq!(
        received.len(),
        1 + 1 + 3,
        "bare, warm, and cold at 0, 2 and 4 s"
    );
    for r in &received {
        assert_eq!(&r.body[..], b"ab", "{} {:?}", r.uri, r.headers);
        assert_eq!(
            r.trailers.as_ref(),
            Some(&trailers),
            "{} {:?}",
            r.uri,
            r.headers
        );
        assert!(
            !r.headers.contains_key("content-length"),
            "chunked, as the caller sent it"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_trailers_only_request_body_reaches_the_server_with_its_trailers() {
    let server = HfServer::start([("/models/warm", Model::Warm)]).await;
    let client = ServiceBuilder::new().layer(advised()).service(http1());
    let (request, trailers) = upload_with_trailers(server.url("/models/warm"), &[]);
    client.oneshot(request).await.unwrap();
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].body.is_empty());
    assert_eq!(received[0].trailers.as_ref(), Some(&trailers));
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_8_mib_uploads_hold_no_more_than_the_total_limit() {
    const N: usize = 1000;
    let upload = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
    // Answers once every call has arrived, so that all are in flight at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let backend = tower::service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
        let barrier = barrier.clone();
        async move {
            let len = req.into_body().collect().await.unwrap().to_bytes().len();
            barrier.wait().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(len.to_string()))))
        }
    });
    let client = ServiceBuilder::new()
        .layer(tower_cold_start::ColdStartRetryLayer::new())
        .service(backend);
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let request = Request::post("http://m.test/models/m")
                .body(Full::new(upload.clone()))
                .unwrap();
            tokio::spawn(client.clone().oneshot(request))
        })
        .collect();
    let mut buffered = 0;
    for call in calls {
        let response = call.await.unwrap().unwrap();
        match report(&response).unbuffered() {
            None => buffered += 1,
            Some(reason) => assert_eq!(reason, tower_cold_start::Unbuffered::TotalLimit),
        }
        assert_eq!(
            &bytes(response).await[..],
            b"8388608",
            "every body sent whole"
        );
    }
    // 128 MiB by default: sixteen 8 MiB bodies, not 8 GiB.
    assert_eq!(buffered, 16);
}

#[tokio::test(start_paused = true)]
async fn bytes_held_for_replay_are_given_back_when_each_call_ends() {
    let backend = tower::service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let client = ServiceBuilder::new()
        .layer(tower_cold_start::ColdStartRetryLayer::new().total_body_limit(1000))
        .service(backend);
    // Each call may take the whole pool, one after another.
    for _ in 0..3 {
        let request = Request::post("http://m.test/")
            .body(Full::new(Bytes::from(vec![0; 1000])))
            .unwrap();
        let response = client.clone().oneshot(request).await.unwrap();
        assert_eq!(report(&response).unbuffered(), None);
    }
}

#[tokio::test(start_paused = true)]
async fn streamed_uploads_past_the_total_limit_go_out_once_intact_and_say_so() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(2), 1.0, false))]).await;
    let layer = advised()
        .jitter(false)
        .body_limit(64 * 1024)
        .total_body_limit(100 * 1024);
    let client = ServiceBuilder::new().layer(layer).service(http1());
    let mut calls = Vec::new();
    let mut senders = Vec::new();
    for n in 0..4u8 {
        let (tx, body) = http_body_util::channel::Channel::<Bytes>::new(4);
        senders.push((n, tx));
        let request = Request::post(server.url(MODEL)).body(body).unwrap();
        calls.push(tokio::spawn(client.clone().oneshot(request)));
    }
    // 40 KiB each, in 10 KiB chunks, interleaved: 160 KiB in all, over the
    // 100 KiB that may be held.
    for _ in 0..4 {
        for (n, tx) in &mut senders {
            tx.send_data(Bytes::from(vec![b'a' + *n; 10 * 1024]))
                .await
                .unwrap();
        }
    }
    drop(senders);
    let mut unbuffered = 0;
    for call in calls {
        let response = call.await.unwrap().unwrap();
        let report = report(&response);
        if report.unbuffered().is_some() {
            assert_eq!(
                report.unbuffered(),
                Some(tower_cold_start::Unbuffered::TotalLimit)
            );
            assert_eq!(report.attempts(), 1);
            assert_eq!(response.status(), 503, "not retried");
            unbuffered += 1;
        } else {
            assert_eq!(response.status(), 200);
        }
    }
    assert!(
        unbuffered >= 2,
        "at most 100 KiB held: {unbuffered} unbuffered"
    );
    for r in server.received() {
        assert_eq!(r.body.len(), 40 * 1024);
        assert!(
            r.body.iter().all(|b| *b == r.body[0]),
            "bytes intact, in order"
        );
    }
}
