"""``key_store="django://"``: keys in the project's database, through the ORM.

The store conformance suite (tests/core/test_core_stores.py and the engine
tests) runs on this store too, as the ``django`` kind of the ``store``
fixture; here is what is Django's own: the URL, the errors, transactions,
time zones and the middleware reading keys from the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from django.core import checks
from django.db import IntegrityError, OperationalError, connection, connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path

from m2m_middleware import ConfigError, KeyStoreError, StoreUnavailable, open_key_store
from m2m_middleware.django import get_client
from m2m_middleware.django.models import APIKey
from m2m_middleware.django.store import DjangoKeyStore, with_null_flags
from m2m_middleware.keys import hash_key
from m2m_middleware.stores.base import subscribe_invalidations

pytestmark = pytest.mark.usefixtures("django_db")


@pytest.fixture
def store() -> Iterator[DjangoKeyStore]:
    the_store = open_key_store("django://")
    assert isinstance(the_store, DjangoKeyStore)
    yield the_store
    the_store.close()


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- the URL ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["django://", "django://default", "django://default/"])
def test_the_url_names_a_database_alias(url: str) -> None:
    store = open_key_store(url, prefix="acme")
    assert isinstance(store, DjangoKeyStore)
    assert store.using == "default"
    assert store.blocking
    assert store.prefix == "acme"
    assert store.create_key("c").key.startswith("acme_")


def test_the_location_is_the_alias_and_the_database_name(store: DjangoKeyStore) -> None:
    name = connection.settings_dict["NAME"]
    assert store.location == f"django://default/{name}"
    # Every store object on the same database shares it, so their caches
    # hear each other's revocations.
    assert open_key_store("django://").location == store.location


@pytest.mark.parametrize(
    ("url", "named"),
    [("django://replica", "'replica'"), ("django://default/keys", "django://<database alias>")],
)
def test_an_unknown_alias_or_a_path_is_a_config_error(url: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_key_store(url)
    assert caught.value.field == "key_store"
    assert named in str(caught.value)


def test_a_store_object_made_before_django_is_configured_works(store: DjangoKeyStore) -> None:
    # settings.py may say M2M_AUTH = {"key_store": DjangoKeyStore()}: nothing
    # in the constructor touches Django's settings or database.
    made_early = DjangoKeyStore(prefix="early")
    issued = made_early.create_key("acme")
    assert issued.key.startswith("early_")
    assert made_early.location == store.location
    with override_settings(ROOT_URLCONF=URLCONF, M2M_AUTH={**M2M_AUTH, "key_store": made_early}):
        assert get("sync", "/sync", issued.key).status_code == 200
    with pytest.raises(ConfigError) as caught:
        DjangoKeyStore("replica").location
    assert caught.value.field == "key_store"


def test_an_unknown_alias_is_e002() -> None:
    with override_settings(M2M_AUTH={"key_store": "django://replica"}):
        messages = [
            m
            for m in checks.run_checks(tags=[checks.Tags.security])
            if str(m.id).startswith("m2m_middleware.")
        ]
    assert [(m.id, m.obj) for m in messages] == [("m2m_middleware.E002", "key_store")]
    assert "replica" in messages[0].msg


def test_a_django_url_passes_the_checks() -> None:
    with override_settings(M2M_AUTH={"key_store": "django://"}):
        assert [
            m
            for m in checks.run_checks(tags=[checks.Tags.security])
            if str(m.id).startswith("m2m_middleware.")
        ] == []


def test_without_django_the_url_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "m2m_middleware.django.store", None)  # as if not installed
    with pytest.raises(ConfigError) as caught:
        open_key_store("django://")
    assert caught.value.field == "key_store"
    assert 'pip install "m2m-middleware[django]"' in str(caught.value)


_OUTSIDE_THE_APP = """
import django
from django.conf import settings
from m2m_middleware import ConfigError, open_key_store

def refused():
    try:
        open_key_store("django://")
    except ConfigError as exc:
        assert exc.field == "key_store", exc
        return str(exc)
    raise AssertionError("opened")

