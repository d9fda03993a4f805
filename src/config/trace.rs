//! Tracing flags: where OpenTelemetry spans are exported, and how many traces are kept.

use anyhow::bail;
use clap::Args;

use crate::telemetry::trace::TraceConfig;

/// Distributed tracing (OpenTelemetry over OTLP/gRPC); off unless an endpoint is given.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector to export spans to, e.g. http://127.0.0.1:4317 (one server span
    /// per RPC, continuing the caller's W3C trace context). Off when not given, and then
    /// free. An unreachable collector never slows or fails a call: spans are dropped and
    /// counted in geomatch_trace_spans_dropped_total.
    #[arg(long, env = "GEOMATCH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share of new traces sampled, 0 to 1; a caller's own sampling decision (the
    /// traceparent's sampled flag) is always followed (parent-based).
    #[arg(long, env = "GEOMATCH_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    pub trace_sample_ratio: f64,
}

impl TraceArgs {
    /// The tracing settings, when tracing is on.
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn settings(&self) -> anyhow::Result<Option<TraceConfig>> {
        let ratio = self.trace_sample_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            bail!("--trace-sample-ratio {ratio}: must be within 0 and 1");
        }
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(None);
        };
        let scheme_ok = endpoint
            .split_once("://")
            .is_some_and(|(scheme, rest)| matches!(scheme, "http" | "https") && !rest.is_empty());
        if !scheme_ok {
            bail!(
                "--otlp-endpoint {endpoint}: must be an http:// or https:// URL, e.g. http://127.0.0.1:4317"
            );
        }
        Ok(Some(TraceConfig {
            endpoint: endpoint.clone(),
            sample_ratio: ratio,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn tracing_is_off_by_default_and_its_flags_are_checked() {
        let (_, s) = parse(&[]).unwrap();
        assert!(s.server.trace.is_none());
        let (_, s) = parse(&[
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--trace-sample-ratio",
            "0.25",
        ])
        .unwrap();
        let t = s.server.trace.unwrap();
        assert_eq!(t.endpoint, "http://127.0.0.1:4317");
        assert_eq!(t.sample_ratio, 0.25);
        for (args, needle) in [
            (
                &["--trace-sample-ratio", "1.5"][..],
                "--trace-sample-ratio 1.5",
            ),
            (
                &["--otlp-endpoint", "127.0.0.1:4317"][..],
                "--otlp-endpoint 127.0.0.1:4317",
            ),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
