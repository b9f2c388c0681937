//! When to send the next request to a loading model.

use std::time::Duration;

use crate::classifier::Hint;

/// How a call paces its requests to a loading model; set with
/// [`ColdStartRetryLayer::wait_strategy`](crate::ColdStartRetryLayer::wait_strategy).
///
/// Whatever the strategy, every wait ends within
/// [`max_total_wait`](crate::ColdStartRetryLayer::max_total_wait), no model is
/// asked more than once per second (per interval with
/// [`FixedInterval`](WaitStrategy::FixedInterval)) save right after a request
/// the server held for a second or more, and a caller waiting behind another
/// caller's probe is released the moment any response shows the model ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitStrategy {
    /// The default: ask the server to hold the request, else poll.
    ///
    /// The first retry goes out 1 s after the first request and asks to be
    /// held; a server that holds answers it when the model is ready. A held
    /// request answered "loading" after 1 s or more was held, so the next
    /// goes out at once; one answered sooner shows a server that does not
    /// hold, which is polled send-to-send every second while other callers
    /// wait on the model, and at 1 s, 1.5 s, then every 2 s for a caller
    /// alone: the pace of a hosted API, which counts requests against a
    /// limit. A server the classifier says is cheap to ask (one users run
    /// themselves, see [`ColdStart::with_poll_interval`](crate::classifier::ColdStart::with_poll_interval):
    /// the self-hosted built-ins say 250 ms, and so does a refused
    /// connection) is polled at that interval instead, so that its model is
    /// used the moment it is ready. `Retry-After` ([`Hint::After`]) and
    /// backoff ([`Hint::Backoff`]) are honoured as
    /// [`SleepEstimate`](WaitStrategy::SleepEstimate) does. `estimated_time`
    /// is not used: it is a poor estimate.
    #[default]
    Adaptive,
    /// Sleep what the server advises (`estimated_time`, or the classifier's
    /// [`Hint`]), capped by
    /// [`max_wait`](crate::ColdStartRetryLayer::max_wait), at least 1 s,
    /// [`default_wait`](crate::ColdStartRetryLayer::default_wait) without a
    /// usable hint, shortened by [jitter](crate::ColdStartRetryLayer::jitter).
    SleepEstimate,
    /// One request per interval, send to send, whatever the server hints;
    /// at least 100 ms.
    FixedInterval(Duration),
}

/// How long a held request must have taken to show that the server held
/// it; a loading answer sooner than this means the server does not hold.
const HELD: Duration = Duration::from_secs(1);

/// The poll interval while other callers wait on the same model, and the
/// first interval of a caller alone.
const POLL: Duration = Duration::from_secs(1);

/// The longest poll interval, for a caller alone.
const POLL_ALONE_MAX: Duration = Duration::from_secs(2);

/// The shortest poll interval: of [`WaitStrategy::FixedInterval`], and of
/// a classifier's own interval.
pub(crate) const POLL_FLOOR: Duration = Duration::from_millis(100);

/// The shortest sleep between two attempts, unless `max_wait` is shorter.
///
/// A server that says `"estimated_time": 0` (or 1e-9) must not turn the layer
/// into a busy loop.
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(1);

/// A number in [0, 1) from std's randomly keyed hasher (fresh keys on every
/// call): enough to spread retries and pings, with no dependency.
pub(crate) fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The bounds that shape one wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitBounds {
    pub(crate) default_wait: Duration,
    pub(crate) max_wait: Duration,
}

/// How long to sleep after a cold start whose hint is `estimate`.
///
/// - a finite, non-negative estimate is used, capped at `max_wait`;
/// - a missing, negative, NaN or infinite one means `default_wait` (capped);
/// - the result is never below [`MIN_WAIT`] unless `max_wait` itself is.
///
/// The caller further caps it by the time left in its budget.
pub(crate) fn advised_wait(estimate: Option<f64>, bounds: WaitBounds) -> Duration {
    let hinted = match estimate {
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            if secs >= bounds.max_wait.as_secs_f64() {
                bounds.max_wait
            } else {
                // `secs` is finite, non-negative and below a `Duration`, so
                // this cannot fail; the fallback keeps it panic-free anyway.
                Duration::try_from_secs_f64(secs).unwrap_or(bounds.max_wait)
            }
        }
        _ => bounds.default_wait,
    };
    hinted.max(MIN_WAIT).min(bounds.max_wait)
}

