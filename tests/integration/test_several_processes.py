"""``memory://`` limits under a real pre-forking server: the workers' log says so, once each.

``gunicorn --preload -w 2`` builds the engine in the master and forks the
workers from it; without ``--preload`` each worker builds its own, and only
``WEB_CONCURRENCY`` tells it how many there are.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from m2m_middleware import open_key_store

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

WARNING_START = "rate_limit_storage is memory:// and "


def gunicorn(*options: str) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable,
        "-m",
        "gunicorn",
        *options,
        "--worker-class",
        "sync",
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "2",
        "budget_flask_app:app",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "environment", "reason"),
    [
        (["--preload", "--workers", "2"], {}, "this process was forked after its limits"),
        ([], {"WEB_CONCURRENCY": "2"}, "WEB_CONCURRENCY is 2"),  # gunicorn's -w default
        (["--workers", "1"], {}, None),  # one process: nothing to say
    ],
    ids=["preload", "web_concurrency", "one_worker"],
)
def test_each_worker_warns_once_about_memory_limits(
    options: list[str],
    environment: dict[str, str],
    reason: str | None,
    tmp_path: Path,
    serve: Callable[[str, Callable[[int], list[str]], Mapping[str, str]], Server],
) -> None:
    store_url = "sqlite:///" + str(tmp_path / "keys.db")
    with closing(open_key_store(store_url)) as keys:
        key = keys.create_key("acme").key
    server = serve(
        "gunicorn",
        gunicorn(*options),
        {
            "M2M_TEST_KEY_STORE": store_url,
            "M2M_TEST_RATE_LIMIT_STORAGE": "memory://",
            "M2M_TEST_DEFAULT_LIMITS": "100/second",
            **environment,
        },
    )
    workers = 1 if reason is None else 2
    pids: set[int] = set()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        for _ in range(50 * workers):  # requests, not warnings: none is logged per request
            response = http.get("/ping", headers={"X-API-Key": key})
            assert response.status_code == 200, server.output()
            pids.add(int(response.json()["pid"]))
            if len(pids) == workers:
                break
    # Every worker has booted once both answered; give a slow one a moment anyway.
    deadline = time.monotonic() + 5
    while True:
        output = server.output()
        warnings = [line for line in output.splitlines() if line.startswith(WARNING_START)]
        if reason is None or len(warnings) >= workers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if reason is None:
        assert warnings == [], output
        return
    assert len(warnings) == workers, output  # one per worker process, none for the master
    for warning in warnings:
        assert warning.startswith(WARNING_START + reason), warning
        assert "point rate_limit_storage at redis://" in warning
