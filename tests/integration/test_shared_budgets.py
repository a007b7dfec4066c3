"""One client, one budget in Redis, however many apps and processes serve it.

"Two Flask apps, a Starlette app and a Django app in one process, and
separately 2+ worker processes under a real server (gunicorn for WSGI,
uvicorn for ASGI), share one budget: exactly the limit is admitted."

Each app (and each worker) has an engine of its own; only the Redis counters
are shared. Every test uses a client id of its own on the machine's Redis,
which other test workers share: nothing here flushes it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flask
import httpx
import pytest
import servers
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient as DjangoAsyncClient
from django.test import Client as DjangoClient
from django.test import override_settings
from django.urls import path as django_path
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from m2m_middleware import KeyStore, Settings, open_key_store
from m2m_middleware.django.middleware import current_engine as django_current_engine
from m2m_middleware.flask import M2MAuth
from m2m_middleware.starlette import M2MMiddleware

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

pytestmark = pytest.mark.redis

REMAINING = re.compile(r'^"default-60s";r=(\d+);t=(\d+)$')


@dataclass
class Reply:
    app: str
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def remaining(self) -> int:
        found = REMAINING.match(self.headers["ratelimit"])
        assert found, self.headers["ratelimit"]
        return int(found[1])


Send = Callable[[Mapping[str, str]], Reply]


def _reply(app: str, status: int, headers: Any, body: bytes) -> Reply:
    return Reply(app, status, {name.lower(): value for name, value in headers.items()}, body)


def _config(store: KeyStore, redis_url: str, limits: str) -> dict[str, Any]:
    return {
        "key_store": store,
        "rate_limit_storage": redis_url,
        "default_limits": limits,
        "public_paths": ["/health"],
        # No revocation bus (and its listening thread): nothing here revokes.
        "invalidation_url": "",
    }


@pytest.fixture
def store() -> Iterator[KeyStore]:
    with closing(open_key_store("memory://")) as opened:
        yield opened


# -- the apps, each with an engine of its own ----------------------------------------


def flask_app(name: str, config: Mapping[str, Any]) -> Send:
    app = flask.Flask(name)
    app.config["M2M_AUTH"] = dict(config)
    M2MAuth(app)

    @app.get("/ping")
    def ping() -> Any:
        return {"app": name, "client_id": flask.g.m2m_client.client_id}

    def send(headers: Mapping[str, str]) -> Reply:
        response = app.test_client().get("/ping", headers=dict(headers))
        return _reply(name, response.status_code, response.headers, response.get_data())

    return send


def starlette_app(name: str, config: Mapping[str, Any]) -> Send:
    async def ping(request: Request) -> Response:
        return JSONResponse({"app": name, "client_id": request.user.client_id})

    app = Starlette(routes=[Route("/ping", ping)])
    app.add_middleware(M2MMiddleware, settings=Settings(**config))
    # Built now, not by whichever of several racing first requests gets there first.
    app.middleware_stack = app.build_middleware_stack()

    def send(headers: Mapping[str, str]) -> Reply:
        # A loop per request (per thread under concurrency): the async Redis path.
        async def one() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await c.get("/ping", headers=dict(headers))

        response = asyncio.run(one())
        return _reply(name, response.status_code, response.headers, response.content)

    return send


def _dj_ping(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"app": "django", "client_id": request.m2m_client.client_id})  # type: ignore[attr-defined]


async def _dj_aping(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"app": "django-async", "client_id": request.m2m_client.client_id})  # type: ignore[attr-defined]


DJANGO_URLCONF = "m2m_shared_budget_urls"
_urls = types.ModuleType(DJANGO_URLCONF)
_urls.urlpatterns = [  # type: ignore[attr-defined]
    django_path("ping", _dj_ping),
    django_path("aping", _dj_aping),
]
sys.modules[DJANGO_URLCONF] = _urls


@contextmanager
def django_settings(config: Mapping[str, Any]) -> Iterator[None]:
    """Django's settings are process-wide: switched once, around every request of a test."""
    with override_settings(M2M_AUTH=dict(config), ROOT_URLCONF=DJANGO_URLCONF):
        django_current_engine()  # the engine, built before any racing request
        yield


def django_sync(headers: Mapping[str, str]) -> Reply:
    """Django's WSGI handler: the middleware's sync path."""
    response = DjangoClient(raise_request_exception=False).get("/ping", headers=headers)
    return _reply("django", response.status_code, response.headers, response.content)


