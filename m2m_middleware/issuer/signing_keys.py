"""The issuer's signing keys: made, sealed, published, rotated and retired.

A key's life, in the times each row carries:

- ``publish_from``: it is in :meth:`SigningKeys.public_jwks` from then on;
- ``signs_from``: it signs from then on, ``jwks_max_age`` plus ``refresh_interval``
  after it was published: another instance may publish it up to a refresh
  later than the one that made it, and a verifier that cached that instance's
  JWKS just before keeps its copy for a whole ``max-age``; so every verifier
  has refetched a copy holding it, from any instance, before the first token
  it signs can reach them;
- ``retire_after``: set when a successor is made, to the successor's
  ``signs_from`` plus ``refresh_interval`` (an instance that has not reread the
  rows yet still signs with this key), ``token_ttl`` and ``clock_skew``: the
  last token this key can sign has expired by then, so it leaves the JWKS.

The current signing key is a pure function of the rows and the time (the
latest ``signs_from`` that has arrived, the kid breaking ties), so every
instance reading the same database agrees on it with no coordination. Each
instance rereads the rows every ``refresh_interval`` seconds; that is shorter
than ``jwks_max_age``, so an instance sees a key another one made before the
key starts to sign.

The one exception to "published before it signs" is the first key of a
database: there was no JWKS with our keys before it, and a verifier that meets
an unknown ``kid`` refetches the JWKS (this package's own does). Instances
that start on a new database together may each make a first key; the one that
did rereads the rows on every call for a refresh interval after, so all of
them publish every first key and agree on the signer from their next request.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from ..errors import ConfigError
from ..extras import require_extra
from ..stores.base import KeyStore
from .tables import SigningKeyTable, StoredSigningKey, table_for

logger = logging.getLogger("m2m_middleware")

ALGORITHMS = ("ES256", "EdDSA", "RS256")
#: What ``GET /.well-known/jwks.json`` will say in ``Cache-Control: max-age``.
DEFAULT_JWKS_MAX_AGE = 300
SECRET_ENVIRONMENT_VARIABLE = "M2M_SIGNING_SECRET"  # noqa: S105 (a name, not a secret)

_Key = ECKey | OKPKey | RSAKey


def _quiet_registry() -> JWSRegistry:
    # RFC 9864 deprecates "EdDSA" for "Ed25519", and joserfc warns on every use;
    # the contract names "EdDSA" because it is what verifiers know today (PyJWT,
    # jose libraries, identity providers' JWKS). The same algorithm, unwarned.
    registry = JWSRegistry(algorithms=list(ALGORITHMS))
    quiet = copy.copy(JWSRegistry.algorithms["EdDSA"])
    quiet.security_warning = None
    registry.algorithms = {**JWSRegistry.algorithms, "EdDSA": quiet}
    return registry


_REGISTRY = _quiet_registry()


def _generate(algorithm: str) -> _Key:
    if algorithm == "ES256":
        return ECKey.generate_key("P-256")
    if algorithm == "EdDSA":
        return OKPKey.generate_key("Ed25519")
    if algorithm == "RS256":
        return RSAKey.generate_key(3072)  # NIST SP 800-57: 2048 is good only to 2030
    raise ConfigError("signing_algorithm", f"expected one of {', '.join(ALGORITHMS)}")


_KEY_TYPES: Mapping[str, type[_Key]] = {"ES256": ECKey, "EdDSA": OKPKey, "RS256": RSAKey}


@dataclass(frozen=True, slots=True)
class SigningKeyInfo:
    """What ``list_keys`` shows of a key: never its private half."""

    kid: str
    algorithm: str
    state: str  # "pending" (published, not yet signing), "signing", "published", "retired"
    created_at: datetime
    publish_from: datetime
    signs_from: datetime
    retire_after: datetime | None

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "kid": self.kid,
            "algorithm": self.algorithm,
            "state": self.state,
            "created_at": iso(self.created_at),
            "publish_from": iso(self.publish_from),
            "signs_from": iso(self.signs_from),
            "retire_after": iso(self.retire_after),
        }


class SigningKey:
    """A key that signs: its kid, algorithm and private key (kept out of every repr)."""

    __slots__ = ("_key", "algorithm", "kid")

    def __init__(self, kid: str, algorithm: str, key: _Key) -> None:
        self.kid = kid
        self.algorithm = algorithm
        self._key = key

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r})"

    def sign(self, claims: Mapping[str, Any], *, typ: str = "at+jwt") -> str:
        """A compact JWS of ``claims`` with ``alg``, ``kid`` and ``typ`` in its header."""
        header = {"alg": self.algorithm, "kid": self.kid, "typ": typ}
        return jwt.encode(header, dict(claims), self._key, registry=_REGISTRY)


class SigningKeys:
    """The signing keys kept in ``store``'s database, sealed under ``secret``.

    ``clock`` returns Unix seconds (injected in tests). Build it through
    :func:`signing_keys_for` from :class:`~m2m_middleware.Settings`.
    ``secret`` None makes a reader: it lists and publishes keys, and refuses to
    sign or rotate with the ConfigError that says how to set the secret.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        secret: str | None,
        algorithm: str = "ES256",
        token_ttl: int = 300,
        jwks_max_age: int = DEFAULT_JWKS_MAX_AGE,
        clock_skew: int = 60,
        refresh_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        require_extra("signing_key_secret", "the token issuer", "issuer")
        from .sealing import check_secret  # cryptography: the issuer extra

        # None: a reader only (``m2m signing-keys list``, a JWKS), which never
        # needs a private key; signing or rotating then asks for the secret.
        self._secret = None if secret is None else check_secret(secret)
        if algorithm not in ALGORITHMS:
            raise ConfigError("signing_algorithm", f"expected one of {', '.join(ALGORITHMS)}")
        if not 0 <= refresh_interval < jwks_max_age:
            raise ValueError("refresh_interval must be shorter than jwks_max_age")
        self.store = store
        self.algorithm = algorithm
        self.token_ttl = token_ttl
        self.jwks_max_age = jwks_max_age
        self.clock_skew = clock_skew
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._table: SigningKeyTable = table_for(store)
        self._lock = threading.Lock()
        self._rows: list[StoredSigningKey] | None = None
        self._read_at = 0.0
        #: Until then (clock seconds) every read goes to the table: set when this
        #: instance made a database's first key, as another may have at the same moment.
        self._unsettled_until = -math.inf
        self._unsealed: dict[str, SigningKey] = {}

    def __repr__(self) -> str:
        return f"SigningKeys(store={self.store!r}, algorithm={self.algorithm!r})"

    @property
    def clock(self) -> Callable[[], float]:
        """Unix seconds now, as these keys see it: which key signs is decided on this
        clock, so the times in the tokens it signs are read from it too."""
        return self._clock

    # -- reading ----------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), timezone.utc)

    def _current_rows(self, *, fresh: bool = False) -> list[StoredSigningKey]:
        now = self._clock()
        with self._lock:
            rows = self._rows
            settled = now >= self._unsettled_until
            if (
                rows is not None
                and not fresh
                and settled
                and now - self._read_at < self.refresh_interval
            ):
                return rows
        rows = self._table.rows()
        with self._lock:
            self._rows, self._read_at = rows, now
        return rows

    @staticmethod
    def _retired(row: StoredSigningKey, now: datetime) -> bool:
        return row.retire_after is not None and row.retire_after <= now

    @classmethod
    def _signing_row(cls, rows: list[StoredSigningKey], now: datetime) -> StoredSigningKey | None:
        signing = [r for r in rows if r.signs_from <= now and not cls._retired(r, now)]
        return max(signing, key=lambda r: (r.signs_from, r.kid), default=None)

    def _state(self, row: StoredSigningKey, current: StoredSigningKey | None, now: datetime) -> str:
        if self._retired(row, now):
            return "retired"
        if current is not None and row.kid == current.kid:
            return "signing"
        if row.signs_from > now:
            return "pending"
        return "published"

    def list_keys(self) -> list[SigningKeyInfo]:
        """Every key in the store, oldest first, with its state now."""
        now = self._now()
        rows = sorted(self._current_rows(fresh=True), key=lambda r: (r.created_at, r.kid))
        current = self._signing_row(rows, now)
        return [
            SigningKeyInfo(
                kid=r.kid,
                algorithm=r.algorithm,
                state=self._state(r, current, now),
                created_at=r.created_at,
                publish_from=r.publish_from,
                signs_from=r.signs_from,
                retire_after=r.retire_after,
            )
            for r in rows
        ]

    def public_jwks(self, *, fresh: bool = False) -> dict[str, list[dict[str, Any]]]:
        """The JWKS to publish: every key published and not retired, public halves only.

        ``fresh`` rereads the store now rather than within ``refresh_interval``
        (the engine's verifier does, on its own schedule: see own_tokens.py).
        """
        now = self._now()
        published = sorted(
            (
                r
                for r in self._current_rows(fresh=fresh)
                if r.publish_from <= now and not self._retired(r, now)
            ),
            key=lambda r: (r.signs_from, r.kid),
        )
        return {"keys": [dict(r.public_jwk) for r in published]}

    def current_signing_key(self) -> SigningKey:
        """The key to sign with now; the first one is made here if the store has none."""
        now = self._now()
        row = self._signing_row(self._current_rows(), now)
        if row is None:
            row = self._signing_row(self._current_rows(fresh=True), now)
        if row is None:
            # No key signs: a new database. Its first key signs at once (see the module doc).
            # Another instance may be making one too (nothing locks "no key" to the
            # insert): until a refresh interval has passed, every request rereads the
            # rows, so both publish both keys and agree on the signer from the next
            # request on, instead of disagreeing for a whole refresh_interval.
            self._insert(now, signs_from=now)
            self._unsettled_until = self._clock() + self.refresh_interval
            row = self._signing_row(self._current_rows(fresh=True), now)
            assert row is not None
        return self._unseal(row)

    def _unseal(self, row: StoredSigningKey) -> SigningKey:
        held = self._unsealed.get(row.kid)
        if held is not None:
            return held
        from .sealing import check_secret, unseal

        pem = unseal(
            check_secret(self._secret), row.sealed_private_key, kid=row.kid, algorithm=row.algorithm
        )
        key_type = _KEY_TYPES.get(row.algorithm)
        if key_type is None:
            raise ConfigError(
                "signing_algorithm", f"signing key {row.kid!r} has an unknown algorithm"
            )
        key = SigningKey(row.kid, row.algorithm, key_type.import_key(pem))
        self._unsealed[row.kid] = key
        return key

    # -- writing ----------------------------------------------------------------

    def _insert(self, now: datetime, *, signs_from: datetime) -> StoredSigningKey:
        from .sealing import check_secret, seal

        secret = check_secret(self._secret)
        key = _generate(self.algorithm)
        kid = key.thumbprint()  # RFC 7638: the same key always has the same kid
        public = {**key.as_dict(private=False), "kid": kid, "alg": self.algorithm, "use": "sig"}
        pem = key.as_pem(private=True)
        row = StoredSigningKey(
            kid=kid,
            algorithm=self.algorithm,
            public_jwk=json.loads(json.dumps(public)),
            sealed_private_key=seal(secret, pem, kid=kid, algorithm=self.algorithm),
            created_at=now,
            publish_from=now,
            signs_from=signs_from,
        )
        self._table.insert(row)
        with self._lock:
            self._unsealed[kid] = SigningKey(kid, self.algorithm, key)
        logger.info("signing key %s (%s) made; it signs from %s", kid, self.algorithm, signs_from)
        return row

    def rotate(self) -> SigningKeyInfo:
        """Make a new key: published now, signing after ``jwks_max_age``; the keys
        before it retire once the last token they can sign has expired."""
        now = self._now()
        rows = self._current_rows(fresh=True)
        live = [r for r in rows if not self._retired(r, now)]
        first = not live
        if live:
            # A wrong secret must fail here, not seal the new key under a second
            # secret that no instance configured with the right one could open.
            self._unseal(max(live, key=lambda r: (r.created_at, r.kid)))
        # Published by every instance within a refresh, then cached for a max-age.
        wait = self.jwks_max_age + self.refresh_interval
        signs_from = now if first else now + timedelta(seconds=wait)
        row = self._insert(now, signs_from=signs_from)
        last_signature = signs_from + timedelta(seconds=self.refresh_interval)
        retire_after = last_signature + timedelta(seconds=self.token_ttl + self.clock_skew)
        self._table.retire_before(signs_from, retire_after)
        self._current_rows(fresh=True)
        return next(info for info in self.list_keys() if info.kid == row.kid)


