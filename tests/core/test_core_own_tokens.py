"""Our own issuer's tokens in the engine (issue 12 item 4): trusted from the key store with
no HTTP fetch, by RFC 9068's rules, and refused as soon as the API key they came from is
revoked or expired.

Tokens are signed the way the token endpoint signs them:
``signing_keys_for(settings, store=store).current_signing_key().sign(claims)``. Clocks are
injected (:class:`FakeClock` stands in for the engine's and the verifier's ``time``), so
nothing sleeps.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from core_support import FakeClock, sqlite_url
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey
from jwt_support import SECRET as IDP_SECRET
from jwt_support import hs256, raw_token

import m2m_middleware.engine as engine_module
import m2m_middleware.tokens as tokens_module
from m2m_middleware import (
    Allowed,
    ConfigError,
    Denied,
    Engine,
    KeyRecord,
    KeyStore,
    Settings,
    open_key_store,
)
from m2m_middleware.errors import StoreUnavailable
from m2m_middleware.issuer import SigningKeys, signing_keys_for
from m2m_middleware.issuer.own_tokens import OWN_KEY_REREAD_INTERVAL
from m2m_middleware.stores import MemoryKeyStore

ISSUER = "https://api.example.test"
SIGNING_SECRET = "own tokens: a signing secret for tests"
TTL = 300
AN_HOUR = 3600


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The engine's and the verifier's view of time, frozen until advanced."""
    fake = FakeClock()
    monkeypatch.setattr(engine_module, "time", fake.time)
    monkeypatch.setattr(engine_module, "monotonic", fake.monotonic)
    monkeypatch.setattr(tokens_module, "time", fake.time)
    return fake


@pytest.fixture(params=["sync", "async"])
def send(request: pytest.FixtureRequest) -> Any:
    """``send(engine, token)``: one GET with ``Authorization: Bearer token``, through
    ``check`` or ``acheck``."""
    import asyncio

    if request.param == "sync":
        return lambda engine, token: engine.check("GET", "/", f"Bearer {token}", None)
    return lambda engine, token: asyncio.run(engine.acheck("GET", "/", f"Bearer {token}", None))


@pytest.fixture
def store() -> Iterator[KeyStore]:
    the_store = MemoryKeyStore()
    yield the_store
    the_store.close()


def own_settings(store: KeyStore | str, **fields: Any) -> Settings:
    fields.setdefault("schemes", ("api_key", "jwt"))
    fields.setdefault("rate_limit_storage", "memory://")
    fields.setdefault("default_limits", "100000/minute")
    fields.setdefault("invalidation_url", "")
    return Settings(
        key_store=store,
        token_endpoint="/oauth/token",
        token_issuer=ISSUER,
        signing_key_secret=SIGNING_SECRET,
        token_ttl=TTL,
        **fields,
    )


def own_engine(store: KeyStore | str, **fields: Any) -> Engine:
    return Engine(own_settings(store, **fields))


def claims_for(record: KeyRecord, now: float, **changes: Any) -> dict[str, Any]:
    """What the endpoint puts in a token for ``record``; ``changes`` override (``...`` drops)."""
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": record.client_id,
        "client_id": record.client_id,
        "aud": ISSUER,
        "exp": int(now) + TTL,
        "iat": int(now),
        "jti": secrets.token_urlsafe(12),
        "scope": " ".join(sorted(record.scopes)),
        "key_id": record.key_id,
    }
    if record.tier is not None:
        claims["tier"] = record.tier
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not ...}


def issue(keys: SigningKeys, record: KeyRecord, now: float, **changes: Any) -> str:
    return keys.current_signing_key().sign(claims_for(record, now, **changes))


def token_for(engine: Engine, record: KeyRecord, now: float, **changes: Any) -> str:
    assert engine.signing_keys is not None
    return issue(engine.signing_keys, record, now, **changes)


def catch_up(clock: FakeClock) -> None:
    """Bring the frozen wall clock up to the real time a revocation was stamped with."""
    clock.wall = max(clock.wall, time.time())


def refused(outcome: Allowed | Denied, match: str = "") -> bool:
    return (
        isinstance(outcome, Denied)
        and outcome.status == 401
        and outcome.error == "invalid_token"
        and match in outcome.detail
    )


# -- trust with no fetch, and the Client --------------------------------------------------


