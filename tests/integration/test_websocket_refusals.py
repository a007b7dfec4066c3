"""A refused websocket over a real uvicorn: the client sees the HTTP answer.

Each of uvicorn's websocket implementations (``--ws websockets``,
``websockets-sansio``, ``wsproto``) offers the ASGI denial-response extension,
so a handshake the middleware or ``require_scopes`` refuses is answered with
the status, headers and problem body an HTTP request gets, not with the bare
``403`` (no body, no ``WWW-Authenticate``) that a ``websocket.close`` becomes.
The client is the ``websockets`` library, reading the handshake's answer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from m2m_middleware import open_key_store

IMPLEMENTATIONS = ["websockets", "websockets-sansio", "wsproto"]
pytestmark = pytest.mark.slow


def _uvicorn(implementation: str) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable,
        "-m",
        "uvicorn",
        "--ws",
        implementation,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "1",
        "websocket_starlette_app:app",
    ]


@pytest.fixture(params=IMPLEMENTATIONS)
def server(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    serve: Callable[[str, Callable[[int], list[str]], Mapping[str, str]], object],
) -> Iterator[tuple[str, str]]:
    """(the ws:// base URL, the key store's URL) of a uvicorn with that implementation."""
    store_url = f"sqlite:///{tmp_path / 'keys.db'}"
    open_key_store(store_url).close()  # made before the server opens it
    started = serve(
        f"uvicorn-{request.param}", _uvicorn(request.param), {"M2M_TEST_KEY_STORE": store_url}
    )
    yield f"ws://127.0.0.1:{started.port}", store_url  # type: ignore[attr-defined]


def _key(store_url: str, *scopes: str) -> str:
    store = open_key_store(store_url)
    try:
        return store.create_key("acme", scopes=list(scopes)).key
    finally:
        store.close()


def _refusal(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, object]]:
    with pytest.raises(InvalidStatus) as raised, connect(url, additional_headers=headers):
        pass  # pragma: no cover - the handshake is refused
    response = raised.value.response
    return (
        response.status_code,
        {name.lower(): value for name, value in response.headers.raw_items()},
        json.loads(response.body or b"null"),
    )


def test_a_refused_handshake_carries_the_http_answer(server: tuple[str, str]) -> None:
    base, store_url = server

    status, headers, problem = _refusal(f"{base}/feed", {})
    assert status == 401
    assert headers["content-type"] == "application/problem+json"
    assert headers["www-authenticate"] == 'Bearer realm="api"'
    assert problem["error"] == "missing_credentials"

    status, headers, problem = _refusal(f"{base}/feed", {"X-API-Key": "m2m_forged"})
    assert (status, problem["error"]) == (401, "invalid_token")
    assert 'error="invalid_token"' in headers["www-authenticate"]

    reader = _key(store_url, "orders:read")
    status, headers, problem = _refusal(f"{base}/feed", {"X-API-Key": reader})
    assert status == 403
    assert problem["error"] == "insufficient_scope"
    assert problem["scope"] == "orders:watch"
    assert 'error="insufficient_scope", ' in headers["www-authenticate"]
    assert 'scope="orders:watch"' in headers["www-authenticate"]
    assert reader not in json.dumps(problem) and reader not in str(headers)

    watcher = _key(store_url, "orders:watch")
    with connect(f"{base}/feed", additional_headers={"X-API-Key": watcher}) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"client_id": "acme"}
