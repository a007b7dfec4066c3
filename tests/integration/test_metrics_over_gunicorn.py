"""Metrics under gunicorn with two workers, through prometheus_client's multiprocess mode.

Whichever worker answers the scrape, the totals are those of every request
sent, spread over both workers, and they survive a worker being replaced.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import gunicorn_command

from m2m_middleware import open_key_store

if TYPE_CHECKING:  # the conftest of this folder; only a type here
    from conftest import Server

Serve = Callable[[str, Callable[[int], list[str]], Mapping[str, str]], "Server"]


def totals(http: httpx.Client) -> dict[tuple[str, str], float]:
    """m2m_requests_total by (outcome, error), and the histogram's count, from one scrape."""
    reply = http.get("/metrics")
    assert reply.status_code == 200, reply.text
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == "m2m_requests_total":
                key = (sample.labels["outcome"], sample.labels["error"])
                found[key] = found.get(key, 0.0) + sample.value
            elif sample.name == "m2m_decision_seconds_count":
                found[("timed", "")] = sample.value
    return found


@pytest.mark.slow
def test_two_workers_report_every_request_once(tmp_path: Path, serve: Serve) -> None:
    store_url = "sqlite:///" + str(tmp_path / "keys.db")
    with closing(open_key_store(store_url)) as keys:
        key = keys.create_key("acme").key
    directory = tmp_path / "prometheus"
    directory.mkdir()
    server = serve(
        "gunicorn",
        gunicorn_command("metrics_flask_app:app", "-c", "python:metrics_gunicorn_conf", workers=2),
        {"M2M_TEST_KEY_STORE": store_url, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    allowed = denied = 0
    pids: set[int] = set()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        # Sync workers close each connection: the kernel hands the next to either worker.
        while (len(pids) < 2 or allowed < 60) and allowed < 2000:
            reply = http.get("/ping", headers={"X-API-Key": key})
            assert reply.status_code == 200, server.output()
            pids.add(int(reply.json()["pid"]))
            allowed += 1
            if allowed % 3 == 0:
                assert http.get("/ping").status_code == 401
                denied += 1
        assert len(pids) == 2, f"one worker answered all {allowed} requests"
        expected = {
            ("allowed", ""): allowed,
            ("denied", "missing_credentials"): denied,
            ("timed", ""): allowed + denied,
        }
        for _ in range(6):  # scrapes answered by either worker: each sees the whole
            assert totals(http) == expected, server.output()

        # A worker that dies is replaced; what it counted is still in the sums.
        os.kill(pids.pop(), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            try:
                answered = http.get("/health").status_code == 200
            except httpx.TransportError:
                answered = False
            if answered and len(list(directory.glob("*.db"))) > 0:
                seen = {int(http.get("/health").json()["pid"]) for _ in range(20)}
                if len(seen) == 2:
                    break
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert totals(http) == expected, server.output()