def django_async(headers: Mapping[str, str]) -> Reply:
    """Django's ASGI handler with an async view: the middleware's async path."""

    async def one() -> Any:
        return await DjangoAsyncClient(raise_request_exception=False).get("/aping", headers=headers)

    response = asyncio.run(one())
    return _reply("django-async", response.status_code, response.headers, response.content)


# -- sending and checking ----------------------------------------------------------


def round_robin(apps: Sequence[Send], headers: Mapping[str, str], n: int) -> list[Reply]:
    return [apps[i % len(apps)](headers) for i in range(n)]


def all_at_once(apps: Sequence[Send], headers: Mapping[str, str], n: int) -> list[Reply]:
    """``n`` requests spread over ``apps``, one thread each, all released together."""
    start = threading.Barrier(n)

    def one(i: int) -> Reply:
        start.wait(timeout=10)
        return apps[i % len(apps)](headers)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def assert_refused(reply: Reply) -> None:
    assert reply.status == 429, reply
    assert reply.headers["content-type"] == "application/problem+json"
    body = reply.json()
    assert body["error"] == "rate_limited"
    assert body["status"] == 429
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert reply.remaining() == 0


def assert_exactly_the_budget(replies: Sequence[Reply], limit: int, client_id: str) -> None:
    admitted = [r for r in replies if r.status == 200]
    assert len(admitted) == limit, [(r.app, r.status) for r in replies]
    for reply in replies:
        if reply.status != 200:
            assert_refused(reply)
    assert all(r.json()["client_id"] == client_id for r in admitted)
    # Every unit of the budget went to exactly one request, whichever app served it.
    assert sorted(r.remaining() for r in admitted) == list(range(limit))


# -- one process, four apps --------------------------------------------------------


@pytest.fixture
def four_apps(store: KeyStore, redis_url: str) -> Iterator[tuple[list[Send], dict[str, str], str]]:
    """Two Flask apps, a Starlette app and a Django app on one key store and one Redis:
    10/minute for a fresh client."""
    client_id = servers.unique("client")
    key = store.create_key(client_id).key
    config = _config(store, redis_url, "10/minute")
    apps = [
        flask_app("flask-a", config),
        starlette_app("starlette", config),
        flask_app("flask-b", config),
        django_sync,
    ]
    with django_settings(config):
        yield apps, {"X-API-Key": key}, client_id


def test_four_apps_in_one_process_share_one_budget(
    four_apps: tuple[list[Send], dict[str, str], str],
) -> None:
    apps, key, client_id = four_apps
    replies = round_robin(apps, key, 40)

    assert [r.status for r in replies] == [200] * 10 + [429] * 30
    assert_exactly_the_budget(replies, 10, client_id)
    # Each app sees what the others spent: one count, going down across apps.
    admitted = replies[:10]
    assert [r.app for r in admitted[:4]] == ["flask-a", "starlette", "flask-b", "django"]
    assert [r.json()["app"] for r in admitted[:4]] == [r.app for r in admitted[:4]]
    assert [r.remaining() for r in admitted] == list(range(9, -1, -1))
    assert {r.app for r in replies[10:]} == {"flask-a", "starlette", "flask-b", "django"}


def test_four_apps_in_one_process_share_one_budget_under_concurrency(
    four_apps: tuple[list[Send], dict[str, str], str],
) -> None:
    apps, key, client_id = four_apps
    replies = all_at_once(apps, key, 40)
    assert_exactly_the_budget(replies, 10, client_id)
    # Every app refused, once the budget was gone: none has a count of its own.
    assert {r.app for r in replies if r.status == 429} == {
        "flask-a",
        "starlette",
        "flask-b",
        "django",
    }


# -- Django: the sync and the async path ------------------------------------------


@pytest.fixture
def django_both(store: KeyStore, redis_url: str) -> Iterator[tuple[dict[str, str], str]]:
    client_id = servers.unique("client")
    key = store.create_key(client_id).key
    with django_settings(_config(store, redis_url, "6/minute")):
        yield {"X-API-Key": key}, client_id


def test_django_sync_and_async_paths_share_one_budget(
    django_both: tuple[dict[str, str], str],
) -> None:
    key, client_id = django_both
    replies = round_robin([django_sync, django_async], key, 10)

    assert [r.status for r in replies] == [200] * 6 + [429] * 4
    assert_exactly_the_budget(replies, 6, client_id)
    assert [r.json()["app"] for r in replies[:6]] == ["django", "django-async"] * 3
    assert [r.remaining() for r in replies[:6]] == [5, 4, 3, 2, 1, 0]
    assert [r.app for r in replies[6:]] == ["django", "django-async"] * 2


