//! Trace context through a queue (the `otel` feature): the consumer's span for a message is the child
//! of the span it was sent in, checked with an in-memory exporter.
#![cfg(feature = "otel")]
use std::time::Duration;

use bussig_client::*;
use opentelemetry::context::FutureExt;
use opentelemetry::trace::{Span, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{global, Context};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

mod common;
use common::*;

#[tokio::test]
async fn a_handlers_span_is_the_child_of_the_senders() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    global::set_tracer_provider(provider.clone());

    let c = client().await;
    let q = TestQueue::create(&c, "traced", "").await;
    let sender = global::tracer("test").start("place order");
    let sent_in = sender.span_context().clone();
    let context = Context::current_with_span(sender);
    send(&c, &q.name, &Job { n: 1 }, &SendOptions::new())
        .with_context(context.clone())
        .await
        .unwrap();
    drop(context);
    let untraced = read(&c, &q.name, 1, Some(Duration::from_secs(1)), None)
        .await
        .unwrap();
    assert!(
        untraced[0].header("traceparent").is_some(),
        "the send carried the context"
    );
    nack(
        &c,
        &q.name,
        untraced[0].id,
        untraced[0].lock_token,
        Some(Duration::ZERO),
        None,
    )
    .await
    .unwrap();

    let shutdown = CancellationToken::new();
    let consumer =
        Consumer::new(connect_no_tls(url()), q.name.clone()).wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let running = tokio::spawn(consumer.run(|_: Message<Job>| async { Ok(()) }, shutdown.clone()));
    eventually("handled", async || {
        stats.handled.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let process = spans
        .iter()
        .find(|span| span.name == format!("{} process", q.name))
        .expect("a span for handling the message");
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(
        process.span_context.trace_id(),
        sent_in.trace_id(),
        "same trace"
    );
    assert_eq!(
        process.parent_span_id,
        sent_in.span_id(),
        "child of the sender's span"
    );
    assert!(process.parent_span_is_remote);
    assert!(process
        .attributes
        .iter()
        .any(|kv| kv.key.as_str() == "messaging.system" && kv.value.as_str() == "bussig"));
}
