"""Hostile request lines over a real uvicorn (h11), sent as raw bytes on a socket.

An HTTP client would tidy these requests up before sending them (httpx
upper-cases the method and removes dot segments), so they go out byte for
byte as an attacker would write them. The app (apps/hostile_paths_app.py)
serves Starlette views, a Django ASGI app and a Flask WSGI app behind one
``M2MMiddleware``, below ``--root-path /api``, and every view names itself:
"refused" and "reached the view" can never be confused.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import servers

import m2m_middleware
from m2m_middleware import open_key_store

APPS = Path(__file__).resolve().parent / "apps"
#: The m2m_middleware this process imported: the server runs the same one.
PACKAGE_PARENT = Path(m2m_middleware.__file__).resolve().parents[1]


def uvicorn(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        # h11, named: with httptools installed (uvicorn[standard]) "auto" picks it, and
        # httptools refuses these request lines itself, before the app sees them.
        "--http",
        "h11",
        "--app-dir",
        str(APPS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--root-path",
        "/api",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "2",
        "hostile_paths_app:app",
    ]


class Wire:
    """One started server and the keys of its store."""

    def __init__(self, server: servers.HttpServer, nobody: str, everything: str) -> None:
        self.server = server
        self.nobody = nobody  # a key without scopes
        self.everything = everything  # a key with every scope the rules ask for

    def send(self, method: str, target: str, key: str | None = None) -> tuple[int, Any]:
        """``method target HTTP/1.1`` exactly as given; the status and the JSON body (or None)."""
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        if key is not None:
            lines.append(f"X-API-Key: {key}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _unchunk(body)
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode("latin-1")


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        out += rest[:length]
        body = rest[length + 2 :]
    return out


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    # One server for the module (the ``serve`` fixture starts one per test).
    workdir: Path = tmp_path_factory.mktemp("hostile-paths")
    url = "sqlite:///" + str(workdir / "keys.db")
    store = open_key_store(url)
    nobody = store.create_key("nobody").key
    everything = store.create_key(
        "everything", scopes=["orders:read", "orders:write", "reports:read"]
    ).key
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "PYTHONPATH"))}
    env.update(
        HOSTILE_PATHS_KEY_STORE=url,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])
        ),
    )
    server = servers.start_server("uvicorn-hostile-paths", uvicorn, workdir, env)
    try:
        yield Wire(server, nobody, everything)
    finally:
        servers.stop_server(server.process)


def test_the_controls_answer_as_configured(wire: Wire) -> None:
    assert wire.send("GET", "/health") == (200, {"status": "ok"})
    assert wire.send("GET", "/orders")[0] == 401
    assert wire.send("GET", "/orders", wire.nobody)[0] == 403
    status, body = wire.send("GET", "/orders", wire.everything)
    assert (status, body["view"]) == (200, "starlette /orders")
    assert body["path"] == "/api/orders"  # served below --root-path /api
    status, body = wire.send("POST", "/django/orders", wire.everything)
    assert (status, body) == (200, {"view": "django POST /orders", "method": "POST"})
    status, body = wire.send("POST", "/flask/orders", wire.everything)
    assert (status, body) == (200, {"view": "flask POST /orders", "method": "POST"})


#: Percent-encoded control characters, as uvicorn decodes them into the scope's path.
CONTROL_TARGETS = [
    "/orders%0A",  # "/orders\n": Starlette's ^/orders$ matches it, a glob does not
    "/orders%0D",
    "/orders%0D%0A",
    "/orders%00",
    "/orders%09",
    "/orders%1B",
    "/orders%7F",
    "/orders%C2%85",  # U+0085 NEL
    "/orders%C2%9B",  # U+009B CSI
    "/orders%0A/",
    "/%0Aorders",
    "/orders/%0A..",
    "/health%0A",  # a public path, too: refused before public paths are looked at
    "/django/orders%0A",
]


@pytest.mark.parametrize("target", CONTROL_TARGETS)
@pytest.mark.parametrize("method", ["GET", "POST", "post"])
def test_a_control_character_in_the_path_is_400_over_the_wire(
    wire: Wire, target: str, method: str
) -> None:
    for key in (wire.nobody, wire.everything, None):
        status, body = wire.send(method, target, key)
        assert status == 400, (method, target, status, body)
        assert body["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/orders/"),  # Starlette redirects it to /orders
        ("GET", "/orders%2F"),  # uvicorn decodes %2F: the path is "/orders/"
        ("GET", "/reports/"),  # the view lives at /reports/, the rule says /reports
        ("GET", "/reports"),
        ("post", "/django/orders"),  # Django's request.method is "POST"
        ("Post", "/django/orders"),
        ("post", "/flask/orders"),  # so is Flask's, mounted under Starlette
        ("post", "/django/orders/"),
        ("head", "/orders"),
    ],
)
def test_a_rule_applies_however_the_request_line_spells_it(
    wire: Wire, method: str, target: str
) -> None:
    status, body = wire.send(method, target, wire.nobody)
    assert status == 403, (method, target, status, body)
    assert method == "head" or body["error"] == "insufficient_scope"


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "//orders"),
        ("GET", "/orders/."),
        ("GET", "/orders/./"),
        ("GET", "/x/../orders"),
        ("GET", "/ORDERS"),
        ("GET", "/Orders"),
        ("GET", "/orders;x"),
        ("GET", "/orders%20"),
        ("GET", "/orders%E2%80%A8"),  # U+2028: not a control character; no view has it
        ("GET", "/orders%85"),  # invalid UTF-8: U+FFFD in the scope
        ("GET", "/orders?x=%0A"),  # the query string is not the path
        ("post", "/django//orders"),
        ("POST", "/django/ORDERS"),
    ],
)
def test_no_other_spelling_reaches_a_guarded_view(wire: Wire, method: str, target: str) -> None:
    """Each of these either meets the rule or reaches no view at all."""
    status, body = wire.send(method, target, wire.nobody)
    assert status in (400, 403, 404, 405, 307), (method, target, status, body)
    if target == "/orders?x=%0A":
        assert status == 403  # the path is /orders: the rule applies
