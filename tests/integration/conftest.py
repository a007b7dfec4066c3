"""Real servers (gunicorn, uvicorn) running the tiny apps in ``apps/``.

The ``serve`` fixture starts a server command on a free port, with the apps
folder and the m2m_middleware this process imported on ``PYTHONPATH``, waits
until its public ``/health`` answers, and stops it (its whole process group:
master and workers) when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import servers

import m2m_middleware

APPS = Path(__file__).resolve().parent / "apps"
#: Where the m2m_middleware this test process imported lives: the servers use the same one.
PACKAGE_PARENT = Path(m2m_middleware.__file__).resolve().parents[1]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

Command = Callable[[int], list[str]]


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The server runs in a session of its own (start_new_session): its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the master and its workers; SIGKILL to whatever is left after a while."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
    # Workers that outlived their master (none should) go too.
    _signal_group(process, signal.SIGKILL)


def _answers(server: Server) -> bool:
    """Poll /health until it answers 200; False if the process dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def _environment(settings: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "PYTHONPATH"))}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(APPS), str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])
    )
    return env


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str, Command, Mapping[str, str]], Server]]:
    """``serve(name, command, env)``: a started server; stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: Command, settings: Mapping[str, str]) -> Server:
        env = _environment(settings)
        output = ""
        for attempt in range(3):  # another process may take the free port first
            port = servers.free_port()
            log_path = tmp_path / f"{name}-{attempt}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command(port),
                    cwd=tmp_path,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append(process)
            server = Server(name, port, process, log_path)
            if _answers(server):
                return server
            stop(process)
            output = server.output()
            if "address already in use" not in output.lower():
                break
        pytest.fail(f"{name} did not answer on /health within {START_TIMEOUT} s:\n{output}")

    try:
        yield start
    finally:
        for process in started:
            stop(process)
