"""Key stores by URL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import keys as keyformat
from ..errors import ConfigError
from ..redaction import redact_url
from .base import IssuedKey, KeyRecord, KeyStore
from .memory import MemoryKeyStore
from .sqlite import SQLiteKeyStore

if TYPE_CHECKING:  # imported on first use instead: see __getattr__ below
    from .postgres import PostgresKeyStore as PostgresKeyStore

__all__ = [
    "IssuedKey",
    "KeyRecord",
    "KeyStore",
    "MemoryKeyStore",
    "SQLiteKeyStore",
    "open_key_store",
]


def open_key_store(
    url: str | KeyStore,
    *,
    prefix: str = keyformat.DEFAULT_PREFIX,
    timeout: float | None = None,
) -> KeyStore:
    """Open ``memory://``, ``sqlite:///relative.db``, ``sqlite:////absolute.db``
    or ``postgresql://user:password@host:port/dbname`` (also ``postgres://``);
    in a Django project with ``"m2m_middleware.django"`` installed, ``django://``
    (the ``default`` database) or ``django://<alias>``.

    ``prefix`` is the prefix of the keys the opened store issues. A ``KeyStore``
    object passed in is returned as it is, keeping its own prefix.
    ``timeout`` bounds each step of a PostgreSQL call (default 2 seconds), so
    that an unreachable server counts as an outage instead of a hang; SQLite
    waits for its file lock on its own terms, and memory never waits.
    """
    if isinstance(url, KeyStore):
        return url
    if not isinstance(url, str):
        raise ConfigError("key_store", f"expected a URL or a KeyStore, got {type(url).__name__}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryKeyStore(prefix=prefix)
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(
                "key_store",
                f"{redact_url(url)!r}: write sqlite:///relative.db or sqlite:////absolute.db",
            )
        return SQLiteKeyStore(path, prefix=prefix)
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresKeyStore
        except ImportError as exc:
            raise ConfigError(
                "key_store",
                'the PostgreSQL key store needs psycopg 3: pip install "m2m-middleware[postgres]"',
            ) from exc
        if timeout is None:
            return PostgresKeyStore(url, prefix=prefix)
        return PostgresKeyStore(url, prefix=prefix, timeout=timeout)
    if scheme == "django":
        try:
            from ..django.store import store_from_url
        except ImportError as exc:
            raise ConfigError(
                "key_store",
                'the django:// key store needs Django: pip install "m2m-middleware[django]"',
            ) from exc
        return store_from_url(url, prefix=prefix)  # the project's DATABASES, via the ORM
    try:
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname or ''}" if parts.scheme else ""
    except ValueError:  # "http://[::1", say: no host to name
        shown = ""
    # Without a scheme (a libpq keyword DSN, a bare path) there is no host to
    # name: the start of the text, with any password in it masked.
    shown = shown or redact_url(url)[:40]
    raise ConfigError(
        "key_store",
        f"unsupported key-store URL {shown!r}: use memory://, sqlite:///path.db or "
        "postgresql://...",
    )


def __getattr__(name: str) -> Any:
    # PostgresKeyStore is imported on first use, so that importing the package
    # never needs psycopg (an optional extra).
    if name == "PostgresKeyStore":
        from .postgres import PostgresKeyStore

        return PostgresKeyStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
