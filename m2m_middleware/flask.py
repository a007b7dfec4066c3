"""Flask extension: ``M2MAuth(app)`` or ``M2MAuth().init_app(app)``.

Settings come from ``settings=`` or the mapping ``app.config["M2M_AUTH"]``.
In a view ``g.m2m_client`` and ``current_client`` are the
:class:`~m2m_middleware.Client`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

try:
    from flask import Flask, Response, current_app, g, request
    from werkzeug.local import LocalProxy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'm2m_middleware.flask needs Flask: pip install "m2m-middleware[flask]"'
    ) from exc

from .client import Client
from .engine import Engine
from .errors import InsufficientScope, MissingCredentials
from .outcome import Denied, deny
from .settings import Settings

EXTENSION_KEY = "m2m_middleware"
F = TypeVar("F", bound=Callable[..., Any])


class _State:
    __slots__ = ("engine", "environ_key")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.environ_key = "HTTP_" + engine.header_name.upper().replace("-", "_")


class M2MAuth:
    def __init__(
        self, app: Flask | None = None, *, settings: Settings | None = None, **fields: Any
    ) -> None:
        if settings is not None and fields:
            raise TypeError("pass either settings=Settings(...) or setting fields, not both")
        self.settings = (
            settings if settings is not None else (Settings(**fields) if fields else None)
        )
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, settings: Settings | None = None) -> None:
        chosen = settings or self.settings or Settings.from_mapping(app.config.get("M2M_AUTH"))
        app.extensions[EXTENSION_KEY] = _State(Engine(chosen))
        app.before_request(_authenticate)
        app.after_request(_add_headers)

    @staticmethod
    def engine(app: Flask | None = None) -> Engine:
        """The engine serving ``app`` (default: the current app)."""
        target = app if app is not None else current_app
        state: _State = target.extensions[EXTENSION_KEY]
        return state.engine


def _denied_response(denied: Denied) -> Response:
    response = Response(denied.body, status=denied.status, content_type="application/problem+json")
    for name, value in denied.headers:
        response.headers[name] = value
    return response


def _authenticate() -> Response | None:
    state: _State = current_app.extensions[EXTENSION_KEY]
    environ = request.environ
    outcome = state.engine.check(
        request.method,
        request.path,
        environ.get("HTTP_AUTHORIZATION"),
        environ.get(state.environ_key),
    )
    if isinstance(outcome, Denied):
        return _denied_response(outcome)
    g.m2m_client = outcome.client
    g._m2m_headers = outcome.headers
    return None


def _add_headers(response: Response) -> Response:
    headers = g.get("_m2m_headers")
    if headers:
        response_headers = response.headers
        for name, value in headers:
            response_headers[name] = value
    return response


def _current_client() -> Client | None:
    return cast("Client | None", g.get("m2m_client"))


#: The authenticated client of the current request (None on a public path).
current_client: Client = cast(Client, LocalProxy(_current_client))


def require_scopes(*scopes: str) -> Callable[[F], F]:
    """Answer 403 ``insufficient_scope`` unless the client has every one of ``scopes``."""
    needed = frozenset(scopes)
    shown = tuple(sorted(needed))

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = _current_client()
            engine = M2MAuth.engine()
            if client is None:
                return _denied_response(
                    deny(
                        MissingCredentials("this view needs an authenticated client"), engine.realm
                    )
                )
            if not client.scopes.issuperset(needed):
                return _denied_response(
                    deny(
                        InsufficientScope(
                            f"this view needs the scope(s): {' '.join(shown)}", scopes=shown
                        ),
                        engine.realm,
                    )
                )
            return current_app.ensure_sync(view)(*args, **kwargs)

        return cast(F, wrapper)

    return decorator