/// The sleep before attempt `attempt + 1` after a cold start that hinted
/// `hint`: the advised wait, shortened by `jitter` (a number in [0, 1), or
/// `None` for no jitter) but never below the floor, then cut to the time left
/// in the budget. `None` when no time is left.
pub(crate) fn planned_wait(
    hint: Hint,
    attempt: u32,
    bounds: WaitBounds,
    jitter: Option<f64>,
    remaining: Duration,
) -> Option<Duration> {
    if remaining.is_zero() {
        return None;
    }
    // A wait the server sets outright that the budget cannot cover is not
    // slept at all: the answer goes back now (a quota that says "in 3
    // hours" must not hold the caller for the rest of its budget).
    if let Hint::After(wait) = hint {
        if wait > remaining {
            return None;
        }
    }
    let advised = match hint {
        Hint::Estimate(secs) => advised_wait(Some(secs), bounds),
        Hint::After(wait) => advised_wait(Some(wait.as_secs_f64()), bounds),
        Hint::Backoff => {
            let doubling = attempt.saturating_sub(1).min(62) as i32;
            advised_wait(Some(2f64.powi(doubling)), bounds)
        }
        Hint::Soon => advised_wait(Some(0.0), bounds),
        Hint::Unknown => advised_wait(None, bounds),
    };
    let wait = match jitter {
        Some(unit) if unit.is_finite() => {
            let share = if hint == Hint::Backoff { 0.5 } else { 0.2 };
            let factor = 1.0 - share * unit.clamp(0.0, 1.0);
            advised.mul_f64(factor).max(MIN_WAIT.min(bounds.max_wait))
        }
        _ => advised,
    };
    Some(wait.min(remaining))
}

/// What the call knows when a loading answer arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer {
    /// What the classifier read from it.
    pub(crate) hint: Hint,
    /// Requests sent so far, this one included.
    pub(crate) attempt: u32,
    /// From sending the request to this answer; zero when not measured (the
    /// first request, which is never held unless the caller asked).
    pub(crate) took: Duration,
    /// Whether the request asked the server to hold it.
    pub(crate) held: bool,
    /// Whether other callers wait on this model for this call's probe.
    pub(crate) company: bool,
    /// The poll interval the classifier gave for this server, if any.
    pub(crate) poll: Option<Duration>,
}

/// The wait before the next request, or `None` when the budget is spent.
pub(crate) fn next_wait(
    strategy: WaitStrategy,
    answer: &Answer,
    bounds: WaitBounds,
    jitter: Option<f64>,
    remaining: Duration,
) -> Option<Duration> {
    if remaining.is_zero() {
        return None;
    }
    let advised = || planned_wait(answer.hint, answer.attempt, bounds, jitter, remaining);
    let interval = match strategy {
        WaitStrategy::SleepEstimate => return advised(),
        WaitStrategy::FixedInterval(interval) => interval.max(POLL_FLOOR),
        WaitStrategy::Adaptive => match answer.hint {
            Hint::After(_) | Hint::Backoff => return advised(),
            _ if answer.held && answer.took >= HELD => Duration::ZERO,
            _ => answer
                .poll
                .map_or_else(|| poll_interval(answer), |poll| poll.max(POLL_FLOOR)),
        },
    };
    Some(interval.saturating_sub(answer.took).min(remaining))
}

/// The shortest time between two requests a strategy sends a loading
/// model (`poll`: the classifier's interval for its server): a caller
/// taking over another's probe waits until that long after the model was
/// last asked.
pub(crate) fn pace(strategy: WaitStrategy, poll: Option<Duration>) -> Duration {
    match strategy {
        WaitStrategy::FixedInterval(interval) => interval.max(POLL_FLOOR),
        WaitStrategy::Adaptive => poll.map_or(POLL, |poll| poll.max(POLL_FLOOR)),
        WaitStrategy::SleepEstimate => POLL,
    }
}

