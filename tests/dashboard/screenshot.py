"""Remake docs/dashboard.png, the README's picture of the dashboard.

    .venv/bin/python tests/dashboard/screenshot.py [OUTPUT.png]

Serves the sample store (tests/dashboard/sample.py) on a free loopback port
and has headless chromium take the picture, as the browser test does.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from dashboard.sample import sample_store  # noqa: E402
from dashboard.test_dashboard_browser import browse, chromium_path  # noqa: E402
from m2m_middleware.dashboard.server import make_dashboard_server  # noqa: E402

WINDOW = "1280,1480"


def main(argv: list[str]) -> int:
    output = Path(argv[0]) if argv else ROOT / "docs" / "dashboard.png"
    chromium = chromium_path()
    if chromium is None:
        print("screenshot: no chromium installed (apt-get install chromium)", file=sys.stderr)
        return 1
    sample = sample_store(hostile=False)  # the README's picture leaves the attacker out
    server = make_dashboard_server(sample.store, port=0, clock=lambda: sample.now)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with tempfile.TemporaryDirectory() as scratch:
            done = browse(
                chromium,
                Path(scratch),
                f"--screenshot={output.resolve()}",
                f"--window-size={WINDOW}",
                "--hide-scrollbars",
                url,
            )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    if done.returncode != 0 or not output.exists():
        print(f"screenshot: chromium failed: {done.stderr[-500:]}", file=sys.stderr)
        return 1
    print(f"screenshot: wrote {output} ({output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
