"""The same small application in Starlette, Flask and Django, behind each adapter.

``make_app(config)`` takes the settings as a lower-case mapping (what Flask's
``app.config["M2M_AUTH"]`` and Django's ``settings.M2M_AUTH`` hold; Starlette
gets ``Settings(**config)``) and returns a :class:`Caller` that sends one
request straight into the application and returns a :class:`Reply`.

Every app has:

- ``GET /orders``: the tests' settings require ``orders:read`` through ``routes``
- ``GET /ping``: no scope of its own
- ``GET /health``: a public path; echoes the attached client (there should be none)
- ``GET /whoami``: echoes the attached :class:`~m2m_middleware.Client`
- ``GET /reports/``: with its trailing slash, as frameworks let a view be written
- ``GET /scoped`` (a sync view) and ``GET /scoped-async`` (an async one): each
  framework's own ``require_scopes(*SCOPED_VIEW_SCOPES)``; echo the client
- ``GET /boom``: raises :class:`Boom` (the framework answers 500)
- ``GET /stream``: a streamed 200 body, :data:`STREAMED`, in two chunks
- ``POST /echo``: answers 200 with the request body as the view read it
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import flask
import httpx
import pytest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import Client as DjangoTestClient
from django.test import override_settings
from django.urls import path as django_path
from django.views.decorators.http import require_safe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from m2m_middleware import Client, Engine, Settings
from m2m_middleware.django import get_client as django_get_client
from m2m_middleware.django import require_scopes as django_require_scopes
from m2m_middleware.django.middleware import current_engine as django_current_engine
from m2m_middleware.flask import M2MAuth, current_client
from m2m_middleware.flask import require_scopes as flask_require_scopes
from m2m_middleware.starlette import M2MMiddleware
from m2m_middleware.starlette import get_client as starlette_get_client
from m2m_middleware.starlette import require_scopes as starlette_require_scopes

HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]] | None
#: What the ``/scoped`` views require, deliberately not in sorted order.
SCOPED_VIEW_SCOPES = ("reports:read", "orders:read")
#: The peer address every test client sends from unless told otherwise.
DEFAULT_PEER = "127.0.0.1"
#: The body ``/stream`` sends, in two chunks.
STREAMED = (b"first,", b"second")


class Boom(Exception):
    """What ``/boom`` raises: a view's own bug."""