/// The adaptive poll interval after `answer` (sends so far, company).
fn poll_interval(answer: &Answer) -> Duration {
    match answer.attempt {
        _ if answer.company => POLL,
        0 | 1 => POLL,
        2 => POLL + POLL / 2,
        _ => POLL_ALONE_MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> WaitBounds {
        WaitBounds {
            default_wait: Duration::from_secs(20),
            max_wait: Duration::from_secs(60),
        }
    }

    fn answer(attempt: u32) -> Answer {
        Answer {
            hint: Hint::Estimate(20.0),
            attempt,
            took: Duration::ZERO,
            held: attempt > 1,
            company: false,
            poll: None,
        }
    }

    fn adaptive(answer: &Answer) -> Option<Duration> {
        next_wait(
            WaitStrategy::Adaptive,
            answer,
            bounds(),
            None,
            Duration::from_secs(120),
        )
    }

    const fn secs(s: f64) -> Duration {
        Duration::from_millis((s * 1000.0) as u64)
    }

    #[test]
    fn adaptive_alone_polls_at_1_then_1_5_then_2_seconds() {
        let waits: Vec<_> = (1..=5).map(|n| adaptive(&answer(n)).unwrap()).collect();
        assert_eq!(
            waits,
            [secs(1.0), secs(1.5), secs(2.0), secs(2.0), secs(2.0)]
        );
    }

    #[test]
    fn adaptive_polls_a_self_hosted_server_at_its_interval_alone_or_not() {
        for n in 1..=5 {
            for company in [false, true] {
                let local = Answer {
                    hint: Hint::Unknown,
                    held: false,
                    company,
                    poll: Some(secs(0.25)),
                    ..answer(n)
                };
                assert_eq!(adaptive(&local), Some(secs(0.25)), "{n} {company}");
                // Send to send: an answer that took 0.1 s leaves 0.15 s.
                let took = Answer {
                    took: secs(0.1),
                    ..local
                };
                assert_eq!(adaptive(&took), Some(secs(0.15)));
            }
        }
        let busy = Answer {
            poll: Some(Duration::ZERO),
            held: false,
            ..answer(2)
        };
        assert_eq!(adaptive(&busy), Some(POLL_FLOOR), "never a busy loop");
        assert_eq!(pace(WaitStrategy::Adaptive, Some(secs(0.25))), secs(0.25));
        assert_eq!(pace(WaitStrategy::Adaptive, None), POLL);
        assert_eq!(pace(WaitStrategy::SleepEstimate, Some(secs(0.25))), POLL);
    }

    #[test]
    fn adaptive_polls_every_second_with_company() {
        for n in 1..=5 {
            let with_company = Answer {
                company: true,
                ..answer(n)
            };
            assert_eq!(adaptive(&with_company), Some(secs(1.0)), "{n}");
        }
    }

    #[test]
    fn a_held_request_that_took_long_is_retried_at_once() {
        for took in [secs(1.0), secs(30.0), secs(60.0)] {
            let held = Answer { took, ..answer(2) };
            assert_eq!(adaptive(&held), Some(Duration::ZERO), "{took:?}");
            // The server's "Model too busy" after its limit: the same.
            let too_busy = Answer {
                hint: Hint::Soon,
                ..held
            };
            assert_eq!(adaptive(&too_busy), Some(Duration::ZERO));
        }
    }

    #[test]
    fn a_held_request_answered_at_once_means_no_hold_and_a_poll() {
        let quick = Answer {
            took: secs(0.2),
            ..answer(2)
        };
        // Counted from send to send: 1.5 s after the previous send.
        assert_eq!(adaptive(&quick), Some(secs(1.3)));
    }

    #[test]
    fn an_unheld_slow_answer_is_not_a_hold() {
        let slow = Answer {
            took: secs(5.0),
            held: false,
            ..answer(2)
        };
        // The interval has passed already: send now, still one per interval.
        assert_eq!(adaptive(&slow), Some(Duration::ZERO));
        let slow = Answer {
            took: secs(0.9),
            held: true,
            ..answer(3)
        };
        assert_eq!(adaptive(&slow), Some(secs(1.1)));
    }

    #[test]
    fn adaptive_honours_retry_after_and_backoff() {
        let after = Answer {
            hint: Hint::After(Duration::from_secs(7)),
            ..answer(2)
        };
        assert_eq!(adaptive(&after), Some(secs(7.0)));
        let backoff = Answer {
            hint: Hint::Backoff,
            ..answer(3)
        };
        assert_eq!(adaptive(&backoff), Some(secs(4.0)));
    }

    #[test]
    fn advised_sleeps_the_estimate() {
        let got = next_wait(
            WaitStrategy::SleepEstimate,
            &answer(1),
            bounds(),
            None,
            Duration::from_secs(120),
        );
        assert_eq!(got, Some(secs(20.0)));
    }

    #[test]
    fn poll_is_fixed_and_floored() {
        let poll = |interval, took| {
            next_wait(
                WaitStrategy::FixedInterval(interval),
                &Answer { took, ..answer(4) },
                bounds(),
                None,
                Duration::from_secs(120),
            )
        };
        assert_eq!(poll(secs(1.0), Duration::ZERO), Some(secs(1.0)));
        assert_eq!(poll(secs(1.0), secs(0.25)), Some(secs(0.75)));
        assert_eq!(poll(Duration::ZERO, Duration::ZERO), Some(secs(0.1)));
    }

    #[test]
    fn advised_wait_follows_the_hint_within_bounds() {
        let b = bounds();
        assert_eq!(advised_wait(Some(20.0), b), Duration::from_secs(20));
        assert_eq!(
            advised_wait(Some(32.137), b),
            Duration::from_secs_f64(32.137)
        );
        assert_eq!(advised_wait(Some(1809.18), b), Duration::from_secs(60));
        assert_eq!(advised_wait(Some(1e308), b), Duration::from_secs(60));
        assert_eq!(advised_wait(Some(f64::MAX), b), Duration::from_secs(60));
    }

    #[test]
    fn advised_wait_uses_the_default_for_unusable_hints() {
        let b = bounds();
        for hint in [
            None,
            Some(-1.0),
            Some(-0.0001),
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
        ] {
            assert_eq!(advised_wait(hint, b), Duration::from_secs(20), "{hint:?}");
        }
    }

    #[test]
    fn advised_wait_never_busy_loops() {
        let b = bounds();
        for hint in [0.0, 1e-9, 0.5, f64::MIN_POSITIVE] {
            assert_eq!(advised_wait(Some(hint), b), MIN_WAIT, "{hint}");
        }
    }

    #[test]
    fn advised_wait_respects_a_cap_below_the_floor() {
        let b = WaitBounds {
            default_wait: Duration::from_secs(20),
            max_wait: Duration::from_millis(10),
        };
        assert_eq!(advised_wait(Some(5.0), b), Duration::from_millis(10));
        assert_eq!(advised_wait(None, b), Duration::from_millis(10));
    }

    #[test]
    fn advised_wait_with_the_largest_cap_does_not_panic() {
        let b = WaitBounds {
            default_wait: Duration::MAX,
            max_wait: Duration::MAX,
        };
        assert_eq!(advised_wait(Some(1e300), b), Duration::MAX);
        assert_eq!(advised_wait(Some(f64::MAX), b), Duration::MAX);
        assert_eq!(advised_wait(None, b), Duration::MAX);
        assert_eq!(advised_wait(Some(30.0), b), Duration::from_secs(30));
    }

    #[test]
    fn no_wait_outlives_the_budget() {
        for strategy in [
            WaitStrategy::Adaptive,
            WaitStrategy::SleepEstimate,
            WaitStrategy::FixedInterval(secs(5.0)),
        ] {
            let got = next_wait(strategy, &answer(3), bounds(), None, secs(0.5));
            assert_eq!(got, Some(secs(0.5)), "{strategy:?}");
            let spent = next_wait(strategy, &answer(3), bounds(), None, Duration::ZERO);
            assert_eq!(spent, None, "{strategy:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn no_sleep_runs_past_the_budget(
                hint in prop_oneof![
                    any::<f64>().prop_map(Hint::Estimate),
                    any::<u64>().prop_map(|s| Hint::After(Duration::from_secs(s))),
                    Just(Hint::Backoff),
                    Just(Hint::Soon),
                    Just(Hint::Unknown),
                ],
                attempt in any::<u32>(),
                jitter in prop_oneof![Just(None), any::<f64>().prop_map(Some)],
                default_ms in any::<u64>(),
                max_ms in any::<u64>(),
                remaining_ns in any::<u64>(),
            ) {
                let bounds = WaitBounds {
                    default_wait: Duration::from_millis(default_ms),
                    max_wait: Duration::from_millis(max_ms),
                };
                let remaining = Duration::from_nanos(remaining_ns);
                match planned_wait(hint, attempt, bounds, jitter, remaining) {
                    None => prop_assert!(
                        remaining.is_zero() || matches!(hint, Hint::After(d) if d > remaining)
                    ),
                    Some(wait) => {
                        prop_assert!(wait <= remaining);
                        prop_assert!(wait <= bounds.max_wait);
                        prop_assert!(wait >= MIN_WAIT.min(bounds.max_wait).min(remaining));
                    }
                }
            }

            #[test]
            fn advised_wait_stays_within_its_bounds(
                estimate in prop_oneof![any::<f64>().prop_map(Some), Just(None)],
                default_ms in any::<u64>(),
                max_ms in any::<u64>(),
            ) {
                let bounds = WaitBounds {
                    default_wait: Duration::from_millis(default_ms),
                    max_wait: Duration::from_millis(max_ms),
                };
                let wait = advised_wait(estimate, bounds);
                prop_assert!(wait <= bounds.max_wait);
                prop_assert!(wait >= MIN_WAIT.min(bounds.max_wait));
                if let Some(secs) = estimate.filter(|s| s.is_finite() && *s >= 1.0) {
                    if secs >= bounds.max_wait.as_secs_f64() {
                        prop_assert_eq!(wait, bounds.max_wait);
                    } else {
                        let error = (wait.as_secs_f64() - secs).abs();
                        prop_assert!(error <= 1e-6 + secs * 1e-12, "{wait:?} vs {secs}");
                    }
                }
            }
        }
    }
}
