"""What every key store offers, and the records it hands out."""

from __future__ import annotations

import abc
import asyncio
import atexit
import hmac
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .. import keys as keyformat
from ..client_keys import check_allowed_cidrs, check_signing_public_key
from ..errors import KeyNotFound, UnreadableRow
from ..redaction import redact
from ..syntax import check_client_id, check_scope, check_tier
from ..transport import normalised_cidrs

if TYPE_CHECKING:
    from ..telemetry.records import Alert, UsageRow

logger = logging.getLogger("m2m_middleware")

#: Key ids whose unreadable row was logged, per store: each is logged once,
#: and a flood of bad rows cannot grow the set past this.
_REPORTED_ROWS = 1024

_P = ParamSpec("_P")
_T = TypeVar("_T")
_R = TypeVar("_R")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything stored about a key except the key itself."""

    key_id: str
    client_id: str
    name: str | None = None
    scopes: frozenset[str] = frozenset()
    tier: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    remaining_uses: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    last_used_at: datetime | None = None
    #: Networks (canonical CIDR text) the key may be used from; empty: anywhere.
    allowed_cidrs: tuple[str, ...] = ()
    #: The client's PEM public key (Ed25519 or P-256) for request signatures, if any.
    signing_public_key: str | None = None

    def status(self, now: datetime | None = None) -> str:
        """``"active"``, ``"revoked"``, ``"expired"`` or ``"used_up"`` (no uses left)."""
        now = now or utcnow()
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.remaining_uses is not None and self.remaining_uses <= 0:
            return "used_up"
        return "active"

    def is_active(self, now: datetime | None = None) -> bool:
        return self.status(now) == "active"

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "key_id": self.key_id,
            "client_id": self.client_id,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "tier": self.tier,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "remaining_uses": self.remaining_uses,
            "metadata": dict(self.metadata),
            "last_used_at": iso(self.last_used_at),
            "allowed_cidrs": list(self.allowed_cidrs),
            "signing_public_key": self.signing_public_key,
        }


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly made key. ``key`` is the plaintext: shown this once, stored nowhere."""

    key: str
    record: KeyRecord

    @property
    def key_id(self) -> str:
        return self.record.key_id

    def __repr__(self) -> str:  # never let the plaintext reach a log by accident
        return f"IssuedKey(key='***', record={self.record!r})"


def encode_metadata(metadata: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(metadata or {}), sort_keys=True, separators=(",", ":"))


def read_metadata(key_id: str, text: object) -> object:
    """A metadata column's JSON text, decoded; UnreadableRow if it is not JSON."""
    if text is None or text == "":
        return None
    if not isinstance(text, (str, bytes)):
        raise UnreadableRow(key_id, "metadata is not JSON text")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, too deep
        raise UnreadableRow(key_id, "metadata is not valid JSON") from None


def _aware(key_id: str, column: str, value: object, *, required: bool = False) -> datetime | None:
    if value is None and not required:
        return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise UnreadableRow(key_id, f"{column} is not a time")
    return value


