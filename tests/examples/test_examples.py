"""Smoke tests: each example app under a real server, spoken to over real HTTP.

Every test starts its own server process on its own free port with its own
SQLite key store in ``tmp_path``, so the tests run in parallel (``-n 2``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import servers

import m2m_middleware
from m2m_middleware import open_key_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_apps"
DJANGO_PROJECT = EXAMPLES / "django_project"
#: Where the m2m_middleware this test process imported lives: the servers use the same one.
PACKAGE_PARENT = Path(m2m_middleware.__file__).resolve().parents[1]

PY = sys.executable
COMMANDS: dict[str, Callable[[int], list[str]]] = {
    "starlette": lambda port: [PY, str(EXAMPLES / "starlette_app.py"), "--port", str(port)],
    "flask": lambda port: [PY, str(EXAMPLES / "flask_app.py"), "--port", str(port)],
    "flask-cli": lambda port: [
        PY,
        "-m",
        "flask",
        "--app",
        str(EXAMPLES / "flask_app"),
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ],
    "django-wsgi": lambda port: [
        PY,
        str(DJANGO_PROJECT / "manage.py"),
        "runserver",
        f"127.0.0.1:{port}",
        "--noreload",
    ],
    "django-asgi": lambda port: [
        PY,
        "-m",
        "uvicorn",
        "--app-dir",
        str(DJANGO_PROJECT),
        "example_project.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "off",
    ],
}


Server = servers.HttpServer


@contextlib.contextmanager
def serve(
    name: str, workdir: Path, key_store: str, *args: str, **extra_env: str
) -> Iterator[Server]:
    """Run example ``name`` under its real server; failures carry the server's output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "DJANGO_", "FLASK_"))}
    env.update(
        M2M_KEY_STORE=key_store,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")])),
        **extra_env,
    )
    server = servers.start_server(
        name, lambda port: COMMANDS[name](port) + list(args), workdir, env
    )
    try:
        yield server
    except (AssertionError, httpx.HTTPError) as exc:
        servers.stop_server(server.process)
        raise AssertionError(f"{exc}\n--- {name} server output ---\n{server.output()}") from exc
    finally:
        servers.stop_server(server.process)


def _keys(tmp_path: Path) -> tuple[str, str, str]:
    """A store URL, a key with orders:read for demo-client, and a key without scopes."""
    url = "sqlite:///" + str(tmp_path / "keys.db")
    with closing(open_key_store(url)) as store:
        demo = store.create_key("demo-client", scopes=["orders:read"]).key
        unscoped = store.create_key("no-scope-client").key
    return url, demo, unscoped


