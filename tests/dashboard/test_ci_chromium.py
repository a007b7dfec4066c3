""".ci/run installs chromium for the browser test: only when missing, only as root.

The script's ``install_chromium`` function runs with a PATH of fakes
(``id``, ``apt-get``, maybe ``chromium``) that record what they were asked.
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

RUN = Path(__file__).parents[2] / ".ci" / "run"


def install_chromium(tmp_path: Path, *, uid: int, chromium: bool) -> tuple[str, list[str]]:
    function = re.search(r"^install_chromium\(\) \{\n.*?^\}\n", RUN.read_text(), re.S | re.M)
    assert function, "install_chromium is gone from .ci/run"
    calls = tmp_path / "calls"
    fakes = {
        "id": f'echo "{uid}"',
        "apt-get": f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND apt-get $*" >> {calls}',
    }
    if chromium:
        fakes["chromium"] = "exit 0"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in fakes.items():
        fake = bin_dir / name
        fake.write_text(f"#!/bin/bash\n{body}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = subprocess.run(
        ["/bin/bash", "-euo", "pipefail", "-c", function.group(0) + "install_chromium"],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout + done.stderr, calls.read_text().splitlines() if calls.exists() else []


def test_an_installed_chromium_is_left_alone(tmp_path: Path) -> None:
    _, calls = install_chromium(tmp_path, uid=0, chromium=True)
    assert calls == []


def test_as_root_a_missing_chromium_is_installed_without_questions(tmp_path: Path) -> None:
    output, calls = install_chromium(tmp_path, uid=0, chromium=False)
    assert calls == [
        "DEBIAN_FRONTEND=noninteractive apt-get update -qq",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
    ]
    assert "installing chromium" in output


def test_without_root_it_says_why_and_goes_on(tmp_path: Path) -> None:
    output, calls = install_chromium(tmp_path, uid=1000, chromium=False)
    assert calls == []
    assert "not root" in output
