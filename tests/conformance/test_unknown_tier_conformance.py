"""A client whose tier is not configured: default limits, and one WARNING saying so.

Run against Starlette, Flask and Django (``make_app``, see conftest.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from m2m_middleware import KeyStore, open_key_store

Maker = Callable[[Mapping[str, Any]], Any]


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def tier_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "m2m_middleware" and r.levelno == logging.WARNING and "tier" in r.getMessage()
    ]


def test_an_unknown_tier_is_warned_about_once_and_gets_the_default_limits(
    make_app: Maker, store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    gold = store.create_key("acme", tier="gold").key  # "gold" is not in tiers
    other = store.create_key("acme-2", tier="gold").key
    silver = store.create_key("globex", tier="silver").key
    app = make_app(
        {
            "key_store": store,
            "rate_limit_storage": "memory://",
            "default_limits": "3/minute",
            "tiers": {"silver": "100/minute", "bronze": "50/minute"},
            "routes": [{"path": "/orders", "scopes": ["orders:read"]}],
            "key_cache_ttl": 30,
        }
    )
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    statuses = [app.get("/ping", {"X-API-Key": gold}).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # default_limits, as before
    assert app.get("/ping", {"X-API-Key": other}).status == 200  # another key, same tier
    assert app.get("/orders", {"X-API-Key": other}).status == 403  # a route rule's plan too
    for _ in range(3):
        assert app.get("/ping", {"X-API-Key": silver}).status == 200  # configured: no warning
    [warning] = tier_warnings(caplog)
    assert warning == (
        "tier gold is not in tiers (configured: bronze, silver): its clients get default_limits"
    )