def _optional_text(key_id: str, column: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UnreadableRow(key_id, f"{column} is not text")
    return value


def each_record(
    rows: Iterable[_R], read: Callable[[_R], KeyRecord]
) -> list[KeyRecord | UnreadableRow]:
    """``read`` of every row, an unreadable one as its :class:`UnreadableRow`: a
    listing shows the rest (and says which it skipped) instead of failing whole."""
    found: list[KeyRecord | UnreadableRow] = []
    for row in rows:
        try:
            found.append(read(row))
        except UnreadableRow as bad:
            found.append(bad)
    return found


def checked_record(
    *,
    key_id: object,
    client_id: object,
    name: object,
    scopes: object,
    tier: object,
    created_at: object,
    expires_at: object,
    revoked_at: object,
    remaining_uses: object,
    metadata: object,
    last_used_at: object,
    allowed_cidrs: object = None,
    signing_public_key: object = None,
) -> KeyRecord:
    """A :class:`KeyRecord` from one row's values, each checked for its type.

    A row written by hand or by other software may hold a text where a time
    belongs, a NULL where a value must be, or metadata that is no JSON object.
    Such a row raises :class:`UnreadableRow` here, once, instead of a
    ``TypeError`` somewhere in a request (a 500). Times must be aware
    datetimes (each store converts its own column format first); scopes a
    collection of scope strings; metadata a JSON object (or NULL: none).
    """
    if not isinstance(key_id, str) or not key_id:
        raise UnreadableRow(repr(key_id), "key_id is not a non-empty text")
    if not isinstance(client_id, str) or not client_id:
        raise UnreadableRow(key_id, "client_id is not a non-empty text")
    if isinstance(scopes, (str, bytes)) or not isinstance(scopes, Iterable):
        raise UnreadableRow(key_id, "scopes is not a list of scopes")
    try:
        scope_set = frozenset(scopes)
    except TypeError:  # an unhashable element
        raise UnreadableRow(key_id, "scopes holds a value that is no scope") from None
    for scope in scope_set:
        if (
            not isinstance(scope, str)
            or not scope
            or not scope.isprintable()
            or any(ch.isspace() for ch in scope)
        ):
            raise UnreadableRow(key_id, "scopes holds a value that is no scope")
    if remaining_uses is not None and (
        isinstance(remaining_uses, bool) or not isinstance(remaining_uses, int)
    ):
        raise UnreadableRow(key_id, "remaining_uses is not a whole number")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise UnreadableRow(key_id, "metadata is not a JSON object")
    created = _aware(key_id, "created_at", created_at, required=True)
    assert created is not None
    return KeyRecord(
        key_id=key_id,
        client_id=client_id,
        name=_optional_text(key_id, "name", name),
        scopes=scope_set,
        tier=_optional_text(key_id, "tier", tier),
        created_at=created,
        expires_at=_aware(key_id, "expires_at", expires_at),
        revoked_at=_aware(key_id, "revoked_at", revoked_at),
        remaining_uses=remaining_uses,
        metadata=MappingProxyType(dict(metadata)),
        last_used_at=_aware(key_id, "last_used_at", last_used_at),
        allowed_cidrs=_cidr_tuple(key_id, allowed_cidrs),
        signing_public_key=_optional_text(key_id, "signing_public_key", signing_public_key),
    )


def _cidr_tuple(key_id: str, value: object) -> tuple[str, ...]:
    """A row's allowed_cidrs: a list of CIDR texts (a JSON text in SQL stores)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = read_metadata(key_id, value)  # JSON text; same checks as metadata
        if value is None:
            return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UnreadableRow(key_id, "allowed_cidrs is not a list of networks")
    try:
        return normalised_cidrs(value)
    except ValueError:
        raise UnreadableRow(key_id, "allowed_cidrs holds a value that is no network") from None


def encode_cidrs(cidrs: Iterable[str]) -> str | None:
    """allowed_cidrs as SQL stores keep them: a JSON list, NULL for none."""
    cidrs = list(cidrs)
    return json.dumps(cidrs, separators=(",", ":")) if cidrs else None


class KeyStore(abc.ABC):
    """A place that keeps key hashes and records.

    Subclasses implement the ``_``-prefixed storage primitives; the lifecycle
    rules (expiry, rotation, usage limits) live here once.
    """

    #: True when calls may block on I/O; async callers then hop to a thread.
    blocking: bool = True
    #: Where the data is, as the URL says (no credentials): the name caches
    #: subscribe under before the store has read its :attr:`store_id`.
    location: str = ""
    #: A random id kept in the database itself (read on first connection), so
    #: that every spelling of the same data (another host name, a symlink) is
    #: one store to revocation notices; None until read, or for data that has
    #: no place to keep one (memory).
    store_id: str | None = None
    #: Seconds between two looks at the data for keys another process
    #: revoked or rotated (:meth:`poll_changes`); None when there is nothing to
    #: poll (changes are heard by a listener, or cannot be made elsewhere).
    change_poll_interval: float | None = None
    #: True when revocations made by other processes reach this store's caches
    #: only over a bus (``invalidation_url``): the store cannot tell them itself.
    needs_bus: bool = True

    #: How often ``last_used_at`` is written back, at most, per key.
    touch_interval: float = 60.0

    def __init__(self, *, prefix: str = keyformat.DEFAULT_PREFIX) -> None:
        self.prefix = keyformat.validate_prefix(prefix)
        self._pending_touches: dict[str, float] = {}
        self._touch_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._reported_rows: OrderedDict[str, None] = OrderedDict()
        with suppress(TypeError):  # a subclass made unhashable is not flushed at exit
            _live_stores.add(self)  # last_used_at is written back at exit too

    # -- storage primitives --------------------------------------------------

    @abc.abstractmethod
    def _insert(self, record: KeyRecord, key_hash: str) -> None: ...

    # The three reads raise UnreadableRow for a row that does not make a
    # record (see checked_record); _fetch_all returns it in the row's place.

    @abc.abstractmethod
    def _fetch(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None: ...

    @abc.abstractmethod
    def _fetch_all(self, client_id: str | None) -> Sequence[KeyRecord | UnreadableRow]: ...

    @abc.abstractmethod
    def _set_revoked(self, key_id: str, when: datetime) -> bool: ...

    @abc.abstractmethod
    def _set_expiry(self, key_id: str, when: datetime) -> bool: ...

    @abc.abstractmethod
    def _take_use(self, key_id: str) -> int | None:
        """Atomically take one use; the uses left after it, or None if none were left."""

    @abc.abstractmethod
    def _return_use(self, key_id: str) -> None:
        """Atomically give back one use taken by :meth:`_take_use` (usage-limited keys only)."""

    @abc.abstractmethod
    def _drain_uses(self, key_id: str) -> int | None:
        """Atomically set the uses left to zero; the uses there were (None: unlimited)."""

    @abc.abstractmethod
    def _write_last_used(self, touches: Mapping[str, datetime]) -> None: ...

    async def run_blocking(
        self, function: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run a blocking call of this store from async code, off the event loop.

        A worker thread by default; a store whose connections belong to a
        framework (Django's ORM) hops the framework's way instead.
        """
        return await asyncio.to_thread(function, *args, **kwargs)

    @property
    def identity(self) -> str:
        """The name revocation notices of this data travel under: its store id once known."""
        return self.store_id or self.location

    def _learned_store_id(self, store_id: str) -> None:
        """Record the id read from the database; notices under it reach this store's caches."""
        self.store_id = store_id
        link_store_id(self.location, store_id)

    def _invalidated(self, key_id: str) -> None:
        """Tell every cache of this store's data that ``key_id`` changed.

        A store whose writes may sit in a caller's open transaction tells them
        once it commits, so no cache reloads the old row in between.
        """
        _notify_invalidated(self.identity, self.location, key_id)

    def watch_changes(self) -> None:
        """Start hearing about keys that other processes revoke or rotate.

        Called by an engine whose cache depends on it. A store whose database
        can push notices (PostgreSQL's ``LISTEN``) starts listening; one that
        is polled instead sets :attr:`change_poll_interval`. Nothing by default.
        """
        return

    def poll_changes(self) -> None:
        """Tell this process's caches about keys changed elsewhere since the last poll.

        Called at most every :attr:`change_poll_interval` seconds, on the request
        path, so it must be cheap when nothing changed. Nothing by default.
        """
        return

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        from ..telemetry.usage import close_counters_of

        close_counters_of(self)  # their last counts, while the connections are open
        self.flush_last_used()

    def _at_exit(self) -> None:
        """Write back what is pending as the process exits (see :func:`_flush_at_exit`)."""
        if self._pending_touches:
            self.flush_last_used()

    # -- public API -----------------------------------------------------------

    def create_key(
        self,
        client_id: str,
        *,
        scopes: Iterable[str] = (),
        tier: str | None = None,
        name: str | None = None,
        expires_at: datetime | None = None,
        max_uses: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        allowed_cidrs: Iterable[str] | None = None,
        signing_public_key: str | bytes | None = None,
    ) -> IssuedKey:
        """Make a key. ``allowed_cidrs``: the networks it may be used from (any, if
        none); ``signing_public_key``: the client's PEM public key (Ed25519 or P-256)
        that its request signatures are verified with. ValueError for a bad value."""
        # What a key carries reaches response headers (scopes, tier) and log
        # lines (client id): refused here, so no stored key can break either.
        check_client_id(client_id)
        if isinstance(scopes, str):
            scopes = scopes.split()
        scope_set = frozenset(check_scope(scope) for scope in scopes)
        if tier is not None:
            check_tier(tier)
        if max_uses is not None and (isinstance(max_uses, bool) or max_uses < 1):
            raise ValueError("max_uses must be a positive integer")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        cidrs = check_allowed_cidrs(allowed_cidrs)
        public_key = check_signing_public_key(signing_public_key)
        plaintext = keyformat.generate_key(self.prefix)
        record = KeyRecord(
            key_id=keyformat.generate_key_id(),
            client_id=client_id,
            name=name,
            scopes=scope_set,
            tier=tier,
            created_at=utcnow().replace(microsecond=0),
            expires_at=expires_at,
            remaining_uses=max_uses,
            metadata=MappingProxyType(dict(metadata or {})),
            allowed_cidrs=cidrs,
            signing_public_key=public_key,
        )
        self._insert(record, keyformat.hash_key(plaintext))
        # Caches that just refused this (then unknown) hash as a guess must
        # not keep refusing it: a new key works at once here, and over a bus
        # in other processes (else within a second, the engine's bound).
        self._invalidated(record.key_id)
        return IssuedKey(plaintext, record)

    def get_key(self, key_id: str) -> KeyRecord:
        record = self._fetch(key_id)
        if record is None:
            raise KeyNotFound(key_id)
        pending = self._pending_touches.get(key_id)
        if pending is not None:
            record = replace(record, last_used_at=datetime.fromtimestamp(pending, timezone.utc))
        return record

    def list_keys(self, client_id: str | None = None) -> list[KeyRecord]:
        """The keys, oldest first; a row that cannot be read is left out, with a warning."""
        self.flush_last_used()
        records = []
        for found in self._fetch_all(client_id):
            if isinstance(found, UnreadableRow):
                self._report_unreadable(found)
            else:
                records.append(found)
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    def revoke_key(self, key_id: str) -> KeyRecord:
        if not self._set_revoked(key_id, utcnow()):
            raise KeyNotFound(key_id)
        self._invalidated(key_id)
        return self.get_key(key_id)

    def rotate_key(self, key_id: str, grace_seconds: float = 0) -> IssuedKey:
        """Issue a successor with the same client, scopes, tier and limits.

        The old key keeps working for ``grace_seconds`` (never longer than
        it would have anyway), so deployments can switch without downtime.
        """
        if grace_seconds < 0:
            raise ValueError("grace_seconds must be zero or more")
        old = self.get_key(key_id)
        status = old.status()
        if status != "active":
            shown = status.replace("_", " ")
            raise ValueError(f"key {key_id!r} is {shown}; create a new key instead")
        # A usage-limited key hands its remaining uses to the successor, so
        # rotation can never multiply a budget; the old key keeps working
        # through the grace period only when it has no usage limit.
        uses = self._drain_uses(key_id) if old.remaining_uses is not None else None
        if uses is not None and uses <= 0:
            raise ValueError(f"key {key_id!r} has no uses left; create a new key instead")
        issued = self.create_key(
            old.client_id,
            scopes=old.scopes,
            tier=old.tier,
            name=old.name,
            expires_at=old.expires_at,
            max_uses=uses,
            metadata={**old.metadata, "rotated_from": old.key_id},
            allowed_cidrs=old.allowed_cidrs,
            signing_public_key=old.signing_public_key,
        )
        ends = utcnow().timestamp() + grace_seconds
        new_expiry = datetime.fromtimestamp(ends, timezone.utc)
        if grace_seconds == 0:
            self._set_revoked(key_id, new_expiry)
        elif old.expires_at is None or new_expiry < old.expires_at:
            self._set_expiry(key_id, new_expiry)
        self._invalidated(key_id)
        return issued

    # -- used by the engine ---------------------------------------------------

    def find_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The record of the key with this hash; None for no key, or one whose row is unreadable."""
        try:
            found = self._fetch_by_hash(key_hash)
        except UnreadableRow as bad:
            # Refused as no key (401), never a 500; logged once, by key id
            # only: the hash would let a reader of the log replay lookups.
            self._report_unreadable(bad)
            return None
        if found is None:
            return None
        record, stored_hash = found
        # The lookup was by an index; compare again in constant time so a
        # backend with a collating or case-folding index cannot fool us.
        if not _compare(stored_hash, key_hash):
            return None
        return record

    def find_by_id(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id``; None for no key, or one whose row is unreadable.

        For a token our issuer made from this key: is the key still good?
        """
        try:
            return self._fetch(key_id)
        except UnreadableRow as bad:
            self._report_unreadable(bad)  # refused as no key, never a 500
            return None

    def _report_unreadable(self, bad: UnreadableRow) -> None:
        reported = self._reported_rows
        if bad.key_id in reported:
            return
        while len(reported) >= _REPORTED_ROWS:
            try:
                reported.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
        reported[bad.key_id] = None
        logger.warning("%s; it is treated as no key until the row is fixed", bad)

    def usage(
        self,
        client_id: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        granularity: str = "hour",
    ) -> list[UsageRow]:
        """Requests counted per client, key and period (CONTRACT.md "Usage"), oldest first.

        ``since`` and ``until`` are aware datetimes (``since`` rounds down to its
        period's start; ``until`` is exclusive); ``granularity`` is ``"hour"``,
        ``"day"`` or ``"month"``. Hourly rows older than ``usage_retention_days``
        were rolled into days, so they answer ``"day"`` and ``"month"`` only.
        What processes have counted but not yet flushed is not here yet.
        """
        from ..telemetry.records import GRANULARITIES
        from ..telemetry.tables import usage_table_for

        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity: expected one of {', '.join(GRANULARITIES)}, got {granularity!r}"
            )
        for name, value in (("since", since), ("until", until)):
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"{name}: expected an aware datetime, got {value!r}")
        return usage_table_for(self).rows(
            client_id=client_id, key_id=key_id, since=since, until=until, granularity=granularity
        )

    def alerts(self, since: datetime | None = None, limit: int = 100) -> list[Alert]:
        """The newest alerts the engines on this store fired (at most ``limit``), newest first."""
        from ..telemetry.tables import usage_table_for

        if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
            raise ValueError(f"since: expected an aware datetime, got {since!r}")
        return usage_table_for(self).alerts(since=since, limit=limit)

    def take_use(self, key_id: str) -> int | None:
        """Take one use of a usage-limited key: the uses left after it, or None if none were."""
        return self._take_use(key_id)

    def return_use(self, key_id: str) -> None:
        """Give back a use that a request took but was then refused for (a rate limit)."""
        self._return_use(key_id)

    def mark_used(self, key_id: str, when: float | None = None) -> bool:
        """Remember a use in memory; True when a write-back is due.

        ``last_used_at`` is written at most once per ``touch_interval`` so the
        hot path never waits on a database write.
        """
        self._pending_touches[key_id] = when if when is not None else time.time()
        return time.monotonic() - self._last_flush >= self.touch_interval

    def flush_last_used(self) -> None:
        with self._touch_lock:
            self._last_flush = time.monotonic()
            if not self._pending_touches:
                return
            touches, self._pending_touches = self._pending_touches, {}
        try:
            self._write_last_used(
                {k: datetime.fromtimestamp(v, timezone.utc) for k, v in touches.items()}
            )
        except Exception:
            # Keep them for the next attempt; newer uses win.
            with self._touch_lock:
                for key_id, when in touches.items():
                    self._pending_touches.setdefault(key_id, when)
            raise


