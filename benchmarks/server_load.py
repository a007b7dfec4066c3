"""Requests per second under a real server: the bare app, ours, and the peers, over loopback.

The in-process benchmarks (``overhead.py``, ``redis_overhead.py``) time the
middleware alone. This one puts each stack behind the server a user would run
it under, one worker process each so the figures compare per-core throughput:

- Starlette under uvicorn; Django (ASGI) under uvicorn;
- Flask under gunicorn (sync worker); Django (WSGI) under gunicorn (sync worker);

and loads it over 127.0.0.1 for a few seconds with a bounded load generator:
Debian's ``wrk`` when it is installed (fixed threads, connections and
duration), else a small asyncio one of this script's own (the same knobs,
keep-alive where the server allows it, bounded by time and by count).

Per server it reports requests per second and p50/p99 latency for the bare
app, ours with ``memory://``, ours with Redis (exact; and batched, once the
installed package's ``Settings`` has ``rate_limit_sync``) and the peer stack
with Redis (slowapi, Flask-Limiter, DRF throttles on ``RedisCache``), and each
one's requests per second as a ratio to the bare app under the same server, all
in one run. The stacks run one after another (one server at a time: the load
generator, the server and Redis share the machine's cores), each after a short
warm-up; ``--rounds N`` runs the whole list N times, interleaved, and reports
the median.

Before anything is timed each stack must answer 200 with its key and 401
without one and with a wrong one, and only ours may send ``RateLimit-Policy``;
a non-200 answer while timing aborts the run, so an error path is never timed.
Limits are high enough never to trip; each run has its own client ids and
Redis key prefix, deleted at the end. Servers run in sessions of their own and
are stopped (the whole process group) on the way out, also on Ctrl-C.

Run ``python benchmarks/server_load.py --help`` for the options. Needs the
``bench`` and ``redis`` extras plus uvicorn and gunicorn (all in ``test``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = "1000000/second"  # high enough that no stack ever answers 429
RUN = uuid.uuid4().hex[:12]  # in every client id and key prefix of this run
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0  # one request taking longer is an error, not a latency


# -- what is measured -------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One framework under one real server."""

    name: str  # also the --only choice
    framework: str  # for --only and the package versions
    app: str  # M2M_BENCH_APP (server_apps.py)
    kind: str  # "uvicorn" | "gunicorn"
    peer: str  # the peer stack's label


SERVERS = (
    Server(
        "starlette",
        "starlette",
        "starlette",
        "uvicorn",
        "AuthenticationMiddleware + slowapi @limit",
    ),
    Server("flask", "flask", "flask", "gunicorn", "before_request sha256 check + Flask-Limiter"),
    Server(
        "django-wsgi",
        "django",
        "django-wsgi",
        "gunicorn",
        "DRF APIView + sha256 auth class + SimpleRateThrottle on RedisCache",
    ),
    Server(
        "django-asgi",
        "django",
        "django-asgi",
        "uvicorn",
        "DRF APIView + sha256 auth class + SimpleRateThrottle on RedisCache",
    ),
)


@dataclass(frozen=True)
class Stack:
    """One row per server: the bare app, one configuration of ours, or the peer.

    ``settings(redis_url)`` gives ours its settings (laid over the key store
    and the limit); ``requires`` names ``Settings`` fields the installed
    package must have, or the row is left out (say, a mode still on a branch).
    """

    key: str
    label: str
    role: str  # "bare" | "ours" | "peer"
    settings: Callable[[str], dict[str, Any]] = lambda url: {}
    requires: tuple[str, ...] = ()
    redis: bool = False


def _redis(url: str, **more: Any) -> dict[str, Any]:
    # invalidation_url="" keeps ours from starting a pub/sub listener on the same Redis.
    return {"rate_limit_storage": url, "invalidation_url": "", **more}


