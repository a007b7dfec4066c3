"""The token service through real servers and authlib's own clients, as a user runs them.

A Starlette app under uvicorn and a Flask app under gunicorn (two workers,
each its own engine, one SQLite file), started as processes of their own;
authlib's ``OAuth2Client`` (httpx) and ``OAuth2Session`` (requests) fetch
tokens with ``grant_type=client_credentials`` and fetch again once the token
has expired; every token verifies against the JWKS fetched from the same
server. Also a chunked token request (no ``Content-Length``) over the wire.
"""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from typing import TYPE_CHECKING, Any

import httpx
import jwt as pyjwt
import pytest
import servers
from authlib.integrations.requests_client import OAuth2Session

from m2m_middleware import open_key_store

with warnings.catch_warnings():
    # authlib 1.9 prefers httpx2 and warns once, on import, when it finds httpx.
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import OAuth2Client

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

pytestmark = pytest.mark.slow

ISSUER = "https://issuer.test"
TTL = 120
SECRET = "integration tests' signing secret"
Serve = Callable[[str, Callable[[int], list[str]], Mapping[str, str]], "Server"]


COMMANDS = {
    "uvicorn": servers.uvicorn_command("token_service_apps:starlette_app"),
    "gunicorn": servers.gunicorn_command("token_service_apps:flask_app"),
}


@pytest.fixture(scope="module", params=sorted(COMMANDS))
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    serve_for_module: Serve,
) -> Iterator[Any]:
    """(the server, a key_id, its API key): a key made before the server started.
    One server per module and framework: starting one is most of these tests' time."""
    workdir = tmp_path_factory.mktemp(request.param)
    url = f"sqlite:///{workdir / 'keys.db'}"
    store = open_key_store(url)
    issued = store.create_key("svc-orders", scopes=["orders:read", "reports:read"], tier="gold")
    store.close()
    environment = {
        "M2M_TEST_KEY_STORE": url,
        "M2M_TEST_ISSUER": ISSUER,
        "M2M_TEST_TOKEN_TTL": str(TTL),
        "M2M_SIGNING_SECRET": SECRET,
    }
    running = serve_for_module(request.param, COMMANDS[request.param], environment)
    yield running, issued.record.key_id, issued.key
    output = running.output()
    assert SECRET not in output
    assert issued.key not in output
    assert "Traceback" not in output


def check(token: Mapping[str, Any], jwks: Mapping[str, Any], scope: str) -> dict[str, Any]:
    """The token response is RFC 6749's, and its access token verifies with PyJWT
    given only ``jwks``; its claims are RFC 9068's."""
    assert token["token_type"].lower() == "bearer"
    assert token["expires_in"] == TTL
    assert token["scope"] == scope
    access_token = token["access_token"]
    header = pyjwt.get_unverified_header(access_token)
    assert header["typ"] == "at+jwt"
    keys = {k.key_id: k for k in pyjwt.PyJWKSet.from_dict(dict(jwks)).keys}
    claims: dict[str, Any] = pyjwt.decode(
        access_token,
        keys[header["kid"]],
        algorithms=["ES256"],
        audience=ISSUER,
        issuer=ISSUER,
        options={"require": ["exp", "iat", "jti", "sub", "client_id"]},
    )
    assert claims["sub"] == claims["client_id"] == "svc-orders"
    assert claims["tier"] == "gold"
    assert claims["exp"] - claims["iat"] == TTL
    return claims