def signing_keys_for(
    settings: Any,
    *,
    store: KeyStore | None = None,
    clock: Callable[[], float] = time.time,
) -> SigningKeys:
    """The signing keys :class:`~m2m_middleware.Settings` describe.

    The secret is ``settings.signing_key_secret``, else ``$M2M_SIGNING_SECRET``;
    with neither, a ConfigError naming ``signing_key_secret``. Read here, when
    the issuer is asked for, never when settings are built for API keys alone.
    ``store`` is the engine's own store object, when it has one open already.
    A change of ``signing_algorithm`` applies from the next rotation on.
    """
    from ..stores import open_key_store

    secret = settings.signing_key_secret
    if secret is None:
        secret = os.environ.get(SECRET_ENVIRONMENT_VARIABLE)
    require_extra("signing_key_secret", "the token issuer", "issuer")
    from .sealing import check_secret

    checked = check_secret(secret)
    if store is None:
        store = open_key_store(settings.key_store, prefix=settings.key_prefix)
    return SigningKeys(
        store,
        secret=checked,
        algorithm=settings.signing_algorithm,
        token_ttl=settings.token_ttl,
        # A new key waits the max-age the JWKS is served with before it signs.
        jwks_max_age=settings.jwks_max_age,
        clock=clock,
    )
