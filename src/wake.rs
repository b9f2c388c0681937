//! When to send the next request to a loading model.

use std::time::Duration;

use crate::classifier::Hint;
use crate::classify::{self, WaitBounds};

/// How a call waits between two requests to a loading model; set with
/// [`ColdStartRetryLayer::wake_up`](crate::ColdStartRetryLayer::wake_up).
///
/// Whatever the strategy, every wait ends within
/// [`max_total_wait`](crate::ColdStartRetryLayer::max_total_wait), and a
/// caller waiting on another caller's probe of the same model is released
/// the moment any response shows the model ready.
///
/// # Which to choose
///
/// `estimated_time` is a poor estimate (the recorded pairs in the README:
/// 20 s announced, 10 s or 24 s taken; 53 s announced, 9 s taken), so
/// sleeping it wastes up to tens of seconds after the model is ready, or
/// retries too early. [`Adaptive`](WakeUp::Adaptive) does not trust it: a
/// server that holds requests (`x-wait-for-model`) answers the held retry the
/// moment the model is ready, and a server that does not is polled, which
/// bounds the wasted time by the poll interval. The README's cold-start table
/// measures all three against the baselines users would otherwise write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WakeUp {
    /// The default: learns from the server.
    ///
    /// - The first retry goes out 1 s after the first request, asking the
    ///   server to hold it (unless
    ///   [`wait_for_model(false)`](crate::ColdStartRetryLayer::wait_for_model)
    ///   or the classifier offers no hold). A server that holds answers it
    ///   when the model is ready: no lag, one request.
    /// - A held request that comes back loading after 1 s or more was held:
    ///   the next goes out at once (the hold was the wait). One that comes
    ///   back sooner was not held: the server does not hold, so the layer
    ///   polls, one request per interval counted from send to send. The
    ///   interval is 1 s while other callers wait on the same model (each
    ///   poll can release them all); a caller waiting alone stretches it to
    ///   1.5 s and then 2 s, which costs it at most 2 s of lag and about half
    ///   the requests of a 1 s poll.
    /// - A wait the server sets outright (`Retry-After`,
    ///   [`Hint::After`]) or asks to grow ([`Hint::Backoff`], e.g. TGI's
    ///   `Model is overloaded`) is honoured as [`Advised`](WakeUp::Advised)
    ///   does: those are the server's word, not an estimate.
    ///
    /// No strategy here sends a model more than one request per second,
    /// except right after a request the server held for a second or more.
    #[default]
    Adaptive,
    /// Sleeps as the server advises, the crate's first behaviour:
    /// `estimated_time` (or the classifier's [`Hint`]), capped by
    /// [`max_wait`](crate::ColdStartRetryLayer::max_wait), at least 1 s,
    /// [`default_wait`](crate::ColdStartRetryLayer::default_wait) without a
    /// usable hint, shortened by [jitter](crate::ColdStartRetryLayer::jitter).
    Advised,
    /// Sends a request every interval (counted from send to send), whatever
    /// the server hints. An interval under 100 ms is raised to 100 ms, so
    /// that a mistake cannot become a busy loop.
    Poll(Duration),
}

/// How long a held request must have taken to show that the server held
/// it; a loading answer sooner than this means the server does not hold.
const HELD: Duration = Duration::from_secs(1);

/// The poll interval while other callers wait on the same model, and the
/// first interval of a caller alone.
const POLL: Duration = Duration::from_secs(1);

/// The longest poll interval, for a caller alone.
const POLL_ALONE_MAX: Duration = Duration::from_secs(2);

/// The shortest interval of [`WakeUp::Poll`].
const POLL_FLOOR: Duration = Duration::from_millis(100);

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
}

/// The wait before the next request, or `None` when the budget is spent.
pub(crate) fn next_wait(
    strategy: WakeUp,
    answer: &Answer,
    bounds: WaitBounds,
    jitter: Option<f64>,
    remaining: Duration,
) -> Option<Duration> {
    if remaining.is_zero() {
        return None;
    }
    let advised = || classify::planned_wait(answer.hint, answer.attempt, bounds, jitter, remaining);
    let interval = match strategy {
        WakeUp::Advised => return advised(),
        WakeUp::Poll(interval) => interval.max(POLL_FLOOR),
        WakeUp::Adaptive => match answer.hint {
            Hint::After(_) | Hint::Backoff => return advised(),
            _ if answer.held && answer.took >= HELD => Duration::ZERO,
            _ => poll_interval(answer),
        },
    };
    Some(interval.saturating_sub(answer.took).min(remaining))
}

/// The shortest time between two requests a strategy sends a loading
/// model: a caller taking over another's probe waits until that long after
/// the model was last asked.
pub(crate) fn pace(strategy: WakeUp) -> Duration {
    match strategy {
        WakeUp::Poll(interval) => interval.max(POLL_FLOOR),
        WakeUp::Adaptive | WakeUp::Advised => POLL,
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
        }
    }

    fn adaptive(answer: &Answer) -> Option<Duration> {
        next_wait(
            WakeUp::Adaptive,
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
            WakeUp::Advised,
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
                WakeUp::Poll(interval),
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
    fn no_wait_outlives_the_budget() {
        for strategy in [WakeUp::Adaptive, WakeUp::Advised, WakeUp::Poll(secs(5.0))] {
            let got = next_wait(strategy, &answer(3), bounds(), None, secs(0.5));
            assert_eq!(got, Some(secs(0.5)), "{strategy:?}");
            let spent = next_wait(strategy, &answer(3), bounds(), None, Duration::ZERO);
            assert_eq!(spent, None, "{strategy:?}");
        }
    }
}
