//! Concurrent callers of one cold model wait together: one probes, the rest
//! wait in-process and are released the moment the model answers.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_cold_start::ColdStartRetryLayer;

const MODEL: &str = "/models/gpt2";

/// One caller's own input, which it must get back.
fn input(n: usize) -> String {
    format!(r#"{{"inputs":"caller {n}"}}"#)
}

#[tokio::test(start_paused = true)]
async fn callers_that_arrive_during_a_cold_start_wait_for_one_probe() {
    // Cold for 24 s, holding; estimate 20 s. One caller meets the cold
    // model; 99 more arrive while it waits. The default strategy.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let client = layered(ColdStartRetryLayer::new());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(send(client.clone(), server.url(MODEL), input(0)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.count(), 1);
    for n in 1..100 {
        tasks.spawn(send(client.clone(), server.url(MODEL), input(n)));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        server.count(),
        2,
        "late callers do not go upstream while the model is cold: only the \
         first request and the held probe did"
    );
    let mut done = Vec::new();
    while let Some(result) = tasks.join_next().await {
        done.push(result.unwrap());
    }
    assert!(done.iter().all(|(status, _, _)| *status == 200));
    // The probe (sent at 1 s, held until 24 s), then each waiter once.
    assert_eq!(server.count(), 1 + 1 + 99, "N + 1 upstream requests");
    // Every caller is answered the moment the model is ready.
    let ready = start + Duration::from_secs(24);
    for (_, at, _) in &done {
        assert!(
            *at - ready < Duration::from_millis(50),
            "woken {:?} late",
            *at - ready
        );
    }
    let held = server
        .received()
        .iter()
        .filter(|r| r.headers.get("x-wait-for-model").is_some())
        .count();
    assert_eq!(
        held, 1,
        "only the probe asks to be held; released waiters find the model warm"
    );
}

#[tokio::test(start_paused = true)]
async fn callers_that_meet_the_cold_model_together_retry_once_each_not_each_on_a_timer() {
    let n = 100;
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(10), 20.0, false),
    )])
    .await;
    let client = layered(advised().jitter(false));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(send(client.clone(), server.url(MODEL), input(i)));
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().0, 200);
    }
    // All N arrived before anything was known: N, then one probe at 20 s,
    // then the other N - 1 once each.
    assert_eq!(server.count(), 2 * n);
    let at_20 = server
        .received()
        .iter()
        .filter(|r| r.at.duration_since(server.received()[0].at) >= Duration::from_secs(20))
        .count();
    assert_eq!(
        at_20, n,
        "one probe, then the released waiters: no second round of timers"
    );
}

#[tokio::test(start_paused = true)]
async fn when_the_probing_caller_is_dropped_a_waiter_takes_the_probe_at_once() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(100), 30.0, false),
    )])
    .await;
    let client = layered(
        advised()
            .jitter(false)
            .max_total_wait(Duration::from_secs(300)),
    );
    let prober = tokio::spawn(send(client.clone(), server.url(MODEL), input(0)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiter = tokio::spawn(send(client.clone(), server.url(MODEL), input(1)));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(server.count(), 1);
    // The prober's caller gives up at 5 s (its own timeout, say).
    prober.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The waiter probes now, not at the prober's 30 s timer.
    assert_eq!(server.count(), 2);
    let taken_at = server.received()[1].at - server.received()[0].at;
    assert_eq!(taken_at.as_secs(), 5);
    waiter.abort();
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_while_waiting_sends_nothing_and_others_are_unaffected() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(24), 20.0, true))]).await;
    let client = layered(advised().jitter(false));
    let prober = tokio::spawn(send(client.clone(), server.url(MODEL), input(0)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dropped = tokio::spawn(send(client.clone(), server.url(MODEL), input(1)));
    let kept = tokio::spawn(send(client.clone(), server.url(MODEL), input(2)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    dropped.abort();
    assert_eq!(prober.await.unwrap().0, 200);
    assert_eq!(kept.await.unwrap().0, 200);
    // First request, probe, and the kept waiter: nothing for the dropped one.
    assert_eq!(server.count(), 3);
    assert!(server
        .received()
        .iter()
        .all(|r| !String::from_utf8_lossy(&r.body).contains("caller 1")));
}

#[tokio::test(start_paused = true)]
async fn waiters_keep_their_own_budget_and_get_the_last_loading_response() {
    let server = HfServer::start([(MODEL, Model::never_loads("20.0"))]).await;
    let client = layered(
        advised()
            .jitter(false)
            .max_total_wait(Duration::from_secs(50)),
    );
    let start = Instant::now();
    let first = tokio::spawn(send(client.clone(), server.url(MODEL), input(0)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut waiters = Vec::new();
    for n in 1..5 {
        waiters.push(tokio::spawn(send(
            client.clone(),
            server.url(MODEL),
            input(n),
        )));
    }
    let (status, _, attempts) = first.await.unwrap();
    assert_eq!((status, attempts), (503, 4), "attempts at 0, 20, 40, 50 s");
    for waiter in waiters {
        let (status, at, attempts) = waiter.await.unwrap();
        assert_eq!(status, 503);
        // Each waiter's own 50 s, counted from when it started waiting (1 s),
        // plus whatever its turns as prober took.
        assert!(
            at - start <= Duration::from_secs(51 + 50),
            "{:?}",
            at - start
        );
        assert!(attempts <= 4);
    }
}

#[tokio::test(start_paused = true)]
async fn a_model_warm_again_goes_straight_upstream() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(5), 2.0, false))]).await;
    let client = layered(advised().jitter(false));
    assert_eq!(
        send(client.clone(), server.url(MODEL), input(0)).await.0,
        200
    );
    let before = server.count();
    let start = Instant::now();
    let (status, at, attempts) = send(client.clone(), server.url(MODEL), input(1)).await;
    assert_eq!((status, attempts), (200, 1));
    assert!(at - start < Duration::from_millis(10));
    assert_eq!(server.count(), before + 1);
}

