"""A Redis outage, through each adapter: the policy decides, nothing answers 500, and the
app recovers by itself when Redis is back."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import servers

from m2m_middleware import open_key_store

pytestmark = pytest.mark.redis

MakeApp = Callable[[Mapping[str, Any]], Any]


def redis_app(make_app: MakeApp, url: str, **overrides: Any) -> tuple[Any, dict[str, str]]:
    store = open_key_store("memory://")
    key = store.create_key(servers.unique("client")).key
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": url,
        "default_limits": "3/minute",
        "public_paths": ["/health"],
        "invalidation_url": "",
    }
    values.update(overrides)
    return make_app(values), {"X-API-Key": key}


@pytest.mark.parametrize("sync", ["exact", "batched"])
def test_limits_in_redis_answer_429_with_the_headers(
    make_app: MakeApp, redis_url: str, sync: str
) -> None:
    # Batched with one instance: exactly the limit, and the same headers.
    app, key = redis_app(make_app, redis_url, rate_limit_sync=sync, rate_limit_lease=2)
    replies = [app.get("/ping", key) for _ in range(4)]
    assert [r.status for r in replies] == [200, 200, 200, 429]
    # Redis counts real seconds: a window opened a moment ago may say 59.
    assert re.fullmatch(r'"default-60s";r=0;t=(59|60)', replies[2].headers["RateLimit"])
    refused = replies[3]
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_deny_policy_answers_503_during_an_outage_then_recovers(
    make_app: MakeApp, redis_server: servers.RedisServer
) -> None:
    app, key = redis_app(make_app, redis_server.url, default_limits="100/minute")
    assert app.get("/ping", key).status == 200
    redis_server.stop()
    for _ in range(3):
        reply = app.get("/ping", key)
        assert reply.status == 503
        assert reply.headers["Content-Type"] == "application/problem+json"
        assert reply.json()["error"] == "temporarily_unavailable"
        assert reply.headers["Retry-After"] == "5"
    assert app.get("/health").status == 200  # public paths need no storage
    redis_server.start()
    assert app.get("/ping", key).status == 200


def test_allow_policy_admits_during_an_outage_then_counts_again(
    make_app: MakeApp, redis_server: servers.RedisServer
) -> None:
    app, key = redis_app(make_app, redis_server.url, on_storage_error="allow")
    assert app.get("/ping", key).status == 200
    redis_server.stop()
    replies = [app.get("/ping", key) for _ in range(5)]  # more than the limit
    assert [r.status for r in replies] == [200] * 5
    assert all("RateLimit" not in r.headers for r in replies)
    redis_server.start()  # an empty Redis: the budget starts again
    assert [app.get("/ping", key).status for _ in range(4)] == [200, 200, 200, 429]
