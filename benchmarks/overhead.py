"""Per-request overhead of API-key auth + per-client rate limiting, per framework.

For Starlette, Flask and Django this times a bare endpoint, the same endpoint
behind m2m-middleware, and the fastest equivalent a user would assemble today
from the usual libraries (slowapi, Flask-Limiter, Django REST framework,
djangorestframework-api-key). Every variant authenticates one API key from the
``X-API-Key`` header and charges an in-memory limit high enough never to trip.

The apps are called directly: a WSGI environ dict and ``app(environ,
start_response)`` with the body iterable consumed and closed, or an ASGI scope
and ``await app(scope, receive, send)`` many times inside one event-loop run.
No sockets, no test clients. Variants are timed round-robin (the start of the
order rotates each round), and each variant's result is the median of its
per-round mean times. Overhead is that median minus the median of the bare
app of the same framework.

Run ``python benchmarks/overhead.py --help`` for the options. Needs the
``bench`` extra: ``pip install -e ".[bench]"``. Not a pytest test: it calls
``django.conf.settings.configure()``, so run it in its own process.
``jwt_overhead.py`` and ``redis_overhead.py`` import this module's drivers and
apps to do the same for JWT bearer tokens and for limits counted in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import io
import itertools
import logging
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

FRAMEWORKS = ("starlette", "flask", "django")
LIMIT = "1000000/second"  # high enough that no variant ever answers 429
DRF_RATE = "1000000/second"
CLIENT_ID = "bench-client"

CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}
clock = CLOCKS["wall"]  # set from --clock before anything is timed

# (status, headers, body) of a single request, for the pre-flight checks.
Reply = tuple[int, dict[str, str], bytes]
# A header whose value differs on every request: its name, and a function that
# hands out the next n values (called before the timed loop, never inside it).
Rotating = tuple[str, Callable[[int], list[str]]]


@dataclass
class Variant:
    framework: str  # "starlette" | "flask" | "django" | "-" (the raw floor)
    stack: str
    role: str  # "bare" | "ours" | "peer" | "floor"
    run: Callable[[int], tuple[int, int]]  # n -> (elapsed ns, requests not answered 200)
    round_means_us: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.round_means_us)


# -- drivers ------------------------------------------------------------------------------


def _sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def wsgi_environ(path: str, headers: dict[str, str]) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def wsgi_request(app: Any, path: str, headers: dict[str, str]) -> Reply:
    seen: list[Any] = []

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None):
        seen[:] = [status, response_headers]
        return lambda data: None

    body_iter = app(wsgi_environ(path, headers), start_response)
    try:
        body = b"".join(body_iter)
    finally:
        close = getattr(body_iter, "close", None)
        if close is not None:
            close()
    status, response_headers = seen
    return int(status.split()[0]), {k.lower(): v for k, v in response_headers}, body


def _requests(
    base: dict[str, Any], n: int, rotating: Rotating | None, key: str, convert: Callable[[str], Any]
) -> Iterator[dict[str, Any]]:
    """n times the request ``base``; with ``rotating``, ``base[key]`` set anew before each."""
    if rotating is None:
        return itertools.repeat(base, n)
    values = [convert(value) for value in rotating[1](n)]

    def each() -> Iterator[dict[str, Any]]:
        for value in values:
            base[key] = value
            yield base

    return each()


def wsgi_runner(
    app: Any, path: str, headers: dict[str, str], rotating: Rotating | None = None
) -> Callable[[int], tuple[int, int]]:
    base = wsgi_environ(path, headers)
    key = "HTTP_" + rotating[0].upper().replace("-", "_") if rotating else ""
    box = [""]

    def write(data: bytes) -> None:
        pass

    def start_response(status: str, response_headers: Any, exc_info: Any = None) -> Any:
        box[0] = status
        return write

    def run(n: int) -> tuple[int, int]:
        bad = 0
        ok = "200 OK"
        environs = _requests(base, n, rotating, key, str)
        perf = clock
        t0 = perf()
        for environ in environs:
            body = app(environ.copy(), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
            if box[0] != ok:
                bad += 1
        return perf() - t0, bad

    return run


def asgi_scope(path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


_REQUEST_MESSAGE = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> dict[str, Any]:
    return _REQUEST_MESSAGE


def asgi_request(
    loop: asyncio.AbstractEventLoop, app: Any, path: str, headers: dict[str, str]
) -> Reply:
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    loop.run_until_complete(app(asgi_scope(path, headers), _receive, send))
    found = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", ())}
    return start["status"], found, b"".join(chunks)


def asgi_runner(
    loop: asyncio.AbstractEventLoop,
    app: Any,
    path: str,
    headers: dict[str, str],
    rotating: Rotating | None = None,
) -> Callable[[int], tuple[int, int]]:
    base = asgi_scope(path, headers)
    box = [0]
    name = rotating[0].lower().encode("latin-1") if rotating else b""
    fixed = [h for h in base["headers"] if h[0] != name]

    def header_list(value: str) -> list[tuple[bytes, bytes]]:
        return [*fixed, (name, value.encode("latin-1"))]

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            box[0] = message["status"]

    async def many(n: int) -> tuple[int, int]:
        bad = 0
        scopes = _requests(base, n, rotating, "headers", header_list)
        perf = clock
        receive = _receive
        t0 = perf()
        for scope in scopes:
            await app(scope.copy(), receive, send)
            if box[0] != 200:
                bad += 1
        return perf() - t0, bad

    def run(n: int) -> tuple[int, int]:
        return loop.run_until_complete(many(n))

    return run


def check_variant(
    label: str,
    request: Callable[[dict[str, str]], Reply],
    good_headers: dict[str, str],
    deny_status: int | None,
    role: str,
    wrong_headers: dict[str, str] | None = None,
) -> None:
    """The authenticated request must be a 200; one without a key must be refused.

    So must one with a wrong credential (by default a made-up API key). Also
    makes sure each variant really runs the stack it is named after: only
    m2m-middleware adds ``RateLimit-Policy``.
    """
    status, headers, body = request(good_headers)
    if status != 200:
        raise SystemExit(f"{label}: expected 200 with a valid key, got {status}: {body[:300]!r}")
    if ("ratelimit-policy" in headers) != (role == "ours"):
        state = "missing" if role == "ours" else "present"
        raise SystemExit(f"{label}: RateLimit-Policy header {state}")
    if deny_status is not None:
        status, _, body = request({})
        if status != deny_status:
            raise SystemExit(
                f"{label}: expected {deny_status} without a key, got {status}: {body[:300]!r}"
            )
        status, _, body = request(wrong_headers or {"X-API-Key": "m2m_not-a-real-key"})
        if status not in (401, 403):
            raise SystemExit(f"{label}: expected 401/403 for a wrong credential, got {status}")


def wsgi_variant(
    framework: str,
    stack: str,
    role: str,
    app: Any,
    path: str,
    headers: dict[str, str],
    deny_status: int | None,
    *,
    wrong_headers: dict[str, str] | None = None,
    rotating: Rotating | None = None,
) -> Variant:
    """A checked (see :func:`check_variant`) WSGI variant."""
    check_variant(
        f"{framework}/{stack}",
        lambda h: wsgi_request(app, path, h),
        headers,
        deny_status,
        role,
        wrong_headers,
    )
    return Variant(framework, stack, role, wsgi_runner(app, path, headers, rotating))


def asgi_variant(
    loop: asyncio.AbstractEventLoop,
    framework: str,
    stack: str,
    role: str,
    app: Any,
    headers: dict[str, str],
    deny_status: int | None,
    *,
    wrong_headers: dict[str, str] | None = None,
    rotating: Rotating | None = None,
) -> Variant:
    """A checked (see :func:`check_variant`) ASGI variant, requesting ``/``."""
    check_variant(
        f"{framework}/{stack}",
        lambda h: asgi_request(loop, app, "/", h),
        headers,
        deny_status,
        role,
        wrong_headers,
    )
    return Variant(framework, stack, role, asgi_runner(loop, app, "/", headers, rotating))


# -- the raw floor ----------------------------------------------------------------------------


def build_floor() -> list[Variant]:
    from limits import parse
    from limits.storage import MemoryStorage
    from limits.strategies import FixedWindowRateLimiter

    key = "m2m_" + "k" * 38
    table = {_sha256_hex(key): CLIENT_ID}
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = parse(LIMIT)

    def run(n: int) -> tuple[int, int]:
        bad = 0
        sha256 = hashlib.sha256
        hit = limiter.hit
        perf = clock
        t0 = perf()
        for _ in range(n):
            client = table[sha256(key.encode()).hexdigest()]
            if not hit(item, "floor", client):
                bad += 1
        return perf() - t0, bad

    return [Variant("-", "raw floor: sha256 + dict lookup + limits hit", "floor", run)]


# -- Starlette ---------------------------------------------------------------------------------


def starlette_app(middleware: list[Any] | None = None, endpoint: Any = None) -> Any:
    """One route, ``/``, answering ``ok`` in plain text (``endpoint`` replaces the default)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", endpoint or hello)], middleware=middleware)


