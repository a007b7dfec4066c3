"""``m2m demo``: the walkthrough over real HTTP, in-process and as a real process."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import IO

import pytest

import m2m_middleware
from m2m_middleware import cli, demo, open_key_store

#: What the ten steps must answer, in order: the last three exchange a key for a
#: token, call with it, and call with it again once its key is revoked.
EXPECTED = [200, 401, 200, 403, 200, 429, 401, 200, 200, 401]
PACKAGE_PARENT = Path(m2m_middleware.__file__).resolve().parents[1]
TIMEOUT = 60.0

JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]+")
ROW = re.compile(r"^\s*(\d+)\s+.+?\s+(\d{3})\s+(\d{3})\s+(OK|UNEXPECTED)\s*$")


def rows(output: str) -> list[tuple[int, int, str]]:
    """(expected, got, verdict) of each table row."""
    found = []
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            found.append((int(match[2]), int(match[3]), match[4]))
    return found


def assert_walkthrough_ok(output: str) -> None:
    assert rows(output) == [(status, status, "OK") for status in EXPECTED], output
    assert "Retry-After" in output
    for error in ("missing_credentials", "insufficient_scope", "rate_limited", "invalid_token"):
        assert error in output
    assert '"scheme": "jwt"' in output
    flowing = " ".join(output.split())  # as the text reads, however it was wrapped
    assert "POST /oauth/token" in flowing
    assert '"token_type": "Bearer"' in flowing and '"scope": "orders:read"' in flowing
    assert '"client_id": "token-client"' in flowing  # the call made with the token
    # The walkthrough shows no whole token, the issued one by its start only (the
    # curl lines that may follow it show the demo JWT, to be copied).
    assert JWT.search(output.partition("Try it yourself")[0]) is None
    assert "All 10 steps answered as expected." in output


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("M2M_")}
    clean.pop("NO_COLOR", None)
    clean["PYTHONUNBUFFERED"] = "1"
    clean["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])
    )
    return clean


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the demo's temporary directory goes, to check that it is removed."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket is listening on."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- in-process --------------------------------------------------------------------


def test_once_in_process(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    temp_root: Path,
) -> None:
    secret = "s" * 64  # the JWT signing secret must never be shown
    monkeypatch.setattr(demo.secrets, "token_urlsafe", lambda n: secret)
    assert demo.main(["--once"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert_walkthrough_ok(out)
    assert secret not in out
    assert "m2m_" not in out  # --once shows no key: there is nothing left to call
    assert "press Ctrl-C" not in out
    assert list(workdir.iterdir()) == []  # nothing in the working directory
    assert list(temp_root.iterdir()) == []  # and the temporary store is gone


def test_once_through_the_cli_with_a_store_of_ones_own(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    assert cli.main(["demo", "--once", "--host", "127.0.0.1", "--store", url]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert_walkthrough_ok(out)
    store = open_key_store(url)
    try:
        keys = {record.client_id: record for record in store.list_keys()}
    finally:
        store.close()
    assert set(keys) == {"demo-client", "no-scope-client", "burst-client", "token-client"}
    assert keys["burst-client"].revoked_at is not None
    assert keys["token-client"].revoked_at is not None  # what refused its token
    assert keys["demo-client"].revoked_at is None


def test_an_unexpected_answer_fails_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "LIMITS", "1000/minute")  # the burst can no longer hit it
    assert demo.main(["--once"]) == 1
    out, err = capsys.readouterr()
    assert [verdict for _, _, verdict in rows(out)] == ["OK"] * 5 + ["UNEXPECTED"] + ["OK"] * 4
    assert err.count("\n") == 1
    assert "step 6 expected 429, got 200" in err


def test_the_token_is_refused_because_its_key_was_revoked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 10 passes only when the revocation refuses the token: without it, the
    token still works, and the walkthrough says so."""
    steps = demo.Demo.steps

    def without_the_last_revocation(self: demo.Demo) -> list[demo.Step]:
        found = steps(self)
        found[-1].before = None
        return found

    monkeypatch.setattr(demo.Demo, "steps", without_the_last_revocation)
    assert demo.main(["--once"]) == 1
    out, err = capsys.readouterr()
    assert [verdict for _, _, verdict in rows(out)] == ["OK"] * 9 + ["UNEXPECTED"]
    assert "step 10 expected 401, got 200" in err


