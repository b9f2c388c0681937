//! The life cycle of one model's shared state, under random schedules.
//!
//! Callers of one model arrive, meet "loading", other answers (a gateway
//! `503`, a `200`) or errors, run out of budget or of their own timeout, and
//! are dropped at any moment, polled again or not. After every step of the
//! schedule, on tokio's paused clock:
//!
//! 1. at most one probe exists per model beyond those whose request was
//!    already in flight when the model was released (no request goes out
//!    under a probe of a state the model no longer has: `Standing::sending`
//!    gives such a probe back first);
//! 2. once the model's latest answer released it (anything but "loading";
//!    a transport error is no answer), nobody waits for it and it is not
//!    held as cold;
//! 3. once every caller has finished or been dropped, the registry is empty
//!    (no cold model, no probe, no waiter), and so is the pool of buffered
//!    bodies.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::{ColdStartRetryLayer, RequestBody, WaitStrategy};

/// What the model answers a request, decided when it arrives.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Loading,
    /// A `503` without the loading marker, as a gateway sends.
    Gateway,
    Warm,
    /// The transport fails.
    Error,
}

#[derive(Clone, Debug)]
enum Step {
    /// A caller arrives, with a timeout of its own or none, and maybe an
    /// answer of its own to its first request.
    Arrive {
        timeout_ms: Option<u16>,
        first: Option<(Answer, u16)>,
    },
    /// From now on the model answers this, after this latency.
    Model { answer: Answer, latency_ms: u16 },
    /// The nth live caller's task is dropped, without being polled again.
    Drop(usize),
    /// Time passes.
    Advance { ms: u16 },
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => Just(Answer::Loading),
        1 => Just(Answer::Gateway),
        2 => Just(Answer::Warm),
        1 => Just(Answer::Error),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (
            prop::option::of(0u16..8_000),
            prop::option::of((answer(), 0u16..2_500)),
        )
            .prop_map(|(timeout_ms, first)| Step::Arrive { timeout_ms, first }),
        2 => (answer(), 0u16..2_500).prop_map(|(answer, latency_ms)| Step::Model { answer, latency_ms }),
        2 => any::<usize>().prop_map(Step::Drop),
        3 => (0u16..3_000).prop_map(|ms| Step::Advance { ms }),
    ]
}

fn wait_strategy() -> impl Strategy<Value = WaitStrategy> {
    prop_oneof![
        Just(WaitStrategy::Adaptive),
        Just(WaitStrategy::FixedInterval(Duration::from_millis(700))),
        Just(WaitStrategy::SleepEstimate),
    ]
}

#[derive(Default)]
struct Model {
    answer: Option<Answer>,
    latency: Duration,
    // Whether the latest answer given released the model (not "loading").
    released: bool,
    in_flight: usize,
    // Answers to some callers' first requests, by caller.
    firsts: std::collections::HashMap<Bytes, (Answer, Duration)>,
}

struct InFlight(Arc<Mutex<Model>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight -= 1;
    }
}

fn loading() -> Response<Full<Bytes>> {
    let body = r#"{"error":"Model m is currently loading","estimated_time":2.0}"#;
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    response
}

type Shared = Arc<Mutex<Model>>;

/// A model server in-process: each request meets its caller's own first
/// answer, if it has one, else the model's answer now, after its latency.
async fn serve(
    model: Shared,
    req: Request<RequestBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let caller = req.into_body().collect().await.unwrap().to_bytes();
    let (answer, latency) = {
        let mut model = model.lock().unwrap();
        model.in_flight += 1;
        match model.firsts.remove(&caller) {
            Some(first) => first,
            None => (model.answer.unwrap_or(Answer::Loading), model.latency),
        }
    };
    // Counted out however the request ends, dropped included.
    let in_flight = InFlight(Arc::clone(&model));
    tokio::time::sleep(latency).await;
    drop(in_flight);
    // Recorded as the answer leaves, with the layer's handling of it next
    // in the same poll. An error is no answer from the model: it releases
    // nothing.
    match answer {
        Answer::Loading => model.lock().unwrap().released = false,
        Answer::Gateway | Answer::Warm => model.lock().unwrap().released = true,
        Answer::Error => {}
    }
    match answer {
        Answer::Loading => Ok(loading()),
        Answer::Gateway => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"no")));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            Ok(response)
        }
        Answer::Warm => Ok(Response::new(Full::new(Bytes::from_static(b"ok")))),
        Answer::Error => Err(std::io::Error::other("reset")),
    }
}

