"""The dashboard as a WSGI app, and ``m2m dashboard``'s server.

The standard library's wsgiref serves it: one read-only page for one person
needs no framework and no new dependency. The page has no login, so it binds
to the loopback by default and checks the ``Host`` header (a web page the
admin visits cannot rebind a name of its own to 127.0.0.1 and read it).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import M2MError
from ..redaction import redact
from ..stores.base import KeyStore, utcnow
from .page import STYLE_HASH, QueryError, gather, message_page, parse_query, render

logger = logging.getLogger("m2m_middleware.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8300

CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src '{STYLE_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
)
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

StartResponse = Callable[..., Any]
#: Status line, HTML body, extra headers.
_Answer = tuple[str, str, list[tuple[str, str]]]


class DashboardError(Exception):
    """A failure to start the dashboard, for the command line: one line and an exit status."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``Host`` without its port: ``[::1]:8300`` -> ``::1``, ``localhost:8300`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class DashboardApp:
    """GET (and HEAD) ``/``: the page of ``store``; every other path 404, other methods 405.

    ``allowed_hosts``: the ``Host`` names answered (None: any, for ``--public``).
    ``clock`` gives "now", so tests pin what counts as expiring soon.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        store_label: str = "key store",
        allowed_hosts: Iterable[str] | None = _LOOPBACK_NAMES,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.store_label = store_label
        self.allowed_hosts = (
            None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        )
        self.clock = clock

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        status, body, extra = self._answer(environ, method)
        data = body.encode("utf-8", "replace")
        headers = [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(data))),
            *SECURITY_HEADERS,
            *extra,
        ]
        start_response(status, headers)
        return [] if method == "HEAD" else [data]

    def _answer(
        self, environ: dict[str, Any], method: str
    ) -> tuple[str, str, list[tuple[str, str]]]:
        host = _host_name(str(environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return (
                "400 Bad Request",
                message_page(
                    "Unknown host",
                    "This dashboard answers only requests for its own loopback address "
                    "(a page elsewhere must not reach it through a name of its own).",
                ),
                [],
            )
        if environ.get("PATH_INFO", "/") != "/":
            return (
                "404 Not Found",
                message_page("Not found", "The dashboard has one page: /."),
                [],
            )
        if method not in ("GET", "HEAD"):
            return (
                "405 Method Not Allowed",
                message_page("Method not allowed", "The dashboard is read-only: GET or HEAD /."),
                [("Allow", "GET, HEAD")],
            )
        try:
            query = parse_query(str(environ.get("QUERY_STRING", "")))
        except QueryError as exc:
            return "400 Bad Request", message_page("Bad request", str(exc)), []
        try:
            data = gather(self.store, query, self.clock())
        except Exception as exc:  # a store that is down must not become a traceback
            logger.warning("dashboard: the key store cannot be read: %s", _described(exc))
            return (
                "503 Service Unavailable",
                message_page(
                    "Key store unavailable",
                    "The key store cannot be read right now; try again shortly. "
                    "The command's log says why.",
                ),
                [("Retry-After", "5")],
            )
        return "200 OK", render(data, store_label=self.store_label), []


def _described(exc: BaseException) -> str:
    """One line for the log: a DSN in a driver's message keeps no password."""
    if isinstance(exc, (M2MError, OSError, sqlite3.Error)):
        text = " ".join(str(exc).split()) or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return redact(text)


class _Handler(WSGIRequestHandler):
    """Requests to the logger at INFO, not one stderr line each."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("dashboard: %s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection: a browser opens several, and the store may be slow."""

    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_dashboard_server(
    store: KeyStore,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    public: bool = False,
    store_label: str = "key store",
    clock: Callable[[], datetime] = utcnow,
) -> WSGIServer:
    """A server bound to ``host``:``port`` (0: a free port), not yet serving.

    A non-loopback ``host`` needs ``public=True``: the page has no login, and
    shows every client, key id and usage count to whoever reaches the port.
    """
    if not public and not is_loopback(host):
        raise DashboardError(
            f"--host {host}: not a loopback address; the dashboard has no login and shows "
            "every client, key id and usage count to anyone who can reach it, so it serves "
            "127.0.0.1 unless you pass --public (put it behind your own authentication)"
        )
    allowed = None if public else {*_LOOPBACK_NAMES, host.strip("[]").lower()}
    app = DashboardApp(store, store_label=store_label, allowed_hosts=allowed, clock=clock)
    server_class = _Server6 if ":" in host else _Server
    try:
        return make_server(
            host.strip("[]"), port, app, server_class=server_class, handler_class=_Handler
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DashboardError(
                f"port {port} on {host} is already in use: choose another with --port"
            ) from None
        if isinstance(exc, socket.gaierror):
            raise DashboardError(f"--host {host}: unknown host ({exc.strerror})") from None
        raise DashboardError(
            f"cannot listen on {host} port {port}: {exc.strerror or exc}"
        ) from None


def run(
    store: KeyStore,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    public: bool = False,
    store_label: str = "key store",
    out: Callable[[str], None] = print,
    ready: threading.Event | None = None,
) -> int:
    """Serve until Ctrl-C (or SIGTERM's KeyboardInterrupt); 0 when stopped that way."""
    server = make_dashboard_server(
        store, host=host, port=port, public=public, store_label=store_label
    )
    bound_host, bound_port = str(server.server_address[0]), server.server_address[1]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    out(f"Dashboard of {store_label} on http://{shown}:{bound_port}/ - press Ctrl-C to stop.")
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        out("Stopped.")
    finally:
        server.server_close()
    return 0


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DashboardApp",
    "DashboardError",
    "is_loopback",
    "make_dashboard_server",
    "run",
]
