"""Signing keys of the token issuer: sealed at rest, published before they sign,
retired after their last token, agreed on by every instance (issue 12 item 3)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from m2m_middleware import ConfigError, Settings, open_key_store
from m2m_middleware.issuer import SigningKeys, signing_keys_for
from m2m_middleware.issuer.tables import table_for

SECRET = "correct horse battery staple 1"
OTHER_SECRET = "another secret, quite long"
T0 = 1_800_000_000.0
MAX_AGE = 300
TTL = 300
SKEW = 60


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[[], Any]


@pytest.fixture(params=["memory", "sqlite", "postgres", "django"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens store objects that share one database (memory: one object, its only form)."""
    opened: list[Any] = []
    if request.param == "memory":
        shared = open_key_store("memory://")
        yield lambda: shared
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        request.getfixturevalue("django_db")
        url = "django://"

    def make() -> Any:
        store = open_key_store(url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def manager(store: Any, clock: Clock, **options: Any) -> SigningKeys:
    options.setdefault("secret", SECRET)
    return SigningKeys(store, clock=clock, token_ttl=TTL, jwks_max_age=MAX_AGE, **options)


def private_material(keys: SigningKeys) -> list[bytes]:
    """Every form a private key of ``keys`` could leak in: PEM text, its body, raw ``d``."""
    found: list[bytes] = []
    for held in keys._unsealed.values():
        private = held._key.as_dict(private=True)
        d = private["d"]
        found.append(d.encode())
        found.append(pyjwt.utils.base64url_decode(d))
        pem = held._key.as_pem(private=True)
        found.append(b"".join(pem.splitlines()[1:-1])[:48])
    found.append(b"PRIVATE KEY")
    return found


# -- sealed at rest --------------------------------------------------------------


def test_the_sqlite_file_holds_no_private_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = open_key_store(f"sqlite:///{path}")
    keys = manager(store, Clock())
    keys.current_signing_key()
    keys.rotate()
    assert len(keys._unsealed) == 2
    store.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys.db"))
    assert b"m2m-seal-1" in data  # the rows are there, sealed
    for material in private_material(keys):
        assert material not in data
    with closing(sqlite3.connect(path)) as conn, conn:
        rows = conn.execute("SELECT public_jwk, private_key FROM m2m_signing_keys").fetchall()
    assert len(rows) == 2
    for public, sealed in rows:
        assert "d" not in json.loads(public)
        assert sealed.startswith("m2m-seal-1$")


@pytest.mark.postgres
def test_the_postgres_table_holds_no_private_key(postgres_url: str) -> None:
    import psycopg

    store = open_key_store(postgres_url)
    keys = manager(store, Clock(), algorithm="RS256")
    keys.current_signing_key()
    store.close()
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT row_to_json(k)::text FROM m2m_signing_keys k").fetchall()
    text = " ".join(row[0] for row in rows).encode()
    assert len(rows) == 1 and b"m2m-seal-1" in text
    for material in private_material(keys):
        if b"\x00" not in material:  # a JSON dump shows text only
            assert material not in text


def test_the_django_table_holds_no_private_key(django_key_store: Any) -> None:
    from django.db import connection

    keys = manager(django_key_store, Clock(), algorithm="EdDSA")
    keys.current_signing_key()
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM m2m_middleware_signingkey")
        rows = cursor.fetchall()
    text = repr(rows).encode()
    assert len(rows) == 1 and b"m2m-seal-1" in text
    for material in private_material(keys):
        assert material not in text


def test_every_store_keeps_the_keys_every_instance_reads(open_store: StoreFactory) -> None:
    clock = Clock()
    first = manager(open_store(), clock)
    signing = first.current_signing_key()
    second = manager(open_store(), clock)
    again = second.current_signing_key()
    assert again.kid == signing.kid
    # The second instance unsealed the key from the database: it signs the same.
    claims = {"sub": "svc", "exp": int(T0) + TTL}
    token = again.sign(claims)
    jwks = pyjwt.PyJWKSet.from_dict(first.public_jwks())
    key = next(k for k in jwks.keys if k.key_id == signing.kid)
    assert (
        pyjwt.decode(token, key.key, algorithms=["ES256"], options={"verify_exp": False})["sub"]
        == "svc"
    )


def test_a_wrong_secret_is_a_clear_error_naming_the_field(open_store: StoreFactory) -> None:
    clock = Clock()
    manager(open_store(), clock).current_signing_key()
    wrong = manager(open_store(), clock, secret=OTHER_SECRET)
    with pytest.raises(ConfigError) as caught:
        wrong.current_signing_key()
    assert caught.value.field == "signing_key_secret"
    assert "not the secret" in str(caught.value)
    assert SECRET not in str(caught.value) and OTHER_SECRET not in str(caught.value)
    # Nor may it seal a new key under the wrong secret.
    with pytest.raises(ConfigError):
        wrong.rotate()
    assert len(manager(open_store(), clock).list_keys()) == 1


def test_a_sealed_key_moved_to_another_kid_does_not_open() -> None:
    store = open_key_store("memory://")
    clock = Clock()
    keys = manager(store, clock)
    keys.current_signing_key()
    keys.rotate()
    table = table_for(store)
    first, second = sorted(table.rows(), key=lambda r: r.created_at.timestamp() + len(r.kid))[:2]
    table._rows[first.kid] = replace(first, sealed_private_key=second.sealed_private_key)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="altered"):
        manager(store, clock)._unseal(table._rows[first.kid])  # type: ignore[attr-defined]


