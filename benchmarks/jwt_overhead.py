"""Per-request overhead of JWT bearer auth + per-client rate limiting, per framework.

The JWT companion of ``overhead.py``, with the same method and drivers (it
imports them): apps called directly through a WSGI environ or an ASGI scope,
variants timed round-robin, each variant's figure the median of its per-round
means, overhead = that median minus the bare app's of the same framework.

Per framework (Starlette, Flask, Django) it times:

- the bare app, and m2m-middleware with an API key (the yardstick);
- m2m-middleware with an HS256 and an ES256 JWT, each **cached** (the same
  token on every request, so it is verified once and then found by its hash)
  and **cold** (a token never seen before on every request, so each one is
  parsed, verified and its claims checked);
- the peer stack, with the same token on every request and with a new one
  each time (the peers cache nothing, so the two should match): Starlette's
  ``AuthenticationMiddleware`` with a PyJWT backend plus slowapi's
  ``@limiter.limit``; flask-jwt-extended's ``verify_jwt_in_request`` plus
  Flask-Limiter; DRF with simplejwt's ``JWTStatelessUserAuthentication`` plus a
  ``UserRateThrottle``.

Plus two rows with no framework at all: one joserfc
``jws.deserialize_compact(token, key, algorithms=[alg])`` per call on a new
token each time, the floor under the cold case.

And tokens of our own issuer (issue 12 item 4), on ``Engine.check`` with the
token service on (see ``build_own``): the API key, one of our tokens cached, a
new one each request from a key the engine knows (cold), and the raw joserfc
verification of the same tokens with our public key; the report gives both
done-when ratios for them.

All of our variants in one framework share one app (one engine, one cache),
the way one deployment would serve API keys and both kinds of token. Every
token carries ``sub``, ``client_id``, ``scope``, ``jti``, ``aud``, ``iss`` and
a far ``exp``; the cold variants' tokens are minted before anything is timed,
enough for the warm-up and every round, and no variant sees one twice. The
peers get their keys already loaded (PyJWT takes the EC public key object),
the fastest way to configure them.

Run ``python benchmarks/jwt_overhead.py --help`` for the options (the same as
``overhead.py``'s, but 1500 requests per round by default). Needs the
``bench`` extra. Not a pytest test: it calls ``django.conf.settings.configure()``,
so run it in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import overhead
from overhead import CLIENT_ID, DRF_RATE, FRAMEWORKS, LIMIT, Rotating, Variant

AUDIENCE = "https://api.example.test"
ISSUER = "https://idp.example.test/"
SCOPE = "orders:read orders:write"
ALGORITHMS = ("HS256", "ES256")
#: What the variants with the same token, and those with a new one each time, are called.
OURS = ("cached", "cold")
PEERS = ("same token", "new token each request")
#: The done-when targets: cached JWT / API key, and cold ES256 and HS256 / (raw + API key).
CACHED_TARGET = 1.5
COLD_TARGET = 1.3

#: Every timed variant under a (framework, kind) name, for the summary lines.
ROWS: dict[tuple[str, str], Variant] = {}


@dataclass(frozen=True)
class Keys:
    hmac_secret: str
    ec_private_pem: str
    ec_public_pem: str
    ec_public: Any  # the cryptography public key object, for PyJWT


def make_keys() -> Keys:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key()
    return Keys(
        hmac_secret=secrets.token_urlsafe(48),
        ec_private_pem=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        ec_public_pem=public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        ec_public=public,
    )


def _signing_key(alg: str, keys: Keys) -> Any:
    from joserfc.jwk import ECKey, OctKey

    if alg == "HS256":
        return OctKey.import_key(keys.hmac_secret)
    return ECKey.import_key(keys.ec_private_pem)


@dataclass
class Tokens:
    """Tokens of one algorithm, all signed before anything is timed."""

    alg: str
    cached: str  # sent on every request by the "cached" / "same token" variants
    check: str  # for the pre-flight checks of the others
    forged: str  # the same claims signed with another key: must be refused
    pool: list[str]  # distinct tokens; each cold variant draws them from the start

    @classmethod
    def mint(cls, alg: str, keys: Keys, other: Keys, count: int) -> Tokens:
        from joserfc import jwt

        key = _signing_key(alg, keys)
        header = {"alg": alg}
        expires = int(time.time()) + 365 * 86400
        prefix = secrets.token_hex(4)

        def sign(jti: str, with_key: Any = key) -> str:
            claims = {
                "sub": CLIENT_ID,
                "client_id": CLIENT_ID,
                "scope": SCOPE,
                "exp": expires,
                "aud": AUDIENCE,
                "iss": ISSUER,
                "jti": f"{prefix}-{jti}",
            }
            return jwt.encode(header, claims, with_key)

        return cls(
            alg,
            cached=sign("cached"),
            check=sign("check"),
            forged=sign("forged", _signing_key(alg, other)),
            pool=[sign(str(i)) for i in range(count)],
        )

    def draw(self) -> Callable[[int], list[str]]:
        """n -> the next n tokens of the pool, for one variant."""
        position = 0

        def take(n: int) -> list[str]:
            nonlocal position
            if position + n > len(self.pool):
                raise SystemExit(f"{self.alg}: the pool of {len(self.pool)} tokens ran out")
            batch = self.pool[position : position + n]
            position += n
            return batch

        return take

    def rotating(self) -> Rotating:
        """A new token from the pool in ``Authorization`` on every request."""
        take = self.draw()
        return "Authorization", lambda n: [f"Bearer {token}" for token in take(n)]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- one framework's variants -----------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One variant to check and time; ``kind`` names it for the summary lines."""

    kind: str
    stack: str
    role: str
    app: Any
    headers: dict[str, str]
    deny: int | None = 401
    wrong: dict[str, str] | None = None  # a credential that must be refused
    rotating: Rotating | None = None  # a new token on every request
    path: str = "/"


