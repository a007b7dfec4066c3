"""API keys in the project's own database: the hash and the record, never the key.

The table holds what :class:`~m2m_middleware.stores.base.KeyRecord` holds plus
the SHA-256 of each key; the plaintext exists only in the response that
issued it. Rows are written by :class:`~m2m_middleware.django.store.DjangoKeyStore`
(``key_store="django://"``), which the admin uses too, so hashing and key format
are the store's own and never reimplemented here.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import models
from django.utils import timezone

from ..errors import UnreadableRow
from ..stores.base import KeyRecord, checked_record


def _aware(value: object) -> object:
    # With USE_TZ = False Django hands back naive datetimes in TIME_ZONE;
    # records are always timezone-aware. Anything else is for checked_record
    # to refuse.
    if not isinstance(value, datetime) or timezone.is_aware(value):
        return value
    return timezone.make_aware(value)


def _lines(value: object) -> object:
    """The allowed_cidrs column (one CIDR per line) as checked_record reads it."""
    return value.split() if isinstance(value, str) else value


if TYPE_CHECKING:
    from typing import TypeAlias

    # Field[what may be assigned, what is read back]: the types django-stubs'
    # mypy plugin would infer, spelled out so that type checking needs no
    # settings module. Annotations only: Django's fields are not generic at run time.
    _NullableDateTime: TypeAlias = models.DateTimeField[datetime | None, datetime | None]


class APIKey(models.Model):
    key_id: models.CharField[str, str] = models.CharField(
        "key id", max_length=64, primary_key=True, editable=False
    )
    # SHA-256 hex of the key: the lookup index of every request. Not editable,
    # so no ModelForm (the admin's included) ever shows or accepts it.
    key_hash: models.CharField[str, str] = models.CharField(
        "key hash", max_length=64, unique=True, editable=False
    )
    client_id: models.CharField[str, str] = models.CharField(
        "client id", max_length=255, db_index=True
    )
    name: models.CharField[str | None, str | None] = models.CharField(
        "name", max_length=255, null=True, blank=True
    )
    #: Space-separated, sorted: a scope never contains a space.
    scopes: models.TextField[str, str] = models.TextField("scopes", blank=True, default="")
    tier: models.CharField[str | None, str | None] = models.CharField(
        "tier", max_length=255, null=True, blank=True
    )
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField("created")
    expires_at: _NullableDateTime = models.DateTimeField("expires", null=True, blank=True)
    revoked_at: _NullableDateTime = models.DateTimeField("revoked", null=True, blank=True)
    remaining_uses: models.PositiveIntegerField[int | None, int | None] = (
        models.PositiveIntegerField("uses left", null=True, blank=True)
    )
    metadata: models.JSONField[Any, Any] = models.JSONField("metadata", default=dict, blank=True)
    last_used_at: _NullableDateTime = models.DateTimeField("last used", null=True, blank=True)
    #: Networks the key may be used from, canonical CIDR text, one per line; empty: anywhere.
    allowed_cidrs: models.TextField[str, str] = models.TextField(
        "allowed networks",
        blank=True,
        default="",
        help_text="CIDRs (IPv4 or IPv6) the key may be used from, one per line; empty: anywhere.",
    )
    signing_public_key: models.TextField[str | None, str | None] = models.TextField(
        "request-signing public key",
        null=True,
        blank=True,
        help_text="The client's Ed25519 or P-256 public key (PEM) for RFC 9421 signatures.",
    )

    class Meta:
        verbose_name = "API key"
        verbose_name_plural = "API keys"
        ordering = ("-created_at", "key_id")

    def __str__(self) -> str:
        # Shown in the admin's history, breadcrumbs and delete pages: the
        # key id and the client, never the hash.
        return f"{self.key_id} ({self.client_id})"

    def to_record(self) -> KeyRecord:
        """This row as a record; UnreadableRow if a column does not hold what it should
        (metadata that is no JSON object, say, which Django hands back as the raw text)."""
        from .store import NULL_FLAG, TIME_COLUMNS

        for column in TIME_COLUMNS:  # loaded through store.with_null_flags
            if getattr(self, column) is None and getattr(self, NULL_FLAG + column, False):
                raise UnreadableRow(str(self.key_id), f"{column} is not a time")
        scopes: object = self.scopes
        return checked_record(
            key_id=self.key_id,
            client_id=self.client_id,
            name=self.name,
            scopes=scopes.split() if isinstance(scopes, str) else scopes,
            tier=self.tier,
            created_at=_aware(self.created_at),
            expires_at=_aware(self.expires_at),
            revoked_at=_aware(self.revoked_at),
            remaining_uses=self.remaining_uses,
            metadata=self.metadata,
            last_used_at=_aware(self.last_used_at),
            allowed_cidrs=_lines(self.allowed_cidrs),
            signing_public_key=self.signing_public_key or None,
        )

    def status(self, now: datetime | None = None) -> str:
        """``"active"``, ``"revoked"``, ``"expired"``, ``"used_up"`` or ``"unreadable"``
        (a row the store treats as no key), as the store sees it."""
        try:
            return self.to_record().status(now)
        except UnreadableRow:
            return "unreadable"


class KeyChange(models.Model):
    """One revoke or rotate, written in its transaction: the change log that
    processes sharing an SQLite database poll (``DjangoKeyStore.poll_changes``).

    Not shown in the admin; rows older than the longest cache TTL are pruned
    as new ones come.
    """

    seq: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    key_id: models.CharField[str, str] = models.CharField("key id", max_length=64)
    at: models.DateTimeField[datetime, datetime] = models.DateTimeField("at", db_index=True)

    class Meta:
        verbose_name = "key change"
        verbose_name_plural = "key changes"

    def __str__(self) -> str:
        return f"{self.seq}: {self.key_id}"


class StoreMeta(models.Model):
    """The store's identity, made once: revocation notices name the data by it,
    whatever database alias or host name a process reaches it by.

    One row; should two processes make one each at once, both then take the
    lowest.
    """

    store_id: models.CharField[str, str] = models.CharField(
        "store id", max_length=64, primary_key=True
    )

    class Meta:
        verbose_name = "key store"
        verbose_name_plural = "key store"

    def __str__(self) -> str:
        return self.store_id


class SigningKey(models.Model):
    """One of the token issuer's signing keys (``m2m_middleware.issuer``).

    ``private_key`` is sealed with AES-GCM under ``signing_key_secret``: a copy
    of the database holds no usable private key. Not in the admin: rotate with
    ``m2m signing-keys rotate``.
    """

    kid: models.CharField[str, str] = models.CharField("key id", max_length=64, primary_key=True)
    algorithm: models.CharField[str, str] = models.CharField("algorithm", max_length=16)
    public_jwk: models.TextField[str, str] = models.TextField("public JWK")
    private_key: models.TextField[str, str] = models.TextField("sealed private key")
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField("created at")
    publish_from: models.DateTimeField[datetime, datetime] = models.DateTimeField("published from")
    signs_from: models.DateTimeField[datetime, datetime] = models.DateTimeField("signs from")
    retire_after: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        "retired after", null=True, blank=True
    )

    class Meta:
        verbose_name = "signing key"
        verbose_name_plural = "signing keys"

    def __str__(self) -> str:
        return f"{self.kid} ({self.algorithm})"


class UsageCount(models.Model):
    """Requests of one client with one key in one hour or day (``m2m_middleware.telemetry``).

    Written only by additive updates (``F() + n``) from every process's usage
    flush, so several processes sum exactly. ``key_id`` is empty for a token
    from an outside identity provider. Read through ``store.usage()``.
    """

    # Big and explicit: an hour per client and key adds up, and a project's
    # DEFAULT_AUTO_FIELD must not ask for a migration of its own.
    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    client_id: models.CharField[str, str] = models.CharField("client id", max_length=255)
    key_id: models.CharField[str, str] = models.CharField(
        "key id", max_length=64, blank=True, default=""
    )
    span: models.CharField[str, str] = models.CharField(
        "span", max_length=4, choices=[("hour", "hour"), ("day", "day")]
    )
    period_start: models.DateTimeField[datetime, datetime] = models.DateTimeField(
        "period start", db_index=True
    )
    allowed: models.BigIntegerField[int, int] = models.BigIntegerField("allowed", default=0)
    denied: models.BigIntegerField[int, int] = models.BigIntegerField("denied", default=0)
    rate_limited: models.BigIntegerField[int, int] = models.BigIntegerField(
        "rate limited", default=0
    )
    units: models.BigIntegerField[int, int] = models.BigIntegerField("cost units", default=0)

    class Meta:
        verbose_name = "usage count"
        verbose_name_plural = "usage counts"
        constraints = (
            models.UniqueConstraint(
                fields=["client_id", "key_id", "span", "period_start"],
                name="m2m_usage_one_row_per_period",
            ),
        )

    def __str__(self) -> str:
        return (
            f"{self.client_id} {self.key_id or '-'} {self.span} {self.period_start:%Y-%m-%d %H:%M}"
        )


class AlertRecord(models.Model):
    """An alert the engines fired, kept for the dashboard (at most ``ALERTS_KEPT``)."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)

    fired_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(
        "fired at", db_index=True
    )
    kind: models.CharField[str, str] = models.CharField("kind", max_length=64)
    subject: models.CharField[str, str] = models.CharField("subject", max_length=255)
    count: models.BigIntegerField[int, int] = models.BigIntegerField("count")
    window_seconds: models.BigIntegerField[int, int] = models.BigIntegerField("window (seconds)")
    detail: models.TextField[str, str] = models.TextField("detail")

    class Meta:
        verbose_name = "alert"
        verbose_name_plural = "alerts"

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}"
