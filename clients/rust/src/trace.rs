//! W3C trace context in message headers (`traceparent`, `tracestate`), with the `otel` feature: a
//! send or publish carries the current OpenTelemetry span's context, and a consumer runs each handler
//! in a span of its own (`<queue> process`, kind consumer, OpenTelemetry's messaging attributes) whose
//! parent is the sender's span. Without the feature these are no-ops.
use serde_json::{Map, Value};

/// `headers` with the current span's context added (when there is one, and the feature is on).
pub(crate) fn with_current_context(
    headers: Option<Map<String, Value>>,
) -> Option<Map<String, Value>> {
    #[cfg(feature = "otel")]
    {
        otel::inject(headers)
    }
    #[cfg(not(feature = "otel"))]
    {
        headers
    }
}

#[cfg(feature = "otel")]
pub(crate) use otel::process_context;

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    };
    use opentelemetry::{global, Context, KeyValue};
    use serde_json::{Map, Value};

    use crate::delivery::Message;

    const TRACEPARENT: &str = "traceparent";
    const TRACESTATE: &str = "tracestate";

    pub fn inject(headers: Option<Map<String, Value>>) -> Option<Map<String, Value>> {
        let current = Context::current();
        let span = current.span();
        let context = span.span_context();
        if !context.is_valid() {
            return headers;
        }
        let mut headers = headers.unwrap_or_default();
        let parent = format!(
            "00-{:032x}-{:016x}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags()
        );
        headers.insert(TRACEPARENT.into(), parent.into());
        let state = context.trace_state().header();
        if !state.is_empty() {
            headers.insert(TRACESTATE.into(), state.into());
        }
        Some(headers)
    }

    /// The sender's span context, from a `traceparent` header of version 00.
    fn extract<T>(message: &Message<T>) -> Option<SpanContext> {
        let mut parts = message.header(TRACEPARENT)?.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let state = message
            .header(TRACESTATE)
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            TraceId::from_hex(trace).ok()?,
            SpanId::from_hex(span).ok()?,
            TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
            true,
            state,
        );
        context.is_valid().then_some(context)
    }

    /// A context with a consumer span for handling `message`, the child of its sender's span; the
    /// span ends when the context (carried by the handler's future) is dropped.
    pub fn process_context<T>(message: &Message<T>) -> Context {
        let parent = match extract(message) {
            Some(sender) => Context::new().with_remote_span_context(sender),
            None => Context::new(),
        };
        let tracer = global::tracer("bussig-client");
        let span = tracer
            .span_builder(format!("{} process", message.queue))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "bussig"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", message.queue.to_string()),
                KeyValue::new("messaging.message.id", message.id.to_string()),
                KeyValue::new(
                    "messaging.message.delivery_count",
                    i64::from(message.delivery_count),
                ),
            ])
            .start_with_context(&tracer, &parent);
        parent.with_span(span)
    }
}
