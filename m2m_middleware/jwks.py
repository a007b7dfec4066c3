"""A JWKS endpoint, fetched once and cached.

- The key set is kept for the endpoint's ``Cache-Control: max-age``, held
  within :data:`MIN_TTL` .. :data:`MAX_TTL` (:data:`DEFAULT_TTL` without one).
- A token whose ``kid`` is unknown may trigger a refetch, at most one per
  ``refetch_interval``: a flood of forged ``kid`` values costs the identity
  provider one request per interval, not one per token.
- When the endpoint fails, the last good key set keeps serving; the outage
  and the recovery are each logged once.
- The URL comes from settings only, never from a token (``jku``, ``x5u``).

:meth:`JWKSClient.refresh` blocks (plain ``urllib`` with a timeout); the
engine's async path runs it in a worker thread, so it never blocks the loop.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.request
from collections.abc import Callable
from time import monotonic
from typing import Any

from .jwtkeys import KeyRing, import_jwk
from .redaction import redact, redact_url, secrets_of

logger = logging.getLogger("m2m_middleware")

DEFAULT_TTL = 600.0
MIN_TTL = 60.0
MAX_TTL = 86400.0
#: A JWKS document larger than this is refused: real ones are a few kB.
MAX_BYTES = 1 << 20
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

Fetcher = Callable[[str, float], tuple[bytes, str | None]]


def http_fetch(url: str, timeout: float) -> tuple[bytes, str | None]:
    """GET ``url``: the body and its ``Cache-Control`` header. Raises OSError on failure."""
    request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked in settings
        url, headers={"Accept": "application/json", "User-Agent": "m2m-middleware"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        body = response.read(MAX_BYTES + 1)
        if len(body) > MAX_BYTES:
            raise OSError(f"the key set is larger than {MAX_BYTES} bytes")
        return body, response.headers.get("Cache-Control")


def cache_seconds(cache_control: str | None) -> float:
    """How long to keep a key set, from its ``Cache-Control`` header."""
    if cache_control:
        if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
            return MIN_TTL
        found = _MAX_AGE.search(cache_control)
        if found:
            return min(max(float(found.group(1)), MIN_TTL), MAX_TTL)
    return DEFAULT_TTL


def parse_key_set(body: bytes) -> KeyRing:
    """A JWKS document -> its usable verification keys. Raises ValueError if it is not one."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the key set is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the key set is not a JSON object with a 'keys' list")
    keys = [key for key in map(import_jwk, document["keys"]) if key is not None]
    if not keys:
        # An outage or a misconfiguration upstream, not a reason to refuse
        # every token: the last good key set keeps serving.
        raise ValueError("the key set holds no usable verification key")
    return KeyRing(keys)


class JWKSClient:
    """The cached key set of one JWKS URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 3.0,
        refetch_interval: float = 30.0,
        fetch: Fetcher = http_fetch,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.url = url
        #: The URL as logs and diagnostics show it: a token in its query masked.
        self.shown_url = redact_url(url)
        self._secrets = secrets_of(url)
        self.timeout = timeout
        self.refetch_interval = refetch_interval
        self.fetch = fetch
        self.clock = clock
        #: The last good key set, or None before the first successful fetch.
        self.ring: KeyRing | None = None
        self.fetches = 0
        self._fresh_until = -1.0
        # Fetches that are not the scheduled refresh (an unknown kid, a retry
        # after a failure) wait until this monotonic time.
        self._hold_until = -1.0
        self._failing = False
        self._lock = threading.Lock()

    def due(self, kid: str | None) -> bool:
        """Whether a token with this ``kid`` should make us fetch before verifying it."""
        now = self.clock()
        ring = self.ring
        if ring is not None and now < self._fresh_until:
            if ring.knows(kid):
                return False
            return now >= self._hold_until  # unknown kid: at most once per interval
        return now >= self._hold_until  # stale or never fetched; after a failure, wait

    def refresh(self, kid: str | None = None) -> None:
        """Fetch the key set if it is still :meth:`due` (blocks; never raises)."""
        with self._lock:
            if not self.due(kid):  # another thread fetched it meanwhile
                return
            unknown_kid = self.ring is not None and self.clock() < self._fresh_until
            self.fetches += 1
            try:
                body, cache_control = self.fetch(self.url, self.timeout)
                ring = parse_key_set(body)
            except Exception as exc:  # any failure (HTTP, JSON, a library): keep the last set
                self._hold_until = self.clock() + self.refetch_interval
                if not self._failing:
                    self._failing = True
                    logger.error(
                        "JWKS %s cannot be fetched: %s",
                        self.shown_url,
                        redact(str(exc), self._secrets),
                    )
                return
            now = self.clock()
            self.ring = ring
            self._fresh_until = now + cache_seconds(cache_control)
            if unknown_kid:
                self._hold_until = now + self.refetch_interval
            if self._failing:
                self._failing = False
                logger.warning("JWKS %s fetched again", self.shown_url)

    def snapshot(self) -> dict[str, Any]:
        """For diagnostics: how many fetches, how many keys."""
        return {
            "url": self.shown_url,
            "fetches": self.fetches,
            "keys": len(self.ring.keys) if self.ring is not None else None,
        }
