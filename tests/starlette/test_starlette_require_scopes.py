"""``m2m_middleware.starlette.require_scopes`` where only Starlette goes: endpoint
classes, threads, websockets (with and without the ASGI denial-response extension),
and the misuses a Starlette user can make. The HTTP answers themselves are pinned
against Flask's and Django's in tests/conformance/test_require_scopes_conformance.py.

Driven with raw ASGI messages, so what is sent is seen exactly.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from m2m_middleware import KeyStore, Settings, open_key_store
from m2m_middleware.starlette import M2MMiddleware, get_client, require_scopes

Message = dict[str, Any]
DENIAL = {"websocket.http.response": {}}


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def _scope(
    kind: str,
    path: str,
    key: str | None,
    extensions: dict[str, Any] | None,
    method: str = "GET",
) -> Message:
    headers = [(b"host", b"testserver")]
    if key is not None:
        headers.append((b"x-api-key", key.encode()))
    scope: Message = {
        "type": kind,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    if kind == "http":
        scope["method"] = method
    else:
        scope["subprotocols"] = []
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


def drive(
    app: Any,
    kind: str,
    path: str,
    key: str | None = None,
    extensions: dict[str, Any] | None = None,
    method: str = "GET",
) -> list[Message]:
    if kind == "http":
        inbound: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]
    else:
        inbound = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

    async def run() -> list[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        for message in inbound:
            queue.put_nowait(message)
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        scope = _scope(kind, path, key, extensions, method)
        await asyncio.wait_for(app(scope, queue.get, send), 5)
        return sent

    return asyncio.run(run())


def response_of(sent: list[Message], prefix: str = "http") -> tuple[int, dict[str, str], bytes]:
    start, *rest = sent
    assert start["type"] == f"{prefix}.response.start", sent
    headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in start["headers"]}
    assert len(headers) == len(start["headers"]), start["headers"]  # none sent twice
    body = b"".join(m["body"] for m in rest)
    assert all(m["type"] == f"{prefix}.response.body" for m in rest), rest
    return start["status"], headers, body


class Ran:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.threads: list[threading.Thread] = []


@pytest.fixture
def ran() -> Ran:
    return Ran()


def build(store: KeyStore, ran: Ran) -> Starlette:
    class Orders(HTTPEndpoint):
        @require_scopes("orders:read")
        async def get(self, request: Request) -> Response:
            ran.names.append("Orders.get")
            return JSONResponse({"client_id": request.user.client_id})

        @require_scopes("orders:write")
        def post(self, request: Request) -> Response:
            ran.names.append("Orders.post")
            return JSONResponse({"client_id": request.user.client_id})

    @require_scopes("reports:read")
    def report(request: Request) -> Response:
        ran.names.append("report")
        ran.threads.append(threading.current_thread())
        return JSONResponse({"client_id": request.user.client_id})

    @require_scopes("orders:watch")
    async def feed(websocket: WebSocket) -> None:
        ran.names.append("feed")
        await websocket.accept()
        client = get_client(websocket)
        await websocket.send_json({"client_id": client.client_id if client else None})
        await websocket.close()

    @requires("orders:read")
    async def starlette_requires(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/orders", Orders),
            Route("/report", report),
            Route("/requires", starlette_requires),
            WebSocketRoute("/feed", feed),
            WebSocketRoute("/public/feed", feed),
        ]
    )
    app.add_middleware(
        M2MMiddleware,
        settings=Settings(
            key_store=store, default_limits="100/minute", public_paths=["/public/*"], realm="shop"
        ),
    )
    return app


def key(store: KeyStore, *scopes: str) -> str:
    return store.create_key("acme", scopes=list(scopes)).key


# -- HTTP ------------------------------------------------------------------------------


def test_endpoint_class_methods_async_and_sync(store: KeyStore, ran: Ran) -> None:
    app = build(store, ran)
    reader, writer = key(store, "orders:read"), key(store, "orders:write")
    status, headers, body = response_of(drive(app, "http", "/orders", writer))
    assert status == 403
    assert headers["content-type"] == "application/problem+json"
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert 'scope="orders:read"' in headers["www-authenticate"]
    assert json.loads(body)["error"] == "insufficient_scope"
    assert response_of(drive(app, "http", "/orders", reader))[0] == 200
    assert response_of(drive(app, "http", "/orders", reader, method="POST"))[0] == 403
    assert response_of(drive(app, "http", "/orders", writer, method="POST"))[0] == 200
    assert ran.names == ["Orders.get", "Orders.post"]


def test_a_sync_endpoint_still_runs_in_a_worker_thread(store: KeyStore, ran: Ran) -> None:
    # Starlette runs sync endpoints in its thread pool only if they look sync:
    # the decorator must not turn one into a coroutine that blocks the event loop.
    app = build(store, ran)
    assert response_of(drive(app, "http", "/report", key(store, "orders:read")))[0] == 403
    assert response_of(drive(app, "http", "/report", key(store, "reports:read")))[0] == 200
    assert ran.names == ["report"]
    assert ran.threads[0] is not threading.main_thread()


def test_starlettes_requires_answers_its_own_plain_403(store: KeyStore, ran: Ran) -> None:
    # What the README says @requires does instead: membership works, the answer is Starlette's.
    app = build(store, ran)
    status, headers, body = response_of(drive(app, "http", "/requires", key(store, "other")))
    assert (status, body) == (403, b"Forbidden")
    assert headers["content-type"].startswith("text/plain")
    assert "www-authenticate" not in headers
    assert response_of(drive(app, "http", "/requires", key(store, "orders:read")))[0] == 200


# -- websockets ------------------------------------------------------------------------


def test_a_websocket_without_the_scope_gets_the_http_answer_where_the_server_can_send_it(
    store: KeyStore, ran: Ran
) -> None:
    app = build(store, ran)
    sent = drive(app, "websocket", "/feed", key(store, "orders:read"), DENIAL)
    status, headers, body = response_of(sent, "websocket.http")
    assert status == 403
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["content-length"]) == len(body)
    assert headers["www-authenticate"] == (
        'Bearer realm="shop", error="insufficient_scope", '
        'error_description="this view needs the scope(s): orders:watch", scope="orders:watch"'
    )
    problem = json.loads(body)
    assert (problem["status"], problem["error"]) == (403, "insufficient_scope")
    assert ran.names == []


def test_a_websocket_without_the_scope_is_closed_with_1008_elsewhere(
    store: KeyStore, ran: Ran
) -> None:
    app = build(store, ran)
    for extensions in (None, {}, {"websocket.http.response.other": {}}):
        sent = drive(app, "websocket", "/feed", key(store, "orders:read"), extensions)
        assert sent == [{"type": "websocket.close", "code": 1008, "reason": "insufficient_scope"}]
    assert ran.names == []


@pytest.mark.parametrize("extensions", [DENIAL, None])
def test_a_websocket_with_the_scope_is_accepted(
    store: KeyStore, ran: Ran, extensions: dict[str, Any] | None
) -> None:
    app = build(store, ran)
    sent = drive(app, "websocket", "/feed", key(store, "orders:watch"), extensions)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {"client_id": "acme"}


def test_a_public_websocket_behind_require_scopes_is_401(store: KeyStore, ran: Ran) -> None:
    app = build(store, ran)
    status, headers, body = response_of(
        drive(app, "websocket", "/public/feed", None, DENIAL), "websocket.http"
    )
    assert (status, json.loads(body)["error"]) == (401, "missing_credentials")
    assert headers["www-authenticate"] == 'Bearer realm="shop"'
    sent = drive(app, "websocket", "/public/feed")
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "missing_credentials"}]


@pytest.mark.parametrize(
    ("credential", "status", "error"),
    [(None, 401, "missing_credentials"), ("m2m_not-a-key", 401, "invalid_token")],
)
def test_the_middleware_answers_a_refused_handshake_over_http_too(
    store: KeyStore, ran: Ran, credential: str | None, status: int, error: str
) -> None:
    app = build(store, ran)
    sent = drive(app, "websocket", "/feed", credential, DENIAL)
    got_status, headers, body = response_of(sent, "websocket.http")
    assert (got_status, json.loads(body)["error"]) == (status, error)
    assert headers["content-type"] == "application/problem+json"
    assert headers["www-authenticate"].startswith('Bearer realm="shop"')
    # Without the extension: the close it always was.
    assert drive(app, "websocket", "/feed", credential) == [
        {"type": "websocket.close", "code": 1008, "reason": error}
    ]


# -- misuse ----------------------------------------------------------------------------


def test_without_the_middleware_the_error_says_what_is_missing(store: KeyStore) -> None:
    @require_scopes("orders:read")
    async def orders(request: Request) -> Response:  # pragma: no cover - never admitted
        return PlainTextResponse("no")

    with pytest.raises(RuntimeError, match=r"needs M2MMiddleware in front of the app"):
        asyncio.run(orders(Request(_scope("http", "/orders", None, None))))


def test_the_request_may_come_by_keyword(store: KeyStore) -> None:
    # As FastAPI passes it to an endpoint that declares ``request: Request``.
    @require_scopes("orders:read")
    async def orders(*, request: Request, limit: int) -> Response:
        return PlainTextResponse(f"{request.user.client_id} {limit}")

    seen: list[Request] = []

    async def capture(request: Request) -> Response:
        seen.append(request)
        return PlainTextResponse("")

    app = Starlette(routes=[Route("/capture", capture)])
    app.add_middleware(M2MMiddleware, settings=Settings(key_store=store))
    for scopes in (["orders:read"], []):
        drive(app, "http", "/capture", key(store, *scopes))
    admitted, refused = seen
    response = asyncio.run(orders(request=admitted, limit=3))
    assert (response.status_code, response.body) == (200, b"acme 3")
    response = asyncio.run(orders(request=refused, limit=3))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"


def test_an_endpoint_called_without_a_request_is_a_clear_type_error() -> None:
    @require_scopes("orders:read")
    async def orders(value: int) -> None:  # pragma: no cover - never admitted
        pass

    with pytest.raises(TypeError, match=r"without a Request or WebSocket"):
        asyncio.run(orders(1))


def test_a_sync_websocket_endpoint_is_a_clear_type_error() -> None:
    @require_scopes("orders:read")
    def feed(websocket: WebSocket) -> None:  # pragma: no cover - never admitted
        pass

    async def receive() -> Message:  # pragma: no cover - never called
        return {}

    async def send(message: Message) -> None:  # pragma: no cover - never called
        pass

    socket = WebSocket(_scope("websocket", "/feed", None, None), receive, send)
    with pytest.raises(TypeError, match=r"websocket endpoint .* must be async"):
        feed(socket)
