"""Our own issuer's tokens, as the engine verifies them: keys from the store, RFC 9068 rules.

The verifier (:class:`~m2m_middleware.tokens.TokenVerifier`) parses every
token the same strict way (RFC 8725) and hands those whose ``kid`` names one of
our signing keys to :class:`OwnTokens`, which says what else they must be:

- ``alg`` one of our published keys' algorithms (whatever ``jwt_algorithms``
  allows for an identity provider's tokens), checked by that key only;
- ``typ`` ``at+jwt``; ``iss`` exactly ``token_issuer``; ``aud`` containing
  ``token_audience``; ``exp`` present; ``client_id`` and ``key_id`` (the API
  key the token was exchanged for) non-empty strings.

The public keys are :meth:`SigningKeys.public_jwks`, read from the key store
(no HTTP fetch): again every ``refresh_interval`` seconds, and for a ``kid``
that no key set holds at most once per :data:`OWN_KEY_REREAD_INTERVAL`, so
that a key another instance has just made is found, and a forged ``kid`` costs
no store read per request. A read that is due runs once (single-flight): the
requests that cannot do without it wait for that one; the others go on with
the keys already read. Whether the key a token came from is still good is the
engine's to say (``Engine._own_token``), from its cache of key states.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import monotonic
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from joserfc.jws import JWSRegistry

from ..client import Client
from ..errors import ConfigError, InvalidToken, KeyStoreError, TemporarilyUnavailable
from ..jwtkeys import Key, KeyRing, import_jwk
from ..redaction import redact
from ..tokens import (
    VerifiedToken,
    algorithm_refused,
    check_audience,
    check_issuer,
    check_times,
    media_type,
    scopes_of,
    text_claim,
)

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tokens import _Parsed
    from .signing_keys import SigningKeys

logger = logging.getLogger("m2m_middleware")

#: The ``typ`` of every token we issue (RFC 9068 section 2.1).
TOKEN_TYPE = "at+jwt"  # noqa: S105 (a media type, not a secret)
#: Seconds between two rereads of our signing keys for a ``kid`` no key set holds.
#: Short, so a key another instance made just now is found on its first token
#: (only a new database's first key signs unpublished: see signing_keys.py);
#: not zero, so forged ``kid`` values cost one store read per interval in all.
OWN_KEY_REREAD_INTERVAL = 2.0
#: What a ``key_id`` claim may hold: the shape of our key ids, with room to spare.
#: It names a row in the key store, so no control character or lone surrogate
#: ever reaches a database driver.
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class _KeySet:
    """One read of our published keys: the ring, and joserfc's algorithm for each ``alg``."""

    ring: KeyRing
    models: Mapping[str, Any]

    @classmethod
    def of(cls, keys: list[Key]) -> _KeySet:
        algorithms = {key.alg for key in keys if isinstance(key.alg, str)}
        # Straight from joserfc's algorithm table: its registry lookup would
        # warn about "EdDSA" (RFC 9864 names it "Ed25519") on every token.
        return cls(KeyRing(keys), {alg: JWSRegistry.algorithms[alg] for alg in algorithms})


_NO_KEYS = _KeySet(KeyRing(()), {})


