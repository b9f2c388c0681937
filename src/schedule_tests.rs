//! One call's life under random schedules: a server whose answers to the
//! caller's request (cold, not cold, success, refused, reset, hang, a
//! redirect whose next hop is refused) and to its readiness route (ready,
//! not ready, 404, slow, hang, refused) change at any time. After every
//! step, on tokio's paused clock:
//!
//! 1. no request or check starts later than the budget after the call's
//!    first cold-start answer (a loading answer or a refusal);
//! 2. the caller's request is sent again only after its own cold-start
//!    answer or a refusal of its own first connection (nothing reached the
//!    server): never after a success, a non-cold answer, a reset, a hang,
//!    or a refused redirect hop (the first server processed it);
//! 3. with a truthful route (it says ready exactly when the model would
//!    answer, and the model goes refused, then cold, then warm) a large
//!    body reaches the server twice at most;
//! 4. when the call ends, its answer is the latest one its own request got
//!    (a refusal, or a refused check after it, ends in `Unreachable`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::classifier::KServe;
use crate::{BoxError, ColdStartRetryLayer, RequestBody, Unreachable};

const BUDGET: Duration = Duration::from_secs(5);
const NOT_READY: &[u8] = br#"{"error":"Model with name m is not ready."}"#;

/// What the caller's request meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Cold,
    /// A `503` without the marker (a gateway): not a cold start.
    NotCold,
    Success,
    /// The request's own connection is refused: nothing reached the server.
    Refused,
    /// The server read the request, then the connection was reset.
    Reset,
    /// The server read the request and never answers.
    Hang,
    /// The server processed the request and redirected; the next hop was
    /// refused (as a client that follows redirects reports it).
    Redirect,
}

/// What a readiness check meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Ready,
    NotReady,
    Missing,
    /// Ready, after 3 s.
    Slow,
    Hang,
    Refused,
}

#[derive(Clone, Debug)]
enum Step {
    Model(Answer, u16),
    Route(Route, u16),
    Advance(u16),
}

fn step() -> impl Strategy<Value = Step> {
    let answer = prop_oneof![
        4 => Just(Answer::Cold),
        1 => Just(Answer::NotCold),
        2 => Just(Answer::Success),
        2 => Just(Answer::Refused),
        1 => Just(Answer::Reset),
        1 => Just(Answer::Hang),
        1 => Just(Answer::Redirect),
    ];
    let route = prop_oneof![
        2 => Just(Route::Ready),
        3 => Just(Route::NotReady),
        1 => Just(Route::Missing),
        1 => Just(Route::Slow),
        1 => Just(Route::Hang),
        1 => Just(Route::Refused),
    ];
    prop_oneof![
        2 => (answer, 0u16..1_500).prop_map(|(a, ms)| Step::Model(a, ms)),
        2 => (route, 0u16..500).prop_map(|(r, ms)| Step::Route(r, ms)),
        3 => (0u16..2_500).prop_map(Step::Advance),
    ]
}

/// The truthful server's phases: refused, cold, then warm, with a route that
/// says so.
fn truthful_step() -> impl Strategy<Value = Step> {
    (0u16..2_500).prop_map(Step::Advance)
}

/// What the server did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// The caller's request arrived (`reached`: the server read it) and met
    /// this.
    Request { answer: Answer, reached: bool },
    /// A check arrived.
    Check(Route),
    /// A check's refusal reached the client (its latency passed).
    CheckRefused,
}

#[derive(Default)]
struct Server {
    answer: Option<(Answer, Duration)>,
    route: Option<(Route, Duration)>,
    // The truthful phases' ends, if the server is the truthful one.
    truthful: Option<(Instant, Instant)>,
    log: Vec<(Instant, Event)>,
    // When the caller's request first met a cold start (the answer left,
    // or the connection was refused): the budget counts from there.
    first_cold: Option<Instant>,
}

