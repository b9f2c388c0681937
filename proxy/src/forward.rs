//! One request: forwarded to the upstream through the layer, the answer
//! handed back as it came, streaming.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use metrics::{counter, gauge, histogram};
use tower::ServiceExt;
use tower_cold_start::{ColdStartReport, ColdStartRetry, RequestBody, ResponseBody, Unreachable};

/// The upstream client: hyper-util over HTTP and HTTPS.
pub(crate) type Upstream = Client<HttpsConnector<HttpConnector>, RequestBody<Incoming>>;

/// The upstream client with the per-attempt timeout, if one is set.
pub(crate) type Attempts = tower::util::Either<
    tower::timeout::Timeout<Upstream>,
    tower::util::MapErr<Upstream, fn(hyper_util::client::legacy::Error) -> tower::BoxError>,
>;

/// The layered client.
pub(crate) type Layered = ColdStartRetry<Attempts>;

/// What the proxy answers with: the upstream's body, or one of its own.
pub(crate) type ProxyBody = Either<ResponseBody<Incoming>, Full<Bytes>>;

/// A call through the layer, boxed as `Send`.
type UpstreamCall = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Response<ResponseBody<Incoming>>, tower::BoxError>>
            + Send,
    >,
>;

/// The proxy's own routes, out of the way of any model server's.
pub(crate) const HEALTH: &str = "/_cold_start/health";
pub(crate) const METRICS: &str = "/_cold_start/metrics";

/// The proxy as a hyper service, one per connection.
#[derive(Clone)]
pub(crate) struct Service(pub(crate) std::sync::Arc<Proxy>);

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>,
    >;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Box::pin(std::sync::Arc::clone(&self.0).handle(request))
    }
}

