"""Proxy headers through real uvicorn and gunicorn, whose own proxy handling comes first.

uvicorn runs with ``--proxy-headers`` on by default and believes
``X-Forwarded-For`` / ``-Proto`` from ``--forwarded-allow-ips`` (default
127.0.0.1): it rewrites the scope's client and scheme before the middleware
sees them. gunicorn believes ``X-Forwarded-Proto`` from the same default and
sets ``wsgi.url_scheme`` from it. These tests pin what the README tells users
to configure: the server's trust and ``trusted_proxies`` must name the same
proxies (or the server's must be off). Requests come from 127.0.0.1 (the
"proxy") or from 127.0.0.2 (any other host: Linux routes all of 127/8 to
loopback), so both sides of each trust decision cross a real socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import servers

from m2m_middleware import open_key_store

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

Serve = Callable[[str, Callable[[int], list[str]], Mapping[str, str]], "Server"]
PROXY = "127.0.0.1"
STRANGER = "127.0.0.2"
CLIENT = "203.0.113.9"
FORWARDED = {"X-Forwarded-For": CLIENT, "X-Forwarded-Proto": "https"}


def uvicorn(*options: str) -> Callable[[int], list[str]]:
    return servers.uvicorn_command("transport_starlette_app:app", *options)


def gunicorn(*options: str) -> Callable[[int], list[str]]:
    return servers.gunicorn_command("transport_flask_app:app", *options, workers=1)


class Site:
    def __init__(self, server: Server, key: str) -> None:
        self.server = server
        self.key = key

    def get(self, source: str, headers: Mapping[str, str]) -> tuple[int, str | None]:
        """GET /seen from ``source``: the status and the problem's error code (None: 200)."""
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, base_url=self.server.url, timeout=5) as http:
            reply = http.get("/seen", headers={"X-API-Key": self.key, **headers})
        if reply.status_code == 200:
            return 200, None
        assert reply.headers["content-type"] == "application/problem+json", self.server.output()
        return reply.status_code, reply.json()["error"]


@pytest.fixture
def start(tmp_path: Path, serve: Serve) -> Callable[..., Site]:
    def started(name: str, command: Callable[[int], list[str]], trusted: list[str]) -> Site:
        url = "sqlite:///" + str(tmp_path / f"{name}.db")
        with closing(open_key_store(url)) as keys:
            key = keys.create_key("acme", allowed_cidrs=["203.0.113.0/24"]).key
        server = serve(
            name,
            command,
            {
                "M2M_TEST_KEY_STORE": url,
                "M2M_TEST_TRUSTED_PROXIES": json.dumps(trusted),
                "M2M_TEST_REQUIRE_HTTPS": "1",
            },
        )
        return Site(server, key)

    return started


@pytest.mark.slow
def test_uvicorn_without_its_proxy_headers_and_trusted_proxies(
    start: Callable[..., Site],
) -> None:
    """The README's advice for uvicorn: ``--no-proxy-headers``, trust in one place."""
    site = start("uvicorn-no-proxy-headers", uvicorn("--no-proxy-headers"), [f"{PROXY}/32"])
    assert site.get(PROXY, FORWARDED) == (200, None)
    # From anyone else, the same headers say nothing: plain HTTP, its own address.
    assert site.get(STRANGER, FORWARDED) == (403, "https_required")
    assert site.get(PROXY, {"X-Forwarded-For": CLIENT}) == (403, "https_required")
    # The client forged the left entry; the proxy appended the address it saw.
    forged = {**FORWARDED, "X-Forwarded-For": f"{CLIENT}, 198.51.100.66"}
    assert site.get(PROXY, forged) == (403, "address_not_allowed")
    rfc7239 = {"Forwarded": f'for="{CLIENT}:4711";proto=https'}
    assert site.get(PROXY, rfc7239) == (200, None)  # uvicorn reads no Forwarded itself
    assert site.get(STRANGER, rfc7239) == (403, "https_required")


@pytest.mark.slow
def test_uvicorn_with_its_default_proxy_headers_and_the_same_trust(
    start: Callable[..., Site],
) -> None:
    """uvicorn's default (--proxy-headers, --forwarded-allow-ips 127.0.0.1) and
    trusted_proxies naming the same proxy agree: uvicorn rewrites the client
    first, and the middleware, seeing a peer it does not trust, keeps it."""
    site = start("uvicorn-defaults", uvicorn(), [f"{PROXY}/32"])
    assert site.get(PROXY, FORWARDED) == (200, None)
    assert site.get(STRANGER, FORWARDED) == (403, "https_required")
    forged = {**FORWARDED, "X-Forwarded-For": f"{CLIENT}, 198.51.100.66"}
    assert site.get(PROXY, forged) == (403, "address_not_allowed")


@pytest.mark.slow
def test_uvicorns_own_trust_applies_even_with_no_trusted_proxies(
    start: Callable[..., Site],
) -> None:
    """What the README warns of: with trusted_proxies empty, uvicorn's default still
    believes 127.0.0.1's headers (it rewrote the scope before the middleware ran)."""
    site = start("uvicorn-defaults-untrusted", uvicorn(), [])
    assert site.get(PROXY, FORWARDED) == (200, None)
    assert site.get(STRANGER, FORWARDED) == (403, "https_required")


@pytest.mark.slow
def test_gunicorn_and_trusted_proxies(start: Callable[..., Site]) -> None:
    """gunicorn sets wsgi.url_scheme from X-Forwarded-Proto for its
    forwarded_allow_ips (default 127.0.0.1) and leaves REMOTE_ADDR alone: the
    client address comes from trusted_proxies only."""
    site = start("gunicorn", gunicorn("--forwarded-allow-ips", PROXY), [f"{PROXY}/32"])
    assert site.get(PROXY, FORWARDED) == (200, None)
    assert site.get(STRANGER, FORWARDED) == (403, "https_required")
    forged = {**FORWARDED, "X-Forwarded-For": f"{CLIENT}, 198.51.100.66"}
    assert site.get(PROXY, forged) == (403, "address_not_allowed")
    assert site.get(PROXY, {"X-Forwarded-For": CLIENT}) == (403, "https_required")


@pytest.mark.slow
def test_gunicorn_without_trusted_proxies_knows_no_client_address(
    start: Callable[..., Site],
) -> None:
    """gunicorn believed the proxy's X-Forwarded-Proto (its default), but the client
    address stays the proxy's: a key bound to the client's network is refused."""
    site = start("gunicorn-untrusted", gunicorn(), [])
    assert site.get(PROXY, FORWARDED) == (403, "address_not_allowed")
