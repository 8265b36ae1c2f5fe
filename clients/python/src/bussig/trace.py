"""W3C trace context (``traceparent``, ``tracestate``) in message headers, with the ``otel`` extra.

A send, publish or reply carries the current OpenTelemetry span's context; a worker runs each handler
in a span of its own (``<queue> process``, kind consumer, OpenTelemetry's messaging attributes) whose
parent is the sender's span. Without opentelemetry installed both are no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional

try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: Optional[TraceContextTextMapPropagator] = TraceContextTextMapPropagator()
except ImportError:  # the otel extra is not installed
    _PROPAGATOR = None


def inject(headers: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """``headers`` with the current span's context added, when there is a span."""
    if _PROPAGATOR is None or not _otel_trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return {**(headers or {}), **carrier}


@contextlib.contextmanager
def processing(queue: str, message_id: int, delivery_count: int, headers: Mapping[str, Any]) -> Iterator[None]:
    """The consumer span of one message's handler, as the current span while it runs."""
    if _PROPAGATOR is None:
        yield
        return
    carrier = {key: value for key, value in headers.items() if isinstance(value, str)}
    parent = _PROPAGATOR.extract(carrier)
    tracer = _otel_trace.get_tracer("bussig")
    with tracer.start_as_current_span(
        f"{queue} process",
        context=parent,
        kind=_otel_trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "bussig",
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
            "messaging.message.id": str(message_id),
            "messaging.message.delivery_count": delivery_count,
        },
    ):
        yield