@pytest.mark.parametrize("secret", ["", "short"])
def test_an_empty_or_short_secret_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError) as caught:
        manager(open_key_store("memory://"), Clock(), secret=secret)
    assert caught.value.field == "signing_key_secret"


# -- settings --------------------------------------------------------------------


def test_no_secret_means_no_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("M2M_SIGNING_SECRET", raising=False)
    settings = Settings(key_store="memory://")  # fine: nothing asked for an issuer
    with pytest.raises(ConfigError) as caught:
        signing_keys_for(settings)
    assert caught.value.field == "signing_key_secret"
    assert "M2M_SIGNING_SECRET" in str(caught.value)


def test_the_secret_comes_from_the_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("M2M_SIGNING_SECRET", SECRET)
    store = open_key_store("memory://")
    keys = signing_keys_for(Settings(key_store=store, signing_algorithm="EdDSA", token_ttl=60))
    assert keys.algorithm == "EdDSA" and keys.token_ttl == 60
    assert keys.current_signing_key().algorithm == "EdDSA"
    # The setting wins over the environment: another secret cannot open the key.
    with pytest.raises(ConfigError):
        signing_keys_for(
            Settings(key_store=store, signing_key_secret=OTHER_SECRET)
        ).current_signing_key()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("signing_algorithm", "HS256"),
        ("signing_algorithm", "none"),
        ("signing_algorithm", "es256"),
        ("signing_algorithm", None),
        ("token_ttl", 0),
        ("token_ttl", -5),
        ("token_ttl", "300"),
        ("token_ttl", True),
        ("token_ttl", 1.5),
        ("token_ttl", 86401),
        ("signing_key_secret", 12345678901234567890),
        ("signing_key_secret", b"bytes secret, long enough"),
    ],
)
def test_bad_issuer_settings_name_their_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(**{field: value})
    assert caught.value.field == field
    if field == "signing_key_secret":
        assert str(value) not in str(caught.value)  # a secret is never quoted


