"""Real servers (gunicorn, uvicorn) running the tiny apps in ``apps/``.

The ``serve`` fixture starts a server command on a free port, with the apps
folder and the m2m_middleware this process imported on ``PYTHONPATH``, waits
until its public ``/health`` answers, and stops it (its whole process group:
master and workers) when the test ends, whatever happened.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import servers

import m2m_middleware

APPS = Path(__file__).resolve().parent / "apps"
#: Where the m2m_middleware this test process imported lives: the servers use the same one.
PACKAGE_PARENT = Path(m2m_middleware.__file__).resolve().parents[1]
Command = Callable[[int], list[str]]
Server = servers.HttpServer


def _environment(settings: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "PYTHONPATH"))}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(APPS), str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])
    )
    return env


def _serving(workdir: Path) -> Iterator[Callable[[str, Command, Mapping[str, str]], Server]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: Command, settings: Mapping[str, str]) -> Server:
        server = servers.start_server(name, command, workdir, _environment(settings))
        started.append(server.process)
        return server

    try:
        yield start
    finally:
        for process in started:
            servers.stop_server(process)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str, Command, Mapping[str, str]], Server]]:
    """``serve(name, command, env)``: a started server; stopped at teardown."""
    yield from _serving(tmp_path)


@pytest.fixture(scope="module")
def serve_for_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str, Command, Mapping[str, str]], Server]]:
    """``serve`` for servers a whole module's tests share; stopped after the module."""
    yield from _serving(tmp_path_factory.mktemp("servers"))
