//! Property: whatever the chunking, trailers and size around `body_limit`,
//! every attempt carries the caller's exact bytes, or the body goes out once,
//! unbuffered, when it is over the limit.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use support::{hf_server, report, Frames};
use tower::{ServiceBuilder, ServiceExt};
use tower_cold_start::{ColdStartRetryLayer, RequestBody};

const LIMIT: usize = 256;

type Seen = Arc<Mutex<Vec<(Bytes, Option<HeaderMap>)>>>;

fn run(body: Vec<u8>, cuts: Vec<usize>, trailers: bool) -> (Seen, u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let backend = tower::service_fn(move |req: Request<RequestBody<Frames>>| {
        let record = record.clone();
        async move {
            let hint = http_body::Body::size_hint(req.body());
            let collected = req.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            // What an HTTP/1 client frames the request by: an exact size
            // means `Content-Length`, which cannot carry trailers.
            let data = collected.to_bytes();
            let len = data.len() as u64;
            assert!(hint.lower() <= len && hint.upper().is_none_or(|u| len <= u));
            if trailers.is_some() {
                assert_eq!(hint.exact(), None, "trailers need chunked framing");
            }
            let n = {
                let mut seen = record.lock().unwrap();
                seen.push((data, trailers));
                seen.len()
            };
            // Loading twice, then warm.
            Ok::<_, Infallible>(if n <= 2 {
                hf_server::loading("m", Some("1.0"))
            } else {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            })
        }
    });
    let client = ServiceBuilder::new()
        .layer(ColdStartRetryLayer::new().jitter(false).body_limit(LIMIT))
        .service(backend);

    let mut frames = Vec::new();
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    for cut in cuts.into_iter().chain([body.len()]) {
        if cut > start {
            frames.push(Frame::data(Bytes::copy_from_slice(&body[start..cut])));
            start = cut;
        }
    }
    if trailers {
        let mut map = HeaderMap::new();
        map.insert("x-digest", "sha-256=abc".parse().unwrap());
        frames.push(Frame::trailers(map));
    }
    let request = Request::post("http://m.test/")
        .body(Frames::new(frames))
        .unwrap();
    let response = rt.block_on(client.oneshot(request)).unwrap();
    let attempts = report(&response).attempts();
    (seen, attempts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_attempt_is_byte_identical_or_there_is_one(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..(2 * LIMIT)),
            prop::collection::vec(any::<u8>(), (LIMIT - 2)..=(LIMIT + 2)),
        ],
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        trailers in any::<bool>(),
    ) {
        let (seen, attempts) = run(body.clone(), cuts, trailers);
        let seen = seen.lock().unwrap();
        if body.len() <= LIMIT {
            prop_assert_eq!(attempts, 3);
            prop_assert_eq!(seen.len(), 3);
        } else {
            prop_assert_eq!(attempts, 1);
            prop_assert_eq!(seen.len(), 1);
        }
        for (got, got_trailers) in seen.iter() {
            prop_assert_eq!(&got[..], &body[..]);
            prop_assert_eq!(got_trailers.is_some(), trailers);
        }
    }
}
