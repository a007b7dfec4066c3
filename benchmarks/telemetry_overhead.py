"""The API-key path with usage, alerts and metrics on, against the same path with them off.

Issue 14 asks that counting usage, watching for alerts and keeping
Prometheus metrics cost at most half again the API-key path's overhead. This
times, per framework and interleaved in one run (the drivers of
``overhead.py``):

- the bare app;
- ours with ``usage=False, alerts=False`` (nothing of telemetry built);
- ours with the defaults (usage and alerts on);
- ours with the defaults and ``metrics_path="/metrics"`` (and client labels).

Each of ours is its own copy of the package (``m2m_telemetry_off``,
``m2m_telemetry_on``, ``m2m_telemetry_metrics``), so that Django, whose
middleware reads one ``settings.M2M_AUTH``, runs all three side by side. Usage
is counted into a memory store; its flush thread runs as it would in an app
(every ``usage_flush_interval``), and the flushes are part of what is timed.

    python benchmarks/telemetry_overhead.py --clock cpu
    python benchmarks/telemetry_overhead.py --only starlette --rounds 21
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead
from against_commit import load_copy
from overhead import CLIENT_ID, LIMIT, Variant

#: (label, package copy, settings fields) of each of ours; the first is the reference.
VERSIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("telemetry off", "m2m_telemetry_off", {"usage": False, "alerts": False}),
    ("usage + alerts (defaults)", "m2m_telemetry_on", {}),
    (
        "usage + alerts + metrics",
        "m2m_telemetry_metrics",
        {"metrics_path": "/metrics", "metrics_client_labels": True},
    ),
)


def _settings(package: str, fields: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    root = importlib.import_module(package)
    store = root.open_key_store("memory://")
    key = store.create_key(CLIENT_ID).key
    config = {"key_store": store, "default_limits": LIMIT, "rate_limit_storage": "memory://"}
    config.update(fields)
    return root.Settings(**config), config, key


def build_core() -> list[Variant]:
    def nothing(n: int) -> tuple[int, int]:
        perf = overhead.clock
        t0 = perf()
        for _ in range(n):
            pass
        return perf() - t0, 0

    variants = [Variant("core", "bare", "bare", nothing)]
    for label, package, fields in VERSIONS:
        settings, _, key = _settings(package, fields)
        engine = importlib.import_module(package).Engine(settings)
        if not engine.gate("GET", "/", None, key, "127.0.0.1").allowed:
            raise SystemExit(f"core/{label}: the key was refused")

        def run(n: int, gate: Any = engine.gate, key: str = key) -> tuple[int, int]:
            bad = 0
            perf = overhead.clock
            t0 = perf()
            for _ in range(n):
                if not gate("GET", "/", None, key, "127.0.0.1").allowed:
                    bad += 1
            return perf() - t0, bad

        variants.append(Variant("core", label, "ours", run))
    return variants


def build_starlette(loop: asyncio.AbstractEventLoop) -> list[Variant]:
    variants = [
        overhead.asgi_variant(loop, "starlette", "bare", "bare", overhead.starlette_app(), {}, None)
    ]
    for label, package, fields in VERSIONS:
        middleware = importlib.import_module(f"{package}.starlette").M2MMiddleware
        settings, _, key = _settings(package, fields)
        app = overhead.starlette_app()
        app.add_middleware(middleware, settings=settings)
        variants.append(
            overhead.asgi_variant(loop, "starlette", label, "ours", app, {"X-API-Key": key}, 401)
        )
    return variants


def build_flask() -> list[Variant]:
    variants = [overhead.wsgi_variant("flask", "bare", "bare", overhead.flask_app(), "/", {}, None)]
    for label, package, fields in VERSIONS:
        auth = importlib.import_module(f"{package}.flask").M2MAuth
        settings, _, key = _settings(package, fields)
        app = overhead.flask_app()
        auth(app, settings=settings)
        variants.append(
            overhead.wsgi_variant("flask", label, "ours", app, "/", {"X-API-Key": key}, 401)
        )
    return variants


def build_django() -> list[Variant]:
    overhead.configure_django({"key_store": "memory://"})  # the one process-wide configuration
    overhead.django_urls({})
    variants = [
        overhead.wsgi_variant("django", "bare", "bare", overhead.django_handler([]), "/", {}, None)
    ]
    for label, package, fields in VERSIONS:
        _, config, key = _settings(package, fields)
        # Each copy's middleware reads M2M_AUTH from a settings object of its own.
        middleware = importlib.import_module(f"{package}.django.middleware")
        middleware.django_settings = types.SimpleNamespace(M2M_AUTH=config)  # type: ignore[attr-defined]
        handler = overhead.django_handler([f"{package}.django.M2MAuthMiddleware"])
        variants.append(
            overhead.wsgi_variant("django", label, "ours", handler, "/", {"X-API-Key": key}, 401)
        )
    return variants


def build(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    for _, package, _ in VERSIONS:
        load_copy(package)
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
        reference_label = VERSIONS[0][0]
        reference = found[reference_label].median_us - bare
        parts = [f"{framework}: bare {bare:7.2f} us   {reference_label}: +{reference:6.2f} us"]
        for label, _, _ in VERSIONS[1:]:
            cost = found[label].median_us - bare
            ratio = cost / reference if reference > 0 else float("nan")
            parts.append(f"{label}: +{cost:6.2f} us ({ratio:.2f}x)")
        lines.append("   ".join(parts))
        if verbose:
            for variant in found.values():
                rounds = ", ".join(f"{m:.2f}" for m in variant.round_means_us)
                lines.append(f"    {variant.stack}: {rounds}")
    lines.append("")
    lines.append(
        "ratio = overhead over the bare app / the overhead with telemetry off (target 1.5x)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    return overhead.run_benchmark(
        argv,
        description="The API-key path with usage, alerts and metrics on and off.",
        build=build,
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