def test_an_own_token_is_a_jwt_client_with_the_key_s_id_scopes_and_tier(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    record = store.create_key("billing", scopes=["orders:read", "orders:write"], tier="gold").record
    engine = own_engine(store, tiers={"gold": "1000/second"})
    assert engine.tokens is not None and engine.tokens.jwks is None  # no HTTP anywhere
    token = token_for(engine, record, clock.wall)
    outcome = send(engine, token)
    assert isinstance(outcome, Allowed), outcome
    client = outcome.client
    assert client.client_id == "billing"
    assert client.scheme == "jwt"
    assert client.scopes == {"orders:read", "orders:write"}
    assert client.tier == "gold"
    assert client.key_id == record.key_id
    assert client.claims["jti"] and client.claims["iss"] == ISSUER
    assert ("RateLimit-Policy", '"tier.gold-1s";q=1000;w=1') in outcome.headers


def test_the_engine_holds_signing_keys_whenever_the_token_endpoint_is_set(
    store: KeyStore,
) -> None:
    api_keys_only = own_engine(store, schemes=("api_key",))
    assert isinstance(api_keys_only.signing_keys, SigningKeys)
    assert api_keys_only.tokens is None
    assert Engine(Settings(key_store=store)).signing_keys is None


def test_without_a_signing_secret_the_engine_is_a_config_error_naming_it(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("M2M_SIGNING_SECRET", raising=False)
    with pytest.raises(ConfigError) as caught:
        Engine(
            Settings(
                key_store=store,
                schemes=("api_key", "jwt"),
                token_endpoint="/oauth/token",
                token_issuer=ISSUER,
            )
        )
    assert caught.value.field == "signing_key_secret"


def test_jwt_only_with_our_issuer_keeps_the_configured_key_store(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    engine = own_engine(url, schemes=("jwt",))
    try:
        assert engine.store.location != "memory://"
        record = engine.store.create_key("billing").record
        token = token_for(engine, record, time.time())
        assert engine.check("GET", "/", f"Bearer {token}", None).allowed
    finally:
        engine.close()


def test_a_token_takes_no_use_of_a_usage_limited_key(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    record = store.create_key("billing", max_uses=1).record
    engine = own_engine(store)
    token = token_for(engine, record, clock.wall)
    for _ in range(5):
        assert send(engine, token).allowed
    cold = token_for(engine, record, clock.wall)
    assert send(engine, cold).allowed
    assert store.get_key(record.key_id).remaining_uses == 1


# -- RFC 9068 / 8725 rules for our tokens -------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"iss": "https://other.example.test"}, "issuer (iss)"),
        ({"iss": ISSUER + "/"}, "issuer (iss)"),
        ({"iss": ...}, "issuer (iss)"),
        ({"aud": "https://other.example.test"}, "audience (aud)"),
        ({"aud": ...}, "no audience (aud)"),
        ({"aud": [ISSUER + "/x"]}, "audience (aud)"),
        ({"exp": ...}, "no expiry (exp)"),
        ({"exp": "9999999999"}, "exp claim is not a number"),
        ({"key_id": ...}, "names no API key (key_id)"),
        ({"key_id": 7}, "key_id claim is not a key id"),
        ({"key_id": "key_\u00e9\n"}, "key_id claim is not a key id"),
        ({"client_id": ...}, "client_id claim"),
        ({"client_id": "someone-else"}, "not the client of its API key"),
        ({"tier": ["gold"]}, "tier claim is not a string"),
        ({"nbf": 10**10}, "not valid yet"),
    ],
)
def test_a_token_of_ours_that_breaks_a_claim_rule_is_refused(
    store: KeyStore, changes: dict[str, Any], match: str, clock: FakeClock
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    outcome = engine.check("GET", "/", f"Bearer {token_for(engine, record, clock.wall)}", None)
    assert outcome.allowed  # the control
    token = token_for(engine, record, clock.wall, **changes)
    assert refused(engine.check("GET", "/", f"Bearer {token}", None), match)


def test_an_audience_list_that_holds_ours_is_accepted(store: KeyStore, clock: FakeClock) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    token = token_for(engine, record, clock.wall, aud=["https://x.example.test", ISSUER])
    assert engine.check("GET", "/", f"Bearer {token}", None).allowed


def test_token_audience_is_what_our_tokens_must_name(store: KeyStore, clock: FakeClock) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store, token_audience="https://orders.example.test")
    named = token_for(engine, record, clock.wall, aud="https://orders.example.test")
    assert engine.check("GET", "/", f"Bearer {named}", None).allowed
    issuer_only = token_for(engine, record, clock.wall, aud=ISSUER)
    assert refused(engine.check("GET", "/", f"Bearer {issuer_only}", None), "audience")


def test_our_tokens_expire_at_exp(store: KeyStore, send: Any, clock: FakeClock) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store, key_cache_ttl=AN_HOUR)
    token = token_for(engine, record, clock.wall)
    exp = int(clock.wall) + TTL
    assert send(engine, token).allowed
    clock.wall = exp - 0.5
    assert send(engine, token).allowed  # cached, half a second left
    clock.wall = exp  # exp == now is expired
    assert refused(send(engine, token), "the token has expired")


@pytest.mark.parametrize("typ", ["JWT", "jwt", None, "at+jwt+x", 1, ["at+jwt"]])
def test_our_tokens_must_be_typed_at_jwt(store: KeyStore, clock: FakeClock, typ: Any) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    assert engine.signing_keys is not None
    key = engine.signing_keys.current_signing_key()
    private = key._key.private_key  # what the endpoint signs with, for a header of any shape
    header: dict[str, Any] = {"alg": key.algorithm, "kid": key.kid}
    if typ is not None:
        header["typ"] = typ
    token = raw_token(header, claims_for(record, clock.wall), key=private)
    assert refused(engine.check("GET", "/", f"Bearer {token}", None), "(typ) must be at+jwt")
    spelled = raw_token(
        {**header, "typ": "application/AT+JWT"}, claims_for(record, clock.wall), key=private
    )
    assert engine.check("GET", "/", f"Bearer {spelled}", None).allowed  # RFC 7515 4.1.9


def test_a_token_signed_by_another_key_under_our_kid_is_refused(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    assert engine.signing_keys is not None
    kid = engine.signing_keys.current_signing_key().kid
    attacker = ECKey.generate_key("P-256")
    token = jose_jwt.encode(
        {"alg": "ES256", "kid": kid, "typ": "at+jwt"}, claims_for(record, clock.wall), attacker
    )
    assert refused(send(engine, token), "signature does not verify")


def test_hs256_with_our_public_key_as_the_secret_is_refused(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    """Algorithm confusion: our public key is public; as an HMAC secret it must verify nothing,
    also where HS256 is allowed for an identity provider's tokens."""
    record = store.create_key("billing").record
    engine = own_engine(store, jwt_keys=IDP_SECRET, jwt_algorithms=["HS256"])
    assert engine.signing_keys is not None
    signing = engine.signing_keys.current_signing_key()
    public_jwk = engine.signing_keys.public_jwks()["keys"][0]
    public_pem = ECKey.import_key(public_jwk).as_pem(private=False)
    for secret in (public_pem, json.dumps(public_jwk).encode()):
        for kid in (signing.kid, None):
            header = {"alg": "HS256", "typ": "at+jwt", **({"kid": kid} if kid else {})}
            token = raw_token(header, claims_for(record, clock.wall), key=secret)
            assert refused(send(engine, token)), (kid, secret[:20])
    # Our kid makes it our token, whose algorithm is ours alone:
    header = {"alg": "HS256", "typ": "at+jwt", "kid": signing.kid}
    token = raw_token(header, claims_for(record, clock.wall), key=public_pem)
    assert refused(send(engine, token), f"algorithm is not one of: {signing.algorithm}")


def test_a_token_of_another_issuer_signed_with_our_key_is_refused(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    """Our key signs our tokens only: the same claims under an identity provider's issuer
    are refused, also when that issuer is trusted (with its own keys)."""
    record = store.create_key("billing").record
    engine = own_engine(store, jwt_keys=IDP_SECRET, jwt_issuer="https://idp.example.test")
    token = token_for(engine, record, clock.wall, iss="https://idp.example.test")
    assert refused(send(engine, token), "issuer (iss)")


def test_identity_provider_tokens_work_beside_ours(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(
        store, jwt_keys=IDP_SECRET, jwt_issuer="https://idp.example.test", jwt_audience="api"
    )
    theirs = hs256(
        {
            "sub": "partner",
            "iss": "https://idp.example.test",
            "aud": "api",
            "exp": clock.wall + 60,
        }
    )
    ours = token_for(engine, record, clock.wall)
    their_outcome, our_outcome = send(engine, theirs), send(engine, ours)
    assert isinstance(their_outcome, Allowed) and their_outcome.client.key_id is None
    assert isinstance(our_outcome, Allowed) and our_outcome.client.key_id == record.key_id
    store.revoke_key(record.key_id)
    catch_up(clock)
    assert refused(send(engine, ours), "revoked")
    assert send(engine, theirs).allowed  # an IdP token has no API key to lose
    # An identity provider's token may not pass itself off as ours by naming a key_id:
    # the IdP's rules never read it.
    passing = hs256(
        {
            "sub": "partner",
            "iss": "https://idp.example.test",
            "aud": "api",
            "exp": clock.wall + 60,
            "key_id": record.key_id,
        }
    )
    outcome = send(engine, passing)
    assert isinstance(outcome, Allowed) and outcome.client.key_id is None


# -- keys from the store: forged kids, other instances, rotation ----------------------------


def test_a_forged_kid_costs_no_store_read_per_request(
    store: KeyStore, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    assert engine.signing_keys is not None
    assert send(engine, token_for(engine, record, clock.wall)).allowed  # keys read once
    reads: list[float] = []
    table = engine.signing_keys._table
    original = table.rows
    monkeypatch.setattr(table, "rows", lambda: (reads.append(clock.mono), original())[1])
    attacker = ECKey.generate_key("P-256")
    for n in range(50):
        forged = jose_jwt.encode(
            {"alg": "ES256", "kid": f"forged-{n}", "typ": "at+jwt"},
            claims_for(record, clock.wall),
            attacker,
        )
        assert refused(send(engine, forged), "no key with the token's kid")
    assert len(reads) <= 1
    clock.advance(OWN_KEY_REREAD_INTERVAL)
    for n in range(50):
        forged = jose_jwt.encode(
            {"alg": "ES256", "kid": f"forged-again-{n}", "typ": "at+jwt"},
            claims_for(record, clock.wall),
            attacker,
        )
        assert refused(send(engine, forged))
    assert len(reads) <= 2


def test_our_keys_are_reread_every_refresh_interval_and_no_more(
    store: KeyStore, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store, key_cache_ttl=0)  # every request verifies its token
    assert engine.signing_keys is not None
    token = token_for(engine, record, clock.wall)
    assert send(engine, token).allowed
    reads: list[float] = []
    table = engine.signing_keys._table
    original = table.rows
    monkeypatch.setattr(table, "rows", lambda: (reads.append(clock.mono), original())[1])
    for _ in range(20):
        assert send(engine, token).allowed
    assert reads == []
    clock.advance(engine.signing_keys.refresh_interval)
    for _ in range(20):
        assert send(engine, token).allowed
    assert len(reads) == 1


def test_a_token_without_a_kid_is_not_ours(store: KeyStore, send: Any, clock: FakeClock) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    assert engine.signing_keys is not None
    key = engine.signing_keys.current_signing_key()
    header = {"alg": key.algorithm, "typ": "at+jwt"}
    token = raw_token(header, claims_for(record, clock.wall), key=key._key.private_key)
    assert refused(send(engine, token), "names no key (kid)")


def test_a_second_instance_verifies_a_token_signed_with_a_key_the_first_made(
    tmp_path: Path, send: Any, clock: FakeClock
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    first, second = own_engine(url), own_engine(url)
    try:
        record = first.store.create_key("billing", scopes=["orders:read"]).record
        # The second has read the (then empty) table before the first made its key:
        attacker = ECKey.generate_key("P-256")
        forged = jose_jwt.encode(
            {"alg": "ES256", "kid": "forged", "typ": "at+jwt"},
            claims_for(record, clock.wall),
            attacker,
        )
        assert refused(send(second, forged))
        token = token_for(first, record, clock.wall)  # the database's first key, made now
        assert send(first, token).allowed
        clock.advance(OWN_KEY_REREAD_INTERVAL)  # a new kid: reread within the interval
        outcome = send(second, token)
        assert isinstance(outcome, Allowed), outcome
        assert outcome.client.scopes == {"orders:read"}
        # And an instance that never read the keys finds it on the first token.
        third = own_engine(url)
        try:
            assert send(third, token_for(first, record, clock.wall)).allowed
        finally:
            third.close()
    finally:
        first.close()
        second.close()


def test_tokens_signed_before_a_rotation_verify_until_they_expire(
    tmp_path: Path, send: Any, clock: FakeClock
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    engine = own_engine(url, key_cache_ttl=AN_HOUR)
    operator_store = open_key_store(url)
    try:
        settings = own_settings(operator_store)
        operator = signing_keys_for(settings, store=operator_store, clock=clock.time)
        record = operator_store.create_key("billing").record
        old_kid = operator.current_signing_key().kid
        old = issue(operator, record, clock.wall)
        assert send(engine, old).allowed
        cold_old = issue(operator, record, clock.wall)  # not seen before the rotation
        operator.rotate()
        clock.advance(250)  # past every reread interval, before the new key signs
        assert operator.current_signing_key().kid == old_kid
        assert send(engine, old).allowed
        assert send(engine, cold_old).allowed  # verified now, with the old key
        # The new key signs: jwks_max_age after every instance could have read it.
        clock.advance(settings.jwks_max_age + operator.refresh_interval - 250)
        new = issue(operator, record, clock.wall)
        assert operator.current_signing_key().kid != old_kid
        assert send(engine, new).allowed
        last_old = issue(operator, record, clock.wall - 1, exp=int(clock.wall) + 60)
        clock.advance(59)
        assert send(engine, last_old).allowed
        clock.advance(1)
        assert refused(send(engine, last_old), "expired")
        assert send(engine, new).allowed
    finally:
        operator_store.close()
        engine.close()


def test_no_signing_keys_readable_at_all_is_a_503(
    store: KeyStore, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = store.create_key("billing").record
    issuer = signing_keys_for(own_settings(store), store=store)
    token = issue(issuer, record, clock.wall)
    engine = own_engine(store)
    assert engine.signing_keys is not None

    def down() -> Any:
        raise StoreUnavailable("signing keys: database is down")

    with monkeypatch.context() as patch:
        patch.setattr(engine.signing_keys._table, "rows", down)
        outcome = send(engine, token)
        assert isinstance(outcome, Denied) and outcome.status == 503, outcome
        assert outcome.error == "temporarily_unavailable"
        assert refused(send(engine, "x.y.z"))  # the shape is still checked first
    clock.advance(OWN_KEY_REREAD_INTERVAL)
    assert send(engine, token).allowed


def test_an_identity_provider_s_token_does_not_need_our_signing_keys(
    store: KeyStore, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = own_engine(store, jwt_keys=IDP_SECRET, jwt_issuer="https://idp.example.test")
    assert engine.signing_keys is not None

    def down() -> Any:
        raise StoreUnavailable("signing keys: database is down")

    monkeypatch.setattr(engine.signing_keys._table, "rows", down)
    claims = {"sub": "partner", "iss": "https://idp.example.test", "exp": clock.wall + 60}
    assert send(engine, hs256(claims)).allowed
    assert send(engine, hs256(claims, kid="idp-1")).allowed  # a kid we cannot place: theirs


@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "django",
        pytest.param("django-postgres", marks=pytest.mark.postgres),
    ],
)
def test_each_store_kind_holds_the_keys_and_their_state(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, send: Any, clock: FakeClock
) -> None:
    """Signing keys and API keys from one store of each kind; revocation ends the token."""
    if kind == "sqlite":
        each: KeyStore = open_key_store(sqlite_url(tmp_path / "keys.db"))
    elif kind == "postgres":
        each = open_key_store(request.getfixturevalue("postgres_url"))
    else:
        fixture = "django_postgres_key_store" if kind == "django-postgres" else "django_key_store"
        each = request.getfixturevalue(fixture)
    try:
        record = each.create_key("billing", scopes=["orders:read"]).record
        engine = own_engine(each, key_cache_ttl=AN_HOUR)
        token = token_for(engine, record, clock.wall)
        outcome = send(engine, token)
        assert isinstance(outcome, Allowed), outcome
        assert outcome.client.key_id == record.key_id
        assert send(engine, token_for(engine, record, clock.wall)).allowed
        each.revoke_key(record.key_id)
        catch_up(clock)
        assert refused(send(engine, token), "was revoked")
    finally:
        each.close()


# -- the key a token came from: revoked, expired, missing ----------------------------------


def test_revoking_the_key_refuses_its_cached_tokens_at_once(
    tmp_path: Path, send: Any, clock: FakeClock
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    engine = own_engine(url, key_cache_ttl=AN_HOUR)
    other_store = open_key_store(url)  # another store object for the same data
    try:
        revoked = engine.store.create_key("billing").record
        kept = engine.store.create_key("billing").record
        tokens = [token_for(engine, revoked, clock.wall) for _ in range(3)]
        survivor = token_for(engine, kept, clock.wall)
        for token in [*tokens, survivor]:
            assert send(engine, token).allowed
        other_store.revoke_key(revoked.key_id)
        catch_up(clock)
        for token in tokens:
            assert refused(
                send(engine, token), "the API key this token was issued from was revoked"
            )
        fresh = token_for(engine, revoked, clock.wall)
        assert refused(send(engine, fresh), "was revoked")
        assert send(engine, survivor).allowed
        assert revoked.key_id not in engine.keys._tokens_of
    finally:
        other_store.close()
        engine.close()


def m2m_keys(*args: str) -> None:
    """``m2m keys ...`` in another process, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if k != "M2M_INVALIDATION_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr


def test_a_revocation_in_another_process_refuses_the_token_within_the_poll(
    tmp_path: Path, send: Any, clock: FakeClock
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    first, second = own_engine(url, key_cache_ttl=AN_HOUR), own_engine(url, key_cache_ttl=AN_HOUR)
    try:
        record = first.store.create_key("billing").record
        token = token_for(first, record, clock.wall)
        assert send(first, token).allowed and send(second, token).allowed
        m2m_keys("revoke", record.key_id, "--store", url)
        clock.wall = max(clock.wall, time.time())
        clock.advance(first.store.change_poll_interval or 0)
        assert refused(send(first, token), "revoked")
        assert refused(send(second, token), "revoked")
    finally:
        first.close()
        second.close()


@pytest.mark.postgres
def test_a_revocation_in_another_process_reaches_the_token_over_postgres_notify(
    postgres_url: str, send: Any
) -> None:
    """PostgreSQL's NOTIFY, the path a key's own revocation takes: real time, as the
    listener thread is real (at most a second, the bound the README gives)."""
    store = open_key_store(postgres_url)
    engine = own_engine(store, key_cache_ttl=AN_HOUR)
    try:
        assert engine.bus is None  # no Redis: the store's own notices only
        record = store.create_key("billing").record
        token = token_for(engine, record, time.time())
        assert send(engine, token).allowed
        m2m_keys("revoke", record.key_id, "--store", postgres_url)
        started = time.monotonic()
        while not refused(send(engine, token), "revoked"):
            assert time.monotonic() - started < 1.0, "not refused within a second"
            time.sleep(0.005)
    finally:
        engine.close()


def test_without_notices_a_revocation_elsewhere_is_seen_within_key_cache_ttl(
    tmp_path: Path, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    engine = own_engine(url, key_cache_ttl=30)
    monkeypatch.setattr(engine.store, "poll_changes", lambda: None)  # the channel is down
    try:
        record = engine.store.create_key("billing").record
        token = token_for(engine, record, clock.wall)
        assert send(engine, token).allowed
        m2m_keys("revoke", record.key_id, "--store", url)
        clock.wall = max(clock.wall, time.time())
        clock.advance(29)
        assert send(engine, token).allowed  # cached: the TTL is the bound
        cold = token_for(engine, record, clock.wall)
        assert send(engine, cold).allowed  # the key's state is cached just as long
        clock.advance(1.5)
        assert refused(send(engine, token), "revoked")
        assert refused(send(engine, cold), "revoked")
    finally:
        engine.close()


def test_a_token_ends_when_its_key_expires(store: KeyStore, send: Any, clock: FakeClock) -> None:
    expires = datetime.fromtimestamp(clock.wall, timezone.utc) + timedelta(seconds=60)
    record = store.create_key("billing", expires_at=expires).record
    engine = own_engine(store, key_cache_ttl=AN_HOUR)
    token = token_for(engine, record, clock.wall)  # lives 300 s
    assert send(engine, token).allowed
    clock.advance(59)
    assert send(engine, token).allowed
    clock.advance(1.5)
    assert refused(send(engine, token), "the API key this token was issued from has expired")
    cold = token_for(engine, record, clock.wall)
    assert refused(send(engine, cold), "has expired")


def test_a_token_of_a_key_the_store_does_not_hold_is_refused(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store)
    ghost = KeyRecord(key_id="key_000000000000", client_id="billing")
    assert send(engine, token_for(engine, record, clock.wall)).allowed
    assert refused(send(engine, token_for(engine, ghost, clock.wall)), "does not exist")


def test_a_rotated_key_s_tokens_end_with_its_grace(
    store: KeyStore, send: Any, clock: FakeClock
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store, key_cache_ttl=AN_HOUR)
    token = token_for(engine, record, clock.wall)
    assert send(engine, token).allowed
    store.rotate_key(record.key_id, grace_seconds=0)
    catch_up(clock)
    assert refused(send(engine, token), "revoked")


def test_a_cold_token_of_a_known_key_costs_no_store_read(
    store: KeyStore, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = store.create_key("billing").record
    engine = own_engine(store, key_cache_ttl=30)
    reads: list[str] = []
    original = store.find_by_id
    monkeypatch.setattr(
        store, "find_by_id", lambda key_id: (reads.append(key_id), original(key_id))[1]
    )
    for _ in range(5):
        assert send(engine, token_for(engine, record, clock.wall)).allowed
    assert reads == [record.key_id]
    clock.advance(31)
    assert send(engine, token_for(engine, record, clock.wall)).allowed
    assert reads == [record.key_id] * 2


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_a_store_outage_follows_on_storage_error(
    store: KeyStore, send: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    known = store.create_key("billing").record
    unseen = store.create_key("billing").record
    engine = own_engine(store, key_cache_ttl=30, on_storage_error=policy)
    assert send(engine, token_for(engine, known, clock.wall)).allowed
    clock.advance(31)  # the key's state is stale

    def down(key_id: str) -> Any:
        raise StoreUnavailable("database is down")

    monkeypatch.setattr(store, "find_by_id", down)
    outcome = send(engine, token_for(engine, known, clock.wall))
    if policy == "allow":
        assert outcome.allowed, outcome
    else:
        assert isinstance(outcome, Denied) and outcome.error == "temporarily_unavailable"
    never_seen = send(engine, token_for(engine, unseen, clock.wall))
    assert isinstance(never_seen, Denied) and never_seen.error == "temporarily_unavailable"
    assert ("Retry-After", "5") in never_seen.headers


# -- the cache: tokens filed under their key ------------------------------------------------


def test_invalidating_a_key_drops_only_its_tokens_and_eviction_unfiles_them(
    store: KeyStore, clock: FakeClock
) -> None:
    one = store.create_key("billing").record
    two = store.create_key("billing").record
    engine = own_engine(store, key_cache_size=4, key_cache_ttl=AN_HOUR)
    tokens = [f"Bearer {token_for(engine, one, clock.wall)}" for _ in range(3)]
    tokens += [f"Bearer {token_for(engine, two, clock.wall)}" for _ in range(3)]
    for authorization in tokens:
        assert engine.check("GET", "/", authorization, None).allowed
    cache = engine.keys
    assert len(cache._entries) == 4  # the oldest two were evicted ...
    filed = {key_id: len(hashes) for key_id, hashes in cache._tokens_of.items()}
    assert filed == {one.key_id: 1, two.key_id: 3}  # ... and unfiled
    cache.invalidate(two.key_id)
    assert len(cache._entries) == 1 and set(cache._tokens_of) == {one.key_id}
    assert cache.state(two.key_id) is None and cache.state(one.key_id) is not None
    cache.invalidate(None)
    assert not cache._entries and not cache._tokens_of and cache.state(one.key_id) is None


def test_the_engine_s_signing_keys_wait_the_configured_jwks_max_age_before_signing(
    store: KeyStore,
) -> None:
    """A rotated-in key signs only once every cached JWKS (``jwks_max_age``) holds it,
    counted from when the last instance rereads the keys (``refresh_interval``)."""
    engine = own_engine(store, jwks_max_age=900)
    assert engine.signing_keys is not None
    assert engine.signing_keys.jwks_max_age == 900
    engine.signing_keys.current_signing_key()
    info = engine.signing_keys.rotate()
    wait = (info.signs_from - info.publish_from).total_seconds()
    assert wait == 900 + engine.signing_keys.refresh_interval
