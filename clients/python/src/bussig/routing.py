"""Routers: handlers chosen by the message's subject, with NATS patterns (``*`` one token, ``>`` as the
last token one or more), grouped under prefixes as FastAPI groups paths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

Handler = Callable[..., Any]
"""``handler(message)``: a function for ``Worker.start``, a coroutine function for ``Worker.run``."""
Decoder = Callable[[Any], Any]
"""Turns a JSON payload into what the handler wants (``Model.model_validate``, ...); an exception
means the payload is undecodable and the message is dead-lettered."""

H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class Route:
    pattern: str
    handler: Handler
    transactional: bool = False
    decode: Optional[Decoder] = None

    def matches(self, subject: Optional[str]) -> bool:
        return subject is not None and pattern_matches(self.pattern, subject)


def pattern_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS pattern matches a subject."""
    wanted = pattern.split(".")
    tokens = subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return index == len(wanted) - 1 and len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def _joined(prefix: str, pattern: str) -> str:
    prefix = prefix.strip(".")
    return f"{prefix}.{pattern}" if prefix else pattern


class Router:
    """Handlers by subject pattern. ``Router(prefix="orders")`` with ``@router.on("*.paid")`` handles
    ``orders.eu.paid``. The first route whose pattern matches a message's subject handles it."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._routes: list[Route] = []

    def on(self, pattern: str, transactional: bool = False, decode: Optional[Decoder] = None) -> Callable[[H], H]:
        """Registers the decorated function for messages whose subject matches ``pattern`` (under the
        router's prefix). A transactional handler gets ``message.conn``, whose transaction also acks
        the message: its writes and the ack commit together, or roll back together."""

        def register(handler: H) -> H:
            self.add(pattern, handler, transactional=transactional, decode=decode)
            return handler

        return register

    def add(self, pattern: str, handler: Handler, transactional: bool = False, decode: Optional[Decoder] = None) -> None:
        self._routes.append(Route(_joined(self.prefix, pattern), handler, transactional, decode))

    def include_router(self, other: Router, prefix: str = "") -> None:
        """Adds ``other``'s routes, under ``prefix`` and then this router's prefix."""
        for route in other.routes:
            pattern = _joined(self.prefix, _joined(prefix, route.pattern))
            self._routes.append(Route(pattern, route.handler, route.transactional, route.decode))

    @property
    def routes(self) -> list[Route]:
        return list(self._routes)

    @property
    def patterns(self) -> list[str]:
        """The patterns, each once, in the order they were added: what a worker subscribes its queue to."""
        return list(dict.fromkeys(route.pattern for route in self._routes))

    def route(self, subject: Optional[str]) -> Optional[Route]:
        return next((route for route in self._routes if route.matches(subject)), None)