def _assert_problem(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["error"] == error
    assert body["status"] == status


@pytest.mark.parametrize("name", list(COMMANDS))
def test_example_app(name: str, tmp_path: Path) -> None:
    store_url, demo_key, unscoped_key = _keys(tmp_path)
    with (
        serve(name, tmp_path, store_url) as server,
        httpx.Client(base_url=server.url, timeout=5.0) as http,
    ):
        health = http.get("/health")
        assert health.status_code == 200, health.text
        assert health.json() == {"status": "ok"}
        assert "RateLimit" not in health.headers

        anonymous = http.get("/orders")
        _assert_problem(anonymous, 401, "missing_credentials")
        assert "error=" not in anonymous.headers["www-authenticate"]

        orders = http.get("/orders", headers={"X-API-Key": demo_key})
        assert orders.status_code == 200, orders.text
        assert orders.json()["client_id"] == "demo-client"
        assert "RateLimit-Policy" in orders.headers
        assert "RateLimit" in orders.headers

        whoami = http.get("/whoami", headers={"Authorization": f"Bearer {demo_key}"})
        assert whoami.status_code == 200, whoami.text
        assert whoami.json() == {
            "client_id": "demo-client",
            "scheme": "api_key",
            "scopes": ["orders:read"],
            "tier": None,
            "key_id": whoami.json()["key_id"],
        }
        assert whoami.json()["key_id"]

        forbidden = http.get("/orders", headers={"X-API-Key": unscoped_key})
        _assert_problem(forbidden, 403, "insufficient_scope")
        challenge = forbidden.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert 'scope="orders:read"' in challenge

        if name in ("starlette", "flask"):  # the start-up banner
            output = server.output()
            assert f"curl {server.url}/health" in output
            assert (
                f"m2m keys create --client demo-client --scope orders:read --store {store_url}"
                in output
            )


@pytest.mark.parametrize(
    ("name", "args", "env"),
    [
        ("starlette", (), {"M2M_EXAMPLE_CREATE_KEY": "1"}),
        ("flask", ("--create-key",), {}),
    ],
)
def test_create_key_on_startup(
    name: str, args: tuple[str, ...], env: dict[str, str], tmp_path: Path
) -> None:
    store_url = "sqlite:///" + str(tmp_path / "keys.db")
    with serve(name, tmp_path, store_url, *args, **env) as server:
        output = server.output()
        found = re.search(rf'curl -H "X-API-Key: (\S+)" {re.escape(server.url)}/orders', output)
        assert found, "no ready-to-paste curl line with the demo key"
        response = httpx.get(server.url + "/orders", headers={"X-API-Key": found[1]}, timeout=5.0)
        assert response.status_code == 200, response.text
        assert response.json()["client_id"] == "demo-client"


@pytest.mark.parametrize("project", ["example_apps", "example_apps/django_project"])
def test_the_example_apps_own_tests_pass(project: str, tmp_path: Path) -> None:
    """Their tests use m2m_middleware.testing as a project of yours would: run as you would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "DJANGO_", "FLASK_"))}
    env.update(
        PYTHONDONTWRITEBYTECODE="1",  # nothing written into example_apps/
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [PY, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), project],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[1-9]\d* passed\b", result.stdout), result.stdout
    assert not (ROOT / project / "example_keys.db").exists()


#: Turns the examples' token service on (it seals their signing keys).
SIGNING_SECRET = "the example apps' token service, in a test"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_token_client_against_each_example(name: str, tmp_path: Path) -> None:
    """example_apps/token_client.py: authlib fetches a token with the key, calls the
    API with it and renews it, against each app under its real server."""
    store_url = "sqlite:///" + str(tmp_path / "keys.db")
    with closing(open_key_store(store_url)) as store:
        issued = store.create_key("demo-client", scopes=["orders:read"])
    with serve(name, tmp_path, store_url, M2M_SIGNING_SECRET=SIGNING_SECRET) as server:
        if name in ("starlette", "flask"):  # the start-up banner
            assert "Token service on" in server.output()
        env = {k: v for k, v in os.environ.items() if not k.startswith("M2M_")}
        env.update(
            M2M_KEY_ID=issued.record.key_id,
            M2M_API_KEY=issued.key,
            PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")])),
        )
        result = subprocess.run(
            [PY, str(EXAMPLES / "token_client.py"), "--base-url", server.url],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr == ""  # no warning, no traceback
        out = result.stdout
        assert "POST /oauth/token: a Bearer token for scope 'orders:read', good for 300 s" in out
        assert "GET /whoami with the token: 200 OK" in out
        assert "client_id=demo-client scheme=jwt" in out
        assert "GET /orders with the token: 200 OK" in out
        assert "authlib fetched a new token by itself" in out
        assert issued.key not in out


def test_without_the_secret_the_examples_have_no_token_endpoint(tmp_path: Path) -> None:
    store_url = "sqlite:///" + str(tmp_path / "keys.db")
    with serve("starlette", tmp_path, store_url) as server:
        assert "Token service off: set M2M_SIGNING_SECRET" in server.output()
        # Nothing answers for the issuer: the JWKS path is just a protected path.
        jwks = httpx.get(server.url + "/.well-known/jwks.json", timeout=5.0)
        _assert_problem(jwks, 401, "missing_credentials")
