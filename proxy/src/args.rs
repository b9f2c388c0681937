//! The command line: every flag also an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::Uri;

/// A sidecar proxy that waits out model cold starts for any HTTP client.
///
/// Point a client's base URL at --listen; every request goes to --upstream
/// as it was sent, and a cold start (a loading answer, a server still
/// booting) is waited out in between, as tower-cold-start's
/// ColdStartRetryLayer does. Its own routes: GET /_cold_start/health and
/// GET /_cold_start/metrics (Prometheus). Logs go to stderr, one line per
/// cold start (COLD_START_LOG sets the filter, e.g. `debug`). SIGTERM or
/// Ctrl-C stops it: no new connections, requests in flight finish within
/// --grace.
#[derive(Debug, Parser)]
#[command(name = "cold-start-proxy", version, about, long_about)]
pub(crate) struct Args {
    /// The address to listen on.
    #[arg(long, env = "COLD_START_LISTEN", default_value = "127.0.0.1:8081")]
    pub(crate) listen: SocketAddr,

    /// The model server to forward to: http:// or https://, host and port,
    /// no path.
    #[arg(long, env = "COLD_START_UPSTREAM", value_parser = upstream)]
    pub(crate) upstream: Uri,

    /// PEM certificates to trust for an HTTPS upstream (an internal CA),
    /// besides the Mozilla roots.
    #[arg(long, env = "COLD_START_UPSTREAM_CA")]
    pub(crate) upstream_ca: Option<std::path::PathBuf>,

    /// Which answers are cold starts: `known` recognises every server's
    /// exact marker (HuggingFace, KServe, Triton, vLLM, TGI, TEI, Ollama,
    /// llama.cpp, MLServer, Ray Serve); a server's name uses its built-in
    /// alone, which also waits out refused connections.
    #[arg(long, env = "COLD_START_CLASSIFIER", value_enum, default_value_t = Classifier::Known)]
    pub(crate) classifier: Classifier,

    /// Whether a refused connection (a server still booting) is waited out.
    /// Default: as the classifier says (`known`: no, a wrong URL fails at
    /// once; a server's own: yes).
    #[arg(long, env = "COLD_START_RETRY_REFUSED")]
    pub(crate) retry_refused: Option<bool>,

    /// The most time one request spends waiting out a cold start (e.g.
    /// `120s`, `2m`, `500ms`).
    #[arg(long, env = "COLD_START_MAX_TOTAL_WAIT", value_parser = duration, default_value = "120s")]
    pub(crate) max_total_wait: Duration,

    /// A bound on each upstream attempt (e.g. `90s`); answered `504` when it
    /// passes. Default: none (a held request may take long).
    #[arg(long, env = "COLD_START_ATTEMPT_TIMEOUT", value_parser = duration)]
    pub(crate) attempt_timeout: Option<Duration>,

    /// The largest request body kept for replay (e.g. `8MiB`); a larger one
    /// is sent once, as it streams in.
    #[arg(long, env = "COLD_START_BODY_LIMIT", value_parser = bytes, default_value = "8MiB")]
    pub(crate) body_limit: usize,

    /// The most bytes all requests in flight keep for replay together.
    #[arg(long, env = "COLD_START_TOTAL_BODY_LIMIT", value_parser = bytes, default_value = "128MiB")]
    pub(crate) total_body_limit: usize,

    /// A top-level field of the JSON body that names the model (`model` for
    /// OpenAI-style servers): callers of one model wait behind one probe.
    /// Default: requests are grouped by path.
    #[arg(long, env = "COLD_START_MODEL_KEY")]
    pub(crate) model_key: Option<String>,

    /// A model to warm at start-up and keep warm: `PATH=JSON`, POSTed to the
    /// upstream (e.g. `/v1/completions={"model":"m","prompt":"hi","max_tokens":1}`).
    /// Repeat the flag, or separate with newlines in the variable.
    #[arg(long, env = "COLD_START_WARM", value_parser = warm, value_delimiter = '\n')]
    pub(crate) warm: Vec<Warm>,

