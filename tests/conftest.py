"""Session-wide test setup shared by every suite.

Django is configured here for pytest-django, the way its documentation says
for a project without a settings module: ``settings.configure()`` in a
``pytest_configure`` hook of the root conftest, after which pytest-django
calls ``django.setup()`` and serves the test database through its own
fixtures (``transactional_db``, the ``django_db`` mark). Each pytest-xdist
worker is its own process and configures Django once. Test modules, imported
after that, may import Django models at module level. Tests switch
``M2M_AUTH`` and ``ROOT_URLCONF`` with ``django.test.override_settings``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import servers

if TYPE_CHECKING:
    from pytest_django import DjangoDbBlocker

#: pytester runs the plugin tests' user projects (tests/testing/).
pytest_plugins = ["pytester"]

#: An empty URLconf, registered under a name no test module can shadow
#: (conftest modules cannot be named reliably: pytest imports several as "conftest").
BASE_URLCONF = "m2m_tests_base_urls"


def pytest_configure(config: pytest.Config) -> None:
    from django.conf import settings

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
        # pytest-django makes the test database (a file: see
        # django_db_modify_db_settings below) for the tests that use it, and
        # refuses every other test a connection.
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


# -- a limit storage that has gone away ------------------------------------------------


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


# -- a Django database: pytest-django's --------------------------------------------------


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """pytest-django's hook for the test database's settings: a file of this process's own.

    A file, not ``:memory:``: the thread async code reaches the ORM on, and
    the concurrency tests' threads, each open their own connection, and
    SQLite's shared-cache memory databases refuse concurrent writers at once
    instead of waiting for the lock. In pytest's temporary directory, which
    is per xdist worker, so no suffix is needed.
    """
    from django.db import connections

    # A connection opened before (Django 6.1's system checks open one to the
    # ':memory:' database) would take the migrations and outlive the switch to
    # the test file: Django ignores close() on an in-memory database, so the
    # sqlite3 connection is closed directly.
    default = connections["default"]
    if default.connection is not None:
        default.connection.close()
        default.connection = None
    path = tmp_path_factory.mktemp("django") / "test.sqlite3"
    default.settings_dict["TEST"]["NAME"] = str(path)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: DjangoDbBlocker) -> Iterator[None]:
    """pytest-django's test databases, and before they go, what a process exit
    would write back (last_used_at and usage counts of stores and engines the
    tests left open), written while the test database still exists."""
    yield
    from m2m_middleware.stores.base import _flush_at_exit
    from m2m_middleware.telemetry.usage import _flush_at_exit as _flush_usage_at_exit

    with django_db_blocker.unblock():
        _flush_usage_at_exit()  # the usage counts of engines the tests left open
        _flush_at_exit()


@pytest.fixture
def _transactional_django_db(request: pytest.FixtureRequest) -> None:
    """Mark the test ``django_db(transaction=True)`` before pytest-django reads its marks.

    pytest-django tells a transactional test by its marks and the fixture
    names it asks for statically; the suite also asks for ``django_key_store``
    through ``request.getfixturevalue`` (the store kinds of tests/core), which
    it cannot see. Its test database is made for the marks of the test that
    first needs it, so a test that is the first of its worker is covered too.
    """
    request.node.add_marker(pytest.mark.django_db(transaction=True), append=False)


@pytest.fixture
def django_db(_transactional_django_db: None, transactional_db: None) -> Iterator[None]:
    """pytest-django's ``transactional_db``, under the name the suite's tests ask for.

    Rows are committed, not rolled back, so threads see them too; the
    database is emptied after the test.
    """
    from django.db import connections

    if connections["default"].in_atomic_block:  # pytest-django began a TestCase before us
        pytest.fail(
            "django_db came after pytest-django's non-transactional db, which wraps the test "
            "in a transaction that threads cannot see into: mark the test "
            "pytest.mark.django_db(transaction=True)"
        )
    yield
    close_django_counters()
    close_django_connections()  # before pytest-django's flush


def close_django_counters() -> None:
    """Write and stop the usage counters of the test's engines on Django stores.

    Left open, the process's flushing thread would write their counts during a
    later test (or during pytest-django's flush of the tables), from a
    connection of its own: rows in a database another test expects empty, and
    a write lock a later test's reads wait on (an admin page under load timed
    out on it and redirected as if its key did not exist).
    """
    from m2m_middleware.telemetry.usage import _live_counters

    for counter in _live_counters():
        # By module name: a test may have hidden Django's modules (sys.modules[...] = None).
        if type(counter.store).__module__.endswith(".django.store") and not counter._closed:
            counter.close()


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
def django_postgres_key_store(
    postgres_url: str, django_db_blocker: DjangoDbBlocker
) -> Iterator[Any]:
    """A ``django://`` store on the machine's PostgreSQL, in this test's own schema.

    The database alias is added for the test and removed after it; the tables
    are made from the models (the migrations are checked against the models in
    tests/django/test_django_admin.py). pytest-django's test databases are
    made for ``DATABASES`` as configured, so this alias is opened for the test
    by hand (``django_db_blocker.unblock()``, its documented way).
    """
    with django_db_blocker.unblock():
        yield from _django_postgres_key_store(postgres_url)


def _django_postgres_key_store(postgres_url: str) -> Iterator[Any]:
    from contextlib import suppress
    from functools import partial
    from urllib.parse import parse_qs, urlsplit

    from asgiref.sync import SyncToAsync
    from django.db import connections

    from m2m_middleware import open_key_store
    from m2m_middleware.django.models import (
        AlertRecord,
        APIKey,
        KeyChange,
        SigningKey,
        StoreMeta,
        UsageCount,
    )

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
            for model in (APIKey, KeyChange, StoreMeta, SigningKey, UsageCount, AlertRecord):
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
