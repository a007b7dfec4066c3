"""The benchmark still runs: every variant answers correctly and the table prints.

Numbers from ``--quick`` are meaningless; this only keeps ``benchmarks/`` from
rotting (each variant is checked for 200 with a key, 401 without, and only ours
sends RateLimit headers, before anything is timed).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"


@pytest.mark.slow
def test_the_overhead_benchmark_runs_and_reports_every_framework() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for framework in ("starlette", "flask", "django"):  # quick numbers may even be negative
        assert re.search(
            rf"^{framework}: ours [+-]-?[\d.]+ us, fastest peer", result.stdout, re.M
        ), result.stdout
    assert "raw floor" in result.stdout
