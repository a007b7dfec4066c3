"""Signed routes through Django's ASGI handler (the conformance cases run its WSGI one).

Under ``AsyncClient`` the request is an ``ASGIRequest``: the middleware runs as a
coroutine, reads the body through ``request.body`` (spooled by the handler
already), takes the path from the scope's ``raw_path``, and the async view still
reads the body after it.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, override_settings
from django.urls import path

from m2m_middleware import open_key_store
from m2m_middleware.signing_clients import RequestsSignatureAuth

BODY = b'{"amount": 1200}'


async def echo(request: HttpRequest) -> HttpResponse:
    asyncio.get_running_loop()  # really running as a coroutine
    return HttpResponse(request.body, content_type="application/octet-stream")


URLCONF = "m2m_django_signature_urls"
_urls = types.ModuleType(URLCONF)
_urls.urlpatterns = [path("echo", echo)]  # type: ignore[attr-defined]
sys.modules[URLCONF] = _urls


@pytest.fixture
def signed_site() -> Iterator[tuple[str, str, ed25519.Ed25519PrivateKey]]:
    store = open_key_store("memory://")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issued = store.create_key("payments", signing_public_key=pem.decode())
    m2m = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "routes": [{"path": "/echo", "methods": ["POST"], "signed": True}],
        "max_body_size": 64,
    }
    with override_settings(M2M_AUTH=m2m, ROOT_URLCONF=URLCONF):
        yield issued.key, issued.record.key_id, private


def post(headers: dict[str, str], body: bytes) -> Any:
    async def go() -> Any:
        return await AsyncClient().post(
            "/echo", body, content_type="application/json", headers=headers
        )

    return asyncio.run(go())


def signed(api_key: str, key_id: str, private: Any, body: bytes) -> dict[str, str]:
    prepared = requests.Request(
        "POST",
        "http://testserver/echo",
        data=body,
        headers={"Host": "testserver", "X-API-Key": api_key, "Content-Type": "application/json"},
    ).prepare()
    RequestsSignatureAuth(key_id, private)(prepared)
    skip = {"content-length", "content-type", "host"}  # the client sends its own
    return {n: v for n, v in prepared.headers.items() if n.lower() not in skip}


def test_a_signed_request_through_the_asgi_handler(
    signed_site: tuple[str, str, ed25519.Ed25519PrivateKey],
) -> None:
    api_key, key_id, private = signed_site
    headers = signed(api_key, key_id, private, BODY)
    reply = post(headers, BODY)
    assert reply.status_code == 200, reply.content
    assert reply.content == BODY
    again = post(headers, BODY)
    assert again.status_code == 401 and again.json()["error"] == "invalid_signature"
    tampered = post(signed(api_key, key_id, private, BODY), BODY.replace(b"1200", b"9900"))
    assert tampered.status_code == 401
    big = b"x" * 65
    too_large = post(signed(api_key, key_id, private, big), big)
    assert too_large.status_code == 413 and too_large.json()["error"] == "invalid_request"


def test_a_chunked_body_over_max_body_size_is_never_read_whole(
    signed_site: tuple[str, str, ed25519.Ed25519PrivateKey],
) -> None:
    """No Content-Length (chunked through an ASGI server): Django's handler spools the
    body to a file, and ``request.body`` would load all of it into memory before the
    413, all of it when ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is None. The middleware reads
    at most ``max_body_size`` + 1 bytes of it."""
    api_key, key_id, private = signed_site
    chunk = b"x" * (1 << 20)
    chunks = 24
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"x-api-key", api_key.encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    sent = _asgi_post(scope, [chunk] * chunks, measure=True)
    assert sent[0]["status"] == 413
    # The handler's spool keeps a few MiB in memory; the whole body is 24 MiB.
    assert sent[-1]["peak"] < 12 * (1 << 20), f"{sent[-1]['peak'] / (1 << 20):.1f} MiB held"
    # A chunked body under the limit, signed, still passes and reaches the view.
    headers = signed(api_key, key_id, private, BODY)
    scope["headers"] = [
        *[(n.lower().encode(), v.encode()) for n, v in headers.items()],
        (b"host", b"testserver"),
        (b"transfer-encoding", b"chunked"),
    ]
    sent = _asgi_post(scope, [BODY[:5], BODY[5:]])
    assert sent[0]["status"] == 200, sent
    assert b"".join(m.get("body", b"") for m in sent[1:]) == BODY


def _asgi_post(
    scope: dict[str, Any], chunks: list[bytes], *, measure: bool = False
) -> list[dict[str, Any]]:
    """Django's ASGI handler answering ``scope`` with ``chunks`` as its body; with
    ``measure``, the last message holds the peak of traced memory (``"peak"``)."""
    import tracemalloc

    from django.core.handlers.asgi import ASGIHandler

    sent: list[dict[str, Any]] = []
    left = len(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal left
        if left == 0:  # the body is all sent; the client waits for the answer
            await asyncio.Event().wait()
        left -= 1
        return {"type": "http.request", "body": chunks[-left - 1], "more_body": left > 0}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=None):
        if not measure:
            asyncio.run(ASGIHandler()(scope, receive, send))
            return sent
        tracemalloc.start()
        try:
            asyncio.run(ASGIHandler()(scope, receive, send))
            sent.append({"peak": tracemalloc.get_traced_memory()[1]})
        finally:
            tracemalloc.stop()
    return sent


@pytest.mark.parametrize("length", ["abc", "1e3", "0x10"])
def test_a_malformed_content_length_on_a_signed_route_is_a_401_not_a_500(
    signed_site: tuple[str, str, ed25519.Ed25519PrivateKey], length: str
) -> None:
    """``request.body`` does ``int(CONTENT_LENGTH)`` and raised ValueError (a 500) before
    the view; the middleware reads no body it cannot size, so no digest holds."""
    from django.test import Client

    api_key, key_id, private = signed_site
    headers = signed(api_key, key_id, private, BODY)
    reply = Client(raise_request_exception=False).post(
        "/echo", BODY, content_type="application/json", headers=headers, CONTENT_LENGTH=length
    )
    assert reply.status_code == 401, reply.content[:200]
    assert reply.json()["error"] == "invalid_signature"