def test_authlib_httpx_client_fetches_and_renews(server: Any) -> None:
    running, key_id, key = server
    token_endpoint = running.url + "/oauth/token"
    with OAuth2Client(
        client_id=key_id,
        client_secret=key,
        token_endpoint=token_endpoint,
        grant_type="client_credentials",
        timeout=10,
    ) as client:
        first = client.fetch_token()
        jwks = httpx.get(running.url + "/.well-known/jwks.json", timeout=10).json()
        claims = check(first, jwks, "orders:read reports:read")
        # Time passes (as the client sees it): the token has expired. The client's
        # next request fetches a new one with the same grant, as a user's would.
        client.token["expires_at"] = int(time.time()) - 1
        reply = client.get(running.url + "/.well-known/oauth-authorization-server")
        assert reply.status_code == 200
        second = client.token
        assert second["access_token"] != first["access_token"]
        renewed = check(second, jwks, "orders:read reports:read")
        assert renewed["jti"] != claims["jti"]
        metadata = reply.json()
        assert metadata["issuer"] == ISSUER
        assert metadata["token_endpoint"] == ISSUER + "/oauth/token"
        # A narrowed scope, asked for as authlib's users ask.
        narrow = client.fetch_token(scope="orders:read")
        check(narrow, jwks, "orders:read")


def test_authlib_requests_session_with_client_secret_post(server: Any) -> None:
    running, key_id, key = server
    with OAuth2Session(
        client_id=key_id,
        client_secret=key,
        token_endpoint=running.url + "/oauth/token",
        token_endpoint_auth_method="client_secret_post",
        grant_type="client_credentials",
    ) as session:
        first = session.fetch_token(timeout=10)
        jwks = session.get(running.url + "/.well-known/jwks.json", timeout=10).json()
        check(first, jwks, "orders:read reports:read")
        session.token["expires_at"] = int(time.time()) - 1
        session.ensure_active_token(session.token)
        second = session.token
        assert second["access_token"] != first["access_token"]
        check(second, jwks, "orders:read reports:read")


def test_authlib_sees_the_oauth_errors(server: Any) -> None:
    from authlib.integrations.base_client import OAuthError

    running, key_id, key = server
    with (
        OAuth2Session(
            client_id=key_id,
            client_secret=key[:-6] + "AAAAAA",
            token_endpoint=running.url + "/oauth/token",
            grant_type="client_credentials",
        ) as session,
        pytest.raises(OAuthError) as refused,
    ):
        session.fetch_token(timeout=10)
    assert refused.value.error == "invalid_client"
    with (
        OAuth2Session(
            client_id=key_id,
            client_secret=key,
            token_endpoint=running.url + "/oauth/token",
            grant_type="client_credentials",
        ) as session,
        pytest.raises(OAuthError) as narrowed,
    ):
        session.fetch_token(timeout=10, scope="admin")
    assert narrowed.value.error == "invalid_scope"


def _raw_request(url: str, request: bytes) -> bytes:
    host, _, port = url.removeprefix("http://").partition(":")
    with closing(socket.create_connection((host, int(port)), timeout=10)) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_chunked_token_request_is_read_whole(server: Any) -> None:
    import base64

    running, key_id, key = server
    auth = base64.b64encode(f"{key_id}:{key}".encode()).decode()
    body = b"grant_type=client_credentials&scope=orders%3Aread"
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
    request = (
        b"POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n"
        + f"Authorization: Basic {auth}\r\n\r\n".encode()
        + chunks
        + b"0\r\n\r\n"
    )
    response = _raw_request(running.url, request)
    assert _status(response) == 200, response[:500]
    assert b'"scope":"orders:read"' in response


def test_an_oversize_chunked_token_request_is_refused(server: Any) -> None:
    running, _, _ = server
    chunk = b"x" * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4))
    request = (
        b"POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    response = _raw_request(running.url, request)
    assert _status(response) == 413, response[:500]


def test_hostile_authorization_headers_over_the_wire(server: Any) -> None:
    running, _, _ = server
    headers_cases = [
        b"Authorization: Basic \xff\xfe\x80\r\n",
        b"Authorization: Basic " + b"A" * 7000 + b"\r\n",
        b"Authorization: Bearer \x00\r\n",
    ]
    for header in headers_cases:
        request = (
            b"POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 29\r\n" + header + b"\r\ngrant_type=client_credentials"
        )
        response = _raw_request(running.url, request)
        status = _status(response)
        assert 400 <= status < 500, (header[:40], response[:300])
        assert b"Traceback" not in response