/// The invariants, after a step.
fn check(
    layer: &ColdStartRetryLayer,
    model: &Shared,
    callers: &mut VecDeque<JoinHandle<()>>,
    at: &str,
) -> Result<(), TestCaseError> {
    callers.retain(|c| !c.is_finished());
    let registry = &layer.shared.runtime.registry;
    let (waiters, probes) = registry.census();
    let cold = registry.cold_models();
    let (in_flight, released) = {
        let model = model.lock().unwrap();
        (model.in_flight, model.released)
    };
    prop_assert!(
        probes <= 1 + in_flight,
        "{at}: {probes} probes, {in_flight} requests in flight"
    );
    if released {
        prop_assert_eq!((waiters, cold), (0, 0), "{}: after a release", at);
    }
    if callers.is_empty() {
        prop_assert_eq!((probes, waiters, cold), (0, 0, 0), "{}: nobody left", at);
        prop_assert_eq!(
            layer.shared.runtime.pool.used(),
            0,
            "{}: bodies still held",
            at
        );
    }
    Ok(())
}

/// Lets every task that can run, run.
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

fn run(wait_strategy: WaitStrategy, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let model = Shared::default();
        let backend = {
            let model = Arc::clone(&model);
            tower::service_fn(move |req| serve(Arc::clone(&model), req))
        };
        let layer = ColdStartRetryLayer::new()
            .wait_strategy(wait_strategy)
            .jitter(false)
            .max_total_wait(Duration::from_secs(10));
        let client = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(backend);
        let mut callers: VecDeque<JoinHandle<()>> = VecDeque::new();
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Arrive { timeout_ms, first } => {
                    let caller = Bytes::from(i.to_string());
                    if let Some((answer, ms)) = first {
                        let latency = Duration::from_millis(ms.into());
                        let mut model = model.lock().unwrap();
                        model.firsts.insert(caller.clone(), (answer, latency));
                    }
                    let request = Request::post("http://m.test/models/m")
                        .body(Full::new(caller))
                        .unwrap();
                    let call = client.clone().oneshot(request);
                    let limit =
                        timeout_ms.map_or(Duration::MAX, |ms| Duration::from_millis(ms.into()));
                    callers.push_back(tokio::spawn(async move {
                        let _ = tokio::time::timeout(limit, call).await;
                    }));
                }
                Step::Model { answer, latency_ms } => {
                    let mut model = model.lock().unwrap();
                    model.answer = Some(answer);
                    model.latency = Duration::from_millis(latency_ms.into());
                }
                Step::Drop(n) => {
                    if !callers.is_empty() {
                        let n = n % callers.len();
                        callers.remove(n).unwrap().abort();
                    }
                }
                Step::Advance { ms } => {
                    tokio::time::sleep(Duration::from_millis(ms.into())).await;
                }
            }
            settle().await;
            check(&layer, &model, &mut callers, &format!("step {i}"))?;
        }
        // Every caller runs to its end: budgets are 10 s, answers come
        // within 2.5 s.
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        prop_assert!(callers.iter().all(JoinHandle::is_finished));
        check(&layer, &model, &mut callers, "the end")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn one_models_state_lives_exactly_as_long_as_its_callers(
        wait_strategy in wait_strategy(),
        steps in prop::collection::vec(step(), 1..48),
    ) {
        run(wait_strategy, steps)?;
    }
}

/// Found by the schedule above: a prober's poll timer ends at the very
/// instant another caller's gateway answer releases the model. The prober
/// must not send under the outlived probe (nor keep it: the probes alive
/// stay within the requests in flight).
#[test]
fn a_nap_that_ends_as_the_model_is_released_sends_under_no_probe() {
    run(
        WaitStrategy::FixedInterval(Duration::from_millis(700)),
        vec![
            Step::Model {
                answer: Answer::Gateway,
                latency_ms: 982,
            },
            Step::Arrive {
                timeout_ms: None,
                first: Some((Answer::Loading, 282)),
            },
            Step::Arrive {
                timeout_ms: None,
                first: None,
            },
        ],
    )
    .unwrap();
}