    /// How often a warmed model is pinged to keep it warm.
    #[arg(long, env = "COLD_START_KEEP_WARM_EVERY", value_parser = duration, default_value = "15m")]
    pub(crate) keep_warm_every: Duration,

    /// How long requests in flight may take to finish after SIGTERM or
    /// Ctrl-C before they are cut.
    #[arg(long, env = "COLD_START_GRACE", value_parser = duration, default_value = "30s")]
    pub(crate) grace: Duration,
}

/// The classifiers by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Classifier {
    /// Every server's exact marker (the library's default).
    Known,
    /// The HuggingFace serverless API.
    Huggingface,
    /// HuggingFace Inference Endpoints: any 503 or 502 (holds with
    /// X-Scale-Up-Timeout).
    InferenceEndpoints,
    /// Any 503 or 429 with Retry-After.
    RetryAfter,
    /// KServe's model server.
    Kserve,
    /// NVIDIA Triton.
    Triton,
    /// vLLM.
    Vllm,
    /// text-generation-inference.
    Tgi,
    /// text-embeddings-inference.
    Tei,
    /// Ollama.
    Ollama,
    /// llama.cpp's llama-server.
    LlamaCpp,
    /// Seldon MLServer.
    Mlserver,
    /// Ray Serve.
    RayServe,
}

/// A model to warm: where to POST, and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Warm {
    pub(crate) path: String,
    pub(crate) body: String,
}

fn upstream(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the scheme must be http:// or https://".into()),
    }
    if uri.authority().is_none() {
        return Err("no host".into());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("credentials in the URL would travel to every request: send a header".into());
    }
    match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("" | "/") => Ok(uri),
        Some(_) => Err("give only the scheme, host and port (no path or query)".into()),
    }
}

/// `120`, `120s`, `2m`, `500ms`, `1.5s`, `1h`.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 120s, 2m, 500ms)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|_| format!("`{text}` is out of range"))
}

/// `8388608`, `8MiB`, `512KiB`, `1GiB`, `64kB`, `10MB`.
pub(crate) fn bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 8MiB)"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown unit `{other}` (use B, KiB, MiB or GiB)")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn warm(text: &str) -> Result<Warm, String> {
    let (path, body) = text
        .split_once('=')
        .ok_or("give `PATH=JSON`, e.g. /v1/completions={\"model\":\"m\",\"prompt\":\"hi\"}")?;
    if !path.starts_with('/') {
        return Err(format!("`{path}` is not a path (it starts with /)"));
    }
    serde_json::from_str::<serde_json::Value>(body)
        .map_err(|e| format!("the body is not JSON: {e}"))?;
    Ok(Warm {
        path: path.to_owned(),
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_as_people_write_them() {
        assert_eq!(duration("120"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "-1s", "1e400s", "3 parsecs", "NaN"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
        assert_eq!(bytes("8MiB"), Ok(8 << 20));
        assert_eq!(bytes("1000"), Ok(1000));
        assert_eq!(bytes("10MB"), Ok(10_000_000));
        for bad in ["", "MiB", "-1", "99999999999999999999GiB", "1 TiB"] {
            assert!(bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_upstream_is_a_server_not_a_route() {
        assert!(upstream("http://127.0.0.1:8080").is_ok());
        assert!(upstream("https://x.endpoints.huggingface.cloud/").is_ok());
        for bad in [
            "127.0.0.1:8080",
            "ftp://h",
            "http://h/v1",
            "http://h/?q=1",
            "http://user:pw@h",
            "http://",
            "not a url",
        ] {
            assert!(upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_warm_model_is_a_path_and_a_json_body() {
        let w = warm(r#"/v1/completions={"model":"m","prompt":"hi"}"#).unwrap();
        assert_eq!(w.path, "/v1/completions");
        assert!(warm("v1={}").is_err());
        assert!(warm("/v1").is_err());
        assert!(warm("/v1={not json").is_err());
    }
}