def test_the_secret_is_in_no_repr_of_settings() -> None:
    settings = Settings(signing_key_secret=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert Settings.from_mapping({"SIGNING_KEY_SECRET": SECRET}).signing_key_secret == SECRET
    assert Settings().token_ttl == 300 and Settings().signing_algorithm == "ES256"


def test_the_api_key_path_never_loads_the_issuer(tmp_path: Path) -> None:
    script = """
import sys
from m2m_middleware import Settings, open_key_store
from m2m_middleware.engine import Engine
store = open_key_store("memory://")
key = store.create_key("svc").key
engine = Engine(Settings(key_store=store, signing_algorithm="RS256", token_ttl=60))
print(sorted(m for m in sys.modules if m.startswith("m2m_middleware.issuer")))
"""
    env = {k: v for k, v in os.environ.items() if k != "M2M_SIGNING_SECRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "[]", done.stderr


# -- secrecy in reprs and logs ---------------------------------------------------


def test_no_secret_or_private_key_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = open_key_store("memory://")
    keys = manager(store, Clock())
    current = keys.current_signing_key()
    info = keys.rotate()
    shown = " ".join(
        [repr(keys), repr(current), repr(info), repr(table_for(store).rows()), caplog.text]
    )
    assert "signing key" in caplog.text  # it does log: what, not the secret
    assert SECRET not in shown
    for material in private_material(keys):
        assert material.decode("latin-1") not in shown
    assert "m2m-seal-1" not in shown  # not even the sealed text


# -- rotation --------------------------------------------------------------------


def jwks_kids(keys: SigningKeys) -> set[str]:
    return {k["kid"] for k in keys.public_jwks()["keys"]}


def test_rotation_timeline(open_store: StoreFactory) -> None:
    clock = Clock()
    keys = manager(open_store(), clock, refresh_interval=0)
    old = keys.current_signing_key()
    assert jwks_kids(keys) == {old.kid}
    clock.now = T0 + 100
    new = keys.rotate()
    assert new.state == "pending"
    # Published at once, not signing for a whole JWKS max-age.
    assert jwks_kids(keys) == {old.kid, new.kid}
    clock.now = T0 + 100 + MAX_AGE - 0.001
    assert keys.current_signing_key().kid == old.kid
    last_old_token_expires = clock.now + TTL
    clock.now = T0 + 100 + MAX_AGE
    assert keys.current_signing_key().kid == new.kid
    states = {i.kid: i.state for i in keys.list_keys()}
    assert states == {old.kid: "published", new.kid: "signing"}
    # The old key stays published until its last token has expired (and the skew).
    clock.now = last_old_token_expires + SKEW - 0.01
    assert old.kid in jwks_kids(keys)
    clock.now = T0 + 100 + MAX_AGE + TTL + SKEW
    assert jwks_kids(keys) == {new.kid}
    assert {i.kid: i.state for i in keys.list_keys()} == {old.kid: "retired", new.kid: "signing"}


def test_rotation_never_signs_unpublished_and_keeps_every_token_verifiable() -> None:
    """Time steps through several rotations, some back to back; at every step the
    key that signs was in the JWKS a max-age ago, and every token signed so far
    verifies with the JWKS now until it expires."""
    clock = Clock()
    store = open_key_store("memory://")
    keys = manager(store, clock, refresh_interval=0)
    keys.current_signing_key()
    rotations = {T0 + 50, T0 + 700, T0 + 710, T0 + 1500, T0 + 1550, T0 + 1600}
    seen_jwks: dict[float, set[str]] = {}
    tokens: list[tuple[float, str, str]] = []
    step = 10.0
    t = T0
    while t < T0 + 3000:
        clock.now = t
        if t in rotations:
            keys.rotate()
        seen_jwks[t] = published = jwks_kids(keys)
        signer = keys.current_signing_key()
        if t >= T0 + MAX_AGE:
            assert signer.kid in seen_jwks[t - MAX_AGE], t
        token = signer.sign({"sub": "svc", "iat": int(t), "exp": int(t) + TTL})
        tokens.append((t, signer.kid, token))
        jwks = pyjwt.PyJWKSet.from_dict(keys.public_jwks())
        by_kid = {k.key_id: k for k in jwks.keys}
        for issued, kid, old_token in tokens:
            if issued + TTL > t:
                assert kid in published, (issued, t)
                pyjwt.decode(
                    old_token,
                    by_kid[kid].key,
                    algorithms=["ES256"],
                    options={"verify_exp": False, "verify_iat": False},
                )
        t += step
    # Retired keys left the JWKS: only the last key (and none retired) remains.
    assert len(jwks_kids(keys)) == 1


def test_two_instances_agree_on_the_current_key(open_store: StoreFactory) -> None:
    clock = Clock()
    one = manager(open_store(), clock)
    two = manager(open_store(), clock)
    assert one.current_signing_key().kid == two.current_signing_key().kid
    step = one.refresh_interval + 1
    clock.now += 20
    two.rotate()
    clock.now += 5
    one.rotate()  # two rotations at once, from two instances
    for _ in range(int((MAX_AGE + TTL + SKEW + 200) / step)):
        clock.now += step
        a, b = one.current_signing_key(), two.current_signing_key()
        assert a.kid == b.kid, clock.now
        assert one.public_jwks() == two.public_jwks()
    assert len(one.public_jwks()["keys"]) == 1


def test_an_instance_sees_another_ones_new_key_before_it_signs(
    open_store: StoreFactory,
) -> None:
    clock = Clock()
    one = manager(open_store(), clock)
    two = manager(open_store(), clock)
    first = two.current_signing_key()
    one.rotate()
    new = max(one.list_keys(), key=lambda i: i.signs_from)
    # Within a refresh interval the other instance publishes it, long before it signs.
    clock.now += two.refresh_interval
    assert new.kid in jwks_kids(two)
    assert two.current_signing_key().kid == first.kid
    clock.now = new.signs_from.timestamp()
    assert two.current_signing_key().kid == new.kid


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "RS256"])
def test_a_jws_verifies_with_pyjwt_given_only_the_public_jwks(algorithm: str) -> None:
    keys = manager(open_key_store("memory://"), Clock(), algorithm=algorithm)
    signer = keys.current_signing_key()
    token = signer.sign({"iss": "https://issuer.test", "sub": "svc", "exp": int(T0) + TTL})
    published = json.loads(json.dumps(keys.public_jwks()))  # as served
    for jwk in published["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
        assert jwk["use"] == "sig" and jwk["alg"] == algorithm
    header = pyjwt.get_unverified_header(token)
    assert header == {"alg": algorithm, "kid": signer.kid, "typ": "at+jwt"}
    key = pyjwt.PyJWKSet.from_dict(published)[header["kid"]]
    claims = pyjwt.decode(
        token,
        key.key,
        algorithms=[algorithm],
        issuer="https://issuer.test",
        options={"verify_exp": False},
    )
    assert claims["sub"] == "svc"
    # A token that is not ours does not verify against our JWKS.
    other = manager(open_key_store("memory://"), Clock(), algorithm=algorithm)
    with pytest.raises(pyjwt.InvalidSignatureError):
        forged = other.current_signing_key().sign({"sub": "svc"})
        pyjwt.decode(forged, key.key, algorithms=[algorithm])


def test_a_reader_without_a_secret_lists_and_publishes_but_does_not_sign() -> None:
    store = open_key_store("memory://")
    clock = Clock()
    manager(store, clock).current_signing_key()
    reader = manager(store, clock, secret=None)
    assert len(reader.list_keys()) == 1 and len(reader.public_jwks()["keys"]) == 1
    with pytest.raises(ConfigError, match="M2M_SIGNING_SECRET"):
        reader.current_signing_key()
    with pytest.raises(ConfigError, match="M2M_SIGNING_SECRET"):
        reader.rotate()


@pytest.mark.parametrize(
    ("column", "value"),
    [("public_jwk", "{not json"), ("public_jwk", "[1, 2]"), ("signs_from", "tomorrow")],
)
def test_a_damaged_row_is_a_store_error_naming_the_key(
    tmp_path: Path, column: str, value: str
) -> None:
    from m2m_middleware.errors import KeyStoreError

    path = tmp_path / "keys.db"
    store = open_key_store(f"sqlite:///{path}")
    kid = manager(store, Clock()).current_signing_key().kid
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"UPDATE m2m_signing_keys SET {column} = ?", (value,))
    with pytest.raises(KeyStoreError, match=kid):
        manager(store, Clock()).public_jwks()
    store.close()


@pytest.mark.postgres
def test_two_processes_create_the_postgres_table_at_once(postgres_url: str) -> None:
    import threading

    stores = [open_key_store(postgres_url) for _ in range(4)]
    for store in stores:
        store.list_keys()  # the API-key schema first: only the new table races
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def read(store: Any) -> None:
        start.wait()
        try:
            manager(store, Clock(), secret=None).list_keys()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for store in stores:
        store.close()
    assert errors == []
