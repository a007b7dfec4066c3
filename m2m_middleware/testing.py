"""A pytest plugin for testing your own app behind m2m-middleware.

Opt in from your root ``conftest.py``::

    pytest_plugins = ["m2m_middleware.testing"]

(or run ``pytest -p m2m_middleware.testing``). It is never loaded by itself.
The fixtures find the app under test, make keys in the store that app checks,
and mint JWTs it accepts:

- ``m2m_key``: a factory, ``m2m_key(scopes=[...], tier=..., client_id=...)``,
  returning an :class:`IssuedTestKey` whose ``headers`` carry it; revoked when
  the test ends.
- ``m2m_headers``: the headers of a fresh key with no scopes (override the
  fixture to change that key).
- ``m2m_token``: a factory, ``m2m_token(scopes=[...], ...)``, returning a
  signed JWT the app accepts (with the app's HMAC secret, or the key
  ``m2m_signing_key`` returns).
- ``m2m_settings``, ``m2m_store``, ``m2m_engine``: the app's settings, key
  store and engine.

The app is found, in this order, in an ``app`` fixture (a Flask app with
``M2MAuth``, a Starlette app or any ASGI app with ``M2MMiddleware`` in its
stack, or an ``M2MMiddleware``), in the test's ``client`` fixture (a Flask or
Starlette test client), then in Django's settings (``M2MAuthMiddleware`` in
``MIDDLEWARE``, or ``M2M_AUTH``). Override ``m2m_settings`` where none of these
fits. This module imports no web framework: each is looked at only when the
app under test already imported it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from .engine import Engine
from .errors import KeyStoreError
from .settings import Settings
from .stores import IssuedKey, KeyStore, open_key_store

__all__ = ["IssuedTestKey", "KeyFactory", "TokenFactory", "engine_of"]

#: The client id of keys and tokens made without one.
DEFAULT_CLIENT_ID = "test-client"
#: The ``exp`` of a minted token, seconds from now.
DEFAULT_TOKEN_TTL = 300

_NO_APP = (
    "m2m_middleware.testing found no app protected by m2m-middleware: define an `app` "
    "fixture that returns your Flask app (with M2MAuth) or your Starlette/ASGI app (with "
    "M2MMiddleware), or configure Django with M2MAuthMiddleware in MIDDLEWARE; "
    "or override the `m2m_settings` fixture to return the Settings your app uses"
)


@dataclass(frozen=True, slots=True)
class IssuedTestKey(IssuedKey):
    """A key made for a test, with the headers that carry it to the app."""

    #: The app's API-key header (``api_key_header``, ``X-API-Key`` by default).
    header: str = "X-API-Key"

    @property
    def client_id(self) -> str:
        return self.record.client_id

    @property
    def headers(self) -> dict[str, str]:
        """``{"X-API-Key": key}`` (the app's own header name)."""
        return {self.header: self.key}

    @property
    def bearer_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <key>"}``, the other way to send it."""
        return {"Authorization": f"Bearer {self.key}"}

    def __repr__(self) -> str:  # never the plaintext, as IssuedKey
        return f"IssuedTestKey(key='***', header={self.header!r}, record={self.record!r})"


class KeyFactory(Protocol):
    """The ``m2m_key`` fixture: makes a key in the app's store.

    ``options`` go to :meth:`~m2m_middleware.KeyStore.create_key` (``name``,
    ``expires_at``, ``max_uses``, ``metadata``).
    """

    def __call__(
        self,
        *,
        scopes: Iterable[str] | str = (),
        tier: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        **options: Any,
    ) -> IssuedTestKey: ...


class TokenFactory(Protocol):
    """The ``m2m_token`` fixture: a signed JWT for the app.

    ``claims`` are added last and win, so a test can make a token that the
    app must refuse (``claims={"aud": "someone-else"}``, ``expires_in=-1``).
    """

    def __call__(
        self,
        *,
        scopes: Iterable[str] | str = (),
        tier: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        expires_in: float = DEFAULT_TOKEN_TTL,
        claims: Mapping[str, Any] | None = None,
    ) -> str: ...


# -- finding the app's engine ---------------------------------------------------------------

#: Attributes by which middleware, wrappers and test clients lead to the app inside.
_INNER = ("middleware_stack", "app", "application", "wsgi_app")


def engine_of(app: object) -> Engine | None:
    """The engine serving ``app``, or None when m2m-middleware does not guard it.

    ``app`` may be a Flask app, a Starlette app, any ASGI app wrapped in
    :class:`~m2m_middleware.starlette.M2MMiddleware` (also under other
    middleware), or a test client of one of these.
    """
    seen: set[int] = set()
    todo = [app]
    while todo and len(seen) < 64:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        engine = _own_engine(current)
        if engine is not None:
            return engine
        todo.extend(getattr(current, name, None) for name in reversed(_INNER))
    return None


def _own_engine(candidate: object) -> Engine | None:
    flask = sys.modules.get("flask")
    if flask is not None and isinstance(candidate, flask.Flask):
        from .flask import EXTENSION_KEY, M2MAuth

        return M2MAuth.engine(candidate) if EXTENSION_KEY in candidate.extensions else None
    adapter = sys.modules.get("m2m_middleware.starlette")
    if adapter is not None and isinstance(candidate, adapter.M2MMiddleware):
        engine: Engine = candidate.engine
        return engine
    applications = sys.modules.get("starlette.applications")
    if (
        applications is not None
        and isinstance(candidate, applications.Starlette)
        and candidate.middleware_stack is None
    ):
        # Starlette makes its middleware (and so our engine) on the first
        # request. Made now and kept, the app serves the test with the very
        # engine found here, as it would have made it.
        candidate.middleware_stack = candidate.build_middleware_stack()
    return None


def _django_engine() -> Engine | None:
    conf = sys.modules.get("django.conf")
    if conf is None or not conf.settings.configured:
        return None
    settings = conf.settings
    middleware = getattr(settings, "MIDDLEWARE", None) or ()
    ours = any(str(name).startswith("m2m_middleware.django") for name in middleware)
    if not ours and not hasattr(settings, "M2M_AUTH"):
        return None
    from .django import current_engine

    return current_engine()


def _fixture(request: pytest.FixtureRequest, name: str) -> object:
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return None


@pytest.fixture
def _m2m_app_engine(request: pytest.FixtureRequest) -> Engine | None:
    """The engine of the app under test, found once per test (None: not found)."""
    engine = engine_of(_fixture(request, "app"))
    if engine is None and "client" in request.fixturenames:
        engine = engine_of(_fixture(request, "client"))
    return engine if engine is not None else _django_engine()


# -- the app's settings, store and engine ------------------------------------------------


@pytest.fixture
def m2m_engine(_m2m_app_engine: Engine | None) -> Engine:
    """The :class:`~m2m_middleware.Engine` serving the app under test."""
    if _m2m_app_engine is None:
        pytest.fail(_NO_APP, pytrace=False)
    return _m2m_app_engine


@pytest.fixture
def m2m_settings(_m2m_app_engine: Engine | None) -> Settings:
    """The app's :class:`~m2m_middleware.Settings`. Override it where the app is not found."""
    if _m2m_app_engine is None:
        pytest.fail(_NO_APP, pytrace=False)
    return _m2m_app_engine.settings


@pytest.fixture
def m2m_store(_m2m_app_engine: Engine | None, m2m_settings: Settings) -> Iterator[KeyStore]:
    """The key store the app checks keys in: its engine's own.

    Without a found app, the store ``m2m_settings`` names (``key_store``): a
    store object as it is, or a URL opened for the test. A ``memory://`` URL
    cannot be opened twice (each opening is a new, empty store): give the app
    and ``m2m_settings`` one store object, ``Settings(key_store=MemoryKeyStore())``.
    """
    if _m2m_app_engine is not None:
        yield _m2m_app_engine.store
        return
    key_store = m2m_settings.key_store
    if isinstance(key_store, KeyStore):
        yield key_store
        return
    if key_store.partition("://")[0].lower() == "memory":
        pytest.fail(
            "m2m_settings names key_store='memory://', which is a new empty store each time "
            "it is opened, not the one your app checks: put one store object in the settings "
            "the app and m2m_settings share, e.g. Settings(key_store=MemoryKeyStore())",
            pytrace=False,
        )
    store = open_key_store(
        key_store, prefix=m2m_settings.key_prefix, timeout=m2m_settings.storage_timeout
    )
    yield store
    store.close()


# -- keys ---------------------------------------------------------------------------------


@pytest.fixture
def m2m_key(m2m_store: KeyStore, m2m_settings: Settings) -> Iterator[KeyFactory]:
    """Make keys in the app's store: ``m2m_key(scopes=["orders:read"]).headers``.

    Every key made is revoked when the test ends, so none outlives it (a
    store on pytest-django's test database is emptied by pytest-django).
    """
    made: list[str] = []
    header = m2m_settings.api_key_header

    def make(
        *,
        scopes: Iterable[str] | str = (),
        tier: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        **options: Any,
    ) -> IssuedTestKey:
        issued = m2m_store.create_key(client_id, scopes=scopes, tier=tier, **options)
        made.append(issued.key_id)
        return IssuedTestKey(issued.key, issued.record, header)

    yield make
    if not _on_django_test_database(m2m_store):
        for key_id in made:
            # Gone already, or in a store the test took down: nothing to revoke.
            with suppress(KeyStoreError):
                m2m_store.revoke_key(key_id)


def _on_django_test_database(store: KeyStore) -> bool:
    """Whether pytest-django owns the store's rows (and may already have closed them)."""
    django_store = sys.modules.get("m2m_middleware.django.store")
    return django_store is not None and isinstance(store, django_store.DjangoKeyStore)


@pytest.fixture
def m2m_headers(m2m_key: KeyFactory) -> dict[str, str]:
    """Headers carrying a fresh key with no scopes: ``client.get("/whoami", headers=m2m_headers)``.

    For a key with scopes, call ``m2m_key(scopes=[...]).headers``, or override
    this fixture in your conftest.
    """
    return m2m_key().headers


# -- tokens -------------------------------------------------------------------------------


@pytest.fixture
def m2m_signing_key(m2m_settings: Settings) -> Any:
    """The key ``m2m_token`` signs with: by default the app's own HMAC secret (``jwt_keys``).

    An app that verifies with public keys only cannot have tokens minted from
    its settings: override this fixture to return the private key (a JWK
    mapping, a PEM string or a joserfc key) whose public half is in its
    ``jwt_keys``.
    """
    _require_jwt(m2m_settings)
    from joserfc.jwk import OctKey

    ring = m2m_settings.jwt_key_ring
    for key in ring.keys if ring is not None else ():
        if isinstance(key, OctKey) and _algorithm(m2m_settings, key) is not None:
            return key
    source = "jwt_jwks_url" if m2m_settings.jwt_jwks_url else "public keys in jwt_keys"
    pytest.fail(
        f"m2m_token cannot mint a token this app accepts: it verifies JWTs with {source}, "
        "whose private keys it does not hold. Override the `m2m_signing_key` fixture to "
        "return your test signer's private key (a JWK or PEM whose public key is in "
        "jwt_keys), or give the test settings an HMAC secret in jwt_keys",
        pytrace=False,
    )


@pytest.fixture
def m2m_token(m2m_settings: Settings, m2m_signing_key: Any) -> TokenFactory:
    """Mint JWTs the app accepts: ``{"Authorization": f"Bearer {m2m_token(scopes=[...])}"}``.

    The claims follow the app's settings: ``iss`` = ``jwt_issuer``, ``aud`` =
    the first ``jwt_audience``, the client id in the first of
    ``jwt_client_id_claims`` (and ``sub``), ``scope``, the tier in
    ``jwt_tier_claim``, ``typ`` = ``jwt_typ``, and ``exp`` ``expires_in``
    seconds from now.
    """
    from joserfc import jwt

    settings = m2m_settings
    _require_jwt(settings)
    key = _import_signing_key(m2m_signing_key)
    algorithm = _algorithm(settings, key)
    if algorithm is None:
        pytest.fail(
            f"m2m_signing_key is a {key.key_type} key, and none of the app's jwt_algorithms "
            f"({', '.join(settings.jwt_algorithms or ())}) signs with it",
            pytrace=False,
        )
    client_claim = settings.jwt_client_id_claims[0]
    typ = settings.jwt_typ or "JWT"

    def mint(
        *,
        scopes: Iterable[str] | str = (),
        tier: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        expires_in: float = DEFAULT_TOKEN_TTL,
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "sub": client_id,
            client_claim: client_id,
            "iat": now,
            "exp": now + expires_in,
        }
        if settings.jwt_issuer is not None:
            payload["iss"] = settings.jwt_issuer
        if settings.jwt_audience:
            payload["aud"] = settings.jwt_audience[0]
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        if scope_list:
            payload["scope"] = " ".join(scope_list)
        if tier is not None:
            if settings.jwt_tier_claim is None:
                raise ValueError(
                    "the app reads no tier from tokens: set jwt_tier_claim in its settings"
                )
            payload[settings.jwt_tier_claim] = tier
        payload.update(claims or {})
        header: dict[str, Any] = {"alg": algorithm}
        if key.kid is not None:
            header["kid"] = key.kid
        return jwt.encode(header, payload, key, algorithms=[algorithm], default_type=typ)

    return mint


def _require_jwt(settings: Settings) -> None:
    if "jwt" not in settings.schemes:
        pytest.fail(
            f"this app does not accept JWTs (schemes={list(settings.schemes)}): "
            "add 'jwt' to its schemes to test with m2m_token, or test with m2m_key",
            pytrace=False,
        )


def _import_signing_key(value: Any) -> Any:
    from joserfc.jwk import ECKey, JWKRegistry, OctKey, OKPKey, RSAKey

    if isinstance(value, (OctKey, RSAKey, ECKey, OKPKey)):
        return value
    if isinstance(value, Mapping):
        return JWKRegistry.import_key(dict(value))
    for key_type in ("RSA", "EC", "OKP"):  # a PEM string or bytes
        try:
            return JWKRegistry.import_key(value, key_type)
        except Exception:  # noqa: S112 - not this type; try the next
            continue
    pytest.fail(
        "m2m_signing_key returned no usable key (a JWK, a PEM or a joserfc key)", pytrace=False
    )


def _algorithm(settings: Settings, key: Any) -> str | None:
    """The first of the app's algorithms that ``key`` signs with.

    Its type, curve and ``alg`` decide, as for verifying (``jwtkeys``); not
    ``use``/``key_ops``, which on a private JWK say "sign", not "verify".
    """
    from .jwtkeys import _requirements

    for alg in settings.jwt_algorithms or ():
        key_type, curves = _requirements(alg)
        if (
            key.key_type == key_type
            and (curves is None or key.get("crv") in curves)
            and key.alg in (None, alg)
        ):
            return alg
    return None
