"""The suite's Django database is pytest-django's, as Django users run theirs.

``django_db`` (what the suite's tests ask for) is pytest-django's
``transactional_db``: a migrated test database of this worker's own, in a
file, whose rows other threads see; other tests get no connection at all.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.db import connection, connections

from m2m_middleware.django.models import APIKey


def test_pytest_django_runs_the_database(
    request: pytest.FixtureRequest, django_db: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert request.config.pluginmanager.hasplugin("django")
    assert "transactional_db" in request.fixturenames
    name = Path(connection.settings_dict["NAME"])
    assert name.name == "test.sqlite3"  # a file, not the configured ':memory:'
    assert name.is_relative_to(tmp_path_factory.getbasetemp())
    assert not connection.in_atomic_block  # committed, not rolled back


def test_rows_are_committed_so_threads_see_them(django_db: None) -> None:
    APIKey.objects.create(
        key_id="key_seen", client_id="c", key_hash="h" * 64, created_at="2024-01-01T00:00Z"
    )
    seen: list[bool] = []

    def look() -> None:
        seen.append(APIKey.objects.filter(key_id="key_seen").exists())
        connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(timeout=30)
    assert seen == [True]


def test_tests_without_the_database_are_refused_a_connection() -> None:
    with pytest.raises(RuntimeError, match="Database access not allowed"):
        APIKey.objects.exists()


def test_asked_for_at_run_time_it_is_transactional_too(request: pytest.FixtureRequest) -> None:
    # As the store kinds of tests/core do: pytest-django cannot see this request.
    store = request.getfixturevalue("django_key_store")
    assert not connection.in_atomic_block
    key_id = store.create_key("c").key_id
    seen: list[bool] = []

    def look() -> None:
        seen.append(APIKey.objects.filter(key_id=key_id).exists())
        connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(timeout=30)
    assert seen == [True]
