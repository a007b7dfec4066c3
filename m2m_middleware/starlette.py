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
        outcome = await self.engine.acheck(
            scope.get("method", "GET"), scope["path"], authorization, api_key
        )
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
            scope["auth"] = AuthCredentials(list(client.scopes))
            scope["m2m_client"] = client
        headers = outcome.headers
        if kind != "http" or not headers:
            await self.app(scope, receive, send)
            return
        raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)


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
