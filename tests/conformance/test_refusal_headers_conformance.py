"""No refusal may be cached or sniffed, whoever answers it, in all three frameworks.

Found by an attacker's review of issue 13's transport work: the token
endpoint's own errors (RFC 6749 5.2 JSON, not problem+json) carried
``Cache-Control: no-store`` but not ``X-Content-Type-Options: nosniff``, which
every other refusal of the middleware carries (the issue asks it of every
problem answer): a browser or an intermediary was free to sniff the body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest

from m2m_middleware import KeyStore, open_key_store

if TYPE_CHECKING:  # this folder's conftest; only a type here
    from conftest import Caller

TOKEN_PATH = "/oauth/token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
Make = Callable[[Mapping[str, Any]], "Caller"]


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def config(store: KeyStore) -> dict[str, Any]:
    return {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "routes": [{"path": "/orders", "scopes": ["orders:read"]}],
        "token_endpoint": TOKEN_PATH,
        "token_issuer": "https://issuer.example",
        "signing_key_secret": "refusal headers tests' signing secret",
    }


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("POST", urlencode({"grant_type": "<script>alert(1)</script>"}).encode(), 400),
        ("POST", b"grant_type=client_credentials", 401),  # no client credentials
        ("POST", b"grant_type=client_credentials&client_id=x&client_secret=y", 401),
        ("GET", b"", 405),
    ],
)
def test_token_endpoint_errors_are_not_cached_nor_sniffed(
    make_app: Make, store: KeyStore, method: str, body: bytes, status: int
) -> None:
    app = make_app(config(store))
    reply = app(method, TOKEN_PATH, FORM, body=body)
    assert reply.status == status, reply.body
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