def specs(
    bare: tuple[str, Any],
    ours: tuple[str, Any, str],
    peers: dict[str, tuple[str, Any, str]],
    tokens: dict[str, Tokens],
    raw_in_view: dict[str, tuple[Any, str]],
) -> list[Spec]:
    """bare; the raw verify in a bare view; ours with the API key, then each
    algorithm cached and cold; then the peers.

    ``bare`` is (stack, app), ``ours`` (stack, app, API key), ``peers`` maps
    each algorithm to (stack, app, path), ``raw_in_view`` to (app, path).
    """
    stack, app, key = ours
    found = [
        Spec("bare", bare[0], "bare", bare[1], {}, deny=None),
        *(
            Spec(
                f"raw-in-view {alg}",
                f"bare + joserfc deserialize_compact in the view, {alg}, new token each request",
                "reference",  # its overhead over bare is the in-framework cold floor
                raw_app,
                bearer(tokens[alg].check),
                wrong=bearer(tokens[alg].forged),
                rotating=tokens[alg].rotating(),
                path=raw_path,
            )
            for alg, (raw_app, raw_path) in raw_in_view.items()
        ),
        Spec("api_key", f"{stack}, API key", "ours", app, {"X-API-Key": key}),
    ]
    for alg, t in tokens.items():
        found += _same_and_new(alg, f"{stack}, JWT {alg}", "ours", app, "/", t, OURS)
    for alg, t in tokens.items():
        peer, peer_app, path = peers[alg]
        found += _same_and_new(f"peer {alg}", f"{peer}, {alg}", "peer", peer_app, path, t, PEERS)
    return found


def _same_and_new(
    kind: str, stack: str, role: str, app: Any, path: str, t: Tokens, names: tuple[str, str]
) -> list[Spec]:
    same, new = names
    wrong = bearer(t.forged)
    return [
        Spec(
            f"{kind} {same}", f"{stack} {same}", role, app, bearer(t.cached), wrong=wrong, path=path
        ),
        Spec(
            f"{kind} {new}",
            f"{stack} {new}",
            role,
            app,
            bearer(t.check),
            wrong=wrong,
            rotating=t.rotating(),
            path=path,
        ),
    ]


