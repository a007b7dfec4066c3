"""``memory://`` limits in several processes: one WARNING per process, where it can be told.

A real ``os.fork`` here; ``gunicorn --preload -w 2`` and ``WEB_CONCURRENCY``
under a real server in tests/integration/test_several_processes.py.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest

from m2m_middleware import Settings
from m2m_middleware import processes as processes_module
from m2m_middleware.limiting import Limiter

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a process that has not warned yet and holds no limiter from other tests."""
    monkeypatch.setattr(processes_module, "_warned", False)
    monkeypatch.setattr(processes_module, "_memory_limiters", weakref.WeakSet())
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)


def limiter(**fields: Any) -> Limiter:
    fields.setdefault("default_limits", "100/second")
    return Limiter(Settings(key_store="memory://", **fields))


def several_process_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "m2m_middleware"
        and r.levelno == logging.WARNING
        and "rate_limit_storage" in r.getMessage()
    ]


@pytest.mark.parametrize("workers", ["2", "4", " 16 "])
def test_web_concurrency_above_one_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, workers: str
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", workers)
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    kept = [limiter(), limiter(tiers={"gold": "5/second"}), limiter()]
    [warning] = several_process_warnings(caplog)  # once per process, not per limiter
    assert warning.startswith(
        f"rate_limit_storage is memory:// and WEB_CONCURRENCY is {workers.strip()}:"
    )
    assert "redis://" in warning
    assert kept


@pytest.mark.parametrize("workers", ["1", "0", "", "two", "-2", "\u00b2", "9" * 50])
def test_no_warning_for_one_worker_or_a_value_that_is_not_a_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, workers: str
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", workers)
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    limiter()
    assert several_process_warnings(caplog) == []


@pytest.mark.parametrize(
    "fields",
    [
        {"rate_limit_storage": "redis://127.0.0.1:6379"},  # shared: nothing to warn about
        {"default_limits": ""},  # memory://, but nothing is counted
    ],
)
def test_no_warning_when_the_counts_are_shared_or_there_are_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fields: dict[str, Any]
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    limiter(**fields)  # builds no connection: Redis is not contacted here
    assert several_process_warnings(caplog) == []


def fork_and_log(tmp_path: Path, in_child: Any = None) -> tuple[list[str], int]:
    """Fork with a file handler on the logger; the child's log lines, and its pid."""
    log_path = tmp_path / f"child-{len(list(tmp_path.glob('child-*.log')))}.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(message)s"))
    # The child restarts every revocation bus this test process opened, also those of
    # earlier tests whose private Redis is gone; their outage logs are not the subject.
    handler.addFilter(lambda record: record.module != "invalidation")
    package_logger = logging.getLogger("m2m_middleware")
    package_logger.addHandler(handler)
    old_level = package_logger.level
    package_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a process with threads (pytest-xdist's):
            # the child only logs and leaves, through os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: the at-fork hook has run
            code = 0
            try:
                if in_child is not None:
                    in_child()
            except BaseException:
                code = 1
            finally:
                handler.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        handler.close()
    assert os.waitstatus_to_exitcode(status) == 0
    return log_path.read_text().splitlines(), pid


def test_a_fork_after_a_memory_limiter_was_built_warns_once_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kept = [limiter(), limiter()]
    caplog.set_level(logging.WARNING, logger="m2m_middleware")

    def in_child() -> None:
        # More limiters and WEB_CONCURRENCY in the child: still the one warning.
        os.environ["WEB_CONCURRENCY"] = "3"
        limiter()

    lines, child = fork_and_log(tmp_path, in_child)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{child} WARNING rate_limit_storage is memory:// and this process")
    assert "gunicorn --preload" in lines[0]
    assert "redis://" in lines[0]
    assert several_process_warnings(caplog) == []  # the parent said nothing
    assert kept


def test_each_forked_process_warns_once(tmp_path: Path) -> None:
    kept = limiter()
    first, first_pid = fork_and_log(tmp_path)
    second, second_pid = fork_and_log(tmp_path)
    assert first_pid != second_pid
    assert len(first) == len(second) == 1
    assert kept


@pytest.mark.parametrize(
    "fields",
    [{"rate_limit_storage": "redis://127.0.0.1:6379"}, {"default_limits": ""}],
)
def test_a_fork_warns_only_while_a_memory_limiter_with_limits_lives(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    assert fork_and_log(tmp_path)[0] == []  # no limiter at all
    kept = limiter(**fields)
    assert fork_and_log(tmp_path)[0] == []
    gone = limiter()
    del gone
    gc.collect()
    assert fork_and_log(tmp_path)[0] == []  # held weakly: a dead limiter counts nothing
    assert kept
