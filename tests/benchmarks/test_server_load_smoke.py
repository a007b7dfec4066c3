"""benchmarks/server_load.py still runs: real servers start, answer and are stopped.

``--quick`` figures are meaningless; this keeps the script from rotting. It
runs the Python load generator, so it needs no wrk (CI may not have it), and
only Starlette under uvicorn, the smallest slice; ``--json`` gives the report's
shape to check. The script itself checks each stack first (200 with the key,
401 without one and with a wrong one, RateLimit-Policy only from ours).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RATIO = r"(?:[\d.]+x|n/a)"


def _servers_left() -> list[str]:
    """Server processes of server_apps.py still running on this machine."""
    found = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in found.splitlines() if "server_apps:app" in line]


@pytest.mark.slow
@pytest.mark.redis
def test_the_server_load_benchmark_reports_every_stack_and_stops_its_servers(
    redis_url: str, tmp_path: Path
) -> None:
    import redis

    report = tmp_path / "report.json"
    before = set(_servers_left())
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "server_load.py"),
            "--quick",
            "--only",
            "starlette",
            "--load-generator",
            "python",
            "--connections",
            "4",
            "--redis-url",
            redis_url,
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    data = json.loads(report.read_text())
    assert data["load_generator"] == "python"
    assert [s["server"] for s in data["servers"]] == ["starlette"]
    stacks = {s["stack"]: s for s in data["servers"][0]["stacks"]}
    assert {"bare", "ours memory", "ours redis exact", "peer redis"} <= set(stacks)
    # The batched row appears exactly when the installed Settings has its field.
    assert ("ours redis batched" in stacks) != ("ours redis batched" in data["skipped_stacks"])
    for stack in stacks.values():
        assert stack["rps"] > 0
        assert 0 < stack["p50_ms"] <= stack["p99_ms"]
        assert len(stack["rounds"]) == 1
    assert stacks["bare"]["ratio_to_bare"] == 1.0

    assert "### starlette under uvicorn (1 worker)" in out
    assert re.search(r"^\| ours, Redis, exact \| [\d,]+ \| [\d.]+ \| [\d.]+ \| ", out, re.M), out
    assert re.search(
        rf"^starlette: ours memory {RATIO}, ours redis exact {RATIO}, .*peer redis {RATIO}$",
        out,
        re.M,
    ), out
    assert re.search(
        rf"^starlette: ours redis exact {RATIO} \(target >= 0.6x: (?:met|not met); "
        r"ahead of the peer with Redis: (?:yes|no)\)$",
        out,
        re.M,
    ), out

    # Every server it started is stopped, and the run's Redis keys are gone.
    assert set(_servers_left()) <= before
    with redis.Redis.from_url(redis_url) as client:
        assert not [k for k in client.scan_iter(match=f"*{data['run']}*", count=1000)]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_the_server_load_benchmark_drives_gunicorn_with_wrk_and_prints_only_json(
    redis_url: str,
) -> None:
    """With ``--json -`` stdout is one JSON document (progress goes to stderr)."""
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "server_load.py"),
            "--quick",
            "--only",
            "flask",
            "--load-generator",
            "wrk",
            "--redis-url",
            redis_url,
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["load_generator"] == "wrk"
    [server] = data["servers"]
    assert (server["server"], server["runs_under"]) == ("flask", "gunicorn")
    roles = [s["role"] for s in server["stacks"]]
    assert roles[0] == "bare" and "ours" in roles and roles[-1] == "peer"
    for stack in server["stacks"]:
        assert stack["rps"] > 0 and stack["rounds"][0]["requests"] > 0
    assert "flask/bare:" in result.stderr
    # On two CPUs or more the server and the load generator are pinned apart (--pin auto).
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert data["server_cpus"] == cpus[:1]
        assert data["load_generator_cpus"] == cpus[1:]
    else:
        assert data["server_cpus"] is None