def _starlette_unauthorized(conn: Any, exc: Exception) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(str(exc), status_code=401)


def _starlette_client(request: Any) -> str:
    return str(request.user.username)


def starlette_auth_middleware(backend: Any) -> Any:
    """Starlette's ``AuthenticationMiddleware`` with ``backend``; refusals are 401s."""
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware

    return Middleware(AuthenticationMiddleware, backend=backend, on_error=_starlette_unauthorized)


def _with_slowapi(app: Any, limiter: Any) -> Any:
    from slowapi import _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded

    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    return app


def starlette_key_backend(table: dict[str, str]) -> Any:
    """An ``AuthenticationBackend``: the SHA-256 of ``X-API-Key`` looked up in ``table``.

    ``table`` maps hex digests to client ids; the user is a ``SimpleUser`` named
    after the client. No key, or an unknown one, is an ``AuthenticationError``.
    """
    from starlette.authentication import (
        AuthCredentials,
        AuthenticationBackend,
        AuthenticationError,
        SimpleUser,
    )
    from starlette.requests import HTTPConnection

    class HashedKeyBackend(AuthenticationBackend):
        async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
            supplied = conn.headers.get("x-api-key")
            if supplied is None:
                raise AuthenticationError("missing API key")
            client = table.get(hashlib.sha256(supplied.encode()).hexdigest())
            if client is None:
                raise AuthenticationError("invalid API key")
            return AuthCredentials(["authenticated"]), SimpleUser(client)

    return HashedKeyBackend()


def starlette_slowapi_decorated(
    backend: Any, limit: str = LIMIT, storage_uri: str = "memory://"
) -> Any:
    """Peer: ``AuthenticationMiddleware`` + slowapi's ``@limiter.limit``, keyed on the user."""
    from slowapi import Limiter as SlowLimiter
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    limiter = SlowLimiter(key_func=_starlette_client, storage_uri=storage_uri)

    @limiter.limit(limit)
    async def limited_hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return _with_slowapi(
        starlette_app([starlette_auth_middleware(backend)], limited_hello), limiter
    )


def build_starlette(loop: asyncio.AbstractEventLoop) -> list[Variant]:
    from slowapi import Limiter as SlowLimiter
    from slowapi.middleware import SlowAPIASGIMiddleware
    from starlette.middleware import Middleware

    from m2m_middleware import Settings, open_key_store
    from m2m_middleware.starlette import M2MMiddleware

    store = open_key_store("memory://")
    key = store.create_key(CLIENT_ID).key
    good = {"X-API-Key": key}
    table = {_sha256_hex(key): CLIENT_ID}

    bare = starlette_app()

    ours = starlette_app()
    ours.add_middleware(
        M2MMiddleware,
        settings=Settings(key_store=store, default_limits=LIMIT, rate_limit_storage="memory://"),
    )

    # Peer 1: AuthenticationMiddleware + slowapi's @limiter.limit decorator.
    peer_deco = starlette_slowapi_decorated(starlette_key_backend(table))

    # Peer 2: AuthenticationMiddleware + slowapi's pure-ASGI middleware with default limits.
    mw_limiter = SlowLimiter(
        key_func=_starlette_client, default_limits=[LIMIT], storage_uri="memory://"
    )
    peer_mw = _with_slowapi(
        starlette_app(
            [
                starlette_auth_middleware(starlette_key_backend(table)),
                Middleware(SlowAPIASGIMiddleware),
            ]
        ),
        mw_limiter,
    )

    specs = [
        ("bare (Route + PlainTextResponse)", "bare", bare, None),
        ("ours: M2MMiddleware", "ours", ours, 401),
        ("peer: AuthenticationMiddleware + slowapi @limit", "peer", peer_deco, 401),
        ("peer: AuthenticationMiddleware + SlowAPIASGIMiddleware", "peer", peer_mw, 401),
    ]
    return [
        asgi_variant(loop, "starlette", stack, role, app, good, deny)
        for stack, role, app, deny in specs
    ]


# -- Flask -------------------------------------------------------------------------------------


def flask_app() -> Any:
    """A Flask app with one route, ``/``, answering ``ok``."""
    from flask import Flask

    app = Flask(__name__)

    @app.get("/")
    def hello() -> str:
        return "ok"

    return app


def flask_key_check(app: Any, table: dict[str, str]) -> None:
    """A ``before_request`` hook: the SHA-256 of ``X-API-Key`` looked up in ``table``.

    Sets ``g.client_id``, or aborts with 401 when the key is missing or unknown.
    """
    from flask import abort, g, request

    @app.before_request
    def check_api_key() -> None:
        supplied = request.headers.get("X-API-Key")
        if supplied is None:
            abort(401)
        client = table.get(hashlib.sha256(supplied.encode()).hexdigest())
        if client is None:
            abort(401)
        g.client_id = client


def flask_limiter(app: Any, limits: str = LIMIT, storage_uri: str = "memory://") -> None:
    """Flask-Limiter with default limits keyed on ``g.client_id``.

    Call it after registering the ``before_request`` hook that sets
    ``g.client_id``, so that hook runs first.
    """
    from flask import g
    from flask_limiter import Limiter

    Limiter(
        key_func=lambda: g.client_id,
        app=app,
        default_limits=[limits],
        storage_uri=storage_uri,
    )


def build_flask() -> list[Variant]:
    from m2m_middleware import Settings, open_key_store
    from m2m_middleware.flask import M2MAuth

    store = open_key_store("memory://")
    key = store.create_key(CLIENT_ID).key
    good = {"X-API-Key": key}
    table = {_sha256_hex(key): CLIENT_ID}

    bare = flask_app()

    ours = flask_app()
    M2MAuth(
        ours,
        settings=Settings(key_store=store, default_limits=LIMIT, rate_limit_storage="memory://"),
    )

    peer = flask_app()
    flask_key_check(peer, table)
    flask_limiter(peer)

    specs = [
        ("bare (one route)", "bare", bare, None),
        ("ours: M2MAuth", "ours", ours, 401),
        ("peer: before_request sha256 check + Flask-Limiter", "peer", peer, 401),
    ]
    return [
        wsgi_variant("flask", stack, role, app, "/", good, deny) for stack, role, app, deny in specs
    ]


# -- Django ------------------------------------------------------------------------------------


def configure_django(
    m2m_auth: dict[str, Any], *, caches: dict[str, Any] | None = None, **extra: Any
) -> None:
    """The one process-wide Django configuration, with ``M2M_AUTH`` and ``extra`` settings.

    ``CACHES`` has a ``LocMemCache`` as ``default``; ``caches`` adds more aliases.

    What differs per variant is the handler's middleware chain (fixed when the
    handler is built, see :func:`django_handler`) and the URL it requests.
    Runs ``django.setup()`` and the migrations (in-memory SQLite).
    """
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="benchmark-only-not-secret",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=_DJANGO_URLS,
        MIDDLEWARE=[],
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "rest_framework",
            "rest_framework_api_key",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            **(caches or {}),
        },
        USE_TZ=True,
        LOGGING_CONFIG=None,
        M2M_AUTH=m2m_auth,
        **extra,
    )
    django.setup()
    # The pre-flight checks send refused requests on purpose; don't log each one.
    logging.getLogger("django.request").setLevel(logging.ERROR)

    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


_DJANGO_URLS = "_m2m_bench_urls"


def django_urls(views: dict[str, Any]) -> None:
    """The URLconf: ``""`` answers ``ok`` in plain text; ``views`` maps more paths to views."""
    from django.http import HttpRequest, HttpResponse
    from django.urls import path

    def hello(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok", content_type="text/plain")

    urls = types.ModuleType(_DJANGO_URLS)
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("", hello),
        *(path(route, view) for route, view in views.items()),
    ]
    sys.modules[urls.__name__] = urls


def django_handler(middleware: list[str]) -> Any:
    """A WSGI handler with this middleware chain (loaded now, kept for its lifetime)."""
    from django.core.wsgi import get_wsgi_application
    from django.test.utils import override_settings

    with override_settings(MIDDLEWARE=middleware):
        return get_wsgi_application()


def django_plain_view(**attributes: Any) -> Any:
    """A DRF ``APIView`` answering ``ok`` in plain text, with these class attributes."""
    from django.http import HttpResponse
    from rest_framework.renderers import JSONRenderer
    from rest_framework.views import APIView

    class PlainTextView(APIView):
        renderer_classes = (JSONRenderer,)

        def get(self, request: Any) -> HttpResponse:
            return HttpResponse("ok", content_type="text/plain")

    return type("BenchView", (PlainTextView,), attributes).as_view()


def drf_key_authentication(table: dict[str, str]) -> type:
    """A DRF authentication class: the SHA-256 of ``X-API-Key`` looked up in ``table``.

    The user is an object with ``client_id`` (and ``pk``) set to the client;
    no key means not authenticated, an unknown one ``AuthenticationFailed``.
    Django must be configured first.
    """
    from rest_framework.authentication import BaseAuthentication
    from rest_framework.exceptions import AuthenticationFailed

    class KeyClient:
        is_authenticated = True
        is_anonymous = False

        def __init__(self, client_id: str) -> None:
            self.client_id = self.pk = client_id

    users = {digest: KeyClient(client) for digest, client in table.items()}

    class HashedAPIKeyAuthentication(BaseAuthentication):
        def authenticate(self, request: Any) -> tuple[KeyClient, None] | None:
            supplied = request.META.get("HTTP_X_API_KEY")
            if not supplied:
                return None
            user = users.get(hashlib.sha256(supplied.encode()).hexdigest())
            if user is None:
                raise AuthenticationFailed("invalid API key")
            return user, None

        def authenticate_header(self, request: Any) -> str:
            return 'ApiKey realm="api"'

    return HashedAPIKeyAuthentication


def drf_client_throttle(rate: str = DRF_RATE, scope: str = "client", cache: Any = None) -> type:
    """A ``SimpleRateThrottle`` at ``rate``, keyed on ``request.user.client_id``.

    ``cache`` replaces DRF's default cache (``caches["default"]``); ``scope``
    is part of the cache key, so throttles of one view need distinct scopes.
    """
    from rest_framework.throttling import SimpleRateThrottle

    class ClientRateThrottle(SimpleRateThrottle):
        def get_cache_key(self, request: Any, view: Any) -> str:
            return self.cache_format % {"scope": self.scope, "ident": request.user.client_id}

    attributes: dict[str, Any] = {"scope": scope, "rate": rate}
    if cache is not None:
        attributes["cache"] = cache
    return type("ClientRateThrottle", (ClientRateThrottle,), attributes)


