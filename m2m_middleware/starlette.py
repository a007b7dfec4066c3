"""Pure ASGI middleware for Starlette and any other ASGI application.

``app.add_middleware(M2MMiddleware, settings=Settings(...))``. In endpoints
``request.user`` is the :class:`~m2m_middleware.Client` and
``request.auth.scopes`` its scopes; ``@require_scopes("orders:read")`` answers
a missing scope as Flask and Django do (Starlette's own ``@requires`` tests the
same scopes but answers its plain-text 403).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from logging import INFO
from typing import Any, TypeVar, cast

try:
    from starlette.authentication import AuthCredentials, UnauthenticatedUser
    from starlette.requests import HTTPConnection
    from starlette.responses import Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from starlette.websockets import WebSocket
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'm2m_middleware.starlette needs Starlette: pip install "m2m-middleware[starlette]"'
    ) from exc

from .audit import audit, ended
from .client import Client
from .engine import Engine
from .outcome import Allowed, Answer, Denied
from .request_view import MAX_ENDPOINT_BODY, AsgiView, ProxyHeaders, RequestView
from .scopes import ScopeRequirement
from .settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

#: Close code for a refused websocket: RFC 6455 "policy violation".
WS_POLICY_VIOLATION = 1008
#: The ASGI extension that lets an app answer a websocket handshake with an HTTP response.
WS_DENIAL_EXTENSION = "websocket.http.response"
_ANONYMOUS = UnauthenticatedUser()


class M2MCredentials(AuthCredentials):
    """``request.auth``: the client's scopes, and the realm refusals are answered in.

    Made once per cached client (and once for public paths), never per request:
    ``scopes`` is a tuple, so sharing it between requests is safe, and
    ``@requires`` only tests membership. The realm is here so that
    :func:`require_scopes` answers in the middleware's realm without a lookup.
    """

    def __init__(self, scopes: Sequence[str], realm: str, engine: Engine | None = None) -> None:
        self.scopes = tuple(scopes)  # type: ignore[assignment]
        self.realm = realm
        #: The middleware's engine, told of the refusals of ``require_scopes``.
        self.engine = engine


class M2MMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        # Positional-only, as Starlette's middleware factory protocol has it: else
        # ``add_middleware(M2MMiddleware, settings=...)`` fails type checking
        # (an ``app=`` keyword could land in both ``app`` and ``**fields``).
        /,
        settings: Settings | None = None,
        *,
        engine: Engine | None = None,
        **fields: Any,
    ) -> None:
        if settings is not None and fields:
            raise TypeError("pass either settings=Settings(...) or setting fields, not both")
        self.app = app
        self.engine = engine or Engine(settings or Settings(**fields))
        self._key_header = self.engine.header_name.lower().encode("latin-1")
        self._auth_cache: dict[int, tuple[Client, M2MCredentials]] = {}
        self._anonymous_auth = M2MCredentials((), self.engine.realm, self.engine)
        self._endpoints = self.engine.endpoints
        #: trusted_proxies is set: the proxy headers are collected in the one pass
        #: over the raw headers that finds the credentials, instead of a second one.
        self._collect_proxy = bool(self.engine.transport.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        authorization = api_key = None
        key_header = self._key_header
        proxy: ProxyHeaders | None = None
        if self._collect_proxy:
            # The loop below plus the three proxy headers: a loop of its own, so
            # that without trusted_proxies no header pays the extra comparisons.
            forwarded = xff = xfp = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    text = value.decode("latin-1")
                    authorization = text if authorization is None else f"{authorization}, {text}"
                elif name == key_header:
                    text = value.decode("latin-1")
                    api_key = text if api_key is None else f"{api_key}, {text}"
                elif name == b"x-forwarded-for":
                    text = value.decode("latin-1")
                    xff = text if xff is None else f"{xff}, {text}"
                elif name == b"x-forwarded-proto":
                    text = value.decode("latin-1")
                    xfp = text if xfp is None else f"{xfp}, {text}"
                elif name == b"forwarded":
                    text = value.decode("latin-1")
                    forwarded = text if forwarded is None else f"{forwarded}, {text}"
            proxy = (forwarded, xff, xfp)
        else:
            for name, value in scope["headers"]:
                if name == b"authorization":
                    text = value.decode("latin-1")
                    authorization = text if authorization is None else f"{authorization}, {text}"
                elif name == key_header:
                    text = value.decode("latin-1")
                    api_key = text if api_key is None else f"{api_key}, {text}"
        path = scope["path"]
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path):
            # Route on the path below the mount point, as Starlette's router
            # does (uvicorn --root-path, Mount): rules are written for that.
            rest = path[len(root_path) :]
            if not rest or rest[0] == "/":
                path = rest or "/"
        engine = self.engine
        method = scope.get("method", "GET")
        if self._endpoints and path in self._endpoints and kind == "http":
            await _send_answer(await engine.aserve(await _view(scope, receive, path)), send)
            return
        if engine.needs_view:  # transport checks: they read more than two headers
            view = _scope_view(scope, path, proxy=proxy)
            if engine.signatures is not None and kind == "http" and engine.reads_body(method, path):
                body = await _read_body(receive, engine.max_body_size)
                if body is None:
                    await _send_answer(engine.body_too_large(method, path), send)
                    return
                view.body = body
                view.raw_path = _raw_path(scope)
                receive = _replay(body, receive)  # the app reads the body we took
            if engine.never_blocks:
                outcome = engine.gate(method, path, authorization, api_key, None, view)
            else:
                outcome = await engine.agate(method, path, authorization, api_key, None, view)
        else:
            peer = scope.get("client")
            address = peer[0] if peer else None  # a key's allowed_cidrs reads it
            if engine.never_blocks:
                outcome = engine.gate(method, path, authorization, api_key, address)
            else:
                outcome = await engine.agate(method, path, authorization, api_key, address)
        if isinstance(outcome, Denied):
            if kind == "websocket":
                await _refuse_websocket(outcome, scope, send)
            else:
                await _send_answer(outcome, send)
            return
        client = outcome.client
        if client is None:
            scope["user"] = _ANONYMOUS
            scope["auth"] = self._anonymous_auth
        else:
            scope["user"] = client
            scope["auth"] = self._credentials(client)
            scope["m2m_client"] = client
        headers = outcome.headers
        if audit.isEnabledFor(INFO):  # the one per-request cost of the audit when it is off
            await self._audited(scope, receive, send, outcome, method, path)
            return
        if kind != "http" or not headers:
            await self.app(scope, receive, send)
            return
        names = _HEADER_NAMES
        raw = [
            (names.get(name) or _header_name(name), value.encode("latin-1"))
            for name, value in headers
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A new message: the app's own may be a constant it reuses.
                message = {**message, "headers": [*message.get("headers", ()), *raw]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _audited(
        self, scope: Scope, receive: Receive, send: Send, outcome: Allowed, method: str, path: str
    ) -> None:
        """Run the app, then write the request's one audit record: how it ended."""
        answer = _Answer(send, _raw_headers(outcome.headers) if scope["type"] == "http" else [])
        try:
            await self.app(scope, receive, answer.send)
        finally:
            ended(outcome, method, path, answer.status, scope.get("m2m_denied"))

    def _credentials(self, client: Client) -> M2MCredentials:
        """``request.auth`` for a client, made once per cached client."""
        cached = self._auth_cache.get(id(client))
        if cached is not None and cached[0] is client:
            return cached[1]
        credentials = M2MCredentials(sorted(client.scopes), self.engine.realm, self.engine)
        if len(self._auth_cache) >= 4096:
            self._auth_cache.clear()
        self._auth_cache[id(client)] = (client, credentials)
        return credentials


