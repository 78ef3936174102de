//! The tracing subscriber: `RUST_LOG` filters (default `info`), output pretty or JSON; and,
//! with an endpoint (`[telemetry] otlp_endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, read before the subscriber is installed), the same spans
//! exported as OpenTelemetry traces over
//! OTLP/HTTP (protobuf). Without an endpoint the OpenTelemetry layer is absent: nothing is
//! exported and the spans cost what they cost for the logs.
//!
//! The spans exported (their `otel.name`): `receive` per webhook request (a sender's
//! `traceparent` is its parent), `run` per handler attempt (linked to its delivery's
//! `receive` through the trace context stored with the delivery, so on any replica and after
//! a restart), `call` per downstream step and `publish` per sink message. [`traceparent`]
//! gives the W3C header of a span for outbound requests and broker messages.

use std::sync::OnceLock;

/// The OpenTelemetry layer, boxed (present only with an endpoint).
type OtelLayer = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::TracerProvider as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The provider, flushed at shutdown.
static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber (once; later calls are ignored), exporting traces over
/// OTLP when `otlp` is given. Returns why traces are not exported when they cannot be (the
/// logs work either way).
pub fn init(format: LogFormat, otlp: Option<&OtlpSettings>) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (otel, problem) = match otlp.map(otel_layer) {
        Some(Ok(layer)) => (Some(layer), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    // Colour codes only for a person at a terminal: in a file or a log pipeline they are
    // noise, and an escape sequence in a log line is what a log-injection attack writes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Pretty => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .try_init();
    problem.map_or(Ok(()), Err)
}

/// Where and how traces are exported.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// The collector's OTLP/HTTP base URL (`http://127.0.0.1:4318`); `/v1/traces` is added.
    pub endpoint: String,
    /// The share of traces kept (a sender's sampled flag is followed).
    pub sample_ratio: f64,
    /// `service.name`.
    pub service_name: String,
}

/// Sends the exporter's requests with the service's own HTTP client, on the runtime that
/// enabled the export (the batch processor works on a thread of its own).
#[derive(Debug)]
struct ExportClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let http = self.http.clone();
        let (parts, body) = request.into_parts();
        let send = async move {
            let mut out = http.request(parts.method, parts.uri.to_string()).body(body);
            for (name, value) in &parts.headers {
                out = out.header(name, value);
            }
            let response = out.send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            let mut answer = http::Response::new(body);
            *answer.status_mut() = status;
            Ok::<_, reqwest::Error>(answer)
        };
        Ok(self.runtime.spawn(send).await??)
    }
}

/// The layer exporting the service's own spans (`webhook_inbox` targets, info and up)
/// to `settings.endpoint` (built within a tokio runtime).
fn otel_layer(settings: &OtlpSettings) -> Result<OtelLayer, String> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    let endpoint = format!("{}/v1/traces", settings.endpoint.trim_end_matches('/'));
    let client = ExportClient {
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?,
        runtime: tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
        opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(settings.sample_ratio),
    ));
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("webhook-inbox");
    let _ = PROVIDER.set(provider);
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target("webhook_inbox", tracing::Level::INFO);
    Ok(Box::new(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(ours),
    ))
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Exports what is buffered and stops the exporter (at the end of `serve`).
pub fn shutdown_otlp() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
        let _ = provider.shutdown();
    }
}

/// The W3C `traceparent` of `span`, when traces are exported and it is sampled.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The span context a `traceparent` header names (none: malformed).
fn parse_traceparent(value: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::propagation::TextMapPropagator as _;
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_owned(), value.to_owned());
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Makes a sender's `traceparent` the parent of `span` (a malformed one is ignored).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if !exporting() {
        return; // nothing to parent: not even the header is parsed on the request path
    }
    if let Some(sc) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// Links `span` to the span a stored `traceparent` names (a run to its delivery's
/// `receive`).
pub fn link_to(span: &tracing::Span, traceparent: Option<&str>) {
    if !exporting() {
        return;
    }
    if let Some(sc) = traceparent.and_then(parse_traceparent) {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_traceparent_is_parsed_or_ignored() {
        let sc =
            super::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(super::parse_traceparent("garbage").is_none());
        assert!(
            super::parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01")
                .is_none()
        );
    }
}
