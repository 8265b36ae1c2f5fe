"""W3C trace context (``traceparent``, ``tracestate``) in message headers, with the ``otel`` extra.

A send, publish, reply or append carries the current OpenTelemetry span's context; a worker or stream
consumer runs each handler in a span of its own (``<queue> process``, kind consumer, OpenTelemetry's
messaging attributes) whose parent is the sender's span. Without opentelemetry installed both are
no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

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
def processing(
    queue: str, message_id: Union[int, str], delivery_count: Optional[int], headers: Mapping[str, Any]
) -> Iterator[None]:
    """The consumer span of one message's handler, as the current span while it runs. A stream record
    has ``<partition>:<seq>`` as its id and no delivery count."""
    if _PROPAGATOR is None:
        yield
        return
    carrier = {key: value for key, value in headers.items() if isinstance(value, str)}
    parent = _PROPAGATOR.extract(carrier)
    attributes: dict[str, Union[str, int]] = {
        "messaging.system": "bussig",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": str(message_id),
    }
    if delivery_count is not None:
        attributes["messaging.message.delivery_count"] = delivery_count
    tracer = _otel_trace.get_tracer("bussig")
    with tracer.start_as_current_span(
        f"{queue} process", context=parent, kind=_otel_trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield
