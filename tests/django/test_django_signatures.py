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
