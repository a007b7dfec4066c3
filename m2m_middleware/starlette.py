"""Pure ASGI middleware for Starlette and any other ASGI application.

``app.add_middleware(M2MMiddleware, settings=Settings(...))``. In endpoints
``request.user`` is the :class:`~m2m_middleware.Client` and
``request.auth.scopes`` its scopes, so ``@requires("orders:read")`` works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

try:
    from starlette.authentication import AuthCredentials, UnauthenticatedUser
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'm2m_middleware.starlette needs Starlette: pip install "m2m-middleware[starlette]"'
    ) from exc

from .client import Client
from .engine import Engine
from .outcome import Denied
from .settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Close code for a refused websocket: RFC 6455 "policy violation".
WS_POLICY_VIOLATION = 1008
_ANONYMOUS = UnauthenticatedUser()


class M2MMiddleware:
    def __init__(
        self,
        app: ASGIApp,
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
        self._auth_cache: dict[int, tuple[Client, AuthCredentials]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        authorization = api_key = None
        key_header = self._key_header
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
        if engine.never_blocks:
            outcome = engine.check(scope.get("method", "GET"), path, authorization, api_key)
        else:
            outcome = await engine.acheck(scope.get("method", "GET"), path, authorization, api_key)
        if isinstance(outcome, Denied):
            if kind == "websocket":
                await send(
                    {
                        "type": "websocket.close",
                        "code": WS_POLICY_VIOLATION,
                        "reason": outcome.error,
                    }
                )
            else:
                await _send_denied(outcome, send)
            return
        client = outcome.client
        if client is None:
            scope["user"] = _ANONYMOUS
            scope["auth"] = AuthCredentials()
        else:
            scope["user"] = client
            scope["auth"] = self._credentials(client)
            scope["m2m_client"] = client
        headers = outcome.headers
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

    def _credentials(self, client: Client) -> AuthCredentials:
        """``request.auth`` for a client, made once per cached client.

        Its ``scopes`` is a tuple, so sharing it between requests is safe;
        ``@requires`` only tests membership.
        """
        cached = self._auth_cache.get(id(client))
        if cached is not None and cached[0] is client:
            return cached[1]
        credentials = AuthCredentials()
        credentials.scopes = tuple(sorted(client.scopes))  # type: ignore[assignment]
        if len(self._auth_cache) >= 4096:
            self._auth_cache.clear()
        self._auth_cache[id(client)] = (client, credentials)
        return credentials


_HEADER_NAMES = {"RateLimit-Policy": b"ratelimit-policy", "RateLimit": b"ratelimit"}


def _header_name(name: str) -> bytes:
    return name.lower().encode("latin-1")


async def _send_denied(denied: Denied, send: Send) -> None:
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(denied.body)).encode()),
    ]
    headers.extend((n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in denied.headers)
    await send({"type": "http.response.start", "status": denied.status, "headers": headers})
    await send({"type": "http.response.body", "body": denied.body})


def get_client(connection: HTTPConnection) -> Client | None:
    """The authenticated :class:`Client` of a request or websocket, or None on a public path."""
    client = connection.scope.get("m2m_client")
    return client if isinstance(client, Client) else None
