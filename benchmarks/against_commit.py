"""The API-key path now against the same path at another commit, in one run.

An issue that says "no more than 10% above the commit before your change"
needs both versions timed side by side, on the same machine at the same
moment: run-to-run drift on a shared machine is larger than 10%. This
script extracts the package as it was at ``--base`` (``git archive``) into a
temporary directory under the name ``m2m_base`` (every import inside the
package is relative, so the copy runs as it is), and times, per framework,
the bare app, ours at ``--base`` and ours now, interleaved round-robin with
the drivers of ``overhead.py``.

    python benchmarks/against_commit.py --base 258acd0
    python benchmarks/against_commit.py --base HEAD~3 --only flask --clock cpu

The report gives each version's overhead over the bare app and now / base.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
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
_base_revision = "HEAD"


def _add_base_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        help="the commit to compare with (anything git rev-parse understands)",
    )


def load_base(revision: str) -> types.ModuleType:
    """Import the package as it was at ``revision``, as ``m2m_base``."""
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
    (root / "m2m_middleware").rename(root / BASE_PACKAGE)
    sys.path.insert(0, str(root))
    return importlib.import_module(BASE_PACKAGE)


def _versions() -> list[tuple[str, str]]:
    """(label, package name) of the two versions, base first."""
    return [(f"ours at {_base_revision}", BASE_PACKAGE), ("ours now", "m2m_middleware")]


def _settings(package: str) -> Any:
    root = importlib.import_module(package)
    store = root.open_key_store("memory://")
    key = store.create_key(CLIENT_ID).key
    return root.Settings(key_store=store, default_limits=LIMIT, rate_limit_storage="memory://"), key


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
            overhead.asgi_variant(loop, "starlette", label, "ours", app, {"X-API-Key": key}, 401)
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
            overhead.wsgi_variant("flask", label, "ours", app, "/", {"X-API-Key": key}, 401)
        )
    return variants


def build_django() -> list[Variant]:
    (base_label, base_package), (now_label, now_package) = _versions()
    now_settings, now_key = _settings(now_package)
    base_settings, base_key = _settings(base_package)
    overhead.configure_django({"key_store": now_settings.key_store, "default_limits": LIMIT})
    overhead.django_urls({})
    # Both middlewares read settings.M2M_AUTH per request; the base copy is
    # pointed at a settings object of its own, so each gets its own store.
    base_middleware = importlib.import_module(f"{base_package}.django.middleware")
    base_middleware.django_settings = types.SimpleNamespace(  # type: ignore[attr-defined]
        M2M_AUTH={"key_store": base_settings.key_store, "default_limits": LIMIT}
    )
    specs = [
        ("bare", "bare", [], {}, None),
        (base_label, "ours", [f"{base_package}.django.M2MAuthMiddleware"], base_key, 401),
        (now_label, "ours", [f"{now_package}.django.M2MAuthMiddleware"], now_key, 401),
    ]
    return [
        overhead.wsgi_variant(
            "django",
            stack,
            role,
            overhead.django_handler(chain),
            "/",
            {"X-API-Key": key} if key else {},
            deny,
        )
        for stack, role, chain, key, deny in specs
    ]


def build(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    global _base_revision
    _base_revision = args.base
    load_base(args.base)
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
        (base_label, _), (now_label, _) = _versions()
        base = found[base_label].median_us - bare
        now = found[now_label].median_us - bare
        ratio = now / base if base > 0 else float("nan")
        lines.append(
            f"{framework}: bare {bare:7.2f} us   overhead {base_label}: {base:6.2f} us   "
            f"now: {now:6.2f} us   now / base: {ratio:.3f}"
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
