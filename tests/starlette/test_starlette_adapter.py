"""The pure ASGI middleware: websockets, lifespan, Starlette's auth helpers, wiring.

Requests are driven with raw ASGI messages (no ``starlette.testclient``), so
what the middleware sends is seen exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, requires
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from m2m_middleware import Client, KeyStore, Settings, open_key_store
from m2m_middleware.starlette import WS_POLICY_VIOLATION, M2MMiddleware, get_client

Message = dict[str, Any]


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def settings(store: KeyStore, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "public_paths": ["/health", "/ws/public"],
        "routes": [{"path": "/ws/orders", "scopes": ["orders:read"]}],
    }
    values.update(overrides)
    return Settings(**values)


# -- raw ASGI drivers -------------------------------------------------------------


def _scope(kind: str, path: str, headers: dict[str, str] | None, method: str = "GET") -> Message:
    raw_path, _, query = path.partition("?")
    scope: Message = {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "http" if kind == "http" else "ws",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    if kind == "http":
        scope["method"] = method
    else:
        scope["subprotocols"] = []
    return scope


async def _drive(app: Any, scope: Message, inbound: list[Message]) -> list[Message]:
    """Run ``app`` with ``inbound`` as what the client sends; return what it sent back."""
    queue: asyncio.Queue[Message] = asyncio.Queue()
    for message in inbound:
        queue.put_nowait(message)
    sent: list[Message] = []

    async def receive() -> Message:
        return await queue.get()

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


def http(
    app: Any, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    sent = asyncio.run(
        _drive(
            app,
            _scope("http", path, headers, method),
            [{"type": "http.request", "body": b"", "more_body": False}],
        )
    )
    start = sent[0]
    assert start["type"] == "http.response.start"
    names = [name.decode("latin-1").lower() for name, _ in start["headers"]]
    assert len(names) == len(set(names)), names  # no header sent twice
    response_headers = {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in start["headers"]
    }
    body = b"".join(m.get("body", b"") for m in sent[1:] if m["type"] == "http.response.body")
    return start["status"], response_headers, body


def websocket(app: Any, path: str, headers: dict[str, str] | None = None) -> list[Message]:
    return asyncio.run(
        _drive(
            app,
            _scope("websocket", path, headers),
            [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}],
        )
    )


# -- the app ------------------------------------------------------------------------


class Calls:
    """Which endpoints actually ran."""

    def __init__(self) -> None:
        self.names: list[str] = []


def build_app(calls: Calls, **starlette_kwargs: Any) -> Starlette:
    async def whoami(request: Request) -> Response:
        calls.names.append("whoami")
        return JSONResponse(
            {
                "client_id": request.user.client_id,
                "display_name": request.user.display_name,
                "authenticated": request.user.is_authenticated,
                "scopes": sorted(request.auth.scopes),
                "same": get_client(request) is request.user,
            }
        )

    @requires("orders:read")
    async def orders(request: Request) -> Response:
        calls.names.append("orders")
        return JSONResponse({"orders": [], "client_id": request.user.client_id})

    async def health(request: Request) -> Response:
        calls.names.append("health")
        return JSONResponse(
            {
                "authenticated": request.user.is_authenticated,
                "scopes": list(request.auth.scopes),
                "client": get_client(request) is not None,
            }
        )

    async def ws(websocket: WebSocket) -> None:
        calls.names.append("ws")
        await websocket.accept()
        client = get_client(websocket)
        await websocket.send_json(
            {
                "authenticated": websocket.user.is_authenticated,
                "client_id": client.client_id if client else None,
                "same": client is websocket.user if client else None,
                "scopes": sorted(websocket.auth.scopes),
            }
        )
        await websocket.close()

    return Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/orders", orders),
            Route("/health", health),
            WebSocketRoute("/ws", ws),
            WebSocketRoute("/ws/orders", ws),
            WebSocketRoute("/ws/public", ws),
        ],
        **starlette_kwargs,
    )


@pytest.fixture
def calls() -> Calls:
    return Calls()


# -- websockets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "credential", "reason"),
    [
        ("/ws", None, "missing_credentials"),
        ("/ws", "m2m_garbage", "invalid_token"),
        ("/ws/orders", "key-without-scope", "insufficient_scope"),
    ],
)
def test_a_refused_websocket_is_closed_with_1008(
    store: KeyStore, calls: Calls, path: str, credential: str | None, reason: str
) -> None:
    if credential == "key-without-scope":
        credential = store.create_key("acme").key
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    headers = {"X-API-Key": credential} if credential else None
    sent = websocket(app, path, headers)
    assert WS_POLICY_VIOLATION == 1008
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": reason}]
    assert calls.names == []


def test_a_rate_limited_websocket_is_closed_with_1008(store: KeyStore, calls: Calls) -> None:
    key = store.create_key("acme").key
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store, default_limits="1/minute"))
    assert websocket(app, "/ws", {"X-API-Key": key})[0]["type"] == "websocket.accept"
    sent = websocket(app, "/ws", {"X-API-Key": key})
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "rate_limited"}]
    assert calls.names == ["ws"]


@pytest.mark.parametrize("path", ["/ws", "/ws/orders"])
def test_an_authenticated_websocket_is_accepted_with_its_client(
    store: KeyStore, calls: Calls, path: str
) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    sent = websocket(app, path, {"Authorization": f"Bearer {key}"})
    assert [m["type"] for m in sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    # No rate-limit headers are smuggled into the handshake answer.
    assert not any(name.lower().startswith(b"ratelimit") for name, _ in sent[0].get("headers", []))
    assert json.loads(sent[1]["text"]) == {
        "authenticated": True,
        "client_id": "acme",
        "same": True,
        "scopes": ["orders:read"],
    }


def test_a_public_websocket_needs_no_credentials(store: KeyStore, calls: Calls) -> None:
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    sent = websocket(app, "/ws/public")
    assert sent[0]["type"] == "websocket.accept"
    assert json.loads(sent[1]["text"]) == {
        "authenticated": False,
        "client_id": None,
        "same": None,
        "scopes": [],
    }


# -- lifespan and other scope types -----------------------------------------------------


def test_lifespan_passes_through_untouched(store: KeyStore, calls: Calls) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = build_app(calls, lifespan=lifespan)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    scope: Message = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    sent = asyncio.run(
        _drive(app, scope, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    )
    assert sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    assert events == ["startup", "shutdown"]


def test_unknown_scope_types_reach_the_app_as_they_are(store: KeyStore) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def inner(scope: Message, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    middleware = M2MMiddleware(inner, settings=settings(store))
    scope: Message = {"type": "lifespan", "asgi": {"version": "3.0"}}
    snapshot = dict(scope)

    async def receive() -> Message:
        raise AssertionError("the middleware must not read lifespan messages")

    async def send(message: Message) -> None:
        raise AssertionError("the middleware must not answer lifespan messages")

    asyncio.run(middleware(scope, receive, send))
    assert seen == [(scope, receive, send)]
    assert seen[0][0] is scope
    assert scope == snapshot


# -- Starlette's authentication helpers -------------------------------------------------


def test_requires_uses_the_clients_scopes(store: KeyStore, calls: Calls) -> None:
    reader = store.create_key("acme", scopes=["orders:read"]).key
    other = store.create_key("acme", scopes=["orders:write"]).key
    app = build_app(calls)
    # No route rule for /orders: only @requires guards it.
    app.add_middleware(M2MMiddleware, settings=settings(store, routes=[]))
    status, _, body = http(app, "/orders", {"X-API-Key": reader})
    assert status == 200
    assert json.loads(body) == {"orders": [], "client_id": "acme"}
    status, _, _ = http(app, "/orders", {"X-API-Key": other})
    assert status == 403
    assert calls.names == ["orders"]


def test_request_user_and_auth_are_the_client(store: KeyStore, calls: Calls) -> None:
    key = store.create_key("acme", scopes=["a", "b"]).key
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    status, headers, body = http(app, "/whoami", {"X-API-Key": key})
    assert status == 200
    assert json.loads(body) == {
        "client_id": "acme",
        "display_name": "acme",
        "authenticated": True,
        "scopes": ["a", "b"],
        "same": True,
    }
    assert headers["content-type"] == "application/json"
    assert headers["ratelimit-policy"] == '"default-60s";q=100;w=60'


def test_a_public_path_has_an_unauthenticated_user(store: KeyStore, calls: Calls) -> None:
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    status, headers, body = http(app, "/health")
    assert status == 200
    assert json.loads(body) == {"authenticated": False, "scopes": [], "client": False}
    assert "ratelimit" not in headers


def test_a_refused_request_never_reaches_the_app(store: KeyStore, calls: Calls) -> None:
    app = build_app(calls)
    app.add_middleware(M2MMiddleware, settings=settings(store))
    status, headers, body = http(app, "/whoami", method="POST")
    assert status == 401
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"] == "missing_credentials"
    assert calls.names == []


# -- wiring -----------------------------------------------------------------------------


def test_wrapping_an_app_directly(store: KeyStore, calls: Calls) -> None:
    key = store.create_key("acme").key
    app = M2MMiddleware(build_app(calls), settings=settings(store, default_limits="1/minute"))
    assert http(app, "/whoami")[0] == 401
    status, headers, _ = http(app, "/whoami", {"X-API-Key": key})
    assert status == 200
    assert re.fullmatch(r'"default-60s";r=0;t=(\d+)', headers["ratelimit"])
    assert http(app, "/whoami", {"X-API-Key": key})[0] == 429


def test_setting_fields_as_keyword_arguments(store: KeyStore, calls: Calls) -> None:
    key = store.create_key("acme").key
    app = M2MMiddleware(
        build_app(calls), key_store=store, default_limits="1/minute", api_key_header="X-Key"
    )
    assert http(app, "/whoami", {"X-Key": key})[0] == 200
    assert http(app, "/whoami", {"X-Key": key})[0] == 429
    assert http(app, "/whoami", {"X-API-Key": key})[0] == 401


def test_middleware_list_wiring(store: KeyStore, calls: Calls) -> None:
    key = store.create_key("acme").key
    app = build_app(calls, middleware=[Middleware(M2MMiddleware, settings=settings(store))])
    assert http(app, "/whoami")[0] == 401
    assert http(app, "/whoami", {"X-API-Key": key})[0] == 200


def test_settings_and_fields_together_are_refused(store: KeyStore, calls: Calls) -> None:
    with pytest.raises(TypeError):
        M2MMiddleware(build_app(calls), settings=settings(store), default_limits="1/second")


def test_any_asgi_app_gets_the_client_and_the_headers(store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["x"]).key
    seen: list[Message] = []

    async def bare(scope: Message, receive: Any, send: Any) -> None:
        seen.append(scope)
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(b"x-app", b"1")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    app = M2MMiddleware(bare, settings=settings(store, default_limits="3/minute"))
    status, headers, _ = http(app, "/anything", {"X-API-Key": key})
    assert status == 204
    assert headers["x-app"] == "1"
    assert headers["ratelimit-policy"] == '"default-60s";q=3;w=60'
    assert headers["ratelimit"].startswith('"default-60s";r=2;t=')
    [scope] = seen
    assert isinstance(scope["user"], Client)
    assert scope["m2m_client"] is scope["user"]
    assert scope["user"].client_id == "acme"
    assert list(scope["auth"].scopes) == ["x"]


def test_a_blocking_key_store_works_on_the_async_path(tmp_path: Path, calls: Calls) -> None:
    sqlite = open_key_store(f"sqlite:///{tmp_path / 'keys.db'}")
    try:
        assert sqlite.blocking
        key = sqlite.create_key("acme").key
        app = M2MMiddleware(build_app(calls), settings=settings(sqlite))
        status, _, body = http(app, "/whoami", {"X-API-Key": key})
        assert status == 200
        assert json.loads(body)["client_id"] == "acme"
        other = "y" if key.endswith("x") else "x"  # a key ending in "x" stayed itself 1 time in 62
        assert http(app, "/whoami", {"X-API-Key": key[:-1] + other})[0] == 401
    finally:
        sqlite.close()


# -- the app's own messages, Starlette's auth objects, root_path --------------------------


def send_scope(app: Any, scope: Message) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run one HTTP request given as a ready scope; return status, raw headers and body."""
    sent = asyncio.run(
        _drive(app, scope, [{"type": "http.request", "body": b"", "more_body": False}])
    )
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:] if m["type"] == "http.response.body")
    return start["status"], list(start["headers"]), body


