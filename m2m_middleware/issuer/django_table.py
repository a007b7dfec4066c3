"""Signing keys in the Django ORM: the ``SigningKey`` model, migrated like the API keys."""

from __future__ import annotations

import json
from datetime import datetime

from django.db.models import Q, QuerySet
from django.utils import timezone

from ..django.models import SigningKey
from ..django.store import DjangoKeyStore, _to_db
from ..errors import KeyStoreError
from .tables import StoredSigningKey


def _aware(value: datetime) -> datetime:
    # With USE_TZ = False the database holds naive datetimes in TIME_ZONE, as
    # DjangoKeyStore writes them (its _to_db); made aware the same way back.
    return value if value.tzinfo is not None else timezone.make_aware(value)


class DjangoTable:
    def __init__(self, store: DjangoKeyStore) -> None:
        self._store = store

    def _objects(self) -> QuerySet[SigningKey]:
        return SigningKey.objects.using(self._store.using)

    def insert(self, row: StoredSigningKey) -> None:
        with self._store._db():
            self._objects().create(
                kid=row.kid,
                algorithm=row.algorithm,
                public_jwk=json.dumps(row.public_jwk, sort_keys=True),
                private_key=row.sealed_private_key,
                created_at=_to_db(row.created_at),
                publish_from=_to_db(row.publish_from),
                signs_from=_to_db(row.signs_from),
                retire_after=_to_db(row.retire_after),
            )

    def rows(self) -> list[StoredSigningKey]:
        with self._store._db():
            found = list(self._objects().all())
        rows = []
        for model in found:
            jwk = json.loads(model.public_jwk)
            if not isinstance(jwk, dict):
                raise KeyStoreError(f"signing key {model.kid!r}: unreadable public JWK")
            rows.append(
                StoredSigningKey(
                    kid=model.kid,
                    algorithm=model.algorithm,
                    public_jwk=jwk,
                    sealed_private_key=model.private_key,
                    created_at=_aware(model.created_at),
                    publish_from=_aware(model.publish_from),
                    signs_from=_aware(model.signs_from),
                    retire_after=None if model.retire_after is None else _aware(model.retire_after),
                )
            )
        return rows

    def retire_before(self, signs_from: datetime, retire_after: datetime) -> None:
        with self._store._db():
            self._objects().filter(
                Q(retire_after__isnull=True) & Q(signs_from__lt=_to_db(signs_from))
            ).update(retire_after=_to_db(retire_after))
