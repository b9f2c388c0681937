//! `Retry-After` (RFC 9110 §10.2.3): delta seconds or an HTTP date.

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, RETRY_AFTER};
use http::StatusCode;

use super::{Classify, ColdStart, Hint, Hold, ResponseView};

/// Any `503` or `429` that carries `Retry-After` (RFC 9110 §10.2.3): delta
/// seconds, or an HTTP date.
///
/// An HTTP date is measured against the response's own `Date` header when it
/// has one (so a clock skew between client and server does not matter), else
/// against this machine's clock; a date in the past means the shortest wait.
/// A missing or unparsable header is not a cold start. Retries carry no hold
/// header, or `Prefer: wait=N` with [`prefer_wait`](RetryAfter::prefer_wait).
///
/// ```
/// use tower_cold_start::classifier::{Classify, HuggingFace, RetryAfter};
/// use tower_cold_start::ColdStartRetryLayer;
/// let layer = ColdStartRetryLayer::new().classifier(HuggingFace.or(RetryAfter::new()));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryAfter {
    hold: Hold,
}

impl RetryAfter {
    /// `Retry-After` on `503` and `429`, no hold header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries carry `Prefer: wait=N` (N the seconds left, at most 60), as
    /// Replicate and other RFC 7240 servers understand.
    pub fn prefer_wait(mut self) -> Self {
        self.hold = Hold::PreferWait;
        self
    }
}

impl Classify for RetryAfter {
    fn may_be_cold_start(&self, status: StatusCode, _held: bool) -> bool {
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS
    }

    fn hold(&self) -> Hold {
        self.hold
    }

    fn classify(&self, response: &ResponseView<'_>) -> Option<ColdStart> {
        if !self.may_be_cold_start(response.status, response.held) {
            return None;
        }
        let wait = retry_after(response.headers, SystemTime::now())?;
        Some(ColdStart::new(Hint::After(wait)).with_hold(self.hold))
    }
}

/// Parses `Retry-After`: delta seconds, or an HTTP date measured against the
/// response's `Date` (else `now`). A date in the past is a zero wait.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    // `retry-after-ms` (OpenAI-style APIs) is the more precise of the two.
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| seconds(v.to_str().ok()?))
    {
        return Some(duration(ms / 1000.0));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Some(secs) = seconds(value) {
        return Some(duration(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let reference = headers
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(now);
    Some(at.duration_since(reference).unwrap_or(Duration::ZERO))
}

/// A count of seconds as servers write it: digits, with an optional
/// fraction (`1.5`, as OpenAI-style APIs send). Anything else, a sign or an
/// exponent included, is not one.
fn seconds(text: &str) -> Option<f64> {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || (text.ends_with('.')) {
        return None;
    }
    // Digits only: the parse cannot fail; absurd counts are infinite.
    text.parse::<f64>().ok()
}

/// Seconds as a wait; an absurd count saturates (and is capped later).
fn duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::test_support::headers;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[("retry-after", "120")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        let h = headers(&[("retry-after", "  7 ")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let h = headers(&[("retry-after", "99999999999999999999999")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(u64::MAX)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &later)]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        let h = headers(&[("retry-after", "1.5")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(1500)));
        let h = headers(&[("retry-after", "120"), ("retry-after-ms", "250.5")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_micros(250_500)));
        for bad in [
            "",
            "-5",
            "1.",
            ".5",
            "1e3",
            "+1",
            "NaN",
            "inf",
            "soon",
            "Mon, 99 Foo 2024 99:99:99 GMT",
        ] {
            let h = headers(&[("retry-after", bad)]);
            assert_eq!(retry_after(&h, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_dates_use_the_server_clock_and_past_dates_mean_now() {
        // Our clock is an hour fast: the server's Date header decides.
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ours = server + Duration::from_secs(3600);
        let h = headers(&[
            ("date", &httpdate::fmt_http_date(server)),
            (
                "retry-after",
                &httpdate::fmt_http_date(server + Duration::from_secs(45)),
            ),
        ]);
        assert_eq!(retry_after(&h, ours), Some(Duration::from_secs(45)));
        let h = headers(&[(
            "retry-after",
            &httpdate::fmt_http_date(server - Duration::from_secs(10)),
        )]);
        assert_eq!(retry_after(&h, server), Some(Duration::ZERO));
        // All three date formats RFC 9110 requires.
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            let h = headers(&[
                ("retry-after", date),
                ("date", "Sun, 06 Nov 1994 08:49:07 GMT"),
            ]);
            assert_eq!(
                retry_after(&h, ours),
                Some(Duration::from_secs(30)),
                "{date}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_header_text_is_a_wait_or_nothing_never_a_panic(
            retry in "[ -~]{0,40}",
            ms in proptest::option::of("[ -~]{0,24}"),
        ) {
            let mut pairs = vec![("retry-after", retry.as_str())];
            if let Some(ms) = &ms {
                pairs.push(("retry-after-ms", ms.as_str()));
            }
            // Printable ASCII: always a valid header value.
            let h = headers(&pairs);
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            if let Some(wait) = retry_after(&h, now) {
                // Only digits (with a fraction) or a date make a wait.
                let text = retry.trim();
                let numeric = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.');
                let dated = httpdate::parse_http_date(text).is_ok();
                let from_ms = ms.as_deref().is_some_and(|m| seconds(m).is_some());
                proptest::prop_assert!(numeric || dated || from_ms, "{retry:?} {ms:?} -> {wait:?}");
            }
        }
    }
}