def test_an_app_reusing_one_start_message_gets_one_copy_of_each_header(store: KeyStore) -> None:
    key = store.create_key("acme").key
    start_message: Message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
    }
    pristine = {**start_message, "headers": list(start_message["headers"])}

    async def constant(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send(start_message)  # the same object on every request
        await send({"type": "http.response.body", "body": b"ok"})

    app = M2MMiddleware(constant, settings=settings(store, default_limits="5/minute"))
    left = []
    for _ in range(3):
        status, raw, body = send_scope(app, _scope("http", "/x", {"X-API-Key": key}))
        assert (status, body) == (200, b"ok")
        names = [name for name, _ in raw]
        assert names.count(b"ratelimit") == names.count(b"ratelimit-policy") == 1, raw
        assert names.count(b"content-type") == 1
        left.append(dict(raw)[b"ratelimit"].split(b";")[1])
    assert left == [b"r=4", b"r=3", b"r=2"]
    assert start_message == pristine


def test_request_auth_is_starlettes_auth_credentials(store: KeyStore) -> None:
    both = store.create_key("acme", scopes=["orders:read", "orders:write"]).key
    reader = store.create_key("acme", scopes=["orders:read"]).key
    seen: list[tuple[bool, list[str]]] = []

    async def probe(request: Request) -> Response:
        seen.append((isinstance(request.auth, AuthCredentials), sorted(request.auth.scopes)))
        return JSONResponse({})

    @requires(["orders:read", "orders:write"])
    async def write(request: Request) -> Response:
        return JSONResponse({"client_id": request.user.client_id})

    routes = [Route("/probe", probe), Route("/health", probe), Route("/write", write)]
    app = Starlette(routes=routes)
    app.add_middleware(M2MMiddleware, settings=settings(store, routes=[]))
    # Interleaved: each key keeps its own scopes, whatever the middleware shares.
    for key in (both, reader, both):
        assert http(app, "/probe", {"X-API-Key": key})[0] == 200
    assert http(app, "/health")[0] == 200
    assert seen == [
        (True, ["orders:read", "orders:write"]),
        (True, ["orders:read"]),
        (True, ["orders:read", "orders:write"]),
        (True, []),
    ]
    assert http(app, "/write", {"X-API-Key": reader})[0] == 403
    status, _, body = http(app, "/write", {"X-API-Key": both})
    assert status == 200
    assert json.loads(body) == {"client_id": "acme"}


def below_root(path: str, root_path: str, headers: dict[str, str] | None = None) -> Message:
    """A scope as a server started with ``--root-path`` sends it: the full path, and the root."""
    scope = _scope("http", path, headers)
    scope["root_path"] = root_path
    return scope


def test_the_mount_point_itself_is_the_apps_root_path(store: KeyStore) -> None:
    seen: list[str] = []

    async def bare(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = M2MMiddleware(bare, settings=settings(store, public_paths=["/"]))
    assert send_scope(app, below_root("/api", "/api"))[0] == 204  # "/" below the mount
    assert send_scope(app, below_root("/api/", "/api"))[0] == 204
    assert send_scope(app, below_root("/api/orders", "/api"))[0] == 401
    assert seen == ["/api", "/api/"]  # the app still gets the scope it was sent


def test_a_path_sharing_only_a_prefix_string_with_the_root_path_is_matched_whole(
    store: KeyStore,
) -> None:
    key = store.create_key("acme").key

    async def bare(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    rules = [{"path": "/apix/*", "scopes": ["x:read"]}]
    app = M2MMiddleware(
        bare, settings=settings(store, routes=rules, public_paths=["/x/*", "/orders"])
    )
    status, _, body = send_scope(app, below_root("/apix/orders", "/api", {"X-API-Key": key}))
    assert status == 403
    assert json.loads(body)["error"] == "insufficient_scope"
    assert send_scope(app, below_root("/apix/orders", "/api"))[0] == 401  # not public either