def test_a_store_whose_signing_keys_need_another_secret_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    monkeypatch.setenv("M2M_SIGNING_SECRET", "the secret of the first run, long enough")
    assert demo.main(["--once", "--store", url]) == 0
    capsys.readouterr()
    monkeypatch.setenv("M2M_SIGNING_SECRET", "another secret altogether, long enough")
    assert demo.main(["--once", "--store", url]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("m2m demo: error: --store: its signing keys cannot be opened")
    assert err.count("\n") == 1
    assert "M2M_SIGNING_SECRET" in err
    assert "the secret of the first run" not in out + err
    assert "another secret altogether" not in out + err


def test_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str], busy_port: int) -> None:
    assert cli.main(["demo", "--once", "--port", str(busy_port)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("m2m demo: error: ")
    assert err.count("\n") == 1
    assert str(busy_port) in err and "in use" in err
    assert "Traceback" not in out + err


def test_missing_uvicorn_is_one_line_with_the_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert demo.main(["--once"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "uvicorn" in err and 'pip install "m2m-middleware[demo]"' in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store", "bogus://x"], "--store"),
        (["--host", "no-such-host.invalid"], "--host"),
    ],
)
def test_bad_options_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert demo.main(["--once", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"m2m demo: error: {message}")
    assert err.count("\n") == 1


def test_the_output_fits_a_narrow_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    assert demo.main(["--once"]) == 0
    out, _ = capsys.readouterr()
    assert_walkthrough_ok(out)
    assert max(len(line) for line in out.splitlines()) <= 60


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert demo.Output(FakeTerminal()).style("OK", "32") == "\x1b[32mOK\x1b[0m"
    assert demo.Output(io.StringIO()).style("OK", "32") == "OK"
    monkeypatch.setenv("NO_COLOR", "1")
    assert demo.Output(FakeTerminal()).style("OK", "32") == "OK"


# -- as a real process -----------------------------------------------------------------


@pytest.mark.slow
def test_once_as_a_process_leaves_nothing_behind(tmp_path: Path) -> None:
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "demo", "--once"],
        cwd=cwd,
        env={**env(), "TMPDIR": str(temp_root), "TEMP": str(temp_root), "TMP": str(temp_root)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert_walkthrough_ok(proc.stdout)
    assert "\x1b[" not in proc.stdout  # not a terminal: no colours
    assert list(cwd.iterdir()) == []
    assert list(temp_root.iterdir()) == []


def _pump(stream: IO[str], lines: queue.Queue[str]) -> threading.Thread:
    """Read the child's output in a thread, so waiting for a line can time out."""

    def pump() -> None:
        for line in stream:
            lines.put(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _restore_sigint() -> None:
    # A process started from a shell's background job inherits SIGINT ignored;
    # the test stands in for a terminal, where Ctrl-C arrives.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_a_serving_demo_cleanly(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "m2m_middleware", "demo", "--port", "0"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_restore_sigint,
    )
    with process:  # closes the pipes
        try:
            assert process.stdout is not None and process.stderr is not None
            lines: queue.Queue[str] = queue.Queue()
            pump = _pump(process.stdout, lines)
            seen: list[str] = []
            deadline = time.monotonic() + TIMEOUT
            while not seen or "press Ctrl-C" not in seen[-1]:
                try:
                    seen.append(lines.get(timeout=0.2))
                except queue.Empty:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("no 'press Ctrl-C' line; output so far:\n" + "".join(seen))
            output = "".join(seen)
            assert_walkthrough_ok(output)
            base = re.search(r"Serving on (http://\S+) ", seen[-1])
            assert base, seen[-1]
            key = re.search(r'curl -i -H "X-API-Key: (m2m_\w+)" (\S+)/whoami', output)
            assert key and key[2] == base[1]

            # It really serves, and the printed key works.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            request = urllib.request.Request(base[1] + "/whoami", headers={"X-API-Key": key[1]})
            with opener.open(request, timeout=10) as response:
                assert response.status == 200

            process.send_signal(signal.SIGINT)
            process.wait(timeout=TIMEOUT)
            pump.join(TIMEOUT)
            stdout = "".join(lines.get_nowait() for _ in range(lines.qsize()))
            stderr = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr == ""
    assert "Stopped" in stdout
    assert list(tmp_path.iterdir()) == []
