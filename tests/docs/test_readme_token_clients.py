"""The README's token clients work as written: authlib's OAuth2Client (httpx) and
OAuth2Session (requests) fetch a token from our endpoint over a real socket, call
the API with it, and fetch a new one by themselves once it has expired.

test_readme_snippets.py type-checks these snippets; this runs them, with only the
API's address changed, against a real uvicorn serving the Starlette adapter.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from readme_anchors import readme_headings
from servers import uvicorn_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from m2m_middleware import Settings, open_key_store
from m2m_middleware.starlette import M2MMiddleware

pytestmark = pytest.mark.slow

README_ORIGIN = "https://api.example.com"
SIGNING_SECRET = "the README's token clients, in a test"


def client_snippets() -> list[str]:
    section = next(h for h in readme_headings() if h.text == "Clients: authlib, httpx or requests")
    return re.findall(r"```python\n(.*?)```", section.body, re.S)


def test_the_section_shows_both_clients() -> None:
    found = client_snippets()
    assert len(found) == 2
    assert "httpx_client import OAuth2Client" in found[0]
    assert "requests_client import OAuth2Session" in found[1]
    for code in found:
        assert 'grant_type="client_credentials"' in code


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Our token service and an /orders route under uvicorn; the key in the environment."""
    store = open_key_store("memory://")
    issued = store.create_key("billing", scopes=["orders:read"])
    monkeypatch.setenv("M2M_KEY_ID", issued.record.key_id)
    monkeypatch.setenv("M2M_API_KEY", issued.key)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def orders(request: Request) -> JSONResponse:
        user = request.user
        return JSONResponse({"client": user.client_id, "scheme": user.scheme})

    app = M2MMiddleware(
        Starlette(routes=[Route("/orders", orders)]),
        settings=Settings(
            key_store=store,
            schemes=("api_key", "jwt"),
            token_endpoint="/oauth/token",
            token_issuer=README_ORIGIN,
            signing_key_secret=SIGNING_SECRET,
            routes=[{"path": "/orders", "scopes": ["orders:read"]}],
        ),
    )
    with uvicorn_in_thread(app) as base_url:
        yield base_url


@pytest.mark.parametrize("index", [0, 1], ids=["OAuth2Client-httpx", "OAuth2Session-requests"])
def test_the_readme_client_fetches_calls_and_renews(api: str, index: int) -> None:
    code = client_snippets()[index].replace(README_ORIGIN, api)
    namespace: dict[str, Any] = {}
    from authlib.deprecate import AuthlibDeprecationWarning

    with warnings.catch_warnings():
        # authlib warns that it prefers httpx2 to httpx; not what this test is about.
        warnings.simplefilter("ignore", AuthlibDeprecationWarning)
        exec(compile(code, f"README client snippet {index}", "exec"), namespace)
    assert namespace["orders"] == {"client": "billing", "scheme": "jwt"}

    client = namespace["client" if index == 0 else "session"]
    first = client.token["access_token"]
    client.token["expires_at"] = int(time.time())  # as if its time were up
    again = client.get(f"{api}/orders")
    assert again.status_code == 200, again.text
    assert client.token["access_token"] != first  # fetched anew, by itself
    client.close()