def _compare(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


# -- last_used_at at exit ------------------------------------------------------------
#
# last_used_at waits in memory for up to touch_interval; a short run (a job
# that makes one request, a worker recycled early) would otherwise exit with
# it unwritten, so the key looks never used. Stores are held weakly: a store
# dropped earlier is not kept alive for this, and a closed one has nothing left.

_live_stores: weakref.WeakSet[KeyStore] = weakref.WeakSet()


def _flush_at_exit() -> None:
    for store in list(_live_stores):
        try:
            store._at_exit()
        except Exception as exc:  # the database may be gone too; say so, quietly
            logger.warning(
                "last_used_at could not be written back at exit (%s): %s",
                type(exc).__name__,
                redact(str(exc)),
            )


atexit.register(_flush_at_exit)


# -- invalidation ----------------------------------------------------------------
#
# Every verified-key cache registers here under its store's location, so a
# revocation made through any store object in this process reaches them all
# at once. A store that reads its store id from the database links its
# location to it, so notices under the id (from a store object that spells
# the URL differently, or from another process) reach caches subscribed under
# any linked location. Publishers (``invalidation.RedisBus``) carry notices to
# other processes, whose listeners hand them to ``notify_local``; a store that
# notices other processes' changes itself (SQLite's change log, PostgreSQL's
# NOTIFY) hands them there too. Without either, other processes see a change
# when their cache entry's TTL runs out.
#
# A callback gets the key id that changed, or None when any key may have
# changed (a listener that was away and may have missed notices).

_listeners: dict[str, list[Any]] = {}
_listeners_lock = threading.Lock()
_publishers: list[Any] = []
_store_id_of: dict[str, str] = {}  # location -> store id
_locations_of: dict[str, set[str]] = {}  # store id -> the locations linked to it


def subscribe_invalidations(name: str, callback: Any) -> None:
    """Call ``callback(key_id)`` on every notice for the data named ``name``
    (a store's location or store id). Held weakly: it goes with its owner."""
    ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else weakref.ref(callback)
    with _listeners_lock:
        _listeners.setdefault(name, []).append(ref)


def link_store_id(location: str, store_id: str) -> None:
    """From now on, notices under ``store_id`` or ``location`` reach the caches of both."""
    with _listeners_lock:
        old = _store_id_of.get(location)
        if old == store_id:
            return
        if old is not None:  # the file was replaced by another store's
            _locations_of.get(old, set()).discard(location)
        _store_id_of[location] = store_id
        _locations_of.setdefault(store_id, set()).add(location)


def add_publisher(publish: Any) -> None:
    """``publish(store_id, location, key_id)`` is called on every revocation made in
    this process (``store_id`` is the store's identity: its location if it has no id)."""
    with _listeners_lock:
        _publishers.append(publish)


def remove_publisher(publish: Any) -> None:
    with _listeners_lock:
        if publish in _publishers:
            _publishers.remove(publish)


def notify_local(name: str, key_id: str | None) -> None:
    """Drop ``key_id`` (None: every key) from every cache in this process of the
    data named ``name``: a store id, or a location."""
    with _listeners_lock:
        store_id = _store_id_of.get(name, name)
        names = {store_id, *_locations_of.get(store_id, ())}
        alive: list[Any] = []
        for each in names:
            refs = [ref for ref in _listeners.get(each, ()) if ref() is not None]
            if refs:
                _listeners[each] = refs
                alive += refs
            else:
                _listeners.pop(each, None)
    for ref in alive:
        callback = ref()
        if callback is not None:
            callback(key_id)


def _notify_invalidated(store_id: str, location: str, key_id: str) -> None:
    notify_local(store_id, key_id)
    for publish in list(_publishers):
        publish(store_id, location, key_id)
