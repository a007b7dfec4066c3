"""Every strategy charges all-or-nothing through every adapter, in memory and in Redis.

40 requests race on ``"1000/day;5/second"``: threads through each adapter's
sync path (Flask, Django's WSGI handler, Starlette with an event loop per
thread), asyncio tasks on one event loop through Starlette and Django's ASGI
handler. However slowly they start, the day limit must hold exactly one charge
per admitted request, and each admitted request reads back its own.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
import servers
from django.test import AsyncClient, override_settings
from limit_state import charged, switching_often
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from m2m_middleware import Engine, Settings, open_key_store
from m2m_middleware.django.middleware import current_engine
from m2m_middleware.starlette import M2MMiddleware

STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter"]
LIMITS = "1000/day;5/second"
RACERS = 40
MakeApp = Callable[[Mapping[str, Any]], Any]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return "memory://"


@pytest.fixture
def busy_switching() -> Iterator[None]:
    with switching_often():
        yield


def race_config(storage: str, strategy: str) -> tuple[dict[str, Any], dict[str, str], str]:
    store = open_key_store("memory://")
    client_id = servers.unique("client")
    values = {
        "key_store": store,
        "rate_limit_storage": storage,
        "rate_limit_strategy": strategy,
        "default_limits": LIMITS,
        "invalidation_url": "",
    }
    return values, {"X-API-Key": store.create_key(client_id).key}, client_id


def assert_all_or_nothing(
    engine: Engine, client_id: str, replies: list[tuple[int, Mapping[str, str]]]
) -> None:
    """``replies``: (status, headers) of each racer."""
    assert len(replies) == RACERS
    replies = [(status, {k.lower(): v for k, v in headers.items()}) for status, headers in replies]
    admitted = [headers for status, headers in replies if status == 200]
    refused = [headers for status, headers in replies if status != 200]
    assert {status for status, _ in replies} <= {200, 429}
    for headers in refused:
        assert 1 <= int(headers["retry-after"]) <= 86400
        assert re.fullmatch(r'"default-\d+s";r=0;t=\d+', headers["ratelimit"])
    day, second = engine.limiter.plan(None, ()).limits
    assert len(admitted) >= 5  # more only if the racers took over a second to start
    # No refused racer was charged. Within one window that means at most 5; a
    # race that crosses a window boundary (a loaded machine) admits more, and a
    # sliding window then rightly holds more than 5 across its two windows.
    assert charged(engine.limiter, second, client_id) <= len(admitted)
    assert charged(engine.limiter, day, client_id) == len(admitted)
    lefts = []
    for headers in admitted:
        assert headers["ratelimit-policy"] == (
            '"default-86400s";q=1000;w=86400, "default-1s";q=5;w=1'
        )
        found = re.fullmatch(
            r'"default-86400s";r=(\d+);t=\d+, "default-1s";r=\d;t=\d', headers["ratelimit"]
        )
        assert found, headers["ratelimit"]
        lefts.append(int(found.group(1)))
    # Each admitted request saw its own charge: 999, 998, ... once each.
    assert sorted(lefts) == list(range(1000 - len(admitted), 1000))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_racing_threads_are_charged_all_or_nothing(
    make_app: MakeApp, storage: str, strategy: str, busy_switching: None
) -> None:
    for _ in range(3):  # interleavings differ from one race to the next
        values, key, client_id = race_config(storage, strategy)
        app = make_app(values)
        # Made before the race: Starlette builds its middleware stack on first call,
        # and racing first calls would each build one, with counters of its own.
        engine = app.engine()
        replies = app.concurrently("/ping", [key] * RACERS)
        assert_all_or_nothing(
            engine, client_id, [(r.status, dict(r.headers.items)) for r in replies]
        )


async def _ping(request: Request) -> Response:
    return PlainTextResponse("pong")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_racing_tasks_through_starlette_are_charged_all_or_nothing(
    storage: str, strategy: str
) -> None:
    values, key, client_id = race_config(storage, strategy)
    app = Starlette(routes=[Route("/ping", _ping)])
    middleware = M2MMiddleware(app, settings=Settings(**values))

    async def race() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return list(
                await asyncio.gather(*(client.get("/ping", headers=key) for _ in range(RACERS)))
            )

    replies = asyncio.run(race())
    assert_all_or_nothing(
        middleware.engine, client_id, [(r.status_code, r.headers) for r in replies]
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_racing_tasks_through_async_django_are_charged_all_or_nothing(
    storage: str, strategy: str
) -> None:
    values, key, client_id = race_config(storage, strategy)

    async def race() -> list[Any]:
        client = AsyncClient()
        return list(
            await asyncio.gather(*(client.get("/ping", headers=key) for _ in range(RACERS)))
        )

    with override_settings(M2M_AUTH=values, ROOT_URLCONF="m2m_conformance_urls"):
        replies = asyncio.run(race())
        engine = current_engine()
    assert_all_or_nothing(
        engine, client_id, [(r.status_code, dict(r.headers.items())) for r in replies]
    )
