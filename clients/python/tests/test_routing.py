from __future__ import annotations

from typing import Any

import pytest

import bussig


@pytest.mark.parametrize(
    "pattern, subject, matches",
    [
        ("orders.*.paid", "orders.eu.paid", True),
        ("orders.*.paid", "orders.eu.x.paid", False),
        ("orders.>", "orders.eu", True),
        ("orders.>", "orders.eu.paid", True),
        ("orders.>", "orders", False),
        (">", "anything.at.all", True),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.*", "a", False),
    ],
)
def test_nats_patterns(pattern: str, subject: str, matches: bool) -> None:
    assert bussig.pattern_matches(pattern, subject) is matches


def test_prefixes_and_included_routers() -> None:
    def handler(message: Any) -> None: ...

    payments = bussig.Router(prefix="payments")
    payments.on("*.settled")(handler)
    orders = bussig.Router()
    orders.on("created", transactional=True)(handler)
    app = bussig.Router(prefix="shop")
    app.include_router(orders, prefix="orders")
    app.include_router(payments)
    assert app.patterns == ["shop.orders.created", "shop.payments.*.settled"]
    route = app.route("shop.orders.created")
    assert route is not None and route.transactional
    assert app.route("shop.payments.eu.settled") is not None
    assert app.route("orders.created") is None
    assert app.route(None) is None


def test_first_matching_route_wins() -> None:
    router = bussig.Router()
    router.add("a.b", lambda m: "exact")
    router.add("a.*", lambda m: "wild")
    first = router.route("a.b")
    second = router.route("a.c")
    assert first is not None and first.handler(None) == "exact"
    assert second is not None and second.handler(None) == "wild"