#: Every row, in the order run. To time another configuration of ours, add a Stack here.
STACKS = (
    Stack("bare", "bare app", "bare"),
    Stack(
        "ours memory", "ours, memory://", "ours", lambda url: {"rate_limit_storage": "memory://"}
    ),
    Stack("ours redis exact", "ours, Redis, exact", "ours", _redis, redis=True),
    Stack(
        "ours redis batched",
        "ours, Redis, batched",
        "ours",
        lambda url: _redis(url, rate_limit_sync="batched"),
        requires=("rate_limit_sync",),
        redis=True,
    ),
    Stack("peer redis", "peer, Redis", "peer", redis=True),
)

#: The issue's done-when ratios (requests per second / the bare app's), per our Redis row.
TARGETS = {"ours redis exact": 0.6, "ours redis batched": 0.8}


def available_stacks() -> list[Stack]:
    from dataclasses import fields

    from m2m_middleware import Settings

    known = {f.name for f in fields(Settings)}
    return [s for s in STACKS if set(s.requires) <= known]


# -- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(server: Server, port: int) -> list[str]:
    if server.kind == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            # Django's ASGI handler has no lifespan; "auto" would log that it is missing.
            "--lifespan",
            "off" if server.framework == "django" else "auto",
            "--timeout-graceful-shutdown",
            "2",
            "server_apps:app",
        ]
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "sync",
        "--workers",
        str(SYNC_WORKERS),
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "2",
        "--log-level",
        "warning",
        "server_apps:app",
    ]


#: gunicorn's sync workers per server (``--sync-workers``); uvicorn always runs one.
SYNC_WORKERS = 1


def workers_of(server: Server) -> int:
    return SYNC_WORKERS if server.kind == "gunicorn" else 1


#: Every server process still running; stopped on the way out whatever happens.
RUNNING: set[subprocess.Popen[bytes]] = set()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Each server runs in a session of its own: its pid is its process group's id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server and its workers; SIGKILL to whatever is left after a while."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
    _signal_group(process, signal.SIGKILL)  # a worker that outlived its master
    RUNNING.discard(process)


def stop_all() -> None:
    for process in list(RUNNING):
        stop(process)


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        finally:
            conn.close()
    except OSError:
        return False


#: The CPUs the servers run on, when pinned (``--pin``); the load generator has the rest.
SERVER_CPUS: set[int] | None = None


def _pin_server() -> None:
    """In the server's process, before it execs: its CPUs (its workers inherit them)."""
    if SERVER_CPUS is not None:
        os.sched_setaffinity(0, SERVER_CPUS)


