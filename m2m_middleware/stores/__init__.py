"""Key stores by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from .. import keys as keyformat
from ..errors import ConfigError
from .base import IssuedKey, KeyRecord, KeyStore
from .memory import MemoryKeyStore
from .sqlite import SQLiteKeyStore

__all__ = [
    "IssuedKey",
    "KeyRecord",
    "KeyStore",
    "MemoryKeyStore",
    "SQLiteKeyStore",
    "open_key_store",
]


def open_key_store(url: str | KeyStore, *, prefix: str = keyformat.DEFAULT_PREFIX) -> KeyStore:
    """Open ``memory://``, ``sqlite:///relative.db`` or ``sqlite:////absolute.db``.

    ``prefix`` is the prefix of the keys the opened store issues. A ``KeyStore``
    object passed in is returned as it is, keeping its own prefix.
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
                "key_store", f"{url!r}: write sqlite:///relative.db or sqlite:////absolute.db"
            )
        return SQLiteKeyStore(path, prefix=prefix)
    if scheme in ("postgresql", "postgres"):
        raise ConfigError(
            "key_store", "the PostgreSQL key store is not available in this release yet"
        )
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname or ''}" if parts.scheme else url[:40]
    raise ConfigError(
        "key_store",
        f"unsupported key-store URL {shown!r}: use memory://, sqlite:///path.db",
    )
