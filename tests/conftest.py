"""Session-wide test setup shared by every suite.

Django settings can be configured only once per process, so it happens here
(each pytest-xdist worker is its own process and runs this once), at import:
pytest imports this conftest before the ones below it, so their module-level
Django imports already see configured settings. Tests switch
``M2M_AUTH`` and ``ROOT_URLCONF`` with ``django.test.override_settings``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

#: An empty URLconf, registered under a name no test module can shadow
#: (conftest modules cannot be named reliably: pytest imports several as "conftest").
BASE_URLCONF = "m2m_tests_base_urls"


def _configure_django() -> None:
    try:
        import django
        from django.conf import settings
    except ImportError:  # pragma: no cover - the test extra installs Django
        return
    if settings.configured:
        return
    base_urls = types.ModuleType(BASE_URLCONF)
    base_urls.urlpatterns = []  # type: ignore[attr-defined]
    sys.modules[BASE_URLCONF] = base_urls
    settings.configure(
        DEBUG=False,
        SECRET_KEY="m2m-middleware-tests-only",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=BASE_URLCONF,
        # The admin and what it needs, for tests/django/test_django_admin.py, which
        # also sets the admin's MIDDLEWARE; most tests keep ours alone.
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "m2m_middleware.django",
        ],
        MIDDLEWARE=["m2m_middleware.django.M2MAuthMiddleware"],
        # Made and migrated only for the tests that ask for ``django_db``
        # (see below); until then nothing connects to it.
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        STATIC_URL="/static/",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast logins
        USE_TZ=True,
        # Never the default (an SQLite file in the working directory): tests
        # that need keys override this with their own memory store.
        M2M_AUTH={"key_store": "memory://"},
    )
    django.setup()


_configure_django()


# -- a limit storage that has gone away ------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture
def break_limit_storage(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make an engine's limit storage fail every call, as an unreachable Redis would.

    ``memory://`` with fixed windows is counted by ``Limiter.windows``; every
    other storage goes through the ``limits`` storage object. Both are broken.
    """

    def breaker(limiter: Any, error: Exception | None = None) -> None:
        def refuse(*args: object, **kwargs: object) -> int:
            raise error or ConnectionError("limit storage unreachable")

        if limiter.windows is not None:
            monkeypatch.setattr(limiter.windows, "take", refuse)
        monkeypatch.setattr(limiter.storage, "incr", refuse)
        if hasattr(limiter.storage, "decr"):
            monkeypatch.setattr(limiter.storage, "decr", refuse)

    return breaker


# -- real servers (see servers.py) -----------------------------------------------------

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import servers  # noqa: E402


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis; skipped without one (failed under CI=true)."""
    if not servers.reachable(servers.REDIS_URL):
        servers.unavailable(f"no Redis at {servers.REDIS_URL}")
    return servers.REDIS_URL


@pytest.fixture(scope="session")
def postgres_base_url() -> str:
    if not servers.reachable(servers.POSTGRES_URL):
        servers.unavailable(f"no PostgreSQL at {servers.POSTGRES_URL}")
    return servers.POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A URL of the machine's PostgreSQL whose search_path is a fresh schema of this test's."""
    with servers.postgres_schema(postgres_base_url) as url:
        yield url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[servers.RedisServer]:
    """A redis-server of this test's own, started; the test may stop and restart it."""
    server = servers.RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# -- a Django database --------------------------------------------------------------


@pytest.fixture(scope="session")
def django_test_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Django's test database, made and migrated once per process (xdist worker).

    A file, not ``:memory:``: the thread async code reaches the ORM on, and
    the concurrency tests' threads, each open their own connection, and
    SQLite's shared-cache memory databases refuse concurrent writers at once
    instead of waiting for the lock.
    """
    from django.db import connections
    from django.test.utils import setup_databases, teardown_databases

    # A connection opened before (Django 6.1's system checks open one to the
    # ':memory:' database) would take the migrations and outlive the switch to
    # the test file: Django ignores close() on an in-memory database, so the
    # sqlite3 connection is closed directly.
    default = connections["default"]
    if default.connection is not None:
        default.connection.close()
        default.connection = None
    path = tmp_path_factory.mktemp("django") / "test.sqlite3"
    connections["default"].settings_dict["TEST"]["NAME"] = str(path)
    old_config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    # What a process exit would write back (last_used_at of stores the tests
    # left open), written while the test database still exists.
    from m2m_middleware.stores.base import _flush_at_exit

    _flush_at_exit()
    connections.close_all()
    teardown_databases(old_config, verbosity=0)


@pytest.fixture
def django_db(django_test_database: None) -> Iterator[None]:
    """The migrated test database, emptied after the test (as TransactionTestCase does).

    Rows are committed, not rolled back, so threads see them too.
    """
    from django.core.management import call_command

    yield
    close_django_connections()
    call_command("flush", verbosity=0, interactive=False)


def close_django_connections() -> None:
    """Close this thread's connections and those of asgiref's one sync thread.

    Outside Django's ASGI handler (the test clients, asyncio.run) async code
    reaches the ORM on that thread, which outlives every test.
    """
    from asgiref.sync import SyncToAsync
    from django.db import connections

    connections.close_all()
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


@pytest.fixture
def django_key_store(django_db: None) -> Any:
    """A ``django://`` store on the test database."""
    from m2m_middleware import open_key_store

    return open_key_store("django://")


@pytest.fixture
def django_postgres_key_store(postgres_url: str) -> Iterator[Any]:
    """A ``django://`` store on the machine's PostgreSQL, in this test's own schema.

    The database alias is added for the test and removed after it; the tables
    are made from the models (the migrations are checked against the models in
    tests/django/test_django_admin.py).
    """
    from contextlib import suppress
    from functools import partial
    from urllib.parse import parse_qs, urlsplit

    from asgiref.sync import SyncToAsync
    from django.db import connections

    from m2m_middleware import open_key_store
    from m2m_middleware.django.models import APIKey, KeyChange, SigningKey, StoreMeta

    alias = "m2m_postgres"
    parts = urlsplit(postgres_url)
    config = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": {"options": parse_qs(parts.query)["options"][0]},  # the search_path
    }
    connections.settings[alias] = connections.configure_settings(
        {**connections.settings, alias: config}
    )[alias]
    try:
        with connections[alias].schema_editor() as editor:
            for model in (APIKey, KeyChange, StoreMeta, SigningKey):
                editor.create_model(model)
        store = open_key_store(f"django://{alias}")
        yield store
        store.close()
    finally:
        close_django_connections()
        forget = partial(connections.__delitem__, alias)  # the wrappers keep the settings
        with suppress(AttributeError):
            forget()
        with suppress(AttributeError):
            SyncToAsync.single_thread_executor.submit(forget).result(timeout=30)
        del connections.settings[alias]