def wsgi_variants(framework: str, found: list[Spec]) -> list[Variant]:
    return _register(
        framework,
        found,
        lambda s: overhead.wsgi_variant(
            framework,
            s.stack,
            s.role,
            s.app,
            s.path,
            s.headers,
            s.deny,
            wrong_headers=s.wrong,
            rotating=s.rotating,
        ),
    )


def asgi_variants(
    loop: asyncio.AbstractEventLoop, framework: str, found: list[Spec]
) -> list[Variant]:
    return _register(
        framework,
        found,
        lambda s: overhead.asgi_variant(
            loop,
            framework,
            s.stack,
            s.role,
            s.app,
            s.headers,
            s.deny,
            wrong_headers=s.wrong,
            rotating=s.rotating,
        ),
    )


def _register(framework: str, found: list[Spec], make: Callable[[Spec], Variant]) -> list[Variant]:
    variants = []
    for spec in found:
        variant = make(spec)  # checks it first: 200 with the credential, 401 without
        ROWS[framework, spec.kind] = variant
        variants.append(variant)
    return variants


def ours_config(store: Any, keys: Keys) -> dict[str, Any]:
    """m2m-middleware's settings: API keys from ``store``, and HS256 or ES256 JWTs."""
    return {
        "key_store": store,
        "schemes": ("api_key", "jwt"),
        "jwt_keys": [keys.hmac_secret, keys.ec_public_pem],
        "jwt_audience": AUDIENCE,
        "jwt_issuer": ISSUER,
        "default_limits": LIMIT,
        "rate_limit_storage": "memory://",
    }


def _api_key(store: Any) -> str:
    return str(store.create_key(CLIENT_ID).key)


# -- the raw joserfc floor ----------------------------------------------------------------------


def build_raw(keys: Keys, tokens: dict[str, Tokens]) -> list[Variant]:
    from joserfc.jwk import ECKey, OctKey

    verifying = {
        "HS256": OctKey.import_key(keys.hmac_secret),
        "ES256": ECKey.import_key(keys.ec_public_pem),
    }
    variants = [raw_variant(t, verifying[alg]) for alg, t in tokens.items()]
    for alg, variant in zip(tokens, variants, strict=True):
        ROWS["-", f"raw {alg}"] = variant
    return variants