def cpu_plan(mode: str) -> tuple[set[int], set[int]] | None:
    """(the server's CPUs, the load generator's) for ``--pin``, or None to let the
    scheduler place everything."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if mode == "off" or (mode == "auto" and len(cpus) < 2):
        return None
    if len(cpus) < 2:
        give_up(f"--pin on needs 2 CPUs or more; this process may use {len(cpus) or 'unknown'}")
    return {cpus[0]}, set(cpus[1:])


@contextlib.contextmanager
def serving(server: Server, env: dict[str, str], workdir: Path) -> Iterator[tuple[int, int]]:
    """The server up on a free port of 127.0.0.1; yields (port, process group id).
    Stopped afterwards."""
    log_text = ""
    for attempt in range(3):  # another process may take the free port first
        port = free_port()
        log_path = workdir / f"{server.name}-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                server_command(server, port),
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pin_server if SERVER_CPUS is not None else None,  # one thread: safe
            )
        RUNNING.add(process)
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(port):
                break
            time.sleep(0.05)
        else:
            stop(process)
            log_text = log_path.read_text(errors="replace")
            if "already in use" in log_text.lower():
                continue
            break
        try:
            yield port, process.pid
        except SystemExit as exc:  # a refused answer, say: what the server logged says why
            stop(process)
            lines = log_path.read_text(errors="replace").splitlines()[-30:]
            if not lines:
                raise
            log_tail = "\n".join(lines)
            message = f"{exc.code}\n{server.name}: the server's last log lines:\n{log_tail}"
            raise SystemExit(message) from None
        finally:
            stop(process)
        return
    tail = "\n".join(log_text.splitlines()[-30:])
    raise SystemExit(f"{server.name}: the {server.kind} server did not answer:\n{tail}")


# -- pre-flight checks ------------------------------------------------------------------------


def request(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def check(label: str, port: int, stack: Stack, key: str) -> None:
    """200 with the key, 401 without one and with a wrong one; RateLimit-Policy only from ours."""
    status, headers, body = request(port, {"X-API-Key": key})
    if status != 200:
        raise SystemExit(f"{label}: expected 200 with a valid key, got {status}: {body[:300]!r}")
    if ("ratelimit-policy" in headers) != (stack.role == "ours"):
        state = "missing" if stack.role == "ours" else "present"
        raise SystemExit(f"{label}: RateLimit-Policy header {state}")
    if stack.role == "bare":
        return
    for what, sent in (("without a key", {}), ("with a wrong key", {"X-API-Key": wrong_key()})):
        status, _, body = request(port, sent)
        if status != 401:
            raise SystemExit(f"{label}: expected 401 {what}, got {status}: {body[:300]!r}")


def wrong_key() -> str:
    from m2m_middleware.keys import generate_key

    return generate_key("m2m")  # well-formed, checksum and all, but in no store


# -- load generators --------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int = 0
    server_cpu_s: float | None = None  # CPU time of the server's processes while loaded

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_rps(self) -> float | None:
        """Requests per second of server CPU: throughput per core, whatever else runs."""
        if not self.server_cpu_s:
            return None
        return self.requests / self.server_cpu_s


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU of every process in group ``pgid`` (Linux /proc; else None).

    The server's master and worker(s) are that group (it runs in a session of
    its own). Counted from outside, so nothing in the server is instrumented.
    """
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp ... utime stime": comm may hold spaces.
                rest = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue  # ended meanwhile
        if int(rest[2]) == pgid:
            total += int(rest[11]) + int(rest[12])
    return total / _TICK


@dataclass(frozen=True)
class Generator:
    name: str
    connections: int
    threads: int
    run: Callable[[int, str, float, Path], Load]  # (port, key, seconds, workdir) -> Load

    def describe(self) -> str:
        if self.name == "wrk":
            return f"wrk ({self.threads} thread(s), {self.connections} connections)"
        return f"the Python load generator (asyncio, {self.connections} connections)"


