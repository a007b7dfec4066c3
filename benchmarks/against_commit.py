"""The API-key path now against the same path at another commit, in one run.

An issue that says "no more than 10% above the commit before your change"
needs both versions timed side by side, on the same machine at the same
moment: run-to-run drift on a shared machine is larger than 10%. This
script extracts the package as it was at ``--base`` (``git archive``) into a
temporary directory under the name ``m2m_base`` (every import inside the
package is relative, so the copy runs as it is), and times, per framework,
the bare app, ours at ``--base``, ours now, and ours now with the transport
checks on (``trusted_proxies`` and ``require_https``, every request coming
through a trusted proxy with ``X-Forwarded-For`` and ``X-Forwarded-Proto``),
interleaved round-robin with the drivers of ``overhead.py``. That last one is
a copy of the package under another name (``m2m_transport``), so that Django,
whose middleware reads one ``settings.M2M_AUTH``, can run both side by side.

    python benchmarks/against_commit.py --base 258acd0
    python benchmarks/against_commit.py --base HEAD~3 --only flask --clock cpu
    python benchmarks/against_commit.py --base 5e65928 --transport-base 4998b39 --clock cpu

The report gives each version's overhead over the bare app, now / base and
transport / base. ``--transport-base REV`` adds the package at ``REV`` with the
transport settings on (``m2m_transport_base``): the transport path before and
after a change to it, timed in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead
from overhead import CLIENT_ID, LIMIT, Variant

BASE_PACKAGE = "m2m_base"
TRANSPORT_PACKAGE = "m2m_transport"
TRANSPORT_BASE_PACKAGE = "m2m_transport_base"
_TRANSPORT_PACKAGES = (TRANSPORT_PACKAGE, TRANSPORT_BASE_PACKAGE)
TRANSPORT_LABEL = "ours now + trusted_proxies, require_https"
#: What each request of the transport variant carries: it came through the proxy.
PROXIED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
#: The harness's requests come from 127.0.0.1: that is the trusted proxy.
TRANSPORT_FIELDS = {"trusted_proxies": ["127.0.0.0/8"], "require_https": True}
_base_revision = "HEAD"
_transport_base_revision: str | None = None


def _add_base_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        help="the commit to compare with (anything git rev-parse understands)",
    )
    parser.add_argument(
        "--transport-base",
        default=None,
        help="also time the package at this commit with the transport settings on",
    )


def load_base(revision: str, name: str = BASE_PACKAGE) -> types.ModuleType:
    """Import the package as it was at ``revision``, as ``name`` (``m2m_base``)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", revision, "m2m_middleware"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        message = f"cannot read m2m_middleware at {revision!r}: {detail.decode().strip()}"
        raise SystemExit(message) from None
    root = Path(tempfile.mkdtemp(prefix="m2m-base-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "m2m_middleware").rename(root / name)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def load_copy(name: str = TRANSPORT_PACKAGE) -> types.ModuleType:
    """The package as it is now, copied as ``name`` (its own module state)."""
    here = Path(__file__).resolve().parent.parent / "m2m_middleware"
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    shutil.copytree(here, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def _versions() -> list[tuple[str, str]]:
    """(label, package name) of the versions, base first."""
    versions = [
        (f"ours at {_base_revision}", BASE_PACKAGE),
        ("ours now", "m2m_middleware"),
        (TRANSPORT_LABEL, TRANSPORT_PACKAGE),
    ]
    if _transport_base_revision is not None:
        label = f"ours at {_transport_base_revision} + trusted_proxies, require_https"
        versions.append((label, TRANSPORT_BASE_PACKAGE))
    return versions


def _fields(package: str) -> dict[str, Any]:
    return dict(TRANSPORT_FIELDS) if package in _TRANSPORT_PACKAGES else {}


def _headers(package: str, key: str) -> dict[str, str]:
    headers = {"X-API-Key": key}
    if package in _TRANSPORT_PACKAGES:
        headers.update(PROXIED)
    return headers


def _deny_status(package: str) -> int:
    return 403 if package in _TRANSPORT_PACKAGES else 401  # no key, no proto: https_required


def _settings(package: str) -> Any:
    root = importlib.import_module(package)
    store = root.open_key_store("memory://")
    key = store.create_key(CLIENT_ID).key
    settings = root.Settings(
        key_store=store, default_limits=LIMIT, rate_limit_storage="memory://", **_fields(package)
    )
    return settings, key


def build_core() -> list[Variant]:
    """``Engine.check`` itself: the adapters' own costs, which are noisy, left out."""

    def nothing(n: int) -> tuple[int, int]:
        perf = overhead.clock
        t0 = perf()
        for _ in range(n):
            pass
        return perf() - t0, 0

    variants = [Variant("core", "bare", "bare", nothing)]
    for label, package in _versions():
        settings, key = _settings(package)
        engine = importlib.import_module(package).Engine(settings)
        if package in _TRANSPORT_PACKAGES:
            variants.append(Variant("core", label, "ours", _core_transport(package, engine, key)))
            continue
        if not engine.check("GET", "/", None, key).allowed:
            raise SystemExit(f"core/{label}: the key was refused")

        def run(n: int, check: Any = engine.check, key: str = key) -> tuple[int, int]:
            bad = 0
            perf = overhead.clock
            t0 = perf()
            for _ in range(n):
                if not check("GET", "/", None, key).allowed:
                    bad += 1
            return perf() - t0, bad

        variants.append(Variant("core", label, "ours", run))
    return variants


def _core_transport(package: str, engine: Any, key: str) -> Any:
    """``Engine.check`` with a view made per request, as the ASGI adapter makes it
    (raw header pairs decoded on first use; the proxy headers collected in the
    adapter's own pass over them, here once, outside the loop)."""
    module = importlib.import_module(f"{package}.request_view")
    raw = [(n.lower().encode(), v.encode()) for n, v in _headers(package, key).items()]
    if hasattr(module, "AsgiView"):
        proxy = module.asgi_proxy_headers(raw)

        def view(view_type: Any = module.AsgiView) -> Any:
            return view_type("GET", "/", raw, "http", "127.0.0.1", b"", b"", proxy)

    else:  # before AsgiView: a closure and a header index per request
        view_type, joined, index = module.RequestView, module.joined_headers, module.AsgiHeaderIndex

        def view() -> Any:
            return view_type(
                "GET",
                "/",
                headers=lambda: joined([(n.decode(), v.decode()) for n, v in raw]),
                client_address="127.0.0.1",
                find_header=index(raw).get,
            )

    if not engine.check("GET", "/", None, key, None, view()).allowed:
        raise SystemExit("core/transport: the key was refused")

    def run(n: int, check: Any = engine.check) -> tuple[int, int]:
        bad = 0
        perf = overhead.clock
        make = view
        t0 = perf()
        for _ in range(n):
            if not check("GET", "/", None, key, None, make()).allowed:
                bad += 1
        return perf() - t0, bad

    return run


def build_starlette(loop: asyncio.AbstractEventLoop) -> list[Variant]:
    variants = [
        overhead.asgi_variant(loop, "starlette", "bare", "bare", overhead.starlette_app(), {}, None)
    ]
    for label, package in _versions():
        middleware = importlib.import_module(f"{package}.starlette").M2MMiddleware
        settings, key = _settings(package)
        app = overhead.starlette_app()
        app.add_middleware(middleware, settings=settings)
        variants.append(
            overhead.asgi_variant(
                loop,
                "starlette",
                label,
                "ours",
                app,
                _headers(package, key),
                _deny_status(package),
                wrong_headers={**_headers(package, key), "X-API-Key": "m2m_not-a-real-key"},
            )
        )
    return variants


def build_flask() -> list[Variant]:
    variants = [overhead.wsgi_variant("flask", "bare", "bare", overhead.flask_app(), "/", {}, None)]
    for label, package in _versions():
        auth = importlib.import_module(f"{package}.flask").M2MAuth
        settings, key = _settings(package)
        app = overhead.flask_app()
        auth(app, settings=settings)
        variants.append(
            overhead.wsgi_variant(
                "flask",
                label,
                "ours",
                app,
                "/",
                _headers(package, key),
                _deny_status(package),
                wrong_headers={**_headers(package, key), "X-API-Key": "m2m_not-a-real-key"},
            )
        )
    return variants


def build_django() -> list[Variant]:
    versions = _versions()
    now_package = "m2m_middleware"
    specs: list[tuple[str, str, list[str], dict[str, str], int | None]] = [
        ("bare", "bare", [], {}, None)
    ]
    for label, package in versions:
        settings, key = _settings(package)
        config = {"key_store": settings.key_store, "default_limits": LIMIT, **_fields(package)}
        if package == now_package:
            overhead.configure_django(config)  # the one process-wide configuration
            overhead.django_urls({})
        else:
            # Both middlewares read settings.M2M_AUTH per request; each copy is
            # pointed at a settings object of its own, so each gets its own store.
            middleware = importlib.import_module(f"{package}.django.middleware")
            middleware.django_settings = types.SimpleNamespace(M2M_AUTH=config)  # type: ignore[attr-defined]
        specs.append(
            (
                label,
                "ours",
                [f"{package}.django.M2MAuthMiddleware"],
                _headers(package, key),
                _deny_status(package),
            )
        )
    return [
        overhead.wsgi_variant(
            "django",
            stack,
            role,
            overhead.django_handler(chain),
            "/",
            headers,
            deny,
            wrong_headers={**headers, "X-API-Key": "m2m_not-a-real-key"} if headers else None,
        )
        for stack, role, chain, headers, deny in specs
    ]


def build(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    global _base_revision, _transport_base_revision
    _base_revision = args.base
    _transport_base_revision = args.transport_base
    load_base(args.base)
    if args.transport_base is not None:
        load_base(args.transport_base, TRANSPORT_BASE_PACKAGE)
    load_copy()
    variants = build_core()
    if "starlette" in frameworks:
        variants += build_starlette(loop)
    if "flask" in frameworks:
        variants += build_flask()
    if "django" in frameworks:
        variants += build_django()
    return variants


def report(variants: list[Variant], verbose: bool) -> list[str]:
    lines = []
    for framework in ("core", *overhead.FRAMEWORKS):
        found = {v.stack: v for v in variants if v.framework == framework}
        if not found:
            continue
        bare = found["bare"].median_us
        versions = _versions()
        (base_label, _), (now_label, _), (transport_label, _) = versions[:3]
        base = found[base_label].median_us - bare
        now = found[now_label].median_us - bare
        transport = found[transport_label].median_us - bare
        ratio = now / base if base > 0 else float("nan")
        transport_ratio = transport / base if base > 0 else float("nan")
        lines.append(
            f"{framework}: bare {bare:7.2f} us   overhead {base_label}: {base:6.2f} us   "
            f"now: {now:6.2f} us   now / base: {ratio:.3f}   "
            f"with trusted_proxies + require_https: {transport:6.2f} us, "
            f"/ base: {transport_ratio:.3f}"
        )
        if len(versions) > 3:
            before_label = versions[3][0]
            before = found[before_label].median_us - bare
            before_ratio = before / base if base > 0 else float("nan")
            lines.append(
                f"    {before_label}: {before:6.2f} us, / base: {before_ratio:.3f}   "
                f"transport now / transport then: {transport / before:.3f}"
            )
        if verbose:
            for variant in found.values():
                rounds = ", ".join(f"{m:.2f}" for m in variant.round_means_us)
                lines.append(f"    {variant.stack}: {rounds}")
    return lines


def main(argv: list[str] | None = None) -> int:
    return overhead.run_benchmark(
        argv,
        description="The API-key path now against the same path at another commit.",
        build=build,
        report=report,
        add_options=_add_base_option,
    )


if __name__ == "__main__":
    sys.exit(main())