def build_django() -> list[Variant]:
    from m2m_middleware import open_key_store

    store = open_key_store("memory://")
    key = store.create_key(CLIENT_ID).key
    good = {"X-API-Key": key}
    table = {_sha256_hex(key): CLIENT_ID}

    configure_django(
        {"key_store": store, "default_limits": LIMIT, "rate_limit_storage": "memory://"},
        API_KEY_CUSTOM_HEADER="HTTP_X_API_KEY",
    )

    from rest_framework.permissions import IsAuthenticated
    from rest_framework.throttling import SimpleRateThrottle
    from rest_framework_api_key.models import APIKey
    from rest_framework_api_key.permissions import HasAPIKey

    _, drf_key = APIKey.objects.create_key(name="bench")

    class KeyPrefixRateThrottle(SimpleRateThrottle):
        """drf-api-key identifies a key by the prefix before the dot."""

        scope = "api_key"
        rate = DRF_RATE

        def get_cache_key(self, request: Any, view: Any) -> str:
            prefix = request.META["HTTP_X_API_KEY"].partition(".")[0]
            return self.cache_format % {"scope": self.scope, "ident": prefix}

    django_urls(
        {
            "drf": django_plain_view(
                authentication_classes=(drf_key_authentication(table),),
                permission_classes=(IsAuthenticated,),
                throttle_classes=(drf_client_throttle(),),
            ),
            "drf-api-key": django_plain_view(
                authentication_classes=(),
                permission_classes=(HasAPIKey,),
                throttle_classes=(KeyPrefixRateThrottle,),
            ),
        }
    )
    plain = django_handler([])
    ours = django_handler(["m2m_middleware.django.M2MAuthMiddleware"])

    specs = [
        ("bare (function view, no middleware)", "bare", plain, "/", good, None),
        ("ours: M2MAuthMiddleware", "ours", ours, "/", good, 401),
        (
            "peer: DRF APIView + sha256 auth class + SimpleRateThrottle",
            "peer",
            plain,
            "/drf",
            good,
            401,
        ),
        (
            # With no authentication classes DRF refuses with 403, not 401.
            "peer: DRF APIView + drf-api-key HasAPIKey + SimpleRateThrottle",
            "peer",
            plain,
            "/drf-api-key",
            {"X-API-Key": drf_key},
            403,
        ),
    ]
    return [
        wsgi_variant("django", stack, role, app, url, headers, deny)
        for stack, role, app, url, headers, deny in specs
    ]


# -- running and reporting ----------------------------------------------------------------------


def measure(
    variants: list[Variant],
    rounds: int,
    requests: int,
    warmup: int,
    after_warmup: Callable[[list[Variant]], None] | None = None,
) -> None:
    """Warm every variant up, call ``after_warmup(variants)``, then time the rounds."""
    for variant in variants:
        _elapsed, bad = variant.run(warmup)
        if bad:
            raise SystemExit(f"{variant.framework}/{variant.stack}: {bad} non-200s in warm-up")
    if after_warmup is not None:
        after_warmup(variants)
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            gc.collect()
            elapsed, bad = variant.run(requests)
            if bad:
                raise SystemExit(
                    f"{variant.framework}/{variant.stack}: {bad} of {requests} requests "
                    f"were not answered 200 in round {r + 1}"
                )
            variant.round_means_us.append(elapsed / requests / 1000)


def _fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def overheads(variants: list[Variant]) -> dict[int, float | None]:
    """Each variant's overhead (by ``id``): its median minus its framework's bare median.

    A raw floor's overhead is its median; a bare app has none.
    """
    bare = {v.framework: v.median_us for v in variants if v.role == "bare"}
    found: dict[int, float | None] = {}
    for v in variants:
        if v.role == "floor":
            found[id(v)] = v.median_us
        elif v.role == "bare":
            found[id(v)] = None
        else:
            found[id(v)] = v.median_us - bare[v.framework]
    return found