#[tokio::test(start_paused = true)]
async fn a_warm_answer_to_a_request_already_in_flight_releases_the_waiters() {
    // Ready at 30 s. Caller A asks to be held from its first request and is
    // answered at 30 s. Caller B meets the cold model at 1 s and probes on a
    // 60 s estimate; caller C waits for B's probe. A's answer releases C at
    // 30 s, long before B's probe would.
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(30), 60.0, true))]).await;
    let client = layered(advised().jitter(false));
    let start = Instant::now();
    let a = {
        let client = client.clone();
        let url = server.url(MODEL);
        tokio::spawn(async move {
            let request = Request::post(url)
                .header("x-wait-for-model", "true")
                .body(Full::new(Bytes::from_static(b"{\"inputs\":\"a\"}")))
                .unwrap();
            client.oneshot(request).await.unwrap().status()
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = tokio::spawn(send(client.clone(), server.url(MODEL), input(1)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = tokio::spawn(send(client.clone(), server.url(MODEL), input(2)));
    assert_eq!(a.await.unwrap(), 200);
    let (status, at, attempts) = c.await.unwrap();
    assert_eq!((status, attempts), (200, 1));
    assert!(
        at - start - Duration::from_secs(30) < Duration::from_millis(50),
        "{:?}",
        at - start
    );
    assert_eq!(b.await.unwrap().0, 200);
}

#[tokio::test(start_paused = true)]
async fn a_cold_model_whose_callers_are_all_dropped_unpolled_is_forgotten() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(100), 20.0, false),
    )])
    .await;
    let client = layered(ColdStartRetryLayer::new().jitter(false));
    let prober = tokio::spawn(send(client.clone(), server.url(MODEL), input(0)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiter = tokio::spawn(send(client.clone(), server.url(MODEL), input(1)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.cold_models(), 1);
    // A server drops the handlers of clients that went away: the prober's
    // task first, then the waiter's, neither polled again.
    prober.abort();
    waiter.abort();
    assert!(prober.await.unwrap_err().is_cancelled());
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(client.cold_models(), 0, "nobody probes or waits on it");
    assert_eq!(server.count(), 1);

    // The model is warm now: the next call goes straight out, no pause.
    server.set_model(MODEL, Model::Warm);
    let start = Instant::now();
    let request = Request::post(server.url(MODEL))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(report(&response).attempts(), 1);
    assert_eq!(report(&response).waited(), Duration::ZERO);
    assert_eq!(server.received()[1].at, start, "sent at once");
}

/// A model that keeps loading for `p`'s requests; `a`'s first request meets
/// a gateway error (not loading) half a second in.
fn loading_but_one_gateway_error() -> Model {
    Model::script(|request, _| {
        let loading = (
            503,
            vec![("content-type", "application/json".to_owned())],
            loading_body("gpt2", Some("20.0")),
        );
        match request.headers.get("x-caller").map(|v| v.as_bytes()) {
            Some(b"a") => (
                Duration::from_millis(500),
                (503, vec![], Bytes::from_static(b"upstream connect error")),
            ),
            _ => (Duration::from_millis(100), loading),
        }
    })
}

async fn tagged(client: Layered, url: String, tag: &'static str) -> u16 {
    let request = Request::post(url)
        .header("x-caller", tag)
        .body(Full::new(Bytes::from(tag)))
        .unwrap();
    client.oneshot(request).await.unwrap().status().as_u16()
}

fn polling_every_second() -> Layered {
    layered(
        ColdStartRetryLayer::new()
            .wait_strategy(tower_cold_start::WaitStrategy::FixedInterval(
                Duration::from_secs(1),
            ))
            .jitter(false)
            .max_total_wait(Duration::from_secs(4)),
    )
}

#[tokio::test(start_paused = true)]
async fn a_prober_that_meets_loading_again_after_a_warm_release_keeps_probing_alone() {
    let server = HfServer::start([(MODEL, loading_but_one_gateway_error())]).await;
    let client = polling_every_second();
    // Both sent at once; `p` meets "loading" at 0.1 s and probes, `a` meets a
    // gateway error at 0.5 s, which releases the model; `p`'s next probe
    // meets "loading" again.
    let p = tokio::spawn(tagged(client.clone(), server.url(MODEL), "p"));
    let a = tokio::spawn(tagged(client.clone(), server.url(MODEL), "a"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.await.unwrap(), 503);
    // `c` arrives while `p` probes: it must wait behind `p`, not probe too.
    let c = tokio::spawn(tagged(client.clone(), server.url(MODEL), "c"));
    assert_eq!(p.await.unwrap(), 503, "gave up at its budget");
    let p_done = Instant::now();
    let from_c: Vec<_> = server
        .received()
        .into_iter()
        .filter(|r| r.headers["x-caller"] == "c")
        .collect();
    assert!(
        from_c.iter().all(|r| r.at >= p_done),
        "c sent while p probed: {:?}",
        server.offsets()
    );
    assert_eq!(c.await.unwrap(), 503);
    assert_eq!(client.cold_models(), 0, "every caller is done");
}

#[tokio::test(start_paused = true)]
async fn a_prober_that_meets_loading_again_after_a_warm_release_leaves_nothing_when_it_gives_up() {
    let server = HfServer::start([(MODEL, loading_but_one_gateway_error())]).await;
    let client = polling_every_second();
    let p = tokio::spawn(tagged(client.clone(), server.url(MODEL), "p"));
    let a = tokio::spawn(tagged(client.clone(), server.url(MODEL), "a"));
    assert_eq!(a.await.unwrap(), 503);
    assert_eq!(p.await.unwrap(), 503);
    assert!(server.count() >= 4, "p probed after the release");
    assert_eq!(client.cold_models(), 0, "every caller is done");
}

#[tokio::test(start_paused = true)]
async fn every_caller_of_a_cold_model_hears_of_its_progress_not_only_the_prober() {
    let server =
        HfServer::start([(MODEL, Model::cold_with(Duration::from_secs(6), 20.0, false))]).await;
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let client = layered(ColdStartRetryLayer::new().jitter(false).on_retry(move |e| {
        let caller = e.uri().query().unwrap().to_owned();
        sink.lock().unwrap().push((
            caller,
            e.behind_probe(),
            e.model().map(str::to_owned),
            e.estimate(),
            e.elapsed(),
        ));
    }));
    let first = tokio::spawn(send(
        client.clone(),
        server.url(&format!("{MODEL}?c=0")),
        input(0),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiters: Vec<_> = (1..=20)
        .map(|n| {
            tokio::spawn(send(
                client.clone(),
                server.url(&format!("{MODEL}?c={n}")),
                input(n),
            ))
        })
        .collect();
    assert_eq!(first.await.unwrap().0, 200);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().0, 200);
    }
    let events = events.lock().unwrap().clone();
    for n in 1..=20 {
        let mine: Vec<_> = events.iter().filter(|e| e.0 == format!("c={n}")).collect();
        // One as it starts waiting, then one per loading answer of the probe.
        assert!(mine.len() >= 3, "caller {n}: {mine:?}");
        for (_, behind, model, estimate, _) in &mine {
            assert!(*behind, "caller {n} never probed: {mine:?}");
            assert_eq!(model.as_deref(), Some("gpt2"));
            assert_eq!(*estimate, Some(20.0));
        }
        assert!(
            mine.windows(2).all(|w| w[0].4 < w[1].4),
            "waited so far grows"
        );
    }
    let prober: Vec<_> = events.iter().filter(|e| e.0 == "c=0").collect();
    assert!(
        !prober.is_empty() && prober.iter().all(|e| !e.1),
        "{prober:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_layer_configured_apart_from_a_clone_shares_no_cold_models_with_it() {
    let server = HfServer::start([(
        MODEL,
        Model::cold_with(Duration::from_secs(100), 20.0, false),
    )])
    .await;
    let layer = ColdStartRetryLayer::new().jitter(false);
    let same = layer.clone();
    let apart = layer.clone().max_total_wait(Duration::from_secs(30));
    let client = layered(layer.clone());
    let probing = tokio::spawn(send(client, server.url(MODEL), input(0)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(layer.cold_models(), 1);
    assert_eq!(same.cold_models(), 1, "a plain clone shares");
    assert_eq!(apart.cold_models(), 0, "configured apart: its own state");
    // A call through the other layer does not wait behind the first's probe.
    let other = layered(apart.clone());
    let started = Instant::now();
    let request = Request::post(server.url(MODEL))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let sent = tokio::spawn(other.oneshot(request));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(server.count(), 2, "sent at once");
    assert_eq!(server.received()[1].at, started);
    probing.abort();
    sent.abort();
}