_WRK_SCRIPT = """\
wrk.method = "GET"
wrk.headers["X-API-Key"] = "{key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "M2M-BENCH %d %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_generator(binary: str, connections: int, threads: int) -> Generator:
    def run(port: int, key: str, seconds: float, workdir: Path) -> Load:
        # The key goes in a script (mode 0600), not on wrk's command line where ps shows it.
        script = workdir / "wrk-headers.lua"
        script.touch(mode=0o600)
        script.write_text(_WRK_SCRIPT.format(key=key))
        command = [
            binary,
            "--threads",
            str(threads),
            "--connections",
            str(connections),
            "--duration",
            f"{max(1, round(seconds))}s",
            "--timeout",
            f"{int(REQUEST_TIMEOUT)}s",
            "--script",
            str(script),
            f"http://127.0.0.1:{port}/",
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
        found = re.search(r"^M2M-BENCH ([\d ]+)$", done.stdout, re.M)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
        count, duration_us, connect, _read, write, status, timeout, p50, p99 = map(
            int, found.group(1).split()
        )
        if status:
            raise SystemExit(f"{status} of {count} answers were not 2xx/3xx while timing")
        return Load(count, duration_us / 1e6, p50 / 1000, p99 / 1000, connect + write + timeout)

    return Generator("wrk", connections, threads, run)


MAX_REQUESTS = 2_000_000  # the Python generator's bound, whatever the duration


async def _one_connection(
    port: int, request_bytes: bytes, deadline: float, latencies: list[float], errors: list[int]
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.perf_counter() < deadline and len(latencies) < MAX_REQUESTS:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT
                )
            assert reader is not None
            started = time.perf_counter()
            writer.write(request_bytes)
            try:
                status, close = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed a kept-alive connection: reconnect and send it again.
                writer.close()
                writer = None
                errors.append(1)
                continue
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise SystemExit(f"an answer was {status}, not 200, while timing")
            if close:  # gunicorn's sync worker closes every connection after one answer
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; its status, and whether the server closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    close = headers.get("connection") == "close"
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:  # the body ends when the connection does
        await reader.read()
        close = True
    return status, close


def python_generator(connections: int) -> Generator:
    def run(port: int, key: str, seconds: float, workdir: Path) -> Load:
        request_bytes = (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {key}\r\n\r\n"
        ).encode()
        latencies: list[float] = []
        errors: list[int] = []

        async def main() -> float:
            started = time.perf_counter()
            deadline = started + seconds
            await asyncio.gather(
                *(
                    _one_connection(port, request_bytes, deadline, latencies, errors)
                    for _ in range(connections)
                )
            )
            return time.perf_counter() - started

        elapsed = asyncio.run(main())
        if not latencies:
            raise SystemExit("the Python load generator got no answer at all")
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return Load(len(latencies), elapsed, cuts[49] * 1000, cuts[98] * 1000, len(errors))

    return Generator("python", connections, 1, run)


# -- running ----------------------------------------------------------------------------------


@dataclass
class Row:
    server: Server
    stack: Stack
    loads: list[Load] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(load.rps for load in self.loads)

    @property
    def cpu_rps(self) -> float | None:
        found = [load.cpu_rps for load in self.loads if load.cpu_rps is not None]
        return statistics.median(found) if found else None

    @property
    def p50_ms(self) -> float:
        return statistics.median(load.p50_ms for load in self.loads)

    @property
    def p99_ms(self) -> float:
        return statistics.median(load.p99_ms for load in self.loads)

    @property
    def label(self) -> str:
        return (
            f"{self.stack.label}: {self.server.peer}"
            if self.stack.role == "peer"
            else (self.stack.label)
        )


@dataclass
class Run:
    workdir: Path
    redis_url: str
    store_url: str
    keys: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def client_id(self, server: Server, stack: Stack) -> str:
        return f"bench-{RUN}-{server.name}-{stack.key.replace(' ', '-')}"

    def key(self, server: Server, stack: Stack) -> str:
        """The key of this row's own client (created once, in the run's SQLite store)."""
        found = self.keys.get((server.name, stack.key))
        if found is None:
            from m2m_middleware import open_key_store

            client = self.client_id(server, stack)
            store = open_key_store(self.store_url)
            try:
                found = (client, store.create_key(client).key)
            finally:
                with contextlib.suppress(Exception):
                    store.close()
            self.keys[server.name, stack.key] = found
        return found[1]

    def env(self, server: Server, stack: Stack) -> dict[str, str]:
        key = self.key(server, stack)
        client = self.client_id(server, stack)
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep
                ),
                "M2M_BENCH_APP": server.app,
                "M2M_BENCH_ROLE": stack.role,
                "M2M_BENCH_LIMIT": LIMIT,
                "M2M_BENCH_KEY_STORE": self.store_url,
                "M2M_BENCH_SETTINGS": json.dumps(stack.settings(self.redis_url)),
                "M2M_BENCH_KEY_SHA256": hashlib.sha256(key.encode()).hexdigest(),
                "M2M_BENCH_CLIENT": client,
                "M2M_BENCH_REDIS_URL": self.redis_url,
                "M2M_BENCH_CACHE_PREFIX": f"m2m-bench-{RUN}",
            }
        )
        return env


def measure_row(
    run: Run,
    row: Row,
    generator: Generator,
    seconds: float,
    warmup: float,
    log: Callable[[str], None],
) -> None:
    label = f"{row.server.name}/{row.stack.key}"
    key = run.key(row.server, row.stack)
    with serving(row.server, run.env(row.server, row.stack), run.workdir) as (port, group):
        check(label, port, row.stack, key)
        generator.run(port, key, warmup, run.workdir)
        cpu_before = group_cpu_seconds(group)
        load = generator.run(port, key, seconds, run.workdir)
        cpu_after = group_cpu_seconds(group)
    if cpu_before is not None and cpu_after is not None:
        load.server_cpu_s = cpu_after - cpu_before
    row.loads.append(load)
    cpu = load.cpu_rps
    log(
        f"  {label}: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms"
        + ("" if cpu is None else f", {cpu:,.0f} req per server CPU-second")
        + (f" ({load.socket_errors} socket errors)" if load.socket_errors else "")
    )


# -- reporting --------------------------------------------------------------------------------


def _throughput(load: Load, clock: str) -> float | None:
    return load.rps if clock == "wall" else load.cpu_rps


def ratio(row: Row, rows: list[Row], clock: str) -> float | None:
    """``row``'s throughput over the bare app's under the same server (per ``clock``).

    With several rounds, the median of the per-round ratios: a stack and its
    bare app run minutes apart at most within a round but further apart across
    rounds, and on a shared machine the load in between moves more than the
    difference being measured.
    """
    bare = next((r for r in rows if r.server is row.server and r.stack.role == "bare"), None)
    if bare is None:
        return None
    found = []
    for mine, base in zip(row.loads, bare.loads, strict=True):
        a, b = _throughput(mine, clock), _throughput(base, clock)
        if a is not None and b:
            found.append(a / b)
    return statistics.median(found) if found else None


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


CLOCK_WORDS = {
    "wall": "requests per second",
    "cpu": "requests per second of server CPU",
}


def report(rows: list[Row], clock: str) -> list[str]:
    out: list[str] = []
    servers = list(dict.fromkeys(r.server for r in rows))
    for server in servers:
        count = workers_of(server)
        out.append(f"### {server.name} under {server.kind} ({count} worker{'s' * (count > 1)})")
        out.append("")
        out.append(
            f"| stack | req/s | p50 ms | p99 ms | req per server CPU-s | {clock} ratio vs bare |"
        )
        out.append("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            if row.server is server:
                out.append(
                    f"| {row.label} | {row.rps:,.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} "
                    f"| {_n(row.cpu_rps)} | {_x(ratio(row, rows, clock))} |"
                )
        out.append("")
    out.append(f"Summary ({CLOCK_WORDS[clock]}, as a ratio to the bare app under the same server):")
    for server in servers:
        mine = {r.stack.key: r for r in rows if r.server is server}
        parts = [
            f"{r.stack.key} {_x(ratio(r, rows, clock))}"
            for r in mine.values()
            if r.stack.role != "bare"
        ]
        out.append(f"{server.name}: " + ", ".join(parts))
        peer = mine.get("peer redis")
        for key, target in TARGETS.items():
            if key not in mine:
                continue
            value = ratio(mine[key], rows, clock)
            met = value is not None and value >= target
            peer_value = None if peer is None else ratio(peer, rows, clock)
            ahead = peer_value is None or (value is not None and value > peer_value)
            out.append(
                f"{server.name}: {key} {_x(value)} (target >= {target}x: "
                f"{'met' if met else 'not met'}; ahead of the peer with Redis: "
                f"{'yes' if ahead else 'no'})"
            )
    return out


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def as_json(rows: list[Row], config: dict[str, Any]) -> dict[str, Any]:
    clock = config["clock"]
    servers = []
    for server in dict.fromkeys(r.server for r in rows):
        stacks = []
        for r in rows:
            if r.server is not server:
                continue
            stacks.append(
                {
                    "stack": r.stack.key,
                    "label": r.label,
                    "role": r.stack.role,
                    "rps": round(r.rps, 1),
                    "p50_ms": round(r.p50_ms, 3),
                    "p99_ms": round(r.p99_ms, 3),
                    "cpu_rps": _rounded(r.cpu_rps, 1),
                    "ratio_to_bare": _rounded(ratio(r, rows, clock), 3),
                    "rounds": [
                        {
                            "rps": round(load.rps, 1),
                            "p50_ms": round(load.p50_ms, 3),
                            "p99_ms": round(load.p99_ms, 3),
                            "cpu_rps": _rounded(load.cpu_rps, 1),
                            "requests": load.requests,
                            "socket_errors": load.socket_errors,
                        }
                        for load in r.loads
                    ],
                }
            )
        servers.append({"server": server.name, "runs_under": server.kind, "stacks": stacks})
    return {**config, "servers": servers}


def versions(frameworks: list[str]) -> str:
    wanted = ["m2m-middleware", "limits", "redis", "uvicorn", "h11", "gunicorn"]
    per_framework = {
        "starlette": ["starlette", "slowapi"],
        "flask": ["flask", "flask-limiter"],
        "django": ["django", "djangorestframework"],
    }
    for framework in dict.fromkeys(frameworks):
        wanted += per_framework[framework]
    found = []
    for name in wanted:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()} ({platform.machine()}); " + ", ".join(found)


# -- command line -----------------------------------------------------------------------------


def shown_url(url: str) -> str:
    """``url`` with any password masked, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def give_up(reason: str) -> None:
    print(f"server_load.py: {reason}", file=sys.stderr)
    raise SystemExit(2)