print(refused())  # Django not configured
settings.configure(INSTALLED_APPS=[], DATABASES={})
django.setup()
print(refused())  # configured, the app not installed
"""


@pytest.mark.slow
def test_without_the_app_installed_the_error_says_to_add_it() -> None:
    # A process of its own: this one has Django configured, with the app.
    done = subprocess.run(
        [sys.executable, "-c", _OUTSIDE_THE_APP],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    not_configured, not_installed = done.stdout.splitlines()
    assert "DJANGO_SETTINGS_MODULE" in not_configured
    for message in (not_configured, not_installed):
        assert '"m2m_middleware.django" to INSTALLED_APPS' in message


# -- what is stored -------------------------------------------------------------------


def test_only_the_hash_is_stored(store: DjangoKeyStore) -> None:
    issued = store.create_key("acme", scopes=["b", "a"], name="ci", metadata={"team": "x"})
    row = APIKey.objects.get(pk=issued.key_id)
    assert row.key_hash == hashlib.sha256(issued.key.encode()).hexdigest() == hash_key(issued.key)
    assert row.scopes == "a b"
    assert row.metadata == {"team": "x"}
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM m2m_middleware_apikey")
        stored = repr(cursor.fetchall())
    assert issued.key not in stored
    assert issued.key[4:-6] not in stored  # nor the secret without prefix and checksum
    assert issued.key not in str(row)
    assert row.key_hash not in str(row)
    assert [f.name for f in APIKey._meta.get_fields() if "plain" in f.name or f.name == "key"] == []


def test_the_model_status_agrees_with_the_record(store: DjangoKeyStore) -> None:
    active = store.create_key("acme")
    revoked = store.revoke_key(store.create_key("acme").key_id)
    expired = store.create_key("acme", expires_at=now() - timedelta(seconds=1))
    used_up = store.create_key("acme", max_uses=1)
    store.take_use(used_up.key_id)
    for key_id, status in [
        (active.key_id, "active"),
        (revoked.key_id, "revoked"),
        (expired.key_id, "expired"),
        (used_up.key_id, "used_up"),
    ]:
        assert APIKey.objects.get(pk=key_id).status() == status
        assert store.get_key(key_id).status() == status


def test_the_earliest_revocation_wins(store: DjangoKeyStore) -> None:
    issued = store.create_key("acme")
    later, earlier = now() + timedelta(hours=1), now() - timedelta(hours=1)
    assert store._set_revoked(issued.key_id, later)
    assert store.get_key(issued.key_id).revoked_at == later
    assert store._set_revoked(issued.key_id, earlier)
    assert store._set_revoked(issued.key_id, later)
    assert store.get_key(issued.key_id).revoked_at == earlier
    assert not store._set_revoked("key_nope", later)


def test_last_used_only_moves_forward(store: DjangoKeyStore) -> None:
    issued = store.create_key("acme")
    first, second = now() - timedelta(minutes=5), now()
    store._write_last_used({issued.key_id: second})
    store._write_last_used({issued.key_id: first})
    assert store.get_key(issued.key_id).last_used_at == second
    store._write_last_used({issued.key_id: second + timedelta(seconds=1), "key_nope": first})
    assert store.get_key(issued.key_id).last_used_at == second + timedelta(seconds=1)


def test_times_are_aware_when_use_tz_is_off(store: DjangoKeyStore) -> None:
    expires = (now() + timedelta(days=1)).replace(microsecond=0)
    with override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris"):
        issued = store.create_key("acme", expires_at=expires)
        record = store.get_key(issued.key_id)
        revoked = store.revoke_key(issued.key_id)
        naive = APIKey.objects.get(pk=issued.key_id).expires_at
    assert record == issued.record
    assert record.expires_at == expires
    assert revoked.revoked_at is not None
    assert abs((revoked.revoked_at - now()).total_seconds()) < 5
    # Stored as Django stores naive times: in TIME_ZONE (Paris is ahead of UTC).
    assert naive is not None and naive.tzinfo is None
    assert naive != expires.replace(tzinfo=None)


# -- errors ------------------------------------------------------------------------------


def test_a_duplicate_is_a_key_store_error(store: DjangoKeyStore) -> None:
    issued = store.create_key("acme")
    with pytest.raises(KeyStoreError) as caught:
        store._insert(store.get_key(issued.key_id), hash_key(issued.key))
    assert not isinstance(caught.value, StoreUnavailable)
    assert isinstance(caught.value.__cause__, IntegrityError)


def test_an_unreachable_database_is_store_unavailable(
    store: DjangoKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = store.create_key("acme")
    closed: list[bool] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(connections["default"], "close", lambda: closed.append(True))
    monkeypatch.setattr("django.db.models.query.QuerySet.first", refuse)
    with pytest.raises(StoreUnavailable) as caught:
        store.get_key(issued.key_id)
    assert isinstance(caught.value.__cause__, OperationalError)
    assert closed == [True]  # dropped, so the next call reconnects
    with transaction.atomic(), pytest.raises(StoreUnavailable):
        store.find_by_hash(hash_key(issued.key))
    assert closed == [True]  # but never inside the caller's transaction


def test_a_missing_table_says_to_migrate(
    store: DjangoKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import ProgrammingError

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ProgrammingError('relation "m2m_middleware_apikey" does not exist')

    monkeypatch.setattr("django.db.models.query.QuerySet.first", refuse)
    with pytest.raises(KeyStoreError, match=r"manage\.py migrate"):
        store.get_key("key_x")


# -- transactions and cache notices ---------------------------------------------------


def test_revocation_notices_wait_for_the_commit(store: DjangoKeyStore) -> None:
    heard: list[str] = []

    def listener(key_id: str) -> None:  # held here: the registry keeps a weak reference
        heard.append(key_id)

    subscribe_invalidations(store.location, listener)
    first, second = store.create_key("acme"), store.create_key("acme")
    assert heard == [first.key_id, second.key_id]  # new keys: caches forget "unknown"
    heard.clear()
    with transaction.atomic():
        store.revoke_key(first.key_id)
        assert heard == []  # not visible to anyone yet
    assert heard == [first.key_id]
    with pytest.raises(RuntimeError), transaction.atomic():
        store.revoke_key(second.key_id)
        raise RuntimeError("roll back")
    assert heard == [first.key_id]
    assert store.get_key(second.key_id).revoked_at is None
    successor = store.rotate_key(second.key_id)  # outside a transaction: at once
    assert heard == [first.key_id, successor.key_id, second.key_id]


# -- concurrency ---------------------------------------------------------------------------


def _race(workers: int, work: Any) -> None:
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        from django.db import connections

        try:
            barrier.wait()
            work(index)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()  # this thread's connections

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_max_uses_is_exact_under_threads(store: DjangoKeyStore) -> None:
    max_uses = 30
    issued = store.create_key("acme", max_uses=max_uses)
    taken: list[int] = []

    def take(index: int) -> None:
        while (left := store.take_use(issued.key_id)) is not None:
            taken.append(left)

    _race(8, take)
    assert len(taken) == max_uses
    assert sorted(taken) == list(range(max_uses))  # each count handed out once
    assert store.get_key(issued.key_id).remaining_uses == 0


def test_a_rotation_racing_requests_never_multiplies_the_budget(store: DjangoKeyStore) -> None:
    max_uses = 200
    issued = store.create_key("acme", max_uses=max_uses)
    taken: list[int] = []
    handed_over: list[int | None] = []

    def work(index: int) -> None:
        if index == 0:
            handed_over.append(store.rotate_key(issued.key_id).record.remaining_uses)
            return
        # At most 150 in all, so the rotation always finds uses to hand over.
        for _ in range(30):
            if store.take_use(issued.key_id) is None:
                break
            taken.append(1)

    _race(6, work)
    [moved] = handed_over
    assert moved is not None
    assert len(taken) + moved == max_uses
    assert store.get_key(issued.key_id).remaining_uses == 0


# -- the middleware reading keys from the database --------------------------------------


def whoami(request: HttpRequest) -> HttpResponse:
    client = get_client(request)
    assert client is not None
    return JsonResponse({"view": "sync", "client_id": client.client_id, "key_id": client.key_id})


async def awhoami(request: HttpRequest) -> HttpResponse:
    asyncio.get_running_loop()
    client = get_client(request)
    assert client is not None
    return JsonResponse({"view": "async", "client_id": client.client_id, "key_id": client.key_id})


URLCONF = "m2m_django_store_urls"
_urls = types.ModuleType(URLCONF)
_urls.urlpatterns = [path("sync", whoami), path("async", awhoami)]  # type: ignore[attr-defined]
sys.modules[URLCONF] = _urls

M2M_AUTH = {"key_store": "django://", "default_limits": "100/minute", "key_cache_ttl": 0}


def get(client: str, url: str, key: str | None) -> Any:
    headers = {"X-API-Key": key} if key else {}
    if client == "sync":
        return Client().get(url, headers=headers)

    async def go() -> Any:
        return await AsyncClient().get(url, headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("view", ["sync", "async"])
def test_the_middleware_reads_keys_from_the_database(
    store: DjangoKeyStore, client: str, view: str
) -> None:
    issued = store.create_key("acme", scopes=["orders:read"], max_uses=2)
    with override_settings(ROOT_URLCONF=URLCONF, M2M_AUTH=M2M_AUTH):
        response = get(client, f"/{view}", issued.key)
        assert response.status_code == 200, response.content
        assert response.json() == {"view": view, "client_id": "acme", "key_id": issued.key_id}
        assert get(client, f"/{view}", issued.key).status_code == 200
        used_up = get(client, f"/{view}", issued.key)
        assert (used_up.status_code, used_up.json()["error"]) == (429, "quota_exceeded")
        other = store.create_key("acme")
        store.revoke_key(other.key_id)
        revoked = get(client, f"/{view}", other.key)
        assert (revoked.status_code, revoked.json()["error"]) == (401, "invalid_token")
        assert get(client, f"/{view}", None).status_code == 401
    assert store.get_key(issued.key_id).remaining_uses == 0


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize(
    "damage",
    ["created_at = 'yesterday'", "revoked_at = 12345", "remaining_uses = 'lots'"],
)
def test_the_middleware_answers_401_for_a_row_it_cannot_read(
    store: DjangoKeyStore, client: str, damage: str
) -> None:
    from django.db import connection

    good, bad = store.create_key("acme"), store.create_key("acme")
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE m2m_middleware_apikey SET {damage} WHERE key_id = %s", [bad.key_id])
    with override_settings(ROOT_URLCONF=URLCONF, M2M_AUTH=M2M_AUTH):
        refused = get(client, f"/{client}", bad.key)
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_token")
        assert get(client, f"/{client}", good.key).status_code == 200
    # The admin loads rows as the store does, so it labels this one too.
    assert with_null_flags(APIKey.objects.filter(pk=bad.key_id)).get().status() == "unreadable"


def test_a_revocation_reaches_a_cached_key_at_once(store: DjangoKeyStore) -> None:
    issued = store.create_key("acme")
    cached = {**M2M_AUTH, "key_cache_ttl": 3600}
    with override_settings(ROOT_URLCONF=URLCONF, M2M_AUTH=cached):
        assert get("sync", "/sync", issued.key).status_code == 200
        # Another store object on the same database, as the admin uses.
        open_key_store("django://").revoke_key(issued.key_id)
        assert get("sync", "/sync", issued.key).status_code == 401


def test_manage_py_m2m_keys_works_on_the_database(
    store: DjangoKeyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    from django.core.management import call_command

    with override_settings(M2M_AUTH={**M2M_AUTH, "key_prefix": "proj"}):
        capsys.readouterr()
        call_command("m2m_keys", "create", "--client", "billing", "--json")
        created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("proj_")
    row = APIKey.objects.get(pk=created["key_id"])
    assert row.key_hash == hash_key(created["key"])
    assert store.find_by_hash(hash_key(created["key"])) == store.get_key(created["key_id"])


# -- revocations made in other processes ------------------------------------------------------

#: ``python -c MANAGE <DATABASES["default"] as JSON> <m2m_keys arguments>``: the
#: project's ``manage.py m2m_keys`` in another process, on the same database.
MANAGE = """
import json, sys
import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["m2m_middleware.django"],
    DATABASES={"default": json.loads(sys.argv[1])},
    USE_TZ=True,
    M2M_AUTH={"key_store": "django://"},
)
django.setup()
from django.core.management import call_command

