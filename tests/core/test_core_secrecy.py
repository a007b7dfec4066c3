"""The plaintext of a key is in no file, no log record and no response."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from core_support import make_engine, sqlite_url

from m2m_middleware import (
    Allowed,
    ConfigError,
    Denied,
    Engine,
    Settings,
    StoreUnavailable,
    open_key_store,
)
from m2m_middleware.jwks import JWKSClient
from m2m_middleware.keys import generate_key, hash_key
from m2m_middleware.stores import MemoryKeyStore


def files_blob(directory: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_no_plaintext_on_disk_only_hashes(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    engine = make_engine(store, default_limits="100/minute")
    issued = [
        store.create_key("client-a", scopes=["orders:read"], name="first"),
        store.create_key("client-a", max_uses=5, metadata={"team": "billing"}),
        store.create_key(
            "client-b", tier="gold", expires_at=datetime.now(timezone.utc) + timedelta(days=1)
        ),
    ]
    for item in issued:
        assert isinstance(engine.check("GET", "/x", None, item.key), Allowed)
        assert isinstance(engine.check("GET", "/x", f"Bearer {item.key}", None), Allowed)
    rotated = store.rotate_key(issued[0].key_id, grace_seconds=60)
    assert isinstance(engine.check("GET", "/x", None, rotated.key), Allowed)
    store.revoke_key(issued[2].key_id)
    plaintexts = [i.key for i in issued] + [rotated.key]

    with_wal = files_blob(tmp_path)  # while the connection is open, the WAL holds the writes
    engine.close()  # flushes last_used_at and closes the connection
    after_close = files_blob(tmp_path)
    assert store.get_key(issued[0].key_id).last_used_at is not None  # the flush happened

    for blob in (with_wal, after_close):
        for key in plaintexts:
            assert key.encode() not in blob
            assert key[4:-6].encode() not in blob  # nor the bare secret
        for key in plaintexts:
            assert hash_key(key).encode() in blob  # hashed at rest
    store.close()


def test_no_plaintext_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="m2m_middleware")

    class FlakyStore(MemoryKeyStore):
        down = False

        def _fetch_by_hash(self, key_hash: str):  # type: ignore[no-untyped-def]
            if self.down:
                raise StoreUnavailable("connection refused")
            return super()._fetch_by_hash(key_hash)

    store = FlakyStore()
    engine = make_engine(store, default_limits="2/minute", key_cache_ttl=0)
    good = store.create_key("client-a").key
    limited = store.create_key("client-b", max_uses=1).key
    revoked = store.create_key("client-c")
    store.revoke_key(revoked.key_id)
    unknown = generate_key()
    malformed = good[:-1] + ("A" if good[-1] != "A" else "B")
    outcomes: list[Allowed | Denied] = [
        engine.check("GET", "/x", None, good),
        engine.check("GET", "/x", f"Bearer {good}", None),
        engine.check("GET", "/x", None, good),  # rate limited
        engine.check("GET", "/x", None, limited),
        engine.check("GET", "/x", None, limited),  # quota exceeded
        engine.check("GET", "/x", None, revoked.key),
        engine.check("GET", "/x", None, unknown),
        engine.check("GET", "/x", None, malformed),
        engine.check("GET", "/x", f"Bearer {good}", unknown),  # two credentials
    ]
    store.down = True
    outcomes.append(engine.check("GET", "/x", None, unknown))  # store unreachable
    store.down = False
    engine.close()

    assert [o.allowed for o in outcomes[:2]] == [True, True]
    assert [getattr(o, "error", None) for o in outcomes[2:]] == [
        "rate_limited",
        None,
        "quota_exceeded",
        "invalid_token",
        "invalid_token",
        "invalid_token",
        "invalid_request",
        "temporarily_unavailable",
    ]
    assert caplog.records, "the rate-limit and outage paths log; nothing was captured"
    secrets = [good, limited, revoked.key, unknown, malformed]
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        for key in secrets:
            assert key not in text
            assert key[4:-6] not in text
    for outcome in outcomes:
        if isinstance(outcome, Denied):
            sent = outcome.body.decode() + repr(outcome.headers) + outcome.detail
            for key in secrets:
                assert key[4:-6] not in sent


# -- passwords and tokens in URLs: never in a repr, an error or a log record ----------

PASSWORD = "Hunter2-s3cret"
#: Each spelling of a secret a URL or DSN can carry, with a part of it that must
#: stay visible so the message still says where.
SECRET_URLS = {
    "key_store": [
        (f"postgresql://keys:{PASSWORD}@db.internal:5432/keys", "db.internal"),
        (f"postgresql://keys:{PASSWORD.replace('-', '%2D')}@db.internal/keys", "db.internal"),
        (f"postgresql://keys@db.internal/keys?sslmode=require&password={PASSWORD}", "sslmode"),
        (f"host=db.internal password={PASSWORD} dbname=keys", "db.internal"),
        (f"host=db.internal password='{PASSWORD} x' dbname=keys", "db.internal"),
    ],
    "rate_limit_storage": [
        (f"redis://:{PASSWORD}@cache.internal:6379/0", "cache.internal"),
        (f"redis://limits:{PASSWORD}@cache.internal:6379", "cache.internal"),
        (f"redis://limits:p@ss/{PASSWORD}@cache.internal:6379", "redis://"),
        (f"redis://cache.internal:6379/0?password={PASSWORD}", "cache.internal"),
        (f"redis+sentinel://u:{PASSWORD}@s1:26379,s2:26379/main", "s1:26379"),
    ],
    "invalidation_url": [
        (f"redis://:{PASSWORD}@bus.internal:6379", "bus.internal"),
        (f"rediss://bus:{PASSWORD}@bus.internal:6380/1", "bus.internal"),
    ],
    "jwt_jwks_url": [
        (f"https://jwks:{PASSWORD}@idp.example/.well-known/jwks.json", "idp.example"),
        (f"https://idp.example/jwks?token={PASSWORD}", "idp.example"),
        (f"https://idp.example/jwks?tenant=a&access_token={PASSWORD}&v=2", "tenant=a"),
        (f"https://idp.example/jwks?sv=2022&sig={PASSWORD}", "sv=2022"),
    ],
}
CASES = [(field, url, shown) for field, urls in SECRET_URLS.items() for url, shown in urls]


def assert_hidden(text: str) -> None:
    assert PASSWORD not in text
    assert PASSWORD.replace("-", "%2D") not in text
    assert "s3cret" not in text  # nor a piece of it


@pytest.mark.parametrize(("field", "url", "shown"), CASES)
def test_the_settings_repr_shows_no_password(field: str, url: str, shown: str) -> None:
    settings = Settings(**{field: url})
    for text in (repr(settings), str(settings), repr([settings])):
        assert_hidden(text)
        assert shown in text  # still says where
        assert f"{field}=" in text


def test_the_settings_repr_still_shows_what_holds_no_secret() -> None:
    settings = Settings(key_store="sqlite:///keys.db", rate_limit_storage="redis://cache:6379/0")
    assert "key_store='sqlite:///keys.db'" in repr(settings)
    assert "rate_limit_storage='redis://cache:6379/0'" in repr(settings)
    assert "jwt_keys" not in repr(settings)  # an HMAC secret, never shown


BAD_SETTINGS = [
    ("jwt_jwks_url", f"http://jwks:{PASSWORD}@idp.example/jwks"),  # http, not local
    ("jwt_jwks_url", f"ftp://idp.example/jwks?token={PASSWORD}"),
    ("rate_limit_storage", f"redis:/limits:{PASSWORD}@cache.internal"),  # no "://"
    ("rate_limit_storage", f"redis//:{PASSWORD}@cache.internal"),
    ("invalidation_url", f"http://bus:{PASSWORD}@bus.internal"),
]


@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS)
def test_a_config_error_for_a_bad_url_shows_no_password(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(**{field: value})
    assert caught.value.field == field
    for text in (str(caught.value), caught.value.problem, repr(caught.value)):
        assert_hidden(text)


BAD_STORES = [
    f"password={PASSWORD} host=db.internal dbname=keys",  # a DSN where a URL belongs
    f"sqlite://keys:{PASSWORD}@db.internal/keys.db",
    f"mysql://keys:{PASSWORD}@db.internal/keys",
    f"postgresql://keys@db.internal/keys?password={PASSWORD}&nosuchoption=1",
    f"postgresql://keys:{PASSWORD}%zz@db.internal/keys",
]


@pytest.mark.parametrize("url", BAD_STORES)
def test_a_bad_key_store_url_is_a_config_error_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_key_store(url)
    assert caught.value.field == "key_store"
    assert_hidden(str(caught.value))


@pytest.mark.parametrize(
    "url",
    [f"nosuch://limits:{PASSWORD}@cache.internal", f"memcached://u:{PASSWORD}@cache:notaport"],
)
def test_a_limit_storage_the_limiter_cannot_open_shows_no_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Engine(Settings(rate_limit_storage=url), store=MemoryKeyStore())
    assert caught.value.field == "rate_limit_storage"
    assert_hidden(str(caught.value))


def test_redaction_masks_every_spelling_and_keeps_the_rest() -> None:
    from m2m_middleware.redaction import redact, redact_url, secrets_of

    assert redact_url(f"redis://u:{PASSWORD}@h:6379/0") == "redis://u:***@h:6379/0"
    assert (
        redact_url(f"redis://h/0?db=1&password={PASSWORD}#x") == "redis://h/0?db=1&password=***#x"
    )
    assert redact_url(f"host=h password='{PASSWORD} \\' x' port=1") == "host=h password=*** port=1"
    assert redact_url("postgresql://postgres@127.0.0.1:5432/test") == (
        "postgresql://postgres@127.0.0.1:5432/test"  # a user name is no secret
    )
    # A secret quoted apart from its URL (libpq, limits) is masked wherever it is.
    message = f'invalid option "{PASSWORD}" in the connection string'
    assert PASSWORD not in redact(message, secrets_of(f"redis://:{PASSWORD}@h"))


def test_outage_records_show_no_password(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client libraries may quote their URL in an error; the log never does."""
    caplog.set_level(logging.DEBUG)
    limits_url = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    bus_url = f"redis://bus:{PASSWORD}@127.0.0.1:1"

    class DownStore(MemoryKeyStore):
        def _fetch_by_hash(self, key_hash: str) -> None:  # type: ignore[override]
            raise StoreUnavailable(f"cannot reach postgresql://keys:{PASSWORD}@db/keys")

    engine = Engine(
        Settings(
            rate_limit_storage=limits_url,
            invalidation_url=bus_url,
            default_limits="5/second",
            key_cache_ttl=0,
        ),
        store=DownStore(),
    )
    assert engine.bus is not None
    engine.bus.stop()

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError(f"Error connecting to {limits_url} / {bus_url}")

    engine.bus._publisher.publish = refuse  # type: ignore[method-assign]
    monkeypatch.setattr(engine.limiter, "_script", refuse)
    assert engine.check("GET", "/x", None, generate_key()).status == 503  # type: ignore[union-attr]
    live = MemoryKeyStore()
    key = live.create_key("client-a").key
    engine.store = live
    assert engine.check("GET", "/x", None, key).status == 503  # type: ignore[union-attr]
    engine.bus.publish(live.identity, live.location, "key_x")

    jwks = JWKSClient(
        f"https://idp.example/jwks?token={PASSWORD}",
        fetch=lambda url, timeout: (_ for _ in ()).throw(OSError(f"cannot GET {url}")),
    )
    jwks.prepare(None)  # the fetch fails at once; its outage is logged
    jwks.fetch = lambda url, timeout: (b'{"keys": [{"kty": "oct", "k": "AAAA"}]}', None)
    assert "idp.example" in jwks.snapshot()["url"]
    assert_hidden(repr(jwks.snapshot()))

    messages = [r.getMessage() for r in caplog.records]
    assert any("key store unreachable" in m for m in messages)
    assert any("rate-limit storage unreachable" in m for m in messages)
    assert any("cannot publish" in m for m in messages)
    assert any("JWKS" in m and "idp.example" in m for m in messages)
    for record in caplog.records:
        assert_hidden(record.getMessage())
