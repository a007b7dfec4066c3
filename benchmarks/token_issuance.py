"""Tokens issued per second per core by the token service, per signing algorithm.

The token service's companion of ``overhead.py``, with its method and drivers
(it imports them): variants timed round-robin in one process on one thread,
each variant's figure the median of its per-round means. One thread is one
core, so tokens per second per core is one million divided by the median
microseconds per token.

Per algorithm (ES256, EdDSA, RS256) it times:

- **core**: ``Engine.serve`` answering ``POST /oauth/token`` (client
  credentials, HTTP Basic with the key's ``key_id`` and the API key, memory
  key store, ``token_limits`` high enough never to refuse), the way every
  adapter calls it: form parsing, authlib's grant, the key from the engine's
  cache, the limit charge, the claims and the signature;
- **starlette**: the same request through the Starlette adapter, called
  directly as an ASGI app (no sockets, no test client, as ``overhead.py``
  does): what one Starlette process answers;
- **raw**: joserfc ``jwt.encode`` of the same claims with the same private
  key, the floor under both (the signature alone).

Every token request is checked once before timing (a 200 with an access token
that verifies with the published JWKS); any non-200 while timing aborts the
run.

Run ``python benchmarks/token_issuance.py --help`` for the options (those of
``overhead.py``, 300 requests per round by default: RS256 signs slowly).
Needs the ``bench`` and ``issuer`` extras.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import overhead
from overhead import Variant

from m2m_middleware import Engine, Settings, open_key_store
from m2m_middleware.issuer.signing_keys import _quiet_registry
from m2m_middleware.request_view import RequestView

ALGORITHMS = ("ES256", "EdDSA", "RS256")
ISSUER = "https://api.example.test"
TOKEN_PATH = "/oauth/token"
SCOPE = "orders:read orders:write"
FORM = b"grant_type=client_credentials"
#: Keys whose rows these variants read: one per algorithm, so no engine shares a cache.
ROWS: dict[tuple[str, str], Variant] = {}


def _settings(store: Any, alg: str) -> Settings:
    return Settings(
        key_store=store,
        default_limits=overhead.LIMIT,
        token_endpoint=TOKEN_PATH,
        token_issuer=ISSUER,
        token_limits=overhead.LIMIT,
        signing_algorithm=alg,
        # Made for this run and never shown: it only seals the run's in-memory keys.
        signing_key_secret=secrets.token_urlsafe(32),
    )


def _basic(key_id: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{key_id}:{key}".encode()).decode()


def _engine(alg: str) -> tuple[Engine, Settings, str]:
    store = open_key_store("memory://")
    issued = store.create_key(overhead.CLIENT_ID, scopes=SCOPE.split(), tier="gold")
    settings = _settings(store, alg)
    return Engine(settings), settings, _basic(issued.record.key_id, issued.key)


def _view(authorization: str) -> RequestView:
    return RequestView(
        "POST",
        TOKEN_PATH,
        headers={
            "authorization": authorization,
            "content-type": "application/x-www-form-urlencoded",
            "content-length": str(len(FORM)),
        },
        body=FORM,
    )


def _check_token(label: str, status: int, body: bytes, jwks: dict[str, Any], alg: str) -> None:
    """The answer is a token that verifies with the published keys, signed with ``alg``."""
    from joserfc import jwt
    from joserfc.jwk import KeySet

    if status != 200:
        raise SystemExit(f"{label}: expected 200 from the token endpoint, got {status}: {body!r}")
    token = json.loads(body)["access_token"]
    verified = jwt.decode(
        token, KeySet.import_key_set(jwks), algorithms=[alg], registry=_quiet_registry()
    )
    if verified.header.get("typ") != "at+jwt" or verified.claims["client_id"] != (
        overhead.CLIENT_ID
    ):
        raise SystemExit(f"{label}: the token is not the client's RFC 9068 access token")


def core_variant(alg: str) -> Variant:
    engine, _, authorization = _engine(alg)
    view = _view(authorization)
    status_of = engine.serve(view)
    jwks = json.loads(engine.serve(RequestView("GET", "/.well-known/jwks.json", headers={})).body)
    _check_token(f"core/{alg}", status_of.status, status_of.body, jwks, alg)
    serve = engine.serve

    def run(n: int) -> tuple[int, int]:
        bad = 0
        clock = overhead.clock
        t0 = clock()
        for _ in range(n):
            # A view per request, as an adapter makes one.
            if serve(_view(authorization)).status != 200:
                bad += 1
        return clock() - t0, bad

    return Variant("core", f"Engine.serve, {alg}", "ours", run)


def starlette_variant(loop: asyncio.AbstractEventLoop, alg: str) -> Variant:
    from starlette.applications import Starlette

    from m2m_middleware.starlette import M2MMiddleware

    _, settings, authorization = _engine(alg)
    app = M2MMiddleware(Starlette(), settings=settings)
    scope = overhead.asgi_scope(TOKEN_PATH, {})
    scope["method"] = "POST"
    scope["headers"] += [
        (b"authorization", authorization.encode()),
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"content-length", str(len(FORM)).encode()),
    ]
    message = {"type": "http.request", "body": FORM, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    reply: dict[str, Any] = {}

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start":
            reply["status"] = event["status"]
            reply["body"] = b""
        elif event["type"] == "http.response.body":
            reply["body"] += event.get("body", b"")

    loop.run_until_complete(app(scope.copy(), receive, send))
    jwks_scope = overhead.asgi_scope("/.well-known/jwks.json", {})
    first = (reply["status"], reply["body"])
    loop.run_until_complete(app(jwks_scope, receive, send))
    _check_token(f"starlette/{alg}", *first, json.loads(reply["body"]), alg)

    async def many(n: int) -> tuple[int, int]:
        bad = 0
        clock = overhead.clock
        t0 = clock()
        for _ in range(n):
            await app(scope.copy(), receive, send)
            if reply["status"] != 200:
                bad += 1
        return clock() - t0, bad

    def run(n: int) -> tuple[int, int]:
        return loop.run_until_complete(many(n))

    return Variant("starlette", f"M2MMiddleware (ASGI), {alg}", "ours", run)


def raw_variant(alg: str) -> Variant:
    """joserfc signing the same claims with a key of the same kind: the floor."""
    from joserfc import jwt
    from joserfc.jwk import ECKey, OKPKey, RSAKey

    key: Any
    if alg == "ES256":
        key = ECKey.generate_key("P-256")
    elif alg == "EdDSA":
        key = OKPKey.generate_key("Ed25519")
    else:
        key = RSAKey.generate_key(3072)  # the size our signer makes
    # The registry our signer uses: joserfc's own warns on every EdDSA token.
    registry = _quiet_registry()

    def claims() -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": ISSUER,
            "sub": overhead.CLIENT_ID,
            "client_id": overhead.CLIENT_ID,
            "aud": ISSUER,
            "exp": now + 300,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "scope": SCOPE,
            "tier": "gold",
        }

    header = {"alg": alg, "typ": "at+jwt", "kid": "bench"}

    def run(n: int) -> tuple[int, int]:
        clock = overhead.clock
        t0 = clock()
        for _ in range(n):
            jwt.encode(header, claims(), key, registry=registry)
        return clock() - t0, 0

    return Variant("raw", f"joserfc jwt.encode, {alg}", "floor", run)


def build(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    variants: list[Variant] = []
    for alg in ALGORITHMS:
        made: list[tuple[str, Callable[[], Variant]]] = [
            ("raw", lambda alg=alg: raw_variant(alg)),
            ("core", lambda alg=alg: core_variant(alg)),
        ]
        if "starlette" in frameworks:
            made.append(("starlette", lambda alg=alg: starlette_variant(loop, alg)))
        for where, make in made:
            variant = make()
            ROWS[where, alg] = variant
            variants.append(variant)
    return variants


def _per_second(us: float) -> str:
    return f"{1e6 / us:,.0f}" if us > 0 else "n/a"


def report(variants: list[Variant], verbose: bool) -> list[str]:
    header = ["where", "stack", "median us/token", "tokens/s per core", "/ raw signing"]
    rows = []
    for v in variants:
        raw = ROWS["raw", v.stack.rpartition(", ")[2]]
        rows.append(
            [
                v.framework,
                v.stack,
                overhead._fmt(v.median_us),
                _per_second(v.median_us),
                overhead._ratio(v.median_us, raw.median_us),
            ]
        )
    out = overhead.markdown_table(header, rows)
    out.append("")
    for where in ("core", "starlette"):
        found = [(alg, ROWS[where, alg]) for alg in ALGORITHMS if (where, alg) in ROWS]
        if not found:
            continue
        out.append(
            f"{where}: tokens/s per core: "
            + ", ".join(
                f"{alg} {_per_second(v.median_us)} "
                f"({overhead._ratio(v.median_us, ROWS['raw', alg].median_us)} raw signing)"
                for alg, v in found
            )
        )
    if verbose:
        out += overhead.round_means(variants)
    return out


def main(argv: list[str] | None = None) -> int:
    return overhead.run_benchmark(
        argv,
        description="Tokens issued per second per core by the token endpoint, per algorithm.",
        build=build,
        report=report,
        packages=("authlib", "joserfc", "cryptography"),
        requests=300,
    )


if __name__ == "__main__":
    sys.exit(main())
