"""Flask extension: ``M2MAuth(app)`` or ``M2MAuth().init_app(app)``.

Settings come from ``settings=`` or the mapping ``app.config["M2M_AUTH"]``.
In a view ``g.m2m_client`` and ``current_client`` are the
:class:`~m2m_middleware.Client`.

The check runs at the WSGI layer, around ``app.wsgi_app`` (where ProxyFix
goes too), before Flask builds its request context: a refused request costs
no routing, no context and no response object, and an admitted one pays for
one small ``before_request`` hook that puts the client on ``g``. The
rate-limit headers join the response as it is sent. So ``after_request``
hooks and error handlers do not see refusals; the audit log does.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any, TypeVar, cast

try:
    import click
    from flask import Flask, Response, current_app, g, request
    from flask.cli import AppGroup
    from werkzeug.local import LocalProxy
    from werkzeug.wsgi import ClosingIterator, get_input_stream
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'm2m_middleware.flask needs Flask: pip install "m2m-middleware[flask]"'
    ) from exc

try:  # the context variables behind `g` and `request` (Flask 2.2+); private
    from flask.globals import _cv_app, _cv_request
except ImportError:  # pragma: no cover - depends on the Flask version
    _cv_app = _cv_request = None  # type: ignore[assignment]

from .audit import audit, ended
from .client import Client
from .engine import Engine
from .outcome import Allowed, Answer, Denied, status_line
from .request_view import MAX_ENDPOINT_BODY, RequestView, WsgiView
from .scopes import ScopeRequirement
from .settings import Settings, invalidation_url

EXTENSION_KEY = "m2m_middleware"
#: Where the gate leaves the authenticated client for the request (None: public path).
ENVIRON_KEY = "m2m_middleware.client"
#: Where ``require_scopes`` leaves the Denied it answered a request with.
DENIED_KEY = "m2m_middleware.denied"
F = TypeVar("F", bound=Callable[..., Any])
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _State:
    """What ``app.extensions["m2m_middleware"]`` holds for one app."""

    __slots__ = ("engine", "environ_key")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        #: The WSGI environ key of the API-key header, e.g. ``HTTP_X_API_KEY``.
        self.environ_key = "HTTP_" + engine.header_name.upper().replace("-", "_")


class _Gate:
    """The WSGI layer that decides each request before Flask sees it."""

    def __init__(self, wsgi_app: WSGIApp, state: _State) -> None:
        self.wsgi_app = wsgi_app
        self.state = state

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if not path.isascii():  # WSGI strings are latin-1; Flask routes on UTF-8
            path = path.encode("latin-1").decode("utf-8", "replace")
        state = self.state
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = "/" + path.lstrip("/")
        engine = state.engine
        if engine.endpoints and path in engine.endpoints:
            return _write(engine.serve(wsgi_view(environ, method, path)), start_response)
        if engine.needs_view:  # transport checks: they read more than two headers
            view = wsgi_view(environ, method, path, read_body=False)
            if (
                engine.signatures is not None
                and engine.reads_body(method, path)
                and not _read_signed_body(environ, view, engine.max_body_size)
            ):
                return _write(engine.body_too_large(method, path), start_response)
            outcome = engine.gate(
                method,
                path,
                environ.get("HTTP_AUTHORIZATION"),
                environ.get(state.environ_key),
                None,
                view,
            )
        else:
            outcome = engine.gate(
                method,
                path,
                environ.get("HTTP_AUTHORIZATION"),
                environ.get(state.environ_key),
                environ.get("REMOTE_ADDR"),  # a key's allowed_cidrs reads it
            )
        if isinstance(outcome, Denied):
            return _write(outcome, start_response)
        environ[ENVIRON_KEY] = outcome.client
        if audit.isEnabledFor(INFO):  # the one per-request cost of the audit when it is off
            return self._audited(environ, start_response, outcome, method, path)
        headers = outcome.headers
        if not headers:
            return self.wsgi_app(environ, start_response)

        def start_with_headers(
            status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            response_headers.extend(headers)
            return start_response(status, response_headers, exc_info)

        return self.wsgi_app(environ, start_with_headers)

    def _audited(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        outcome: Allowed,
        method: str,
        path: str,
    ) -> Iterable[bytes]:
        """Run the app, then write the request's one audit record: how it ended.

        Flask starts the response before it returns the body, so the record
        is written then, before a streamed body is sent; an app under it
        that starts the response only while its body is read is recorded
        when the server closes the body (WSGI's ``close``).
        """
        headers = outcome.headers
        status: int | None = None

        def start_and_note(
            status_text: str, response_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            nonlocal status
            status = _status_code(status_text)
            response_headers.extend(headers)
            return start_response(status_text, response_headers, exc_info)

        def write_record() -> None:
            ended(outcome, method, path, status, environ.get(DENIED_KEY))

        try:
            body = self.wsgi_app(environ, start_and_note)
        except BaseException:
            write_record()  # no answer yet: recorded as the 500 the server sends
            raise
        if status is not None:
            write_record()
            return body
        return ClosingIterator(body, write_record)


def _write(answer: Answer, start_response: StartResponse) -> list[bytes]:
    """A denial or an endpoint's answer, written straight to the WSGI server."""
    start_response(
        status_line(answer.status),
        [
            ("Content-Type", answer.content_type),
            ("Content-Length", str(len(answer.body))),
            *answer.headers,
        ],
    )
    return [answer.body]


def _read_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes (then nothing past
    ``limit + 1`` is read). Through werkzeug's input stream, which honours
    ``Content-Length`` and a server's chunked ``wsgi.input_terminated`` alike
    (PEP 3333: never read past the declared length)."""
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > limit:
        return None
    body = get_input_stream(environ, max_content_length=None).read(limit + 1)
    return None if len(body) > limit else body


def _read_signed_body(environ: dict[str, Any], view: RequestView, limit: int) -> bool:
    """Read the body of a request that must be signed into ``view``, and leave it readable
    for the app (``wsgi.input`` becomes the bytes read); False when it is over ``limit``."""
    from .signatures import wsgi_request_path

    body = _read_body(environ, limit)
    if body is None:
        return False
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("wsgi.input_terminated", None)  # the length is known now
    view.body = body
    view.raw_path = wsgi_request_path(environ)
    return True


def wsgi_view(
    environ: dict[str, Any], method: str, path: str, *, read_body: bool = True
) -> RequestView:
    """The neutral view of a WSGI request to an endpoint the middleware answers: the
    body read for a POST, up to :data:`MAX_ENDPOINT_BODY` (None past it)."""
    body: bytes | None = b""
    if read_body and method == "POST":
        body = _read_body(environ, MAX_ENDPOINT_BODY)
    return WsgiView(method, path, environ, environ.get("wsgi.url_scheme", "http"), body)


def _status_code(status_text: str) -> int | None:
    """``"404 NOT FOUND"`` -> 404 (None for a status no server would send)."""
    code = status_text[:3]
    return int(code) if code.isdigit() else None


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
        state = _State(Engine(chosen))
        app.extensions[EXTENSION_KEY] = state
        layer: Any = app.wsgi_app
        while layer is not None and not isinstance(layer, _Gate):
            layer = getattr(layer, "app", None)  # under ProxyFix and friends
        if isinstance(layer, _Gate):  # init_app again: the new settings win
            layer.state = state
            return
        app.wsgi_app = _Gate(app.wsgi_app, state)  # type: ignore[method-assign]
        app.before_request(_attach_client)
        app.cli.add_command(m2m_cli)

    @staticmethod
    def engine(app: Flask | None = None) -> Engine:
        """The engine serving ``app`` (default: the current app)."""
        target = app if app is not None else current_app
        state: _State = target.extensions[EXTENSION_KEY]
        return state.engine


#: ``flask m2m ...``: key management and usage on the app's own store.
m2m_cli = AppGroup("m2m", help="m2m-middleware: API keys and usage in this app's key store.")


@m2m_cli.command(
    "keys",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def _keys_command(args: tuple[str, ...]) -> None:
    """create | list | revoke | rotate, as `m2m keys` (see `flask m2m keys --help`)."""
    from .cli import keys_main

    engine = M2MAuth.engine()
    code = keys_main(
        args,
        prog="flask m2m keys",
        store=engine.store,
        notify=invalidation_url(engine.settings, engine.store),
        tiers=engine.settings.tier_limit_items,
    )
    raise SystemExit(code)


@m2m_cli.command(
    "usage",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def _usage_command(args: tuple[str, ...]) -> None:
    """Requests counted per client, key and period, as `m2m usage` (see --help)."""
    from .cli import usage_main

    raise SystemExit(usage_main(args, prog="flask m2m usage", store=M2MAuth.engine().store))


def _attach_client() -> None:
    """``before_request``: put the client the gate admitted on ``g``.

    Through the context variables behind ``g`` and ``request`` where this
    Flask has them (2.2 to 3.1): each LocalProxy hop costs about a
    microsecond, as much as the rest of the hook. Any other shape falls back
    to the proxies, once and for good.
    """
    global _attach
    try:
        _attach()
    except AttributeError:
        _attach = _attach_portable
        _attach()


def _attach_portable() -> None:
    g.m2m_client = request.environ.get(ENVIRON_KEY)


def _attach_direct() -> None:
    _cv_app.get().g.m2m_client = _cv_request.get().request.environ.get(ENVIRON_KEY)


_attach: Callable[[], None] = _attach_portable if _cv_app is None else _attach_direct


def _denied_response(denied: Denied) -> Response:
    response = Response(denied.body, status=denied.status, content_type="application/problem+json")
    for name, value in denied.headers:
        response.headers[name] = value
    return response


def _current_client() -> Client | None:
    return cast("Client | None", g.get("m2m_client"))


#: The authenticated client of the current request (None on a public path).
current_client: Client = cast(Client, LocalProxy(_current_client))


def require_scopes(*scopes: str) -> Callable[[F], F]:
    """Answer 403 ``insufficient_scope`` unless the client has every one of ``scopes``.

    401 ``missing_credentials`` on a public path (no client). A scope that is
    not an RFC 6749 scope token is a ConfigError here, when the view is defined.
    """
    requirement = ScopeRequirement(scopes)

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = _current_client()
            if requirement.admits(client):
                return current_app.ensure_sync(view)(*args, **kwargs)
            engine = M2MAuth.engine()
            denied = requirement.refuse(client, engine.realm)
            request.environ[DENIED_KEY] = denied  # the refusal, for whoever audits the request
            engine.app_refused(denied)  # usage, metrics and alerts count it refused
            return _denied_response(denied)

        return cast(F, wrapper)

    return decorator
