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
        INSTALLED_APPS=["m2m_middleware.django"],
        MIDDLEWARE=["m2m_middleware.django.M2MAuthMiddleware"],
        DATABASES={},
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