/// Everything a request needs.
pub(crate) struct Proxy {
    pub(crate) client: Layered,
    pub(crate) upstream: Uri,
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl Proxy {
    /// Answers one request: the proxy's own routes, or the upstream's.
    pub(crate) async fn handle(
        self: std::sync::Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if request.method() == Method::GET {
            match request.uri().path() {
                HEALTH => return Ok(own(StatusCode::OK, r#"{"status":"ok"}"#.into(), JSON)),
                METRICS => {
                    gauge!("cold_start_proxy_cold_models").set(self.client.cold_models() as f64);
                    return Ok(own(StatusCode::OK, self.metrics.render(), PROMETHEUS));
                }
                _ => {}
            }
        }
        Ok(self.forward(request).await)
    }

    async fn forward(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        let request = match self.upstream_request(request) {
            Ok(request) => request,
            Err(why) => return bad_request(why),
        };
        counter!("cold_start_proxy_requests_total").increment(1);
        // Boxed as `Send` here, where the compiler can see it is (its
        // inference of `Send` through the nested futures gives up).
        let call: UpstreamCall = Box::pin(self.client.clone().oneshot(request));
        match call.await {
            Ok(response) => {
                let report = response.extensions().get::<ColdStartReport>().copied();
                if let Some(report) = report {
                    record(&method, &path, response.status(), &report);
                }
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(error) => {
                counter!("cold_start_proxy_upstream_errors_total").increment(1);
                failure(&method, &path, &*error)
            }
        }
    }

    /// The request as the upstream gets it: the same method, path, query,
    /// headers (less hop-by-hop ones), body and trailers, to the upstream's
    /// host.
    fn upstream_request(
        &self,
        request: Request<Incoming>,
    ) -> Result<Request<Incoming>, &'static str> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut uri = self.upstream.clone().into_parts();
        uri.path_and_query = match path_and_query.parse() {
            Ok(path_and_query) => Some(path_and_query),
            Err(_) => return Err("the request target is not a path"),
        };
        parts.uri = Uri::from_parts(uri).map_err(|_| "no upstream URL for this path")?;
        // The upstream's own host, set by the client from the URI.
        parts.headers.remove(header::HOST);
        strip_hop_by_hop(&mut parts.headers);
        // Whatever the client spoke (HTTP/1.1 or h2c), the upstream
        // connection decides its own version.
        parts.version = Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
}

const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4";

fn own(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An answer of the proxy's own: a small JSON error naming the cause.
fn error_response(status: StatusCode, error: &str, detail: Option<String>) -> Response<ProxyBody> {
    let mut body = serde_json::json!({ "error": error });
    if let Some(detail) = detail {
        body["detail"] = serde_json::Value::String(detail);
    }
    own(status, body.to_string(), JSON)
}

fn bad_request(detail: &str) -> Response<ProxyBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        "bad request",
        Some(detail.to_owned()),
    )
}

/// A call that ended in an error: `502` for an upstream that could not be
/// reached (or failed mid-answer), `504` for an attempt past its timeout.
fn failure(
    method: &Method,
    path: &str,
    error: &(dyn std::error::Error + Send + Sync + 'static),
) -> Response<ProxyBody> {
    let cause = causes(error);
    if let Some(unreachable) = error.downcast_ref::<Unreachable>() {
        tracing::warn!(%method, path, gave_up = unreachable.gave_up().as_str(), cause, "upstream unreachable");
        return error_response(StatusCode::BAD_GATEWAY, "upstream unreachable", Some(cause));
    }
    if error.is::<tower::timeout::error::Elapsed>() {
        tracing::warn!(%method, path, "upstream attempt timed out");
        return error_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out", None);
    }
    tracing::warn!(%method, path, cause, "upstream request failed");
    error_response(
        StatusCode::BAD_GATEWAY,
        "upstream request failed",
        Some(cause),
    )
}

/// An error and its sources, one line, with no URL in it (a URL may carry
/// credentials; the upstream is the operator's own anyway).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text.split(' ')
        .map(|word| if word.contains("://") { "<url>" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Metrics for every call, and one log line per cold start.
fn record(method: &Method, path: &str, status: StatusCode, report: &ColdStartReport) {
    counter!("cold_start_proxy_upstream_attempts_total")
        .increment(u64::from(report.attempts() + report.checks()));
    let cold = report.attempts() > 1 || report.checks() > 0 || !report.waited().is_zero();
    if !cold {
        return;
    }
    counter!("cold_start_proxy_cold_starts_total").increment(1);
    histogram!("cold_start_proxy_wait_seconds").record(report.waited().as_secs_f64());
    tracing::info!(
        %method,
        path,
        status = status.as_u16(),
        attempts = report.attempts(),
        checks = report.checks(),
        waited_ms = report.waited().as_millis() as u64,
        unreachable = report.unreachable(),
        gave_up = report.gave_up().map(|g| g.as_str()),
        "cold start"
    );
}

/// The hop-by-hop headers (RFC 9110 section 7.6.1), and those the
/// `Connection` header names: they are for one connection, not the next.
/// `TE: trailers` stays, since it asks for trailers end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The per-attempt timeout, if any, around the upstream client.
pub(crate) fn with_attempt_timeout(client: Upstream, timeout: Option<Duration>) -> Attempts {
    match timeout {
        Some(timeout) => tower::util::Either::Left(tower::timeout::Timeout::new(client, timeout)),
        None => {
            let boxed: fn(hyper_util::client::legacy::Error) -> tower::BoxError = |e| e.into();
            tower::util::Either::Right(tower::util::MapErr::new(client, boxed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-session"),
            ("keep-alive", "timeout=5"),
            ("x-session", "abc"),
            ("proxy-authorization", "Basic eA=="),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "content-type", "te"]);
        assert_eq!(headers["te"], "trailers");
    }

    #[test]
    fn causes_are_one_line_with_no_url() {
        let error = std::io::Error::other("error sending request for url (http://h/v1?key=s)");
        assert_eq!(causes(&error), "error sending request for url <url>");
    }
}
