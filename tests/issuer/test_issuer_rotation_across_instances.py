"""Rotation seen through the token service of two instances sharing one database.

Two engines ("instances") on one SQLite file, and on one PostgreSQL schema,
each answering ``POST <token_endpoint>`` and the JWKS, with one injected clock.
A rotation by one of them (``SigningKeys.rotate()``, what ``m2m signing-keys
rotate`` calls) must keep the promise the JWKS ``max-age`` makes to verifiers:
a key is in *both* instances' JWKS for at least ``jwks_max_age`` before either
signs with it; every token issued before stays verifiable (its kid published)
until it expires; then the old key leaves the JWKS.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt as pyjwt
import pytest

from m2m_middleware import Engine, Settings
from m2m_middleware.issuer import signing_keys_for
from m2m_middleware.request_view import RequestView

T0 = 1_800_000_000.0
MAX_AGE = 60
TTL = 120
SKEW = 60  # SigningKeys' default clock_skew
STEP = 3.0  # not a divisor of the refresh interval: instances reread at odd times
REFRESH = 10  # SigningKeys' default refresh_interval
SECRET = "rotation tests' signing secret"
ISSUER = "https://issuer.example"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def instance(url: str, clock: Clock) -> Engine:
    """An engine as a server process would build it, its signing keys on ``clock``."""
    settings = Settings(
        key_store=url,
        rate_limit_storage="memory://",
        token_endpoint="/oauth/token",
        token_issuer=ISSUER,
        token_limits="100000/minute",
        token_ttl=TTL,
        jwks_max_age=MAX_AGE,
        signing_key_secret=SECRET,
    )
    engine = Engine(settings)
    # The engine's own keys run on the wall clock; the test's run on ``clock``
    # (and so do the tokens' iat and exp: the service reads its keys' clock).
    keys = signing_keys_for(settings, store=engine.store, clock=clock)
    assert engine.token_service is not None
    engine.signing_keys = engine.token_service.signing_keys = keys
    return engine


def token(engine: Engine, key_id: str, key: str) -> str:
    basic = base64.b64encode(f"{key_id}:{key}".encode()).decode()
    view = RequestView(
        "POST",
        "/oauth/token",
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "authorization": f"Basic {basic}",
        },
        body=urlencode({"grant_type": "client_credentials"}).encode(),
    )
    served = engine.serve(view)
    assert served.status == 200, served.body
    return str(json.loads(served.body)["access_token"])


def jwks(engine: Engine) -> dict[str, Any]:
    served = engine.serve(RequestView("GET", "/.well-known/jwks.json", headers={}))
    assert served.status == 200
    assert ("Cache-Control", f"public, max-age={MAX_AGE}") in served.headers
    return dict(json.loads(served.body))


def test_rotation_across_two_instances_keeps_every_promise(store_url: str) -> None:
    clock = Clock()
    one, two = instance(store_url, clock), instance(store_url, clock)
    try:
        issued = one.store.create_key("svc", scopes=["orders:read"])
        key_id, key = issued.record.key_id, issued.key
        instances = {"one": one, "two": two}
        first_kid = pyjwt.get_unverified_header(token(one, key_id, key))["kid"]
        assert pyjwt.get_unverified_header(token(two, key_id, key))["kid"] == first_kid

        rotate_at = T0 + 30
        # Past the old key's retirement: published a max-age and a refresh, then a
        # refresh, a token lifetime and the skew more (see SigningKeys).
        end = rotate_at + MAX_AGE + 2 * REFRESH + TTL + SKEW + 4 * STEP
        published_since: dict[tuple[str, str], float] = {}
        #: (kid, exp, the public JWK that verified it when it was issued)
        issued_tokens: list[tuple[str, int, dict[str, Any]]] = []
        signers: dict[str, set[str]] = {"one": set(), "two": set()}
        new_kid = None
        t = T0
        while t <= end:
            clock.now = t
            if t == rotate_at:
                new_kid = one.signing_keys.rotate().kid  # type: ignore[union-attr]
            documents = {name: jwks(engine) for name, engine in instances.items()}
            for name, document in documents.items():
                for published in document["keys"]:
                    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(published)
                    published_since.setdefault((name, published["kid"]), t)
            for name, engine in instances.items():
                access_token = token(engine, key_id, key)
                kid = pyjwt.get_unverified_header(access_token)["kid"]
                signers[name].add(kid)
                if kid != first_kid:  # the database's first key signs at once (by design)
                    for other in instances:
                        since = published_since.get((other, kid))
                        assert since is not None, f"{name} signed with {kid} unpublished by {other}"
                        assert t - since >= MAX_AGE, (name, other, t - since)
                # It verifies from either instance's JWKS (PyJWT, nothing else given).
                for document in documents.values():
                    published = next(k for k in document["keys"] if k["kid"] == kid)
                    claims = pyjwt.decode(
                        access_token,
                        pyjwt.PyJWK.from_dict(published),
                        algorithms=["ES256"],
                        audience=ISSUER,
                        issuer=ISSUER,
                        options={"verify_exp": False, "verify_iat": False},
                    )
                assert claims["exp"] - claims["iat"] == TTL
                assert claims["iat"] == int(t)  # the service's clock is its keys' clock
                issued_tokens.append((kid, claims["exp"], published))
            # Every token issued so far stays verifiable from either instance's JWKS
            # until it expires: the same public key, under the same kid.
            for name, document in documents.items():
                by_kid = {k["kid"]: k for k in document["keys"]}
                for kid, exp, published in issued_tokens:
                    if exp > t:
                        assert by_kid.get(kid) == published, f"{name} dropped {kid} at {t}"
            t += STEP
        assert new_kid is not None
        # Both instances moved to the new key, and the old one has left both JWKS.
        assert signers == {"one": {first_kid, new_kid}, "two": {first_kid, new_kid}}
        for engine in instances.values():
            assert [k["kid"] for k in jwks(engine)["keys"]] == [new_kid]
    finally:
        for engine in (one, two):
            engine.store.close()


def test_the_cli_rotation_is_seen_by_a_running_instance(tmp_path: Path) -> None:
    """``m2m signing-keys rotate`` from another process; the instance publishes the new
    key within a refresh and does not sign with it before a max-age has passed."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    clock = Clock(time.time())  # the CLI runs on the wall clock
    engine = instance(url, clock)
    try:
        issued = engine.store.create_key("svc")
        first = pyjwt.get_unverified_header(token(engine, issued.record.key_id, issued.key))["kid"]
        env = {**os.environ, "M2M_SIGNING_SECRET": SECRET}
        command = ["signing-keys", "rotate", "--json", "--store", url]
        result = subprocess.run(
            [sys.executable, "-m", "m2m_middleware", *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        rotated = json.loads(result.stdout)
        new_kid = rotated["kid"]
        clock.now = time.time() + 11  # past a refresh interval
        assert new_kid in {k["kid"] for k in jwks(engine)["keys"]}
        seen_at = clock.now
        while clock.now < seen_at + MAX_AGE:
            kid = pyjwt.get_unverified_header(token(engine, issued.record.key_id, issued.key))[
                "kid"
            ]
            assert kid == first
            clock.now += STEP
    finally:
        engine.store.close()


def test_two_instances_making_the_first_key_at_once_agree_on_the_next_request(
    tmp_path: Path,
) -> None:
    """A new database, two instances whose first token requests arrive together: both
    find no key and each makes one (no lock spans "none there" and "insert"). From
    their next request on they must agree on the signer and both publish both keys,
    not after a refresh interval of disagreement."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    clock = Clock()
    one, two = instance(url, clock), instance(url, clock)
    try:
        keys_one, keys_two = one.signing_keys, two.signing_keys
        assert keys_one is not None and keys_two is not None
        # The interleaving of a race, made deterministic: two saw no key (it read
        # before one's insert landed) and makes its own just after one did.
        assert keys_two.public_jwks() == {"keys": []}
        first = keys_one.current_signing_key().kid
        assert keys_two._signing_row(keys_two._current_rows(), keys_two._now()) is None
        keys_two._insert(keys_two._now(), signs_from=keys_two._now())
        keys_two._current_rows(fresh=True)  # as current_signing_key rereads after its insert
        clock.now += STEP  # the next requests: well within a refresh interval
        both = {k["kid"] for k in keys_two.public_jwks()["keys"]}
        assert first in both and len(both) == 2
        for engine in (one, two):
            assert {k["kid"] for k in jwks(engine)["keys"]} == both
        assert keys_one.current_signing_key().kid == keys_two.current_signing_key().kid
    finally:
        for engine in (one, two):
            engine.store.close()