class Headers:
    """Response headers, looked up case-insensitively; keeps repeated fields apart."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self.items = [(name.lower(), value) for name, value in items]

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.items if key == name]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        if len(values) > 1:
            raise AssertionError(f"header {name} sent {len(values)} times: {values}")
        return values[0] if values else default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"


@dataclass
class Reply:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _header_list(headers: HeaderInput) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


class Caller:
    """Sends requests into one framework's app; ``engine()`` is its M2M engine.

    ``prefix`` serves the app below a path prefix, the way each server does it:
    ASGI ``root_path`` (also prepended to ``path``, as uvicorn does), WSGI
    ``SCRIPT_NAME`` for Flask and Django. ``path`` is then relative to it.
    ``peer`` is the address the request comes from as the server sees it (ASGI
    ``client``, WSGI ``REMOTE_ADDR``), ``https`` whether the server got it over TLS.
    ``body`` is the request's content, sent with a ``Content-Length`` (a
    ``Content-Type`` among ``headers`` goes where each framework keeps it).
    """

    framework: str

    def __call__(
        self,
        method: str,
        path: str,
        headers: HeaderInput = None,
        *,
        prefix: str = "",
        body: bytes = b"",
        peer: str = DEFAULT_PEER,
        https: bool = False,
    ) -> Reply:
        raise NotImplementedError

    def get(self, path: str, headers: HeaderInput = None) -> Reply:
        return self("GET", path, headers)

    def post(self, path: str, body: bytes, headers: HeaderInput = None) -> Reply:
        return self("POST", path, headers, body=body)

    def engine(self) -> Engine:
        raise NotImplementedError

    def concurrently(
        self, path: str, headers: list[HeaderInput], *, method: str = "GET", body: bytes = b""
    ) -> list[Reply]:
        """``method`` ``path`` once per entry of ``headers``, all threads released at once."""
        start = threading.Barrier(len(headers))

        def one(h: HeaderInput) -> Reply:
            start.wait(timeout=5)
            return self._one_of_many(method, path, h, body)

        with ThreadPoolExecutor(max_workers=len(headers)) as pool:
            return list(pool.map(one, headers))

    def _one_of_many(self, method: str, path: str, headers: HeaderInput, body: bytes) -> Reply:
        return self(method, path, headers, body=body)


def echo(client: Client | None) -> dict[str, Any] | None:
    if client is None:
        return None
    return {
        "is_client": isinstance(client, Client),
        "client_id": client.client_id,
        "scheme": client.scheme,
        "scopes": sorted(client.scopes),
        "tier": client.tier,
        "key_id": client.key_id,
        "claims": dict(client.claims),
    }


# -- Starlette ------------------------------------------------------------------


async def _st_orders(request: Request) -> Response:
    return JSONResponse({"orders": []})


async def _st_ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def _st_health(request: Request) -> Response:
    return JSONResponse(
        {
            "client": echo(starlette_get_client(request)),
            "authenticated": request.user.is_authenticated,
        }
    )


async def _st_reports(request: Request) -> Response:
    return PlainTextResponse("reports")


async def _st_whoami(request: Request) -> Response:
    client = request.user
    return JSONResponse(
        {
            "client": echo(client),
            "same": starlette_get_client(request) is client,
            "authenticated": client.is_authenticated,
            "framework_scopes": sorted(request.auth.scopes),
        }
    )


@starlette_require_scopes(*SCOPED_VIEW_SCOPES)
def _st_scoped(request: Request) -> Response:
    return JSONResponse({"client": echo(starlette_get_client(request))})


@starlette_require_scopes(*SCOPED_VIEW_SCOPES)
async def _st_scoped_async(request: Request) -> Response:
    return JSONResponse({"client": echo(starlette_get_client(request))})


async def _st_boom(request: Request) -> Response:
    raise Boom("/boom")


async def _st_stream(request: Request) -> Response:
    async def chunks() -> Any:
        for chunk in STREAMED:
            yield chunk

    return StreamingResponse(chunks(), media_type="text/plain")


async def _st_echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


class StarletteCaller(Caller):
    framework = "starlette"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.app = Starlette(
            routes=[
                Route("/orders", _st_orders, methods=["GET"]),
                Route("/ping", _st_ping, methods=["GET"]),
                Route("/health", _st_health, methods=["GET"]),
                Route("/whoami", _st_whoami, methods=["GET"]),
                Route("/reports/", _st_reports, methods=["GET"]),
                Route("/scoped", _st_scoped, methods=["GET"]),
                Route("/scoped-async", _st_scoped_async, methods=["GET"]),
                Route("/boom", _st_boom, methods=["GET"]),
                Route("/stream", _st_stream, methods=["GET"]),
                Route("/echo", _st_echo, methods=["POST"]),
            ]
        )
        self.app.add_middleware(M2MMiddleware, settings=Settings(**config))

    def __call__(
        self,
        method: str,
        path: str,
        headers: HeaderInput = None,
        *,
        prefix: str = "",
        body: bytes = b"",
        peer: str = DEFAULT_PEER,
        https: bool = False,
    ) -> Reply:
        raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in _header_list(headers)]
        app: Any = self.app
        if _tidied_by_httpx(method, path):
            app = _AsSent(app, method, prefix + path)

        async def send() -> httpx.Response:
            # No raise_app_exceptions: a crash must come back as a 500, as it
            # does from the Flask and Django callers.
            transport = httpx.ASGITransport(
                app=app, raise_app_exceptions=False, root_path=prefix, client=(peer, 50123)
            )
            async with httpx.AsyncClient(
                transport=transport, base_url=f"{'https' if https else 'http'}://testserver"
            ) as client:
                return await client.request(
                    method, prefix + path, headers=raw, content=body or None
                )

        response = asyncio.run(send())
        return Reply(
            response.status_code, Headers(response.headers.multi_items()), response.content
        )

    def engine(self) -> Engine:
        if self.app.middleware_stack is None:
            self.app.middleware_stack = self.app.build_middleware_stack()
        layer: Any = self.app.middleware_stack
        while not isinstance(layer, M2MMiddleware):
            layer = layer.app
        return layer.engine


def _tidied_by_httpx(method: str, path: str) -> bool:
    """httpx upper-cases the method and removes dot segments; servers pass both on as sent."""
    segments = path.partition("?")[0].split("/")
    return method != method.upper() or "." in segments or ".." in segments


class _AsSent:
    """Gives the app the method and path as uvicorn would: the method's case kept,
    the path percent-decoded (``unquote``, as uvicorn does) with its dot segments."""

    def __init__(self, app: Any, method: str, target: str) -> None:
        self.app = app
        self.method = method
        self.raw_path = target.partition("?")[0]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope = {
            **scope,
            "method": self.method,
            "path": unquote(self.raw_path),
            "raw_path": self.raw_path.encode("latin-1"),
        }
        await self.app(scope, receive, send)


# -- Flask ----------------------------------------------------------------------


class FlaskCaller(Caller):
    framework = "flask"

    def __init__(self, config: Mapping[str, Any]) -> None:
        app = flask.Flask("m2m_conformance")
        app.config["M2M_AUTH"] = config
        M2MAuth(app)

        @app.get("/orders")
        def orders() -> Any:
            return {"orders": []}

        @app.get("/ping")
        def ping() -> Any:
            return "pong"

        @app.get("/health")
        def health() -> Any:
            client = flask.g.get("m2m_client")
            return {"client": echo(client), "authenticated": client is not None}

        @app.get("/reports/")
        def reports() -> Any:
            return "reports"

        @app.get("/whoami")
        def whoami() -> Any:
            client = flask.g.m2m_client
            return {
                "client": echo(client),
                "same": current_client._get_current_object() is client,  # type: ignore[attr-defined]
                "authenticated": client.is_authenticated,
                "framework_scopes": sorted(current_client.scopes),
            }

        @app.get("/scoped")
        @flask_require_scopes(*SCOPED_VIEW_SCOPES)
        def scoped() -> Any:
            return {"client": echo(flask.g.m2m_client)}

        @app.get("/scoped-async")
        @flask_require_scopes(*SCOPED_VIEW_SCOPES)
        async def scoped_async() -> Any:
            return {"client": echo(flask.g.m2m_client)}

        @app.get("/boom")
        def boom() -> Any:
            raise Boom("/boom")

        @app.get("/stream")
        def stream() -> Any:
            return flask.Response(iter(STREAMED), mimetype="text/plain")

        @app.post("/echo")
        def echo_body() -> Any:
            return flask.Response(flask.request.get_data(), mimetype="application/octet-stream")

        self.app = app
        self.client = app.test_client()

    def __call__(
        self,
        method: str,
        path: str,
        headers: HeaderInput = None,
        *,
        prefix: str = "",
        body: bytes = b"",
        peer: str = DEFAULT_PEER,
        https: bool = False,
    ) -> Reply:
        response = self.client.open(
            path,
            method=method,
            headers=_header_list(headers),
            base_url=f"{'https' if https else 'http'}://localhost{prefix}",
            environ_base={"REMOTE_ADDR": peer},
            data=body or None,
        )
        return Reply(response.status_code, Headers(response.headers.items()), response.get_data())

    def engine(self) -> Engine:
        return M2MAuth.engine(self.app)


# -- Django ---------------------------------------------------------------------


@require_safe
def _dj_orders(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"orders": []})


@require_safe
def _dj_ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pong", content_type="text/plain")


@require_safe
def _dj_health(request: HttpRequest) -> HttpResponse:
    client = request.m2m_client  # type: ignore[attr-defined]
    return JsonResponse({"client": echo(client), "authenticated": client is not None})


@require_safe
def _dj_whoami(request: HttpRequest) -> HttpResponse:
    client = request.m2m_client  # type: ignore[attr-defined]
    return JsonResponse(
        {
            "client": echo(client),
            "same": django_get_client(request) is client,
            "authenticated": client.is_authenticated,
            "framework_scopes": sorted(client.scopes),
        }
    )


@require_safe
def _dj_reports(request: HttpRequest) -> HttpResponse:
    return HttpResponse("reports", content_type="text/plain")


@django_require_scopes(*SCOPED_VIEW_SCOPES)
def _dj_scoped(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"client": echo(django_get_client(request))})


@django_require_scopes(*SCOPED_VIEW_SCOPES)
async def _dj_scoped_async(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"client": echo(django_get_client(request))})


def _dj_boom(request: HttpRequest) -> HttpResponse:
    raise Boom("/boom")


def _dj_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter(STREAMED), content_type="text/plain")


def _dj_echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.read(), content_type="application/octet-stream")


DJANGO_URLCONF = "m2m_conformance_urls"
_urls = types.ModuleType(DJANGO_URLCONF)
_urls.urlpatterns = [  # type: ignore[attr-defined]
    django_path("orders", _dj_orders),
    django_path("ping", _dj_ping),
    django_path("health", _dj_health),
    django_path("whoami", _dj_whoami),
    django_path("reports/", _dj_reports),
    django_path("scoped", _dj_scoped),
    django_path("scoped-async", _dj_scoped_async),
    django_path("boom", _dj_boom),
    django_path("stream", _dj_stream),
    django_path("echo", _dj_echo),
]
sys.modules[DJANGO_URLCONF] = _urls


class DjangoCaller(Caller):
    framework = "django"

    def __init__(self, config: Mapping[str, Any]) -> None:
        # The same dict object on every request: the middleware keeps one
        # engine (and so one set of counters) per M2M_AUTH object.
        self.config = dict(config)
        self.client = DjangoTestClient(raise_request_exception=False)

    def _settings(self) -> override_settings:
        return override_settings(M2M_AUTH=self.config, ROOT_URLCONF=DJANGO_URLCONF)

    def __call__(
        self,
        method: str,
        path: str,
        headers: HeaderInput = None,
        *,
        prefix: str = "",
        body: bytes = b"",
        peer: str = DEFAULT_PEER,
        https: bool = False,
    ) -> Reply:
        with self._settings():
            return self._send(self.client, method, path, headers, prefix, body, peer, https)

    @staticmethod
    def _send(
        client: DjangoTestClient,
        method: str,
        path: str,
        headers: HeaderInput,
        prefix: str,
        body: bytes = b"",
        peer: str = DEFAULT_PEER,
        https: bool = False,
    ) -> Reply:
        joined: dict[str, str] = {}
        content_type = "application/octet-stream"  # what Django's client says with no type
        for name, value in _header_list(headers):
            if name.lower() == "content-type":  # CONTENT_TYPE in the environ, not HTTP_...
                content_type = value
                continue
            # What a WSGI server does with a repeated header field.
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        extra = {"SCRIPT_NAME": prefix} if prefix else {}
        response = client.generic(
            method,
            path,
            body,
            content_type,
            headers=joined,
            secure=https,
            REMOTE_ADDR=peer,
            **extra,
        )
        body = b"".join(response.streaming_content) if response.streaming else response.content  # type: ignore[attr-defined]
        return Reply(response.status_code, Headers(response.headers.items()), body)

    def concurrently(
        self, path: str, headers: list[HeaderInput], *, method: str = "GET", body: bytes = b""
    ) -> list[Reply]:
        # override_settings swaps process-wide state: enter it once, outside the threads.
        with self._settings():
            return super().concurrently(path, headers, method=method, body=body)

    def _one_of_many(self, method: str, path: str, headers: HeaderInput, body: bytes) -> Reply:
        # A test client per thread, like a WSGI server's per-request handling.
        client = DjangoTestClient(raise_request_exception=False)
        return self._send(client, method, path, headers, "", body)

    def engine(self) -> Engine:
        with self._settings():
            return django_current_engine()


BUILDERS: dict[str, Callable[[Mapping[str, Any]], Caller]] = {
    "starlette": StarletteCaller,
    "flask": FlaskCaller,
    "django": DjangoCaller,
}


@pytest.fixture(params=sorted(BUILDERS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_app(framework: str) -> Callable[[Mapping[str, Any]], Caller]:
    return BUILDERS[framework]


@pytest.fixture
def every_framework() -> dict[str, Callable[[Mapping[str, Any]], Caller]]:
    """The three builders at once, for tests that compare the frameworks' answers."""
    return dict(BUILDERS)


@pytest.fixture
def scoped_view_scopes() -> tuple[str, ...]:
    return SCOPED_VIEW_SCOPES
