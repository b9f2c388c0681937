//! `Debug` output of every public type carries no header value and no body
//! byte.

mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tower::ServiceBuilder;
use tower_cold_start::ColdStartRetryLayer;

const SECRET: &str = "Bearer hf_TopSecretToken0123456789";

#[tokio::test(start_paused = true)]
async fn debug_output_of_every_public_type_shows_no_header_value_or_body_byte() {
    use http_body_util::BodyExt;
    use tower::Service;

    // A backend that records the Debug of the request body it receives.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let backend = tower::service_fn(
        move |req: Request<tower_cold_start::RequestBody<Full<Bytes>>>| {
            record.lock().unwrap().push(format!("{:?}", req.body()));
            async {
                Ok::<_, std::convert::Infallible>(support::hf_server::loading("gpt2", Some("1.0")))
            }
        },
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut client = ServiceBuilder::new()
        .layer(
            ColdStartRetryLayer::new()
                .jitter(false)
                .max_attempts(2)
                .on_retry(move |e| sink.lock().unwrap().push(format!("{e:?}"))),
        )
        .service(backend);
    let request = Request::post("http://m.test/models/gpt2")
        .header("authorization", SECRET)
        .body(Full::new(Bytes::from_static(
            b"{\"inputs\":\"private words\"}",
        )))
        .unwrap();
    let mut texts = vec![format!("{client:?}")];
    let mut future = std::pin::pin!(client.call(request));
    texts.push(format!("{:?}", future));
    let response = future.as_mut().await.unwrap();
    texts.push(format!("{response:?}"));
    let (_, body) = response.into_parts();
    texts.push(format!("{body:?}"));
    let _ = body.collect().await;
    texts.extend(seen.lock().unwrap().iter().cloned());
    texts.extend(events.lock().unwrap().iter().cloned());
    assert!(texts.len() >= 6, "{texts:#?}");
    for text in &texts {
        assert!(
            !text.contains("TopSecretToken"),
            "header value in Debug: {text}"
        );
        assert!(
            !text.contains("private words"),
            "request bytes in Debug: {text}"
        );
    }
}