impl Server {
    fn now_answer(&self) -> (Answer, Duration) {
        match self.truthful {
            Some((up, warm)) => {
                let now = Instant::now();
                let answer = if now < up {
                    Answer::Refused
                } else if now < warm {
                    Answer::Cold
                } else {
                    Answer::Success
                };
                (answer, Duration::ZERO)
            }
            None => self.answer.unwrap_or((Answer::Cold, Duration::ZERO)),
        }
    }

    fn now_route(&self) -> (Route, Duration) {
        match self.truthful {
            Some(_) => {
                let route = match self.now_answer().0 {
                    Answer::Refused => Route::Refused,
                    Answer::Success => Route::Ready,
                    _ => Route::NotReady,
                };
                (route, Duration::ZERO)
            }
            None => self.route.unwrap_or((Route::NotReady, Duration::ZERO)),
        }
    }
}

type Shared = Arc<Mutex<Server>>;

fn refused() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
}

fn status(code: u16, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}

async fn serve(
    server: Shared,
    req: Request<RequestBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    if req.method() == Method::GET {
        let (route, latency) = server.lock().unwrap().now_route();
        server
            .lock()
            .unwrap()
            .log
            .push((Instant::now(), Event::Check(route)));
        tokio::time::sleep(latency).await;
        return match route {
            Route::Ready => Ok(status(200, b"")),
            Route::NotReady => Ok(status(503, b"")),
            Route::Missing => Ok(status(404, b"")),
            Route::Slow => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(status(200, b""))
            }
            Route::Hang => std::future::pending().await,
            Route::Refused => {
                let mut server = server.lock().unwrap();
                server.log.push((Instant::now(), Event::CheckRefused));
                Err(refused())
            }
        };
    }
    let (answer, latency) = server.lock().unwrap().now_answer();
    let event = |reached| Event::Request { answer, reached };
    if answer == Answer::Refused {
        // Refused before any byte: the body is never asked for.
        let mut server = server.lock().unwrap();
        server.log.push((Instant::now(), event(false)));
        server.first_cold.get_or_insert_with(Instant::now);
        return Err(refused());
    }
    server
        .lock()
        .unwrap()
        .log
        .push((Instant::now(), event(true)));
    let _ = req.into_body().collect().await;
    tokio::time::sleep(latency).await;
    if answer == Answer::Cold {
        let mut server = server.lock().unwrap();
        server.first_cold.get_or_insert_with(Instant::now);
    }
    match answer {
        Answer::Cold => Ok(status(503, NOT_READY)),
        Answer::NotCold => Ok(status(503, b"upstream unavailable")),
        Answer::Success => Ok(status(200, b"ok")),
        Answer::Reset => Err(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))),
        Answer::Hang => std::future::pending().await,
        Answer::Redirect => Err(refused()),
        Answer::Refused => unreachable!("answered above"),
    }
}

/// Invariants 1 to 3, on the log so far.
fn check(server: &Shared, large: bool, at: &str) -> Result<(), TestCaseError> {
    let server = server.lock().unwrap();
    let requests: Vec<_> = server
        .log
        .iter()
        .filter_map(|(t, e)| match e {
            Event::Request { answer, reached } => Some((*t, *answer, *reached)),
            Event::Check(_) | Event::CheckRefused => None,
        })
        .collect();
    if let Some(first_cold) = server.first_cold {
        // Starts only: a check's refusal is an answer.
        let starts = server.log.iter().filter(|(_, e)| *e != Event::CheckRefused);
        for (t, event) in starts {
            prop_assert!(
                *t <= first_cold + BUDGET,
                "{at}: {event:?} at {:?} after the first cold answer",
                *t - first_cold
            );
        }
    }
    for pair in requests.windows(2) {
        let before = pair[0].1;
        prop_assert!(
            matches!(before, Answer::Cold | Answer::Refused),
            "{at}: the request was sent again after {before:?}"
        );
    }
    if server.truthful.is_some() && large {
        let reached = requests.iter().filter(|(_, _, reached)| *reached).count();
        prop_assert!(
            reached <= 2,
            "{at}: a large body reached the server {reached} times"
        );
    }
    Ok(())
}