def report(variants: list[Variant], verbose: bool) -> list[str]:
    bare = {v.framework: v.median_us for v in variants if v.role == "bare"}
    ours = {v.framework: v.median_us - bare[v.framework] for v in variants if v.role == "ours"}
    overhead_of = overheads(variants)
    header = ["framework", "stack", "median us/request", "overhead us", "overhead ratio vs ours"]
    rows = []
    for v in variants:
        overhead = overhead_of[id(v)]
        ratio = None
        if overhead is not None and v.framework in ours and ours[v.framework] > 0:
            ratio = overhead / ours[v.framework]
        rows.append([v.framework, v.stack, _fmt(v.median_us), _fmt(overhead), _fmt(ratio, "x")])
    out = markdown_table(header, rows)
    out.append("")
    floor = next((v.median_us for v in variants if v.role == "floor"), None)
    for framework in FRAMEWORKS:
        if framework not in ours:
            continue
        peers = [v for v in variants if v.framework == framework and v.role == "peer"]
        best = min(peers, key=lambda v: v.median_us)
        peer_overhead = best.median_us - bare[framework]
        mine = ours[framework]
        text = (
            f"{framework}: ours {mine:+.2f} us, fastest peer {peer_overhead:+.2f} us "
            f"({best.stack.removeprefix('peer: ')}), "
            f"peer/ours {_ratio(peer_overhead, mine)}"
        )
        if floor:
            text += f", ours/raw floor {_ratio(mine, floor)}"
        out.append(text)
    if verbose:
        out += round_means(variants)
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, every column but the first two right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = set(range(2, len(header)))

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    out = [line(header)]
    out.append(
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    out.extend(line(r) for r in rows)
    return out


def round_means(variants: list[Variant]) -> list[str]:
    """For ``--verbose``: every variant's per-round means."""
    out = ["", "round means (us/request), in round order:"]
    for v in variants:
        means = " ".join(f"{m:.2f}" for m in v.round_means_us)
        out.append(f"  {v.framework}/{v.stack}: {means}")
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def versions(frameworks: Iterable[str], extra: Iterable[str] = ()) -> str:
    wanted = ["m2m-middleware", "limits", *extra]
    per_framework = {
        "starlette": ["starlette", "slowapi"],
        "flask": ["flask", "werkzeug", "flask-limiter"],
        "django": ["django", "djangorestframework", "djangorestframework-api-key"],
    }
    for framework in frameworks:
        wanted += per_framework[framework]
    found = []
    for name in wanted:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.machine()}); " + ", ".join(found)
    )


def parse_args(
    argv: list[str] | None,
    description: str,
    requests: int = 2000,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if add_options is not None:
        add_options(parser)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"requests per variant per round (default {requests})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few small rounds: a smoke run for CI, not numbers"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=FRAMEWORKS,
        help="measure only this framework (repeatable); the raw floors are always measured",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter_ns (default); cpu: time.process_time_ns, which leaves out "
        "time this process spends descheduled, steadier on a busy machine",
    )
    parser.add_argument("--verbose", action="store_true", help="also print every round's mean")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.requests is None:
        args.requests = 100 if args.quick else requests
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be at least 1")
    args.warmup = max(20, args.requests // 4)
    return args


def build_all(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    variants = build_floor()
    if "starlette" in frameworks:
        variants += build_starlette(loop)
    if "flask" in frameworks:
        variants += build_flask()
    if "django" in frameworks:
        variants += build_django()
    return variants


def run_benchmark(
    argv: list[str] | None,
    *,
    description: str,
    build: Callable[[argparse.Namespace, list[str], asyncio.AbstractEventLoop], list[Variant]],
    report: Callable[[list[Variant], bool], list[str]],
    packages: Iterable[str] = (),
    requests: int = 2000,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
    after_warmup: Callable[[list[Variant], argparse.Namespace], None] | None = None,
) -> int:
    """Parse the options, build the variants, time them and print the report.

    ``build(args, frameworks, loop)`` returns the checked variants; ``packages``
    are more distributions whose versions the report names; ``requests`` is the
    default of ``--requests``; ``add_options(parser)`` adds a script's own
    options; ``after_warmup(variants, args)`` runs between the warm-up and the
    first timed round (say, to count something per request, untimed).
    """
    global clock
    args = parse_args(argv, description, requests, add_options)
    clock = CLOCKS[args.clock]
    frameworks = [f for f in FRAMEWORKS if not args.only or f in args.only]
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    started = time.perf_counter()
    try:
        variants = build(args, frameworks, loop)
        measure(
            variants,
            args.rounds,
            args.requests,
            args.warmup,
            None if after_warmup is None else lambda found: after_warmup(found, args),
        )
    finally:
        # As asyncio.run does: lets clients bound to the loop close on it.
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    print(versions(frameworks, packages))
    print(
        f"{args.rounds} interleaved rounds x {args.requests} requests per variant "
        f"(warm-up {args.warmup}), {args.clock} clock; median of per-round means; "
        f"overhead = median - median(bare app of the same framework)"
    )
    if args.quick:
        print("--quick: a smoke run; these numbers are too short-lived to quote")
    print()
    for text in report(variants, args.verbose):
        print(text)
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(
        argv,
        description="Per-request overhead of API-key auth + rate limiting, per framework.",
        build=build_all,
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
