"""Real Redis and PostgreSQL for the tests that need them.

A test that needs a server asks for one of the fixtures in ``tests/conftest.py``
(``redis_url``, ``postgres_url``, ``redis_server``). When the server is not
there the test is skipped with the reason, except under ``CI=true``, where a
missing server is a failure: CI machines have both, and a suite that quietly
skipped them would prove nothing.

The addresses default to the machine's own servers and can be moved with
``M2M_TEST_REDIS_URL`` and ``M2M_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("M2M_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("M2M_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str) -> None:
    """Skip the test, or under CI fail it: the server must be there."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: tests that need a server must run)", pytrace=False)
    pytest.skip(what)


def reachable(url: str, timeout: float = 0.5) -> bool:
    parts = urlsplit(url)
    try:
        with closing(socket.create_connection((parts.hostname, parts.port), timeout=timeout)):
            return True
    except OSError:
        return False


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    """A name no other test (or xdist worker, or earlier run) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# -- PostgreSQL: one schema per test ------------------------------------------------


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh schema, dropped afterwards: the URL whose search_path points at it."""
    import psycopg

    schema = unique("m2m_test")
    with psycopg.connect(base_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- Redis: a server of the test's own, that it may kill -------------------------------


class RedisServer:
    """A ``redis-server`` on a free port that the test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.binary = str(binary)
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not reachable(self.url, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill it outright, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


# -- an HTTP server under test, in a process of its own ------------------------------------

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


@dataclass
class HttpServer:
    """A server process the test started, answering on 127.0.0.1:``port``."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def answers(self) -> bool:
        """Poll /health until it answers 200; False if the process dies or time runs out."""
        import httpx

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return False


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The server runs in a session of its own (start_new_session): its pid is the group id.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server and its workers; SIGKILL to whatever is left after a while."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
    # Workers that outlived their master (none should) go too.
    _signal_group(process, signal.SIGKILL)


def start_server(
    name: str, command: Callable[[int], list[str]], workdir: Path, env: Mapping[str, str]
) -> HttpServer:
    """``command(port)`` on a free port, started and answering /health, or the test fails
    with the server's output."""
    output = ""
    for attempt in range(3):  # another process may take the free port first
        port = free_port()
        log_path = workdir / f"{name}-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command(port),
                cwd=workdir,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = HttpServer(name, port, process, log_path)
        if server.answers():
            return server
        stop_server(process)
        output = server.output()
        if "already in use" not in output.lower():
            break
    pytest.fail(f"{name} did not answer on /health within {START_TIMEOUT} s:\n{output}")


# -- the command lines of real servers, for start_server ----------------------------------


def uvicorn_command(target: str, *options: str) -> Callable[[int], list[str]]:
    """uvicorn serving ``target`` ("module:app") on 127.0.0.1 at the port given."""
    return lambda port: [
        sys.executable,
        "-m",
        "uvicorn",
        *options,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "2",
        target,
    ]


def gunicorn_command(target: str, *options: str, workers: int = 2) -> Callable[[int], list[str]]:
    """gunicorn (sync workers) serving ``target`` ("module:app") on 127.0.0.1 at the port given."""
    return lambda port: [
        sys.executable,
        "-m",
        "gunicorn",
        *options,
        "--worker-class",
        "sync",
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "2",
        target,
    ]


# -- uvicorn in a thread of the test process ------------------------------------------------


@contextmanager
def uvicorn_in_thread(app: object) -> Iterator[str]:
    """Serve the ASGI ``app`` with a real uvicorn (h11, its own event loop) on 127.0.0.1;
    yields the base URL. In-process, so the test can reach into the app (inject a
    clock, read counters) while requests cross a real socket and a real HTTP parser."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here: no race for a free port
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http="h11",
        ws="none",
        lifespan="off",
        loop="asyncio",
        log_config=None,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("uvicorn did not start", pytrace=False)
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        sock.close()
