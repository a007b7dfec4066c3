"""A slow JWKS endpoint cannot stall a Starlette app under a real uvicorn server.

Requests cross a real socket into uvicorn (h11) running the app on its own
event loop (``servers.uvicorn_in_thread``); the identity provider is a local
endpoint that trickles its answer one byte every 0.2 s (``jwks_server``), so
no socket read ever waits long enough for a per-read timeout to fire. Every
wait is bounded: the endpoint gives up after a few seconds, and so do the
test's own requests.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import servers
from cryptography.hazmat.primitives.asymmetric import ec
from jwks_server import SlowJWKS
from jwt.algorithms import ECAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from m2m_middleware import Settings, open_key_store
from m2m_middleware.jwks import JWKSClient
from m2m_middleware.starlette import M2MMiddleware

#: Far below any stall here, and generous for a loaded two-core machine.
PROMPT = 0.5
#: What the slow endpoint costs a waiter that has no deadline of its own.
STALL = 6.0


@pytest.fixture(scope="module")
def idp_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def next_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    value: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    value.pop("key_ops", None)
    value["kid"] = kid
    return value


def token(key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    # A jti of its own: every token is new to the verified-token cache.
    claims = {"sub": "svc", "exp": int(time.time()) + 300, "jti": os.urandom(8).hex()}
    return pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def idp(idp_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowJWKS]:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = SlowJWKS({"keys": [jwk(idp_key, "k1")]})
    server.byte_interval = 0.2
    server.limit = STALL
    try:
        yield server
    finally:
        server.close()


async def ping(request: Request) -> Response:
    return JSONResponse({"client_id": request.user.client_id})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def middleware(idp: SlowJWKS, key_store: str, **fields: Any) -> M2MMiddleware:
    app = Starlette(routes=[Route("/ping", ping), Route("/health", health)])
    settings = Settings(
        schemes=("api_key", "jwt"),
        key_store=key_store,
        rate_limit_storage="memory://",
        public_paths=["/health"],
        jwt_jwks_url=idp.url,
        **fields,
    )
    return M2MMiddleware(app, settings=settings)


def jwks_of(app: M2MMiddleware) -> JWKSClient:
    tokens = app.engine.tokens
    assert tokens is not None and tokens.jwks is not None
    return tokens.jwks


def timed_get(base: str, headers: dict[str, str]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.get(base + "/ping", headers=headers, timeout=STALL + 5)
    return response, time.monotonic() - start


@pytest.mark.parametrize(("before", "status"), [("never-fetched", 503), ("new-kid", 401)])
def test_a_token_that_needs_the_trickling_endpoint_is_answered_within_the_timeout(
    idp: SlowJWKS,
    idp_key: ec.EllipticCurvePrivateKey,
    next_key: ec.EllipticCurvePrivateKey,
    before: str,
    status: int,
) -> None:
    """503 when no key set can be had, 401 for a kid the set held does not have:
    after about jwt_jwks_timeout (1 s), not after the endpoint's 6 s."""
    app = middleware(idp, "memory://", jwt_jwks_timeout=1.0)
    with servers.uvicorn_in_thread(app) as base:
        if before == "new-kid":
            response, _ = timed_get(base, bearer(token(idp_key, "k1")))
            assert response.status_code == 200, response.text
        idp.mode = "trickle"
        response, took = timed_get(base, bearer(token(next_key, "k2")))
        assert response.status_code == status, response.text
        assert response.json()["error"] == (
            "temporarily_unavailable" if status == 503 else "invalid_token"
        )
        assert took < 1.0 + PROMPT
        assert idp.slow_started.is_set()


def test_a_known_kid_is_served_while_a_slow_refresh_runs(
    idp: SlowJWKS, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    app = middleware(idp, "memory://", jwt_jwks_timeout=3.0)
    clock = _Clock()
    jwks_of(app).clock = clock
    with servers.uvicorn_in_thread(app) as base:
        response, _ = timed_get(base, bearer(token(idp_key, "k1")))
        assert response.status_code == 200, response.text
        idp.mode = "trickle"
        clock.now += 301  # past the set's max-age (300 s)
        for _ in range(5):
            response, took = timed_get(base, bearer(token(idp_key, "k1")))
            assert response.status_code == 200, response.text
            assert took < PROMPT  # from the stale set; the refresh runs behind
        assert idp.slow_started.wait(5)
        assert idp.hits == 2  # one refresh for all of them


def test_jwt_requests_held_by_a_stalled_jwks_do_not_delay_an_api_key_request(
    idp: SlowJWKS, idp_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    """The SQLite store answers in asyncio's default thread pool (min(32, CPUs + 4)
    threads). Before, each JWT request waiting for the JWKS held one of them, and
    an API-key request queued behind them until the fetch ended (7.5 s seen)."""
    url = "sqlite:///" + str(tmp_path / "keys.db")
    store = open_key_store(url)
    try:
        api_key = store.create_key("billing").key
    finally:
        store.close()
    waiting = max(12, min(32, (os.cpu_count() or 1) + 4) + 4)  # more than the pool holds
    app = middleware(idp, url, jwt_jwks_timeout=3.0)
    idp.mode = "trickle"
    with servers.uvicorn_in_thread(app) as base:

        async def main() -> tuple[list[httpx.Response], httpx.Response, float]:
            async with httpx.AsyncClient(base_url=base, timeout=STALL + 5) as client:
                jwts = [
                    asyncio.create_task(client.get("/ping", headers=bearer(token(idp_key, "k1"))))
                    for _ in range(waiting)
                ]
                loop = asyncio.get_running_loop()
                assert await loop.run_in_executor(None, idp.slow_started.wait, 5)
                await asyncio.sleep(0.3)  # every JWT request is in and waiting
                start = time.monotonic()
                keyed = await client.get("/ping", headers={"X-API-Key": api_key})
                took = time.monotonic() - start
                return list(await asyncio.gather(*jwts)), keyed, took

        jwt_replies, keyed, took = asyncio.run(main())
    assert keyed.status_code == 200, keyed.text
    assert keyed.json() == {"client_id": "billing"}
    assert took < PROMPT
    assert [r.status_code for r in jwt_replies] == [503] * waiting
    assert idp.hits == 1  # one fetch for all of them


class _Clock:
    """A monotonic clock the test moves, for the JWKS client's max-age."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