def require_redis(url: str) -> None:
    try:
        import redis
    except ImportError:
        give_up('needs redis-py: pip install -e ".[bench,redis]"')
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        give_up(f"no Redis at {shown_url(url)} ({reason}); start one or pass --redis-url")


def delete_run_keys(url: str) -> None:
    """Delete every key of this run (their names all hold ``RUN``)."""
    import redis

    with contextlib.suppress(Exception), redis.Redis.from_url(url, socket_timeout=5) as client:
        found = list(client.scan_iter(match=f"*{RUN}*", count=1000))
        for start in range(0, len(found), 500):
            client.delete(*found[start : start + 500])


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Requests per second and p50/p99 latency of each stack under a real server "
        "(one worker), loaded over 127.0.0.1."
    )
    choices = sorted({s.name for s in SERVERS} | {s.framework for s in SERVERS})
    parser.add_argument(
        "--only",
        action="append",
        choices=choices,
        help="only this framework or server (repeatable; django = django-wsgi and django-asgi)",
    )
    parser.add_argument(
        "--duration", type=positive(float), default=None, help="seconds per stack (default 5)"
    )
    parser.add_argument(
        "--connections", type=positive(int), default=16, help="concurrent connections (default 16)"
    )
    parser.add_argument(
        "--threads",
        type=positive(int),
        default=1,
        help="wrk threads (default 1: 2 cores are shared)",
    )
    parser.add_argument(
        "--rounds",
        type=positive(int),
        default=1,
        help="run the whole list N times, interleaved; report medians (a ratio: the median of "
        "the per-round ratios; default 1)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto (default): wrk if installed, else the Python one",
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help=f"default {DEFAULT_REDIS_URL}"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK_WORDS),
        default="wall",
        help="what the ratios compare: wall (default), requests per second; cpu, requests per "
        "second of the server's own CPU time (steadier on a shared machine, but blind to time "
        "a sync worker spends waiting for Redis)",
    )
    parser.add_argument(
        "--pin",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto (default): with 2 CPUs or more, the server runs on the first and the load "
        "generator on the others, so neither takes the other's core (Redis is left where the "
        "scheduler puts it); off: no pinning",
    )
    parser.add_argument(
        "--sync-workers",
        type=positive(int),
        default=1,
        metavar="N",
        help="gunicorn sync worker processes, all on the server's CPUs (default 1: per-worker "
        "throughput, every Redis round trip waited out; gunicorn's docs advise 2 x cores + 1, "
        "so that one worker runs while another waits)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (about 1 s per stack)")
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write the figures as JSON to FILE (- for stdout, "
        "which then holds only the JSON)",
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1.0 if args.quick else 5.0
    args.warmup = 0.3 if args.quick else 1.0
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections")
    return args


def pick_generator(args: argparse.Namespace) -> Generator:
    binary = shutil.which("wrk")
    if args.load_generator == "wrk" and binary is None:
        give_up("--load-generator wrk: wrk is not installed (apt-get install wrk)")
    if binary is not None and args.load_generator != "python":
        return wrk_generator(binary, args.connections, args.threads)
    return python_generator(args.connections)


def _cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


MEDIANS = " (medians; a ratio is the median of the per-round ratios)"


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    servers = [
        s for s in SERVERS if not args.only or s.name in args.only or s.framework in args.only
    ]
    for module in ("uvicorn", "gunicorn"):
        if any(s.kind == module for s in servers) and shutil.which(module) is None:
            with contextlib.suppress(ImportError):
                __import__(module)
                continue
            give_up(f"needs {module}: pip install {module}")
    require_redis(args.redis_url)
    generator = pick_generator(args)
    global SERVER_CPUS, SYNC_WORKERS
    SYNC_WORKERS = args.sync_workers
    plan = cpu_plan(args.pin)
    if plan is not None:
        SERVER_CPUS, others = plan
        os.sched_setaffinity(0, others)  # this process and the load generator it starts
    stacks = available_stacks()
    to_json = args.json == "-"
    log: Callable[[str], None] = (lambda text: print(text, file=sys.stderr)) if to_json else print

    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    rows = [Row(server, stack) for server in servers for stack in stacks]
    with tempfile.TemporaryDirectory(prefix="m2m-server-load-") as tmp:
        workdir = Path(tmp)
        run = Run(workdir, args.redis_url, f"sqlite:///{workdir / 'keys.db'}")
        try:
            for number in range(args.rounds):
                log(f"round {number + 1} of {args.rounds}")
                # Rotate the start each round so no stack always runs first (or last).
                shift = number % len(rows)
                for row in rows[shift:] + rows[:shift]:
                    measure_row(run, row, generator, args.duration, args.warmup, log)
        finally:
            stop_all()
            delete_run_keys(args.redis_url)

    frameworks = [s.framework for s in servers]
    skipped = [s.key for s in STACKS if s not in stacks]
    config = {
        "run": RUN,
        "versions": versions(frameworks),
        "load_generator": generator.name,
        "connections": args.connections,
        "threads": generator.threads,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "clock": args.clock,
        "quick": args.quick,
        "skipped_stacks": skipped,
        "server_cpus": sorted(plan[0]) if plan else None,
        "gunicorn_sync_workers": SYNC_WORKERS,
        "load_generator_cpus": sorted(plan[1]) if plan else None,
    }
    lines = [
        config["versions"],
        f"{generator.describe()}, {args.duration:g} s per stack after a {args.warmup:g} s "
        f"warm-up, {args.rounds} round(s){MEDIANS if args.rounds > 1 else ''}; "
        "one server at a time, 127.0.0.1; uvicorn: 1 worker process; gunicorn: "
        f"{SYNC_WORKERS} sync worker process(es)",
        (
            f"server pinned to CPU {_cpus(plan[0])}, load generator to CPU {_cpus(plan[1])}, "
            "Redis where the scheduler puts it"
            if plan
            else "no CPU pinning (--pin off or one CPU)"
        ),
    ]
    if skipped:
        lines.append(
            "left out (the installed Settings lacks a field they need): " + ", ".join(skipped)
        )
    if args.quick:
        lines.append("--quick: a smoke run; these numbers are too short-lived to quote")
    lines += ["", *report(rows, args.clock), "", f"(total {time.perf_counter() - started:.1f} s)"]
    if to_json:
        print(json.dumps(as_json(rows, config), indent=2))
    else:
        print("\n".join(lines))
        if args.json:
            Path(args.json).write_text(json.dumps(as_json(rows, config), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are stopped by then (finally blocks)
        print("server_load.py: interrupted; every server it started is stopped", file=sys.stderr)
        sys.exit(130)
