"""The audit log tells the truth, in Starlette, Flask and Django alike.

Exactly one INFO record on ``m2m_middleware.audit`` per request whose
credential was checked, saying how the request ended: ``denied`` with the
status and error of whoever refused it (the engine, or the view's
``require_scopes``), else ``allowed`` with the status the app answered. A
public path nobody refused leaves none. ``require_scopes`` refusals carry the
same escaped fields and ``m2m_*`` extras the engine's denials do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import jwt as pyjwt
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from test_http_conformance import Maker, api_key, config

import m2m_middleware.django.middleware as django_middleware
import m2m_middleware.flask as flask_adapter
import m2m_middleware.starlette as starlette_adapter
from m2m_middleware import KeyStore, Settings, open_key_store
from m2m_middleware.starlette import M2MMiddleware, require_scopes

AUDIT = "m2m_middleware.audit"
EXTRAS = (
    "m2m_allowed",
    "m2m_status",
    "m2m_error",
    "m2m_client_id",
    "m2m_key_id",
    "m2m_scheme",
    "m2m_method",
    "m2m_path",
)
SECRET = "an-hmac-secret-of-at-least-32-bytes!"


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


@pytest.fixture
def audit_on(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger=AUDIT)
    yield caplog


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AUDIT]


def only_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    found = records(caplog)
    assert len(found) == 1, [r.getMessage() for r in found]
    assert found[0].levelno == logging.INFO
    return found[0]


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in EXTRAS}


def expected(
    allowed: bool,
    status: int,
    error: str | None,
    path: str,
    client_id: str | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    return {
        "m2m_allowed": allowed,
        "m2m_status": status,
        "m2m_error": error,
        "m2m_client_id": client_id,
        "m2m_key_id": key_id,
        "m2m_scheme": "api_key" if client_id is not None else None,
        "m2m_method": "GET",
        "m2m_path": path,
    }


# -- the rows of the issue ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/scoped"])
def test_a_public_path_nobody_refused_leaves_no_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture, path: str
) -> None:
    issued = store.create_key("acme", scopes=["orders:read", "reports:read"])
    app = make_app(config(store, public_paths=["/health", "/scoped"]))
    assert app.get("/health").status == 200
    assert app.get("/health", api_key(issued.key)).status == 200
    assert records(audit_on) == []
    # Control: the same app audits a protected path.
    assert app.get("/ping", api_key(issued.key)).status == 200
    assert len(records(audit_on)) == 1


def test_an_allowed_request_is_one_allowed_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture
) -> None:
    issued = store.create_key("acme")
    app = make_app(config(store))
    assert app.get("/ping", api_key(issued.key)).status == 200
    record = only_record(audit_on)
    assert extras(record) == expected(True, 200, None, "/ping", "acme", issued.key_id)
    assert record.getMessage() == f"allowed GET /ping client=acme key={issued.key_id}"


@pytest.mark.parametrize(
    ("path", "key_scopes", "status", "error"),
    [
        ("/orders", [], 403, "insufficient_scope"),  # a route rule
        ("/ping", None, 401, "missing_credentials"),
    ],
    ids=["route-rule-403", "no-credential-401"],
)
def test_an_engine_denial_is_one_denied_record(
    make_app: Maker,
    store: KeyStore,
    audit_on: pytest.LogCaptureFixture,
    path: str,
    key_scopes: list[str] | None,
    status: int,
    error: str,
) -> None:
    app = make_app(config(store))
    who: tuple[str | None, str | None] = (None, None)
    if key_scopes is None:
        reply = app.get(path)
    else:
        issued = store.create_key("acme", scopes=key_scopes)
        reply, who = app.get(path, api_key(issued.key)), ("acme", issued.key_id)
    assert reply.status == status
    record = only_record(audit_on)
    assert extras(record) == expected(False, status, error, path, *who)
    assert record.getMessage().startswith(f"denied GET {path} status={status} error={error}")


@pytest.mark.parametrize("view", ["/scoped", "/scoped-async"])
def test_a_require_scopes_403_is_one_denied_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture, view: str
) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    app = make_app(config(store))
    reply = app.get(view, api_key(issued.key))
    assert reply.status == 403 and reply.json()["error"] == "insufficient_scope"
    record = only_record(audit_on)
    assert extras(record) == expected(False, 403, "insufficient_scope", view, "acme", issued.key_id)
    assert record.getMessage() == (
        f"denied GET {view} status=403 error=insufficient_scope client=acme"
    )


@pytest.mark.parametrize("view", ["/scoped", "/scoped-async"])
def test_a_require_scopes_401_on_a_public_path_is_one_denied_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture, view: str
) -> None:
    app = make_app(config(store, public_paths=["/health", "/scoped*"]))
    reply = app.get(view)
    assert reply.status == 401 and reply.json()["error"] == "missing_credentials"
    record = only_record(audit_on)
    assert extras(record) == expected(False, 401, "missing_credentials", view)
    assert record.getMessage() == f"denied GET {view} status=401 error=missing_credentials client=-"


@pytest.mark.parametrize("view", ["/scoped", "/scoped-async"])
def test_require_scopes_letting_a_client_through_is_one_allowed_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture, view: str
) -> None:
    issued = store.create_key("acme", scopes=["orders:read", "reports:read"])
    app = make_app(config(store))
    assert app.get(view, api_key(issued.key)).status == 200
    record = only_record(audit_on)
    assert extras(record) == expected(True, 200, None, view, "acme", issued.key_id)


# -- how an admitted request ended -------------------------------------------------------


@pytest.mark.parametrize(("path", "status"), [("/boom", 500), ("/nowhere", 404)])
def test_an_admitted_request_is_recorded_with_the_status_it_got(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture, path: str, status: int
) -> None:
    # /boom raises in the view: Flask and Django answer the 500 themselves,
    # Starlette's ServerErrorMiddleware (outside ours) does, the exception
    # passing through the middleware on its way.
    issued = store.create_key("acme")
    app = make_app(config(store))
    assert app.get(path, api_key(issued.key)).status == status
    record = only_record(audit_on)
    assert extras(record) == expected(True, status, None, path, "acme", issued.key_id)


def test_a_streamed_response_is_one_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture
) -> None:
    issued = store.create_key("acme")
    app = make_app(config(store))
    reply = app.get("/stream", api_key(issued.key))
    assert (reply.status, reply.body) == (200, b"first,second")  # conftest.STREAMED
    assert "RateLimit" in reply.headers  # the headers still join a streamed response
    record = only_record(audit_on)
    assert extras(record) == expected(True, 200, None, "/stream", "acme", issued.key_id)


def test_every_kind_of_request_in_a_row_gets_its_own_one_record(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture
) -> None:
    scoped = store.create_key("acme", scopes=["orders:read", "reports:read"]).key
    plain = store.create_key("acme").key
    app = make_app(config(store))
    sent = [
        ("/health", None),  # public: none
        ("/ping", plain),
        ("/orders", plain),  # route rule: 403
        ("/scoped", plain),  # require_scopes: 403
        ("/scoped-async", scoped),
        ("/boom", plain),
        ("/ping", None),  # 401
    ]
    for path, key in sent:
        app.get(path, api_key(key) if key else None)
    got = [(r.m2m_path, r.m2m_allowed, r.m2m_status) for r in records(audit_on)]  # type: ignore[attr-defined]
    assert got == [
        ("/ping", True, 200),
        ("/orders", False, 403),
        ("/scoped", False, 403),
        ("/scoped-async", True, 200),
        ("/boom", True, 500),
        ("/ping", False, 401),
    ]


def hs256(**claims: Any) -> str:
    now = int(time.time())
    return pyjwt.encode({"iat": now, "exp": now + 600, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("view", ["/scoped", "/scoped-async"])
def test_a_require_scopes_record_is_escaped_as_the_engines_are(
    make_app: Maker, store: KeyStore, audit_on: pytest.LogCaptureFixture, view: str
) -> None:
    forged = "svc\nallowed GET /admin client=root key=key_x"
    app = make_app(
        config(store, schemes=["api_key", "jwt"], jwt_keys=SECRET, jwt_algorithms=["HS256"])
    )
    reply = app.get(view, {"Authorization": f"Bearer {hs256(sub=forged, scope='x')}"})
    assert reply.status == 403
    record = only_record(audit_on)
    message = record.getMessage()
    escaped = "svc\\nallowed\\x20GET\\x20/admin\\x20client=root\\x20key=key_x"
    assert message == f"denied GET {view} status=403 error=insufficient_scope client={escaped}"
    assert extras(record)["m2m_client_id"] == escaped
    assert extras(record)["m2m_scheme"] == "jwt"
    for value in [message, *(v for v in extras(record).values() if isinstance(v, str))]:
        assert value.isprintable() and len(value.splitlines()) == 1


# -- the cost when the audit is off --------------------------------------------------------

ADAPTERS = {
    "starlette": starlette_adapter,
    "flask": flask_adapter,
    "django": django_middleware,
}


def test_with_the_audit_off_no_request_is_watched(
    make_app: Maker,
    framework: str,
    store: KeyStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ends: list[object] = []
    real = ADAPTERS[framework].ended

    def spy(*args: Any) -> None:
        ends.append(args)
        real(*args)

    monkeypatch.setattr(ADAPTERS[framework], "ended", spy)
    plain = store.create_key("acme").key
    app = make_app(config(store, public_paths=["/health", "/scoped"]))
    caplog.set_level(logging.WARNING, logger=AUDIT)
    for path in ("/ping", "/scoped", "/boom", "/stream", "/health"):
        app.get(path, api_key(plain))
    assert ends == [] and records(caplog) == []
    # Control: at INFO each admitted request is seen once it has ended.
    caplog.set_level(logging.INFO, logger=AUDIT)
    for path in ("/ping", "/scoped", "/boom", "/stream", "/health"):
        app.get(path, api_key(plain))
    assert len(ends) == 5
    # /scoped is public here: the key is not looked at, and the view refuses (401).
    paths = [(r.m2m_path, r.m2m_status) for r in records(caplog)]  # type: ignore[attr-defined]
    assert paths == [("/ping", 200), ("/scoped", 401), ("/boom", 500), ("/stream", 200)]


# -- websockets (Starlette) ------------------------------------------------------------------

Message = dict[str, Any]
DENIAL_EXTENSION: dict[str, Any] = {"websocket.http.response": {}}


def websocket_app(store: KeyStore) -> Starlette:
    @require_scopes("orders:watch")
    async def feed(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    async def silent(websocket: WebSocket) -> None:
        raise RuntimeError("no handshake")

    app = Starlette(
        routes=[
            WebSocketRoute("/feed", feed),
            WebSocketRoute("/public/feed", feed),
            WebSocketRoute("/silent", silent),
        ]
    )
    app.add_middleware(
        M2MMiddleware,
        settings=Settings(key_store=store, default_limits="100/minute", public_paths=["/public/*"]),
    )
    return app


def connect(app: Any, path: str, key: str | None, extensions: Any) -> list[Message]:
    """One websocket handshake straight into the app; the messages it sent."""
    headers = [(b"host", b"testserver")]
    if key is not None:
        headers.append((b"x-api-key", key.encode()))
    scope: Message = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }
    if extensions is not None:
        scope["extensions"] = extensions

    async def run() -> list[Message]:
        inbound: asyncio.Queue[Message] = asyncio.Queue()
        inbound.put_nowait({"type": "websocket.connect"})
        inbound.put_nowait({"type": "websocket.disconnect", "code": 1000})
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        with contextlib.suppress(RuntimeError):  # /silent's: a server answers it 500
            await asyncio.wait_for(app(scope, inbound.get, send), 5)
        return sent

    return asyncio.run(run())


WS_EXTENSIONS = {"with-denial-extension": DENIAL_EXTENSION, "close-only": None}


@pytest.mark.parametrize("extensions", WS_EXTENSIONS.values(), ids=WS_EXTENSIONS.keys())
def test_a_websocket_refused_by_require_scopes_is_one_denied_record(
    store: KeyStore, audit_on: pytest.LogCaptureFixture, extensions: Any
) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    sent = connect(websocket_app(store), "/feed", issued.key, extensions)
    assert "websocket.accept" not in [m["type"] for m in sent]
    record = only_record(audit_on)
    assert extras(record) == expected(
        False, 403, "insufficient_scope", "/feed", "acme", issued.key_id
    )


@pytest.mark.parametrize("extensions", WS_EXTENSIONS.values(), ids=WS_EXTENSIONS.keys())
def test_a_public_websocket_refused_by_require_scopes_is_one_401_record(
    store: KeyStore, audit_on: pytest.LogCaptureFixture, extensions: Any
) -> None:
    connect(websocket_app(store), "/public/feed", None, extensions)
    record = only_record(audit_on)
    assert extras(record) == expected(False, 401, "missing_credentials", "/public/feed")


def test_a_websocket_the_engine_refuses_is_one_denied_record(
    store: KeyStore, audit_on: pytest.LogCaptureFixture
) -> None:
    connect(websocket_app(store), "/feed", None, DENIAL_EXTENSION)
    record = only_record(audit_on)
    assert extras(record) == expected(False, 401, "missing_credentials", "/feed")


@pytest.mark.parametrize(("path", "status"), [("/feed", 101), ("/silent", 500)])
def test_an_admitted_websocket_is_one_allowed_record_with_its_handshake_status(
    store: KeyStore, audit_on: pytest.LogCaptureFixture, path: str, status: int
) -> None:
    issued = store.create_key("acme", scopes=["orders:watch"])
    sent = connect(websocket_app(store), path, issued.key, None)
    if status == 101:
        kinds = [m["type"] for m in sent]
        assert kinds == ["websocket.accept", "websocket.send", "websocket.close"]
    record = only_record(audit_on)
    assert extras(record) == expected(True, status, None, path, "acme", issued.key_id)
