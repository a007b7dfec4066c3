"""A key store in a dictionary: for tests and single-process experiments."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from .base import KeyRecord, KeyStore

_counter = itertools.count()
#: Names this process's memory stores apart from another process's: a store's
#: location is what invalidation notices carry over a shared bus, and with a
#: counter alone "memory://3" here and "memory://3" in another process (another
#: worker behind one Redis bus) were one name, so that process's revocations
#: emptied this one's cache (a stale key then got 503 instead of its outage grace).
_PROCESS = uuid.uuid4().hex[:12]


class MemoryKeyStore(KeyStore):
    blocking = False
    needs_bus = False  # no other process can change this data

    def __init__(self, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.location = f"memory://{_PROCESS}-{next(_counter)}"
        self._lock = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        self._hashes: dict[str, str] = {}  # key hash -> key id

    def _insert(self, record: KeyRecord, key_hash: str) -> None:
        with self._lock:
            self._records[record.key_id] = record
            self._hashes[key_hash] = record.key_id

    def _fetch(self, key_id: str) -> KeyRecord | None:
        return self._records.get(key_id)

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        key_id = self._hashes.get(key_hash)
        if key_id is None:
            return None
        return self._records[key_id], key_hash

    def _fetch_all(self, client_id: str | None) -> list[KeyRecord]:
        return [r for r in self._records.values() if client_id is None or r.client_id == client_id]

    def _update(self, key_id: str, **changes: object) -> bool:
        with self._lock:
            record = self._records.get(key_id)
            if record is None:
                return False
            self._records[key_id] = replace(record, **changes)  # type: ignore[arg-type]
            return True

    def _set_revoked(self, key_id: str, when: datetime) -> bool:
        with self._lock:
            record = self._records.get(key_id)
            if record is None:
                return False
            if record.revoked_at is None or when < record.revoked_at:
                self._records[key_id] = replace(record, revoked_at=when)
            return True

    def _set_expiry(self, key_id: str, when: datetime) -> bool:
        return self._update(key_id, expires_at=when)

    def _take_use(self, key_id: str) -> int | None:
        with self._lock:
            record = self._records.get(key_id)
            if record is None or record.remaining_uses is None or record.remaining_uses <= 0:
                return None
            left = record.remaining_uses - 1
            self._records[key_id] = replace(record, remaining_uses=left)
            return left

    def _return_use(self, key_id: str) -> None:
        with self._lock:
            record = self._records.get(key_id)
            if record is not None and record.remaining_uses is not None:
                self._records[key_id] = replace(record, remaining_uses=record.remaining_uses + 1)

    def _drain_uses(self, key_id: str) -> int | None:
        with self._lock:
            record = self._records.get(key_id)
            if record is None or record.remaining_uses is None:
                return None
            self._records[key_id] = replace(record, remaining_uses=0)
            return record.remaining_uses

    def _write_last_used(self, touches: Mapping[str, datetime]) -> None:
        for key_id, when in touches.items():
            self._update(key_id, last_used_at=when)