call_command("m2m_keys", *sys.argv[2:])
"""


def manage_elsewhere(database: dict[str, Any], *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "M2M_INVALIDATION_URL"}
    result = subprocess.run(
        [sys.executable, "-c", MANAGE, json.dumps(database), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr


def refused_within(seconds: float, request: Any) -> float:
    started = time.monotonic()
    while (response := request()).status_code == 200:
        assert time.monotonic() - started < seconds, f"still admitted after {seconds} s"
        time.sleep(0.01)
    assert (response.status_code, response.json()["error"]) == (401, "invalid_token")
    return time.monotonic() - started


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("action", ["revoke", "rotate"])
def test_manage_py_in_another_process_is_heard_within_a_poll_interval(
    store: DjangoKeyStore, client: str, action: str
) -> None:
    # SQLite, no Redis, an hour of caching: the KeyChange log is all there is.
    issued = store.create_key("acme")
    database = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(connection.settings_dict["NAME"]),
    }
    cached = {**M2M_AUTH, "key_cache_ttl": 3600, "invalidation_url": ""}
    with override_settings(ROOT_URLCONF=URLCONF, M2M_AUTH=cached):
        assert get(client, f"/{client}", issued.key).status_code == 200
        manage_elsewhere(database, action, issued.key_id)
        refused_within(1.0, lambda: get(client, f"/{client}", issued.key))


def test_a_database_not_migrated_for_the_change_log_still_revokes(
    store: DjangoKeyStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from django.db.models.query import QuerySet

    from m2m_middleware.django.models import KeyChange

    create = QuerySet.create

    def missing(self: QuerySet[Any], **kwargs: Any) -> Any:
        if self.model is KeyChange:
            raise OperationalError("no such table: m2m_middleware_keychange")
        return create(self, **kwargs)

    monkeypatch.setattr(QuerySet, "create", missing)
    first, second = store.create_key("acme"), store.create_key("acme")
    with caplog.at_level(logging.WARNING, logger="m2m_middleware"):
        store.revoke_key(first.key_id)
        store.rotate_key(second.key_id)
    assert store.get_key(first.key_id).revoked_at is not None
    assert store.get_key(second.key_id).revoked_at is not None
    warnings = [r.getMessage() for r in caplog.records if "cannot tell other" in r.getMessage()]
    assert len(warnings) == 1 and "manage.py migrate" in warnings[0]  # once, not per change


@pytest.mark.postgres
@pytest.mark.parametrize("client", ["sync", "async"])
def test_manage_py_in_another_process_is_heard_through_notify(
    django_postgres_key_store: DjangoKeyStore, client: str
) -> None:
    # PostgreSQL, no Redis: the other process knows the database by another
    # alias ("default"); the store id kept in it makes them one store.
    store = django_postgres_key_store
    issued = store.create_key("acme")
    settings_dict = connections[store.using].settings_dict
    database = {
        key: settings_dict[key] for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")
    }
    database["OPTIONS"] = dict(settings_dict["OPTIONS"])
    cached = {**M2M_AUTH, "key_store": store, "key_cache_ttl": 3600, "invalidation_url": ""}
    with override_settings(ROOT_URLCONF=URLCONF, M2M_AUTH=cached):
        assert get(client, f"/{client}", issued.key).status_code == 200
        assert store.store_id is not None
        manage_elsewhere(database, "revoke", issued.key_id)
        refused_within(1.0, lambda: get(client, f"/{client}", issued.key))


def test_on_sqlite_the_store_needs_no_bus(store: DjangoKeyStore) -> None:
    from m2m_middleware import Settings
    from m2m_middleware.settings import invalidation_url

    assert connection.vendor == "sqlite" and not store.needs_bus
    sentinel = Settings(key_store=store, rate_limit_storage="redis+sentinel://127.0.0.1:1/m")
    assert invalidation_url(sentinel, store) is None  # the change log carries revocations
