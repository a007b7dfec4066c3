"""Issue 14's "done when": usage totals equal the requests sent, exactly, after a flush,
under 4 processes sharing one SQLite file and under 2 gunicorn workers on PostgreSQL.

Each process counts in memory and adds its counts to the shared tables (in the
background, on ``engine.flush()``, at exit); a count lost, or added twice, by
any of them shows here as a total that is off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import servers

import m2m_middleware
from m2m_middleware import KeyStore, open_key_store

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

APPS = Path(__file__).resolve().parent / "apps"
sys.path.insert(0, str(APPS))
from usage_settings import PATHS, UNITS  # noqa: E402  (the apps' own module)

Totals = dict[tuple[str, str | None], tuple[int, int, int, int]]


def totals(store: KeyStore) -> Totals:
    """allowed, denied, rate_limited, units per client and key, over every period."""
    summed: dict[tuple[str, str | None], list[int]] = {}
    for row in store.usage(granularity="month"):
        counts = summed.setdefault((row.client_id, row.key_id), [0, 0, 0, 0])
        for index, value in enumerate((row.allowed, row.denied, row.rate_limited, row.units)):
            counts[index] += value
    return {key: (a, d, r, u) for key, (a, d, r, u) in summed.items()}


def environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "PYTHONPATH"))}
    env.update(settings)
    package_parent = Path(m2m_middleware.__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(package_parent)])
    return env


@pytest.mark.slow
def test_four_processes_on_one_sqlite_file_sum_exactly(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "keys.db")
    with closing(open_key_store(url)) as store:
        issued = [
            store.create_key("client-a"),
            store.create_key("client-a"),
            store.create_key("client-b"),
        ]
    keys = [[i.record.client_id, i.key_id, i.key] for i in issued]
    env = environment(M2M_TEST_KEY_STORE=url, M2M_TEST_KEYS=json.dumps(keys))
    per_thread = 300
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "usage_worker", str(index), str(per_thread)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(4)
    ]
    try:
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    expected: dict[tuple[str, str | None], list[int]] = {}
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        assert "could not be written" not in err, err
        for key_id, counts in json.loads(out).items():
            client_id = next(c for c, k, _ in keys if k == key_id)
            mine = expected.setdefault((client_id, key_id), [0, 0, 0, 0])
            for index, value in enumerate(counts):
                mine[index] += value
    sent = 4 * (2 * per_thread) + 2 * 7  # two threads each; the even ones 7 more
    assert sum(a + d + r for a, d, r, _ in expected.values()) == sent
    # Each kind of answer is there, so each count is put to the test.
    assert all(all(counts[:3]) for counts in expected.values()), expected
    with closing(open_key_store(url)) as store:
        assert totals(store) == {key: tuple(counts) for key, counts in expected.items()}


@pytest.mark.slow
@pytest.mark.postgres
def test_two_gunicorn_workers_on_postgres_sum_exactly(
    postgres_url: str,
    serve: Callable[[str, Callable[[int], list[str]], Mapping[str, str]], Server],
) -> None:
    with closing(open_key_store(postgres_url)) as store:
        issued = [
            store.create_key("client-a"),
            store.create_key("client-a"),
            store.create_key("client-b"),
        ]
    server = serve(
        "gunicorn",
        servers.gunicorn_command("usage_flask_app:app", workers=2),
        {"M2M_TEST_KEY_STORE": postgres_url},
    )
    answers: Counter[tuple[str, str, int]] = Counter()
    pids: set[int] = set()

    def send(n: int) -> tuple[str, str, int, int | None]:
        key = issued[n % len(issued)]
        path = PATHS[n % len(PATHS)]
        response = http.get(path, headers={"X-API-Key": key.key})
        pid = response.json()["pid"] if response.status_code == 200 else None
        return key.key_id, path, response.status_code, pid

    # One client for all threads (httpx's is thread-safe; one each would cost
    # more than the requests); 8 at once, so both sync workers are kept busy.
    with httpx.Client(base_url=server.url, timeout=10.0) as http, ThreadPoolExecutor(8) as pool:
        for key_id, path, status, pid in pool.map(send, range(400)):
            answers[(key_id, path, status)] += 1
            if pid is not None:
                pids.add(pid)
    assert len(pids) == 2, server.output()  # both workers answered, so both flush
    assert {status for _, _, status in answers} == {200, 403, 429}, answers
    servers.stop_server(server.process)  # SIGTERM: each worker writes its counts as it exits
    output = server.output()
    assert "could not be written" not in output, output

    expected: dict[tuple[str, str | None], list[int]] = {}
    for (key_id, path, status), count in answers.items():
        client_id = next(i.record.client_id for i in issued if i.key_id == key_id)
        mine = expected.setdefault((client_id, key_id), [0, 0, 0, 0])
        if status == 200:
            mine[0] += count
            mine[3] += count * UNITS.get(path, 1)
        elif status == 429:
            mine[2] += count
        else:
            mine[1] += count
    with closing(open_key_store(postgres_url)) as store:
        assert totals(store) == {key: tuple(counts) for key, counts in expected.items()}