_HEADER_NAMES = {"RateLimit-Policy": b"ratelimit-policy", "RateLimit": b"ratelimit"}


def _header_name(name: str) -> bytes:
    return name.lower().encode("latin-1")


def _raw_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(_header_name(name), value.encode("latin-1")) for name, value in headers]


#: The status each handshake message means to the client (ASGI spec: a close before
#: ``websocket.accept`` is a 403); ``websocket.http.response.start`` carries its own.
_HANDSHAKE_STATUS = {"websocket.accept": 101, "websocket.close": 403}


class _Answer:
    """Passes the app's messages on, noting the status the client gets (for the audit)
    and adding the rate-limit headers to an HTTP response."""

    __slots__ = ("_headers", "_send", "status")

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        self._send = send
        self._headers = headers
        self.status: int | None = None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" or kind == "websocket.http.response.start":
            self.status = message["status"]
            if self._headers:
                message = {**message, "headers": [*message.get("headers", ()), *self._headers]}
        elif self.status is None and kind in _HANDSHAKE_STATUS:
            self.status = _HANDSHAKE_STATUS[kind]
        await self._send(message)


def _denial_headers(answer: Answer) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", answer.content_type.encode("latin-1")),
        (b"content-length", str(len(answer.body)).encode()),
    ]
    headers.extend((n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in answer.headers)
    return headers


async def _send_answer(answer: Answer, send: Send, kind: str = "http") -> None:
    """A denial or an endpoint's answer; ``kind="websocket"`` sends it as a handshake's answer."""
    prefix = "websocket.http" if kind == "websocket" else "http"
    await send(
        {
            "type": f"{prefix}.response.start",
            "status": answer.status,
            "headers": _denial_headers(answer),
        }
    )
    await send({"type": f"{prefix}.response.body", "body": answer.body})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it is over ``limit`` bytes (a 413)."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break  # http.disconnect: what came is all there is; its digest will tell
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app after the middleware read the body: the body first, whole,
    then whatever the server says next (``http.disconnect``)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _raw_path(scope: Scope) -> str:
    """The path the client sent (its ``@target-uri``'s), mount prefix included."""
    from .signatures import asgi_request_path, quoted_path

    return asgi_request_path(scope) or quoted_path(scope["path"])


async def _view(scope: Scope, receive: Receive, path: str) -> RequestView:
    """The neutral view of a request to an endpoint the middleware answers, body read
    (up to :data:`MAX_ENDPOINT_BODY`; None past it) for a POST."""
    body = await _read_body(receive, MAX_ENDPOINT_BODY) if scope.get("method") == "POST" else b""
    return _scope_view(scope, path, body)


def _scope_view(
    scope: Scope, path: str, body: bytes | None = b"", proxy: ProxyHeaders | None = None
) -> RequestView:
    """The neutral view of an ASGI request; its headers are decoded on first use.

    ``proxy``: the proxy headers, when the caller collected them already."""
    client = scope.get("client")
    return AsgiView(
        scope.get("method", "GET"),
        path,
        scope["headers"],
        scope.get("scheme") or ("ws" if scope["type"] == "websocket" else "http"),
        client[0] if client else None,
        scope.get("query_string", b""),
        body,
        proxy,
    )


async def _refuse_websocket(denied: Denied, scope: Scope, send: Send) -> None:
    """Refuse a handshake (before ``websocket.accept``) with the HTTP answer, where possible.

    With the ASGI websocket denial response extension (offered by each of
    uvicorn's implementations: websockets, websockets-sansio, wsproto; see
    tests/integration/test_websocket_refusals.py) the client gets the status,
    headers and problem body an HTTP request would. Without it all an app can
    send is a close, which uvicorn turns into a bare 403: 1008 (policy
    violation), with the error code as the reason.
    """
    if WS_DENIAL_EXTENSION in (scope.get("extensions") or ()):
        await _send_answer(denied, send, "websocket")
    else:
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": denied.error})


def get_client(connection: HTTPConnection) -> Client | None:
    """The authenticated :class:`Client` of a request or websocket, or None on a public path."""
    client = connection.scope.get("m2m_client")
    return client if isinstance(client, Client) else None


def denied_response(denied: Denied) -> Response:
    """A :class:`Denied` as a Starlette response: the bytes the middleware itself sends."""
    response = Response(denied.body, status_code=denied.status)
    response.raw_headers = _denial_headers(denied)
    return response


def require_scopes(*scopes: str) -> Callable[[F], F]:
    """Refuse a request or websocket unless the client has every one of ``scopes``.

    The answer is the one Flask's and Django's ``require_scopes`` (and route
    rules) give: 403 ``insufficient_scope`` with ``WWW-Authenticate`` naming the
    scopes, or 401 ``missing_credentials`` on a public path (no client), as
    problem+json. A websocket is refused before it is accepted, the way the
    middleware refuses one. Works on async and sync endpoints (Starlette runs a
    sync one in a thread; the wrapper stays sync so that it still does) and on
    ``HTTPEndpoint`` methods. A scope that is not an RFC 6749 scope token is a
    ConfigError here, when the endpoint is defined.
    """
    requirement = ScopeRequirement(scopes)

    def decorator(endpoint: F) -> F:
        if _is_async(endpoint):

            @functools.wraps(endpoint)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                connection = _connection(endpoint, args, kwargs)
                client = get_client(connection)
                if requirement.admits(client):
                    return await endpoint(*args, **kwargs)
                denied = _refused(requirement, connection, client)
                if isinstance(connection, WebSocket):
                    await _refuse_websocket(denied, connection.scope, connection.send)
                    return None
                return denied_response(denied)

            return cast(F, async_wrapper)

        @functools.wraps(endpoint)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            connection = _connection(endpoint, args, kwargs)
            if isinstance(connection, WebSocket):
                raise TypeError(
                    f"require_scopes: the websocket endpoint {endpoint!r} must be async"
                )
            client = get_client(connection)
            if requirement.admits(client):
                return endpoint(*args, **kwargs)
            return denied_response(_refused(requirement, connection, client))

        return cast(F, wrapper)

    return decorator


def _refused(
    requirement: ScopeRequirement, connection: HTTPConnection, client: Client | None
) -> Denied:
    auth = connection.scope.get("auth")
    if not isinstance(auth, M2MCredentials):
        raise RuntimeError(
            "require_scopes needs M2MMiddleware in front of the app: "
            "app.add_middleware(M2MMiddleware, settings=Settings(...))"
        )
    denied = requirement.refuse(client, auth.realm)
    connection.scope["m2m_denied"] = denied  # the refusal, for whoever audits the request
    if auth.engine is not None:
        auth.engine.app_refused(denied)  # usage, metrics and alerts count it refused
    return denied


def _connection(endpoint: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HTTPConnection:
    """The Request or WebSocket among an endpoint's arguments, wherever it stands.

    By type rather than by parameter name (Starlette's ``@requires`` insists on
    ``request``/``websocket``): a route function gets it first, an
    ``HTTPEndpoint`` method after ``self``, FastAPI passes it by keyword.
    """
    for value in args:
        if isinstance(value, HTTPConnection):
            return value
    for value in kwargs.values():
        if isinstance(value, HTTPConnection):
            return value
    raise TypeError(f"require_scopes: {endpoint!r} was called without a Request or WebSocket")


def _is_async(endpoint: Any) -> bool:
    """Starlette's own test (``starlette._utils.is_async_callable``, which is private)."""
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    return inspect.iscoroutinefunction(endpoint) or (
        callable(endpoint) and inspect.iscoroutinefunction(endpoint.__call__)
    )
