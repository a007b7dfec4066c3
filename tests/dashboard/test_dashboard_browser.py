"""The dashboard in a real browser: Debian's headless chromium loads the page.

The dashboard serves a populated in-process store from a thread on a free
port; chromium dumps the DOM it built (after parsing, as a user's browser
would have it) and takes a screenshot. Skipped where no chromium is
installed, except under CI=true (.ci/run installs it), where that fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers

from m2m_middleware.dashboard.server import make_dashboard_server

from .sample import HOSTILE_CLIENT, HOSTILE_NAME, Sample, sample_store
from .test_dashboard import PAGE_ELEMENTS, parsed

pytestmark = pytest.mark.slow

#: The flags the brief and Debian's headless use need: no sandbox (containers
#: have no user namespaces), and nothing that reaches the network by itself.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    found = chromium_path()
    if found is None:
        servers.unavailable("no chromium installed (apt-get install chromium)")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Sample]]:
    sample = sample_store()
    server = make_dashboard_server(sample.store, port=0, clock=lambda: sample.now)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", sample
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        sample.store.close()


def browse(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},  # chromium writes dot-files there
        check=False,
    )


def test_the_page_loads_with_its_charts_and_no_secret(
    chromium: str, served: tuple[str, Sample], tmp_path: Path
) -> None:
    url, sample = served
    done = browse(chromium, tmp_path, "--dump-dom", url)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    tags = parsed(dom)
    text = " ".join(tags.text)
    assert "m2m-middleware dashboard" in text
    for client in ("billing", "reports", "partner-acme", "legacy-sync"):
        assert client in text
    for key_id in sample.key_ids.values():
        assert key_id in text
    svgs = [attrs for tag, attrs in tags.tags if tag == "svg"]
    assert len(svgs) == 5  # all clients + four clients with requests
    series = [attrs.get("data-series") for tag, attrs in tags.tags if tag == "g"]
    assert series.count("allowed") == series.count("denied") == series.count("rate_limited") == 5
    assert sum(1 for tag, _ in tags.tags if tag == "rect") > 50  # bars, not just legends
    assert "rate_limited" in text and "203.0.113.7" in text  # the alerts
    for secret in sample.secrets:
        assert secret not in dom


def test_a_hostile_client_name_stays_text_in_the_dom(
    chromium: str, served: tuple[str, Sample], tmp_path: Path
) -> None:
    url, _ = served
    done = browse(chromium, tmp_path, "--dump-dom", url)
    assert done.returncode == 0, done.stderr[-2000:]
    tags = parsed(done.stdout)
    # The browser built no element the page did not write: no <img>, no <script>.
    assert {tag for tag, _ in tags.tags} <= PAGE_ELEMENTS
    assert not any(name.startswith("on") for _, attrs in tags.tags for name in attrs)
    text = "".join(tags.text)
    assert HOSTILE_CLIENT in text
    assert HOSTILE_NAME in text


def test_a_filtered_page_and_a_screenshot(
    chromium: str, served: tuple[str, Sample], tmp_path: Path
) -> None:
    url, _ = served
    done = browse(chromium, tmp_path, "--dump-dom", url + "?client=partner-acme&days=2")
    assert done.returncode == 0, done.stderr[-2000:]
    tags = parsed(done.stdout)
    assert sum(1 for tag, _ in tags.tags if tag == "svg") == 1
    assert "per hour" in done.stdout
    shot = tmp_path / "dashboard.png"
    done = browse(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