def view_verifier(alg: str, keys: Keys) -> Callable[[str | None], bool]:
    """Authorization header -> whether one joserfc verify accepts its token.

    For a bare view that does the raw verify itself: the cold floor measured
    in the same framework, where the crypto no longer runs in a tight loop
    with its code and data hot in the CPU caches.
    """
    from joserfc import jws
    from joserfc.errors import JoseError
    from joserfc.jwk import ECKey, OctKey

    key = (
        OctKey.import_key(keys.hmac_secret)
        if alg == "HS256"
        else ECKey.import_key(keys.ec_public_pem)
    )
    algorithms = [alg]

    def verified(authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        try:
            jws.deserialize_compact(authorization[7:], key, algorithms)
        except (JoseError, ValueError):
            return False
        return True

    return verified


def raw_variant(tokens: Tokens, key: Any) -> Variant:
    """One ``jws.deserialize_compact`` per call, a new token each time: the cold floor."""
    from joserfc import jws
    from joserfc.errors import BadSignatureError

    algorithms = [tokens.alg]
    jws.deserialize_compact(tokens.check, key, algorithms)
    try:
        jws.deserialize_compact(tokens.forged, key, algorithms)
    except BadSignatureError:
        pass
    else:
        raise SystemExit(f"raw {tokens.alg}: a token signed with another key verified")
    take = tokens.draw()

    def run(n: int) -> tuple[int, int]:
        batch = take(n)
        deserialize = jws.deserialize_compact
        perf = overhead.clock
        t0 = perf()
        for token in batch:
            deserialize(token, key, algorithms)
        return perf() - t0, 0

    stack = f"raw: joserfc jws.deserialize_compact, {tokens.alg}, new token each call"
    return Variant("-", stack, "floor", run)


def build_engine(keys: Keys, tokens: dict[str, Tokens]) -> list[Variant]:
    """``Engine.check`` called directly: our whole decision with no framework around it.

    The done-when ratios are taken here. In a framework each overhead is the
    difference of two medians ten to fifty times its size, so one run's noise
    can swing a ratio of two small overheads by 2x either way; this measures
    the same code (the adapters do the same work for either credential)
    without that noise.
    """
    from m2m_middleware import Settings, open_key_store
    from m2m_middleware.engine import Engine

    store = open_key_store("memory://")
    key = _api_key(store)
    engine = Engine(Settings(**ours_config(store, keys)))
    check = engine.check
    variants = []

    def constant(kind: str, stack: str, api_key: str | None, authorization: str | None) -> None:
        wrong = tokens["HS256"].forged
        if not check("GET", "/", authorization, api_key).allowed:
            raise SystemExit(f"core {kind}: refused its own credential")
        if check("GET", "/", f"Bearer {wrong}", None).allowed:
            raise SystemExit(f"core {kind}: a forged token passed")

        def run(n: int) -> tuple[int, int]:
            perf = overhead.clock
            refused = 0
            t0 = perf()
            for _ in range(n):
                if not check("GET", "/", authorization, api_key).allowed:
                    refused += 1
            return perf() - t0, refused

        variant = Variant("-", f"core: Engine.check, {stack}", "floor", run)
        ROWS["-", f"core {kind}"] = variant
        variants.append(variant)

    constant("api_key", "API key", key, None)
    for alg, t in tokens.items():
        constant(f"{alg} cached", f"JWT {alg} cached", None, f"Bearer {t.cached}")
        take = t.draw()

        def run(n: int, take: Callable[[int], list[str]] = take) -> tuple[int, int]:
            batch = [f"Bearer {token}" for token in take(n)]
            perf = overhead.clock
            refused = 0
            t0 = perf()
            for authorization in batch:
                if not check("GET", "/", authorization, None).allowed:
                    refused += 1
            return perf() - t0, refused

        variant = Variant("-", f"core: Engine.check, JWT {alg} cold", "floor", run)
        ROWS["-", f"core {alg} cold"] = variant
        variants.append(variant)
    return variants


# -- our own issuer's tokens ---------------------------------------------------------------------

OWN_ISSUER = "https://api.example.test"
OWN_SECRET = "jwt_overhead.py: the signing secret of a benchmark"


def build_own(keys: Keys, count: int) -> list[Variant]:
    """Tokens our own issuer signed (issue 12 item 4), through ``Engine.check`` directly.

    One engine configured as a deployment with the token service is (our
    issuer trusted from the key store, API keys and an IdP's JWTs beside it):
    the API key (cached), one token of ours on every request (**cached**), a
    token it has not seen on every request from a key it knows (**cold**: the
    full parse, one ES256 verification, the claims, the key's state from the
    cache), and, with no engine at all, joserfc's ``deserialize_compact`` of the
    same tokens with our public key (the floor under the cold case).
    """
    from joserfc.jwk import ECKey

    from m2m_middleware import Settings, open_key_store
    from m2m_middleware.engine import Engine

    store = open_key_store("memory://")
    issued = store.create_key(CLIENT_ID, scopes=SCOPE.split())
    engine = Engine(
        Settings(
            **ours_config(store, keys),
            token_endpoint="/oauth/token",
            token_issuer=OWN_ISSUER,
            signing_key_secret=OWN_SECRET,
        )
    )
    assert engine.signing_keys is not None
    signing = engine.signing_keys.current_signing_key()
    public = ECKey.import_key(engine.signing_keys.public_jwks()["keys"][0])
    attacker = ECKey.generate_key("P-256")
    expires = int(time.time()) + 3600
    prefix = secrets.token_hex(4)

    def sign(jti: str, forged: bool = False) -> str:
        claims = {
            "iss": OWN_ISSUER,
            "sub": CLIENT_ID,
            "client_id": CLIENT_ID,
            "aud": OWN_ISSUER,
            "exp": expires,
            "iat": expires - 3600,
            "jti": f"{prefix}-{jti}",
            "scope": SCOPE,
            "key_id": issued.key_id,
        }
        if not forged:
            return signing.sign(claims)
        from joserfc import jwt

        header = {"alg": signing.algorithm, "kid": signing.kid, "typ": "at+jwt"}
        return jwt.encode(header, claims, attacker)

    own = Tokens(
        signing.algorithm,
        cached=sign("cached"),
        check=sign("check"),
        forged=sign("forged", forged=True),
        pool=[sign(str(i)) for i in range(count)],
    )
    raw = raw_variant(own, public)
    raw.stack = f"raw: joserfc jws.deserialize_compact, our issuer's {own.alg}, new token each call"
    ROWS["-", "raw own"] = raw
    check = engine.check
    for credential, api_key in ((own.check, None), (own.cached, None), (None, issued.key)):
        authorization = None if credential is None else f"Bearer {credential}"
        if not check("GET", "/", authorization, api_key).allowed:
            raise SystemExit("core own: refused its own credential")
    if check("GET", "/", f"Bearer {own.forged}", None).allowed:
        raise SystemExit("core own: a token signed with another key under our kid passed")

    def same(authorization: str | None, api_key: str | None) -> Callable[[int], tuple[int, int]]:
        def run(n: int) -> tuple[int, int]:
            perf = overhead.clock
            refused = 0
            t0 = perf()
            for _ in range(n):
                if not check("GET", "/", authorization, api_key).allowed:
                    refused += 1
            return perf() - t0, refused

        return run

    take = own.draw()

    def cold(n: int) -> tuple[int, int]:
        batch = [f"Bearer {token}" for token in take(n)]
        perf = overhead.clock
        refused = 0
        t0 = perf()
        for authorization in batch:
            if not check("GET", "/", authorization, None).allowed:
                refused += 1
        return perf() - t0, refused

    stack = "core: Engine.check with the token service on"
    variants = [
        raw,
        Variant("-", f"{stack}, API key", "floor", same(None, issued.key)),
        Variant("-", f"{stack}, our token cached", "floor", same(f"Bearer {own.cached}", None)),
        Variant("-", f"{stack}, our token cold (a known key)", "floor", cold),
    ]
    for kind, variant in zip(("own api_key", "own cached", "own cold"), variants[1:], strict=True):
        ROWS["-", f"core {kind}"] = variant
    return variants


# -- Starlette ---------------------------------------------------------------------------------


def build_starlette(
    loop: asyncio.AbstractEventLoop, keys: Keys, tokens: dict[str, Tokens]
) -> list[Variant]:
    import jwt as pyjwt
    from starlette.authentication import (
        AuthCredentials,
        AuthenticationBackend,
        AuthenticationError,
        SimpleUser,
    )
    from starlette.requests import HTTPConnection

    from m2m_middleware import Settings, open_key_store
    from m2m_middleware.starlette import M2MMiddleware

    store = open_key_store("memory://")
    key = _api_key(store)
    ours = overhead.starlette_app()
    ours.add_middleware(M2MMiddleware, settings=Settings(**ours_config(store, keys)))

    class PyJWTBackend(AuthenticationBackend):
        def __init__(self, key: Any, alg: str) -> None:
            self.key = key
            self.algorithms = [alg]

        async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
            scheme, _, token = conn.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise AuthenticationError("missing bearer token")
            try:
                claims = pyjwt.decode(
                    token,
                    self.key,
                    algorithms=self.algorithms,
                    audience=AUDIENCE,
                    issuer=ISSUER,
                    options={"require": ["exp", "aud", "iss"]},
                )
            except pyjwt.InvalidTokenError as exc:
                raise AuthenticationError(str(exc)) from None
            return AuthCredentials(claims["scope"].split()), SimpleUser(claims["client_id"])

    def raw_endpoint(alg: str) -> Any:
        from starlette.responses import PlainTextResponse

        verified = view_verifier(alg, keys)

        async def endpoint(request: Any) -> PlainTextResponse:
            if not verified(request.headers.get("authorization")):
                return PlainTextResponse("no", status_code=401)
            return PlainTextResponse("ok")

        return overhead.starlette_app(endpoint=endpoint)

    verifying = {"HS256": keys.hmac_secret, "ES256": keys.ec_public}
    stack = "peer: AuthenticationMiddleware (PyJWT backend) + slowapi @limit"
    peers = {
        alg: (stack, overhead.starlette_slowapi_decorated(PyJWTBackend(verifying[alg], alg)), "/")
        for alg in tokens
    }
    return asgi_variants(
        loop,
        "starlette",
        specs(
            ("bare (Route + PlainTextResponse)", overhead.starlette_app()),
            ("ours: M2MMiddleware", ours, key),
            peers,
            tokens,
            {alg: (raw_endpoint(alg), "/") for alg in tokens},
        ),
    )


# -- Flask -------------------------------------------------------------------------------------


def build_flask(keys: Keys, tokens: dict[str, Tokens]) -> list[Variant]:
    from flask import g, jsonify
    from flask_jwt_extended import JWTManager, get_jwt_identity, verify_jwt_in_request

    from m2m_middleware import Settings, open_key_store
    from m2m_middleware.flask import M2MAuth

    store = open_key_store("memory://")
    key = _api_key(store)
    ours = overhead.flask_app()
    M2MAuth(ours, settings=Settings(**ours_config(store, keys)))

    def peer(alg: str) -> Any:
        app = overhead.flask_app()
        app.config.update(
            JWT_ALGORITHM=alg,
            JWT_TOKEN_LOCATION=["headers"],
            JWT_DECODE_AUDIENCE=AUDIENCE,
            JWT_DECODE_ISSUER=ISSUER,
        )
        if alg == "HS256":
            app.config["JWT_SECRET_KEY"] = keys.hmac_secret
        else:
            app.config["JWT_PUBLIC_KEY"] = keys.ec_public
        manager = JWTManager(app)

        @manager.invalid_token_loader
        def invalid_token(reason: str) -> Any:  # flask-jwt-extended says 422 by default
            return jsonify(msg=reason), 401

        @app.before_request
        def authenticate() -> None:
            verify_jwt_in_request()
            g.client_id = get_jwt_identity()

        overhead.flask_limiter(app)
        return app

    def raw_app(alg: str) -> Any:
        from flask import Flask, request

        app = Flask(__name__)
        verified = view_verifier(alg, keys)

        @app.get("/")
        def hello() -> Any:
            if not verified(request.headers.get("Authorization")):
                return "no", 401
            return "ok"

        return app

    stack = "peer: flask-jwt-extended verify_jwt_in_request + Flask-Limiter"
    peers = {alg: (stack, peer(alg), "/") for alg in tokens}
    return wsgi_variants(
        "flask",
        specs(
            ("bare (one route)", overhead.flask_app()),
            ("ours: M2MAuth", ours, key),
            peers,
            tokens,
            {alg: (raw_app(alg), "/") for alg in tokens},
        ),
    )


# -- Django ------------------------------------------------------------------------------------


def build_django(keys: Keys, tokens: dict[str, Tokens]) -> list[Variant]:
    from m2m_middleware import open_key_store

    store = open_key_store("memory://")
    key = _api_key(store)
    # simplejwt reads one configuration per process: HS256 here; ES256 below.
    overhead.configure_django(
        ours_config(store, keys),
        SIMPLE_JWT={
            "ALGORITHM": "HS256",
            "SIGNING_KEY": keys.hmac_secret,
            "AUDIENCE": AUDIENCE,
            "ISSUER": ISSUER,
            "USER_ID_CLAIM": "client_id",
            "TOKEN_TYPE_CLAIM": None,  # our tokens are plain access tokens, no token_type
        },
    )

    from rest_framework.permissions import IsAuthenticated
    from rest_framework.throttling import UserRateThrottle
    from rest_framework_simplejwt.authentication import JWTStatelessUserAuthentication
    from rest_framework_simplejwt.backends import TokenBackend
    from rest_framework_simplejwt.exceptions import InvalidToken, TokenError
    from rest_framework_simplejwt.tokens import AccessToken

    class ClientRateThrottle(UserRateThrottle):  # keyed on request.user.pk: the client_id
        scope = "client"
        rate = DRF_RATE

    class ES256AccessToken(AccessToken):
        """What ``SIMPLE_JWT = {"ALGORITHM": "ES256", "VERIFYING_KEY": ...}`` would build."""

        _token_backend = TokenBackend(
            "ES256", verifying_key=keys.ec_public_pem, audience=AUDIENCE, issuer=ISSUER
        )

    class ES256StatelessUserAuthentication(JWTStatelessUserAuthentication):
        """The stock class, with ``AUTH_TOKEN_CLASSES = (ES256AccessToken,)``."""

        def get_validated_token(self, raw_token: bytes) -> Any:
            try:
                return ES256AccessToken(raw_token)
            except TokenError as exc:
                raise InvalidToken(exc.args[0]) from None

    authentication = {
        "HS256": JWTStatelessUserAuthentication,
        "ES256": ES256StatelessUserAuthentication,
    }
    from django.http import HttpRequest, HttpResponse

    def raw_view(alg: str) -> Any:
        verified = view_verifier(alg, keys)

        def view(request: HttpRequest) -> HttpResponse:
            if not verified(request.headers.get("Authorization")):
                return HttpResponse("no", status=401, content_type="text/plain")
            return HttpResponse("ok", content_type="text/plain")

        return view

    overhead.django_urls(
        {
            **{
                f"drf-{alg.lower()}": overhead.django_plain_view(
                    authentication_classes=(authentication[alg],),
                    permission_classes=(IsAuthenticated,),
                    throttle_classes=(ClientRateThrottle,),
                )
                for alg in tokens
            },
            **{f"raw-{alg.lower()}": raw_view(alg) for alg in tokens},
        }
    )
    plain = overhead.django_handler([])
    ours = overhead.django_handler(["m2m_middleware.django.M2MAuthMiddleware"])
    stack = "peer: DRF APIView + simplejwt JWTStatelessUserAuthentication + UserRateThrottle"
    peers = {alg: (stack, plain, f"/drf-{alg.lower()}") for alg in tokens}
    return wsgi_variants(
        "django",
        specs(
            ("bare (function view, no middleware)", plain),
            ("ours: M2MAuthMiddleware", ours, key),
            peers,
            tokens,
            {alg: (plain, f"/raw-{alg.lower()}") for alg in tokens},
        ),
    )


# -- running and reporting ----------------------------------------------------------------------


def build(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    keys, other = make_keys(), make_keys()
    count = args.warmup + args.rounds * args.requests
    tokens = {alg: Tokens.mint(alg, keys, other, count) for alg in ALGORITHMS}
    variants = build_raw(keys, tokens) + build_engine(keys, tokens) + build_own(keys, count)
    if "starlette" in frameworks:
        variants += build_starlette(loop, keys, tokens)
    if "flask" in frameworks:
        variants += build_flask(keys, tokens)
    if "django" in frameworks:
        variants += build_django(keys, tokens)
    return variants


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _verdict(ratio: float | None, target: float) -> str:
    met = "n/a" if ratio is None else "met" if ratio <= target else "NOT met"
    return f"target <= {target}x: {met}"


def report(variants: list[Variant], verbose: bool) -> list[str]:
    overheads = overhead.overheads(variants)

    def cost(framework: str, kind: str) -> float | None:
        row = ROWS.get((framework, kind))
        return None if row is None else overheads[id(row)]

    header = ["framework", "stack", "median us/request", "overhead us", "overhead / ours API key"]
    rows = []
    for v in variants:
        mine = overheads[id(v)]
        ratio = _ratio(mine, cost(v.framework, "api_key"))
        rows.append(
            [v.framework, v.stack, overhead._fmt(v.median_us), overhead._fmt(mine), _x(ratio)]
        )
    out = overhead.markdown_table(header, rows)
    out.append("")
    # The done-when ratios, on Engine.check itself (see build_engine).
    key = cost("-", "core api_key")
    cached = {alg: _ratio(cost("-", f"core {alg} cached"), key) for alg in ALGORITHMS}
    known = [ratio for ratio in cached.values() if ratio is not None]
    out.append(
        "core: cached JWT / API key: "
        + ", ".join(f"{alg} {_x(ratio)}" for alg, ratio in cached.items())
        + f" ({_verdict(max(known) if len(known) == len(cached) else None, CACHED_TARGET)})"
    )
    for alg in ("ES256", "HS256"):  # issue 12 set the target for ES256, issue 15 for HS256
        cold, raw = cost("-", f"core {alg} cold"), cost("-", f"raw {alg}")
        assert cold is not None and raw is not None and key is not None
        ratio = _ratio(cold, raw + key)
        out.append(
            f"core: cold {alg} / (raw joserfc {alg} + API key): "
            f"{cold:.2f} / ({raw:.2f} + {key:.2f}) us = {_x(ratio)}"
            + f" ({_verdict(ratio, COLD_TARGET)})"
        )
    # Our own issuer's tokens, against the API key in the same engine.
    key = cost("-", "core own api_key")
    ratio = _ratio(cost("-", "core own cached"), key)
    out.append(f"core: our token cached / API key: {_x(ratio)} ({_verdict(ratio, CACHED_TARGET)})")
    cold, raw = cost("-", "core own cold"), cost("-", "raw own")
    assert cold is not None and raw is not None and key is not None
    ratio = _ratio(cold, raw + key)
    out.append(
        f"core: our token cold / (raw joserfc ES256 + API key): "
        f"{cold:.2f} / ({raw:.2f} + {key:.2f}) us = {_x(ratio)} ({_verdict(ratio, COLD_TARGET)})"
    )
    for framework in FRAMEWORKS:
        key = cost(framework, "api_key")
        if key is None:
            continue
        out.append(
            f"{framework}: cached JWT / API key overhead: "
            + ", ".join(
                f"{alg} {_x(_ratio(cost(framework, f'{alg} cached'), key))}" for alg in ALGORITHMS
            )
        )
        for alg in ALGORITHMS:
            cold = cost(framework, f"{alg} cold")
            in_view = cost(framework, f"raw-in-view {alg}")
            assert cold is not None and in_view is not None
            out.append(
                f"{framework}: cold {alg} / (raw joserfc {alg} in a bare view + API key): "
                f"{cold:.2f} / ({in_view:.2f} + {key:.2f}) us = {_x(_ratio(cold, in_view + key))}"
            )
        peer = ROWS[framework, f"peer {ALGORITHMS[0]} {PEERS[0]}"].stack.partition(",")[0]
        pairs = [
            (f"{alg} {label}", f"peer {alg} {theirs}", f"{alg} {mine}")
            for alg in ALGORITHMS
            for label, theirs, mine in zip(
                ("same-token/cached", "new-token/cold"), PEERS, OURS, strict=True
            )
        ]
        out.append(
            f"{framework}: peer/ours ({peer.removeprefix('peer: ')}): "
            + ", ".join(
                f"{label} {_x(_ratio(cost(framework, theirs), cost(framework, mine)))}"
                for label, theirs, mine in pairs
            )
        )
    if verbose:
        out += overhead.round_means(variants)
    return out


def main(argv: list[str] | None = None) -> int:
    return overhead.run_benchmark(
        argv,
        description="Per-request overhead of JWT auth (HS256, ES256; cached and cold) + rate "
        "limiting, per framework, next to the API-key path and the peer stacks.",
        build=build,
        report=report,
        packages=[
            "joserfc",
            "pyjwt",
            "cryptography",
            "flask-jwt-extended",
            "djangorestframework-simplejwt",
        ],
        requests=1500,  # 32 variants, some slow: about 2.5 min on 2 cores
    )


if __name__ == "__main__":
    sys.exit(main())
