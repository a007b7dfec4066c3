"""One middleware class for sync and async Django stacks (django-cors-headers' shape)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from io import BytesIO
from logging import INFO
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings as django_settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.http.request import RawPostDataException

from ..audit import audit, ended
from ..client import Client
from ..engine import Engine
from ..outcome import Allowed, Answer, Denied
from ..request_view import MAX_ENDPOINT_BODY, RequestView, WsgiView
from ..scopes import ScopeRequirement
from ..settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

_engines: dict[int, tuple[object, Engine, str]] = {}


def current_engine() -> Engine:
    """The engine for the current ``settings.M2M_AUTH``, rebuilt when it changes.

    Reading the setting per request (one attribute lookup) is what makes
    ``override_settings(M2M_AUTH=...)`` take effect in tests.
    """
    return _current()[0]


def _current() -> tuple[Engine, str]:
    """The current engine and the ``request.META`` key of its API-key header."""
    config = getattr(django_settings, "M2M_AUTH", None)
    cached = _engines.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1], cached[2]
    engine = Engine(Settings.from_mapping(config))
    if len(_engines) >= 16:  # override_settings in a long test run: keep the newest
        _engines.pop(next(iter(_engines)))
    meta_key = "HTTP_" + engine.header_name.upper().replace("-", "_")
    _engines[id(config)] = (config, engine, meta_key)
    return engine, meta_key


def _denied_response(denied: Answer) -> HttpResponse:
    response = HttpResponse(denied.body, status=denied.status, content_type=denied.content_type)
    for name, value in denied.headers:
        response[name] = value
    return response


def _view(request: HttpRequest, *, read_body: bool = True) -> RequestView:
    """The neutral view of a request (for an endpoint the middleware answers, body
    read for a POST, up to :data:`MAX_ENDPOINT_BODY`; None past it).

    The scheme is the one the server saw (``wsgi.url_scheme``, the ASGI scope's),
    not ``request.scheme``: that one believes ``SECURE_PROXY_SSL_HEADER`` from
    any client, and proxy headers count here only from ``trusted_proxies``.
    """
    meta = request.META
    method = request.method or "GET"
    body: bytes | None = b""
    if read_body and method == "POST":
        declared = meta.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > MAX_ENDPOINT_BODY:
            body = None
        else:
            try:
                body = request.read(MAX_ENDPOINT_BODY + 1)
            except RawPostDataException:  # a middleware before this one parsed the form
                body = request.POST.urlencode().encode()
            except OSError:  # UnreadablePostError: the client went away
                body = b""
            if len(body) > MAX_ENDPOINT_BODY:
                body = None
    return WsgiView(method, request.path_info, meta, _server_scheme(request), body)


def _signed_body(engine: Engine, request: HttpRequest, view: RequestView) -> Denied | None:
    """Read the body of a request that may need a signature into ``view`` (through
    ``request.body``, which keeps it for the view), with the path the client sent;
    the 413 when it is over ``max_body_size``. None: go on."""
    method = request.method or "GET"
    if not engine.reads_body(method, request.path_info):
        return None
    limit = engine.max_body_size
    declared = request.META.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > limit:
        return engine.body_too_large(method, request.path_info)
    body: bytes | None
    try:
        if declared and not declared.isdigit():
            # request.body would int() it and raise ValueError (a 500); a body that
            # cannot be sized is not read, so no digest holds (Flask reads none either).
            body = None
        else:
            body = request.body if declared else _bounded_body(request, limit)
    except RequestDataTooBig:  # over DATA_UPLOAD_MAX_MEMORY_SIZE
        return engine.body_too_large(method, request.path_info)
    except RawPostDataException:  # a middleware before this one parsed it: no digest to check
        body = None
    except OSError:  # UnreadablePostError: the client went away
        body = b""
    if body is not None and len(body) > limit:
        return engine.body_too_large(method, request.path_info)
    view.body = body
    view.raw_path = _request_path(request)
    return None


def _bounded_body(request: HttpRequest, limit: int) -> bytes:
    """The body of a request without ``Content-Length`` (chunked, through an ASGI server),
    read to at most ``limit`` + 1 bytes and kept as ``request.body`` keeps it.

    ``request.body`` would read the whole of it first: Django's ASGI handler has
    spooled it to a file, and ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (None: no bound) is
    checked against all of it. Found by the signature red team: 24 MiB chunked
    were held in memory for a 64-byte ``max_body_size``.
    """
    if hasattr(request, "_body"):  # read before us: it is what the view gets
        return request.body
    if getattr(request, "_read_started", False):  # read before us: no digest to check
        raise RawPostDataException("the request body was read before the signature check")
    body = request.read(limit + 1)
    data_limit = django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if data_limit is not None and len(body) > data_limit:
        raise RequestDataTooBig("over DATA_UPLOAD_MAX_MEMORY_SIZE")
    if len(body) <= limit:
        # What request.body does once it has read: the view reads these bytes.
        request._body = body
        request._stream = BytesIO(body)
    return body


def _request_path(request: HttpRequest) -> str:
    """The path the client sent (its ``@target-uri``'s): an ASGI request's ``raw_path``,
    a WSGI server's ``RAW_URI`` / ``REQUEST_URI``, else ``SCRIPT_NAME`` + ``PATH_INFO``."""
    from ..signatures import asgi_request_path, wsgi_request_path

    scope = getattr(request, "scope", None)  # django.core.handlers.asgi.ASGIRequest
    if isinstance(scope, dict):
        raw = asgi_request_path(scope)
        if raw:
            return raw
    return wsgi_request_path(request.META)


def _server_scheme(request: HttpRequest) -> str:
    """The scheme the server saw: an ASGI request's scope, a WSGI request's environ."""
    scope = getattr(request, "scope", None)  # django.core.handlers.asgi.ASGIRequest
    if isinstance(scope, dict):
        return str(scope.get("scheme") or "http")
    return str(request.META.get("wsgi.url_scheme") or "http")


class M2MAuthMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        current_engine()  # validate settings at start-up, not on the first request

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        engine, meta_key = _current()
        if engine.endpoints and request.path_info in engine.endpoints:
            return _denied_response(engine.serve(_view(request)))
        meta = request.META
        view = _view(request, read_body=False) if engine.needs_view else None
        if view is not None and engine.signatures is not None:
            refused = _signed_body(engine, request, view)
            if refused is not None:
                return _denied_response(refused)
        outcome = engine.gate(
            request.method or "GET",
            request.path_info,
            meta.get("HTTP_AUTHORIZATION"),
            meta.get(meta_key),
            meta.get("REMOTE_ADDR"),  # a key's allowed_cidrs reads it
            view,
        )
        if not outcome.allowed:
            return _denied_response(cast(Denied, outcome))
        if audit.isEnabledFor(INFO):  # the one per-request cost of the audit when it is off
            return self._audited(request, cast(Allowed, outcome))
        return self._respond(
            request, cast(Allowed, outcome), self.get_response(_attach(request, outcome))
        )

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        engine, meta_key = _current()
        if engine.endpoints and request.path_info in engine.endpoints:
            return _denied_response(await engine.aserve(_view(request)))
        meta = request.META
        view = _view(request, read_body=False) if engine.needs_view else None
        if view is not None and engine.signatures is not None:
            # Django's ASGI handler has spooled the body already: reading it never waits.
            refused = _signed_body(engine, request, view)
            if refused is not None:
                return _denied_response(refused)
        args = (
            request.method or "GET",
            request.path_info,
            meta.get("HTTP_AUTHORIZATION"),
            meta.get(meta_key),
            meta.get("REMOTE_ADDR"),
            view,
        )
        outcome = engine.gate(*args) if engine.never_blocks else await engine.agate(*args)
        if not outcome.allowed:
            return _denied_response(cast(Denied, outcome))
        if audit.isEnabledFor(INFO):
            return await self._aaudited(request, cast(Allowed, outcome))
        response = await self.get_response(_attach(request, outcome))
        return self._respond(request, cast(Allowed, outcome), response)

    def _audited(self, request: HttpRequest, outcome: Allowed) -> HttpResponseBase:
        """Get the response, then write the request's one audit record: how it ended."""
        method, path = request.method or "GET", request.path_info  # before a view can touch them
        try:
            response: HttpResponseBase = self.get_response(_attach(request, outcome))
        except BaseException:
            # Django answers a view's exception itself; one that gets here is
            # recorded as the 500 the server then sends.
            _ended(request, outcome, method, path, None)
            raise
        _ended(request, outcome, method, path, response.status_code)
        return self._respond(request, outcome, response)

    async def _aaudited(self, request: HttpRequest, outcome: Allowed) -> HttpResponseBase:
        method, path = request.method or "GET", request.path_info
        try:
            response: HttpResponseBase = await self.get_response(_attach(request, outcome))
        except BaseException:
            _ended(request, outcome, method, path, None)
            raise
        _ended(request, outcome, method, path, response.status_code)
        return self._respond(request, outcome, response)

    @staticmethod
    def _respond(
        request: HttpRequest, outcome: Allowed, response: HttpResponseBase
    ) -> HttpResponseBase:
        for name, value in outcome.headers:
            response[name] = value
        return response


def _ended(
    request: HttpRequest, outcome: Allowed, method: str, path: str, status: int | None
) -> None:
    ended(outcome, method, path, status, getattr(request, "m2m_denied", None))


def _attach(request: HttpRequest, outcome: Allowed | Denied) -> HttpRequest:
    request.m2m_client = outcome.client  # type: ignore[attr-defined]
    return request


def get_client(request: HttpRequest) -> Client | None:
    client = getattr(request, "m2m_client", None)
    return client if isinstance(client, Client) else None


def require_scopes(*scopes: str) -> Callable[[F], F]:
    """Answer 403 ``insufficient_scope`` unless the client has every one of ``scopes``.

    Works on sync and async views alike; 401 ``missing_credentials`` on a public
    path (no client). A scope that is not an RFC 6749 scope token is a
    ConfigError here, when the view is defined.
    """
    requirement = ScopeRequirement(scopes)

    def refusal(request: HttpRequest) -> HttpResponse | None:
        client = get_client(request)
        if requirement.admits(client):
            return None
        engine = current_engine()
        denied = requirement.refuse(client, engine.realm)
        request.m2m_denied = denied  # type: ignore[attr-defined]  # for whoever audits it
        engine.app_refused(denied)  # usage, metrics and alerts count it refused
        return _denied_response(denied)

    def decorator(view: F) -> F:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                return refusal(request) or await view(request, *args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            return refusal(request) or view(request, *args, **kwargs)

        return cast(F, wrapper)

    return decorator
