//! Waiting: a pause before a call's next request, or a wait behind another
//! caller's probe, either ended early by a change of the model's state.
//! The one place where a wait is polled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::time::{sleep_until, Instant, Sleep};

use crate::coalesce::{ColdModel, Waiter};

/// A wait, until its timer or a change of its model.
pub(crate) struct Wait {
    pub(crate) timer: Pin<Box<Sleep>>,
    pub(crate) started: Instant,
    // The model this call probes (a pause), and a wake-up for its release.
    released: Option<(Arc<ColdModel>, Pin<Box<OwnedNotified>>)>,
    pub(crate) kind: WaitKind,
}

/// What a call waits for.
pub(crate) enum WaitKind {
    /// Its own next request, as the model's probe (or alone). `gives_up`:
    /// the pause runs to the end of the budget, which ends the call unless
    /// the model is released first.
    Pause { gives_up: bool },
    /// Another caller's probe, until the budget ends; `heard`: the model's
    /// loading answers this caller was told of.
    Behind { waiter: Waiter, heard: u64 },
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// Its timer.
    Timer,
    /// A change of the model's state: a probe given back or a new loading
    /// answer (behind a probe), or the model's release.
    ModelChanged,
}

impl Wait {
    /// A pause of `duration` before this call's next request, ended early
    /// if `probing`'s model is released.
    pub(crate) fn pause(
        duration: Duration,
        probing: Option<Arc<ColdModel>>,
        gives_up: bool,
    ) -> Box<Self> {
        let released = probing.map(|model| {
            let wake = model.wake_up();
            (model, wake)
        });
        Box::new(Wait {
            timer: Box::pin(sleep_until(Instant::now() + duration)),
            started: Instant::now(),
            released,
            kind: WaitKind::Pause { gives_up },
        })
    }

    /// A wait behind another caller's probe, until `deadline`, ended early
    /// by any change of the model; `heard`: the loading answers already told.
    pub(crate) fn behind(waiter: Waiter, deadline: Instant, heard: u64) -> Box<Self> {
        Box::new(Wait {
            timer: Box::pin(sleep_until(deadline)),
            started: Instant::now(),
            released: None,
            kind: WaitKind::Behind { waiter, heard },
        })
    }

    /// Waits for the timer or a change of the model. A pause is woken only
    /// when its model's state is gone (released); a wait behind a probe by
    /// any change.
    pub(crate) fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Woken> {
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woken::Timer);
        }
        if let WaitKind::Behind { waiter, .. } = &mut self.kind {
            ready!(waiter.poll_changed(cx));
            return Poll::Ready(Woken::ModelChanged);
        }
        let Some((model, wake)) = &mut self.released else {
            return Poll::Pending;
        };
        loop {
            ready!(wake.as_mut().poll(cx));
            // Listen again before looking, so that no change is missed.
            *wake = model.wake_up();
            if !model.is_current() {
                return Poll::Ready(Woken::ModelChanged);
            }
            // Woken for something else (another caller's answer).
        }
    }

    /// What the wait is for, in a few words.
    pub(crate) fn what(&self) -> &'static str {
        match self.kind {
            WaitKind::Pause { .. } => "sleeping before a retry",
            WaitKind::Behind { .. } => "waiting for another caller's probe",
        }
    }
}

impl std::fmt::Debug for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let left = self
            .timer
            .deadline()
            .saturating_duration_since(Instant::now());
        f.debug_struct("Wait")
            .field("what", &self.what())
            .field("left", &left)
            .finish()
    }
}