def test_django_sync_and_async_paths_share_one_budget_under_concurrency(
    django_both: tuple[dict[str, str], str],
) -> None:
    key, client_id = django_both
    replies = all_at_once([django_sync, django_async], key, 20)
    assert_exactly_the_budget(replies, 6, client_id)


# -- real servers, two worker processes --------------------------------------------

SERVER_LIMIT = 25
BURST = 80

COMMANDS: dict[str, Callable[[int], list[str]]] = {
    "gunicorn": lambda port: [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        "2",
        "--worker-class",
        "sync",
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "2",
        "budget_flask_app:app",
    ],
    "uvicorn": lambda port: [
        sys.executable,
        "-m",
        "uvicorn",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "2",
        "budget_starlette_app:app",
    ],
}


def burst(server: Server, path: str, headers: Mapping[str, str], n: int) -> list[httpx.Response]:
    """``n`` requests at once, each on a connection of its own (so the kernel hands
    them to whichever worker accepts first, not to the one a kept-alive connection
    is stuck to)."""
    start = threading.Barrier(n)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    with httpx.Client(base_url=server.url, timeout=10.0, limits=limits) as http:

        def one(_: int) -> httpx.Response:
            start.wait(timeout=10)
            return http.get(path, headers=dict(headers))

        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(one, range(n)))


def workers_answering(server: Server, count: int) -> set[int]:
    """The pids behind ``/health``, once ``count`` workers answer (or 10 s have passed):
    the first answer only proves that one worker is up."""
    pids: set[int] = set()
    deadline = time.monotonic() + 10
    while len(pids) < count and time.monotonic() < deadline:
        pids |= {int(r.json()["pid"]) for r in burst(server, "/health", {}, 8)}
    return pids


def assert_server_budget(
    replies: Sequence[httpx.Response], client_id: str, server: Server
) -> set[int]:
    """Exactly the budget admitted, across the workers; the pids that admitted."""
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == SERVER_LIMIT, (statuses, server.output())
    assert statuses.count(429) == len(replies) - SERVER_LIMIT, (statuses, server.output())
    admitted = [r for r in replies if r.status_code == 200]
    for response in replies:
        if response.status_code == 429:
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["error"] == "rate_limited"
            assert 1 <= int(response.headers["retry-after"]) <= 60
    assert all(r.json()["client_id"] == client_id for r in admitted)
    remaining = []
    for response in admitted:
        found = REMAINING.match(response.headers["ratelimit"])
        assert found, response.headers["ratelimit"]
        remaining.append(int(found[1]))
    assert sorted(remaining) == list(range(SERVER_LIMIT))
    pids = {int(r.json()["pid"]) for r in admitted}
    assert server.process.pid not in pids  # the workers answer, not the master
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_workers_of_a_real_server_share_one_budget(
    name: str,
    redis_url: str,
    tmp_path: Path,
    serve: Callable[[str, Callable[[int], list[str]], Mapping[str, str]], Server],
) -> None:
    store_url = "sqlite:///" + str(tmp_path / "keys.db")  # sqlite:////abs/path/keys.db
    clients = [servers.unique("client") for _ in range(2)]
    with closing(open_key_store(store_url)) as keys:
        issued = [keys.create_key(client_id).key for client_id in clients]
    server = serve(
        name,
        COMMANDS[name],
        {
            "M2M_TEST_KEY_STORE": store_url,
            "M2M_TEST_RATE_LIMIT_STORAGE": redis_url,
            "M2M_TEST_DEFAULT_LIMITS": f"{SERVER_LIMIT}/minute",
        },
    )

    workers = workers_answering(server, 2)
    assert len(workers) >= 2, (workers, server.output())
    assert server.process.pid not in workers  # the workers answer, not the master

    for client_id, key in zip(clients, issued, strict=True):
        pids = assert_server_budget(
            burst(server, "/ping", {"X-API-Key": key}, BURST), client_id, server
        )
        assert pids <= workers, (pids, workers)
        if len(pids) >= 2:
            break  # admitted by both workers, from one count in Redis
    # Else the kernel gave every admitted request of both bursts to one worker (rare
    # for gunicorn's sync workers; uvicorn's may accept a whole burst in one loop):
    # the budget held anyway, and both workers were shown to serve above.