/// Invariant 4, on how the call ended.
fn check_end(
    server: &Shared,
    outcome: &Result<(StatusCode, Bytes), BoxError>,
) -> Result<(), TestCaseError> {
    let server = server.lock().unwrap();
    let mut last_request = None;
    let mut refused_check_after = false;
    for (_, event) in &server.log {
        match event {
            Event::Request { answer, .. } => {
                last_request = Some(*answer);
                refused_check_after = false;
            }
            Event::CheckRefused => refused_check_after = true,
            Event::Check(_) => {}
        }
    }
    let last = last_request.expect("the first request went out");
    match outcome {
        Ok((code, body)) => {
            let expected = match last {
                Answer::Cold => (503, NOT_READY),
                Answer::NotCold => (503, &b"upstream unavailable"[..]),
                Answer::Success => (200, &b"ok"[..]),
                other => return Err(TestCaseError::fail(format!("answered after {other:?}"))),
            };
            prop_assert_eq!((code.as_u16(), &body[..]), expected);
            prop_assert!(
                !refused_check_after || last == Answer::Success || last == Answer::NotCold
            );
        }
        Err(error) if error.is::<Unreachable>() => {
            prop_assert!(
                last == Answer::Refused || refused_check_after,
                "Unreachable after {last:?}"
            );
        }
        Err(error) => {
            prop_assert!(
                matches!(last, Answer::Reset | Answer::Redirect),
                "an error ({error}) after {last:?}"
            );
        }
    }
    Ok(())
}

async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

fn run(large: bool, truthful: Option<(u16, u16)>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let server = Shared::default();
        if let Some((up, warm)) = truthful {
            let now = Instant::now();
            let up = now + Duration::from_millis(up.into());
            server.lock().unwrap().truthful = Some((up, up + Duration::from_millis(warm.into())));
        }
        let backend = {
            let server = Arc::clone(&server);
            tower::service_fn(move |req| serve(Arc::clone(&server), req))
        };
        let layer = ColdStartRetryLayer::new()
            .classifier(KServe)
            .jitter(false)
            .max_total_wait(BUDGET);
        let client = tower::ServiceBuilder::new().layer(layer).service(backend);
        let body = Bytes::from(vec![b'x'; if large { 128 * 1024 } else { 16 }]);
        let request = Request::post("http://m.test/v2/models/m/infer")
            .body(Full::new(body))
            .unwrap();
        let call = tokio::spawn(async move {
            let response = client.oneshot(request).await?;
            let code = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((code, body))
        });
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Model(answer, ms) => {
                    server.lock().unwrap().answer =
                        Some((answer, Duration::from_millis(ms.into())));
                }
                Step::Route(route, ms) => {
                    server.lock().unwrap().route = Some((route, Duration::from_millis(ms.into())));
                }
                Step::Advance(ms) => tokio::time::sleep(Duration::from_millis(ms.into())).await,
            }
            settle().await;
            check(&server, large, &format!("step {i}"))?;
        }
        // The budget ends every wait; a request that hangs stays unanswered.
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        check(&server, large, "the end")?;
        if call.is_finished() {
            let outcome = call.await.expect("the call does not panic");
            check_end(&server, &outcome)?;
        } else {
            let hung = server
                .lock()
                .unwrap()
                .log
                .iter()
                .rev()
                .find_map(|(_, e)| match e {
                    Event::Request { answer, .. } => Some(*answer),
                    Event::Check(_) | Event::CheckRefused => None,
                });
            prop_assert_eq!(
                hung,
                Some(Answer::Hang),
                "only a hanging request is still under way"
            );
            call.abort();
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn one_calls_life_keeps_the_contract_whatever_the_server_does(
        large in any::<bool>(),
        steps in prop::collection::vec(step(), 1..32),
    ) {
        run(large, None, steps)?;
    }

    #[test]
    fn with_a_truthful_route_a_large_body_goes_out_twice_at_most(
        up in 0u16..3_000,
        warm in 0u16..4_000,
        steps in prop::collection::vec(truthful_step(), 1..8),
    ) {
        run(true, Some((up, warm)), steps)?;
    }
}