class OwnTokens:
    """The rules and keys for tokens our own issuer signed (see the module doc)."""

    def __init__(
        self,
        signing_keys: SigningKeys,
        settings: Settings,
        *,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if settings.token_issuer is None:  # Settings require it with token_endpoint
            raise ConfigError("token_issuer", "our own tokens need the issuer (iss) they carry")
        self.signing_keys = signing_keys
        self.issuer: str = settings.token_issuer
        self.audience = frozenset({settings.token_audience or settings.token_issuer})
        self.leeway = float(settings.jwt_leeway)
        #: Monotonic seconds; replaceable, so tests advance time instead of sleeping.
        self.clock = clock
        self.refresh_interval = signing_keys.refresh_interval
        #: Our published keys, swapped whole on each read (None until the first
        #: read succeeds), so no token sees the ring of one read and the
        #: algorithms of another.
        self._keys: _KeySet | None = None
        self._next_refresh = 0.0
        self._next_reread = 0.0
        self._flight: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()
        self._down = False

    def __repr__(self) -> str:
        return f"OwnTokens(issuer={self.issuer!r}, kids={sorted(self.ring.by_kid)!r})"

    @property
    def ring(self) -> KeyRing:
        keys = self._keys
        return _NO_KEYS.ring if keys is None else keys.ring

    # -- keys -------------------------------------------------------------------

    def prepare(self, unknown_kid: str | None) -> None:
        """Read our keys now if they are due (or this ``kid`` may be a new one of ours)."""
        flight, mine = self._start(unknown_kid)
        if flight is not None:
            if mine:
                self._read(flight)
            else:
                flight.result()  # another thread's read, never longer than the store's timeout

    async def aprepare(self, unknown_kid: str | None) -> None:
        """:meth:`prepare` for the event loop: a blocking store reads in a thread."""
        flight, mine = self._start(unknown_kid)
        if flight is not None:
            if not mine:
                await asyncio.wrap_future(flight)
            elif self.signing_keys.store.blocking:
                await self.signing_keys.store.run_blocking(self._read, flight)
            else:
                self._read(flight)

    def _start(
        self, unknown_kid: str | None
    ) -> tuple[concurrent.futures.Future[None] | None, bool]:
        """The read to wait for, if any, and whether this caller is to run it.

        A request whose token names a known ``kid`` never waits for a read
        another request runs; one that needs the keys (none read yet, or its
        ``kid`` unknown) waits for the read in flight rather than start a second.
        """
        now = self.clock()
        needed = unknown_kid is not None or self._keys is None
        if (
            self._flight is None
            and now < self._next_refresh
            and not (needed and now >= self._next_reread)
        ):
            return None, False  # the hot path: one clock read, no lock
        with self._lock:
            flight = self._flight
            if flight is not None:
                return (flight if needed else None), False
            due = now >= self._next_refresh
            if not due and not (needed and now >= self._next_reread):
                return None, False
            self._next_refresh = now + self.refresh_interval
            self._next_reread = now + OWN_KEY_REREAD_INTERVAL
            flight = self._flight = concurrent.futures.Future()
        return flight, True

    def _read(self, flight: concurrent.futures.Future[None]) -> None:
        """One read of our published keys; never raises (an outage keeps the keys we had)."""
        try:
            jwks = self.signing_keys.public_jwks(fresh=True)
        except KeyStoreError as exc:
            if not self._down:
                self._down = True
                logger.error(
                    "cannot read the token issuer's signing keys: %s; "
                    "tokens are checked against the keys read before",
                    redact(str(exc)),
                )
        except Exception as exc:  # defence in depth: a 401 or 503 later, never a 500
            logger.error("cannot read the token issuer's signing keys (%s)", type(exc).__name__)
        else:
            self._install(jwks.get("keys", []))
            if self._down:
                self._down = False
                logger.warning("the token issuer's signing keys can be read again")
        finally:
            with self._lock:
                self._flight = None
            flight.set_result(None)

    def _install(self, jwks: list[Any]) -> None:
        keys: list[Key] = [key for key in map(import_jwk, jwks) if key is not None]
        self._keys = _KeySet.of(keys)

    def _current(self) -> _KeySet:
        keys = self._keys
        if keys is None:  # never read: a token of ours cannot be judged, only refused for now
            raise TemporarilyUnavailable(
                "the token issuer's signing keys cannot be read; try again shortly"
            )
        return keys

    # -- rules ------------------------------------------------------------------

    def admit(self, parsed: _Parsed) -> _Parsed:
        """The header rules of our tokens: one of our algorithms, a ``kid``, ``typ: at+jwt``."""
        if parsed.kid is None:  # ours always name theirs
            raise InvalidToken("the token names no key (kid)")
        algorithms = self._current().models.keys()
        if parsed.alg not in algorithms:
            raise InvalidToken(algorithm_refused(frozenset(algorithms)))
        typ = parsed.header.get("typ")
        if not isinstance(typ, str) or media_type(typ) != TOKEN_TYPE:
            raise InvalidToken(f"the token's type (typ) must be {TOKEN_TYPE}")
        return parsed

    def candidates(self, kid: str | None, alg: str) -> tuple[list[Key], Any]:
        """The keys that may verify the token, and joserfc's algorithm to verify with."""
        keys = self._current()
        model = keys.models.get(alg)
        found = keys.ring.candidates(kid, alg) if kid is not None and model is not None else []
        if not found:
            raise InvalidToken("no key with the token's kid can verify it")
        return found, model

    def check_claims(self, claims: dict[str, Any], now: float) -> VerifiedToken:
        exp = check_times(claims, now, self.leeway)
        check_issuer(claims, self.issuer)
        check_audience(claims, self.audience)  # required: ours is never empty
        client_id = text_claim(claims, "client_id")
        key_id = claims.get("key_id")
        if key_id is None:
            raise InvalidToken("the token names no API key (key_id)")
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise InvalidToken("the token's key_id claim is not a key id")
        tier = claims.get("tier")
        if tier is not None and not isinstance(tier, str):
            raise InvalidToken("the token's tier claim is not a string")
        client = Client(
            client_id=client_id,
            scheme="jwt",
            scopes=scopes_of(claims),
            tier=tier,
            key_id=key_id,
            claims=MappingProxyType(claims),
        )
        return VerifiedToken(client, exp + self.leeway)
