"""Optional dependencies: a setting that needs one that is missing is one ConfigError.

Each extra of the distribution (``pip install "m2m-middleware[redis]"``) brings
the packages some settings need. :class:`~m2m_middleware.Settings` asks here,
at construction, so a missing package is reported naming the setting that
needs it and the line that installs it, in ``Settings(...)``, in an app's
start-up and in Django's system checks alike, never as a bare
``ModuleNotFoundError`` from deep inside the first request.
"""

from __future__ import annotations

from .errors import ConfigError

#: The packages each extra brings, in the order they are imported.
EXTRA_MODULES = {
    "redis": ("redis",),
    "postgres": ("psycopg", "psycopg_pool"),
    "django": ("django",),
    "issuer": ("cryptography", "authlib"),
    "signatures": ("cryptography", "http_message_signatures"),
    "metrics": ("prometheus_client",),
}


def require_extra(field: str, what: str, extra: str) -> None:
    """Import the packages of ``extra``, or raise a ConfigError for ``field``.

    ``what`` says what needs them, e.g. ``"a redis:// rate_limit_storage"``.
    Imported with ``__import__`` so the packages are loaded once, where they
    would be loaded anyway a moment later (the storage, the store or the bus
    that the engine builds from the same settings).
    """
    for module in EXTRA_MODULES[extra]:
        try:
            __import__(module)
        except ImportError as exc:
            raise ConfigError(
                field,
                f"{what} needs the {module} package, which cannot be imported here "
                f'({_reason(exc)}): pip install "m2m-middleware[{extra}]"',
            ) from None


def require_jose(field: str) -> None:
    """joserfc is a dependency of the package itself: missing, the install is broken."""
    try:
        for module in ("joserfc.jwk", "joserfc.jws"):
            __import__(module)
    except ImportError as exc:
        raise ConfigError(
            field,
            "accepting JWTs needs joserfc, a dependency of m2m-middleware that cannot be "
            f'imported here ({_reason(exc)}): pip install "m2m-middleware"',
        ) from None


def _reason(exc: ImportError) -> str:
    """The import's own words, on one line: which module, or what broke inside it."""
    return " ".join(str(exc).split())[:200] or type(exc).__name__
