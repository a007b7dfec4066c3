"""Signed routes behind the middleware on a real uvicorn and a real gunicorn, signed
by :mod:`m2m_middleware.signing_clients` on httpx and requests.

tests/core/test_signing_clients.py pins the clients against the bare verifier;
here the whole path runs: the server's own parsing of the request line and the
body (chunked or not), each adapter reading the body for the digest and handing
it on to the view, the raw path the server keeps (ASGI ``raw_path``, gunicorn's
``RAW_URI``), and the nonce memory (in Redis for uvicorn, so the Starlette
adapter takes the async path, ``averify`` on ``redis.asyncio``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import requests
import servers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from m2m_middleware import open_key_store
from m2m_middleware.signing_clients import HttpxSignatureAuth, RequestsSignatureAuth

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

Serve = Callable[[str, Callable[[int], list[str]], Mapping[str, str]], "Server"]
BODY = b'{"amount": 1200}'


@pytest.fixture(params=["uvicorn", "gunicorn"])
def site(
    request: pytest.FixtureRequest, tmp_path: Path, serve: Serve, redis_url: str
) -> tuple[str, str, str, ed25519.Ed25519PrivateKey]:
    """(base URL, API key, its key_id, the client's private key) of a started server."""
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    url = "sqlite:///" + str(tmp_path / "keys.db")
    with closing(open_key_store(url)) as keys:
        issued = keys.create_key("payments", signing_public_key=pem.decode())
    # gunicorn's two workers share the nonce memory through Redis as well.
    env = {"M2M_TEST_KEY_STORE": url, "M2M_TEST_LIMITS": redis_url}
    command = (
        servers.uvicorn_command("signed_apps:starlette_app")
        if request.param == "uvicorn"
        else servers.gunicorn_command("signed_apps:flask_app")
    )
    server = serve(request.param, command, env)
    return server.url, issued.key, issued.record.key_id, private


@pytest.mark.slow
@pytest.mark.redis
def test_httpx_and_requests_sign_what_the_servers_verify(
    site: tuple[str, str, str, ed25519.Ed25519PrivateKey],
) -> None:
    url, api_key, key_id, private = site
    auth = HttpxSignatureAuth(key_id, private)
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, auth=auth) as client:
        reply = client.post("/payments", content=BODY)
        assert reply.status_code == 200, reply.text
        assert reply.content == BODY  # the view read the body after the middleware did
        assert client.post("/payments?page=2", json={"a": "é"}).status_code == 200
        unsigned = httpx.post(url + "/payments", content=BODY, headers={"X-API-Key": api_key})
        assert unsigned.status_code == 401
        assert unsigned.json()["error"] == "invalid_signature"
    with requests.Session() as session:
        session.headers["X-API-Key"] = api_key
        session.auth = RequestsSignatureAuth(key_id, private)
        answer = session.post(url + "/payments", data=BODY, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.content == BODY


@pytest.mark.slow
@pytest.mark.redis
def test_a_replay_is_refused_by_the_server(
    site: tuple[str, str, str, ed25519.Ed25519PrivateKey],
) -> None:
    url, api_key, key_id, private = site
    signed = httpx.Request("POST", url + "/payments", content=BODY, headers={"X-API-Key": api_key})
    HttpxSignatureAuth(key_id, private)(signed)
    with httpx.Client() as client:
        assert client.send(signed).status_code == 200
        again = client.send(signed)  # the same bytes once more (another gunicorn worker, too)
        assert again.status_code == 401
        assert "used before" in again.json()["detail"]
