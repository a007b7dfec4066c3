"""The admin for API keys: a new key is shown once, on the page that answers its creation.

Keys are made, revoked and rotated through :class:`DjangoKeyStore`, so the key
format, the hashing and the cache notices are the store's. The plaintext is
in one response only: a page rendered straight from the POST that made it,
with ``Cache-Control: no-store``. Never a redirect and never a message
(``django.contrib.messages`` keeps messages in a cookie or the session), so
no later request, page or log can show it again. Records are read-only here:
a change form saved back would also overwrite counters the middleware keeps
moving (uses left, last use), so changes happen only through the actions.
A key's page also shows its recent usage: the dashboard's chart and a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers, widgets
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import router, transaction
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.cache import patch_cache_control
from django.utils.safestring import mark_safe

from .. import keys as keyformat
from ..client_keys import check_allowed_cidrs, check_signing_public_key
from ..dashboard.charts import usage_chart
from ..errors import ConfigError, KeyNotFound, KeyStoreError
from ..settings import Settings
from ..stores.base import IssuedKey, KeyStore
from ..syntax import check_client_id, check_scope, check_tier
from .models import APIKey
from .store import SCHEME, DjangoKeyStore, with_null_flags

if TYPE_CHECKING:
    from django.db.models import QuerySet

    _ModelAdmin = admin.ModelAdmin[APIKey]
else:
    _ModelAdmin = admin.ModelAdmin

STATUS_LABELS = {
    "active": "active",
    "revoked": "revoked",
    "expired": "expired",
    "used_up": "used up",
}

#: The days of usage a key's page shows: the chart, and the table of the latest ones.
USAGE_CHART_DAYS = 14
USAGE_TABLE_DAYS = 7

GRACE_CHOICES = [
    (0, "None: the old keys stop working now"),
    (3600, "1 hour"),
    (86400, "24 hours"),
]


def _validated() -> Settings | None:
    """``M2M_AUTH`` as the middleware reads it; None when it is invalid (the
    system checks report that: E001/E002)."""
    config = getattr(settings, "M2M_AUTH", None)
    try:
        return config if isinstance(config, Settings) else Settings.from_mapping(config)
    except (ConfigError, TypeError):
        return None


def _configured_tiers() -> tuple[str, ...]:
    """The tier names a new key may have: those ``M2M_AUTH`` configures."""
    validated = _validated()
    return tuple(sorted(validated.tier_limit_items)) if validated is not None else ()


def _configured() -> tuple[str | None, str, str | None]:
    """The django:// alias of ``M2M_AUTH`` (None: another store), its key prefix,
    and a warning for the admin's pages when the middleware reads other keys."""
    validated = _validated()
    if validated is None:
        return None, keyformat.DEFAULT_PREFIX, None
    store = validated.key_store
    if isinstance(store, DjangoKeyStore):
        return store.using, store.prefix, None
    if isinstance(store, KeyStore):
        shown = type(store).__name__
    elif store.lower().startswith(SCHEME + "://"):
        alias = store[len(SCHEME) + 3 :].strip("/") or "default"
        return alias, validated.key_prefix, None
    else:
        shown = store.partition("://")[0] + "://..."
    warning = (
        f"M2M_AUTH's key_store is {shown}, not django://: the middleware does not read "
        "the keys listed and made here."
    )
    return None, validated.key_prefix, warning


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(STATUS_LABELS.items())

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        now = timezone.now()
        revoked = Q(revoked_at__lte=now)
        expired = Q(expires_at__lte=now)
        used_up = Q(remaining_uses__lte=0)
        # The order of KeyRecord.status: revoked, then expired, then used up.
        wanted = {
            "active": ~revoked & ~expired & ~used_up,
            "revoked": revoked,
            "expired": ~revoked & expired,
            "used_up": ~revoked & ~expired & used_up,
        }.get(self.value() or "")
        return queryset.filter(wanted) if wanted is not None else queryset


class _UnechoedTextarea(forms.Textarea):
    """Never renders what was typed, as a password input does not: a form shown
    again with an error must not put a pasted private key back on the page."""

    def format_value(self, value: Any) -> str | None:
        return None


class CreateKeyForm(forms.Form):
    client_id = forms.CharField(
        label="Client id",
        max_length=255,
        help_text="Who the key belongs to: rate limits count per client id.",
    )
    name = forms.CharField(label="Name", max_length=255, required=False)
    scopes = forms.CharField(
        label="Scopes",
        required=False,
        help_text="Separated by spaces, e.g. <code>orders:read orders:write</code>.",
        widget=forms.TextInput(attrs={"class": "vTextField"}),
    )
    #: A choice of the configured tiers (see __init__): a tier ``tiers`` does not
    #: name would quietly give the key default_limits.
    tier = forms.ChoiceField(
        label="Tier", required=False, help_text="The client's rate limits: one of the tiers."
    )
    expires_at = forms.SplitDateTimeField(
        label="Expires",
        required=False,
        widget=widgets.AdminSplitDateTime,
        help_text="Leave empty for a key that does not expire.",
    )
    max_uses = forms.IntegerField(
        label="Max uses",
        required=False,
        min_value=1,
        help_text="Leave empty for no usage limit.",
    )
    allowed_cidrs = forms.CharField(
        label="Allowed networks",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "class": "vLargeTextField"}),
        help_text="CIDRs the key may be used from, one per line, e.g. <code>10.0.0.0/8</code> "
        "or <code>2001:db8::/32</code>. Leave empty for anywhere.",
    )
    signing_public_key = forms.CharField(
        label="Request-signing public key",
        required=False,
        widget=_UnechoedTextarea(attrs={"rows": 5, "class": "vLargeTextField"}),
        help_text="The client's Ed25519 or P-256 <em>public</em> key, PEM. Never a private key.",
    )

    def __init__(self, *args: Any, tiers: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = cast(forms.ChoiceField, self.fields["tier"])
        field.choices = [("", "None: default_limits"), *((t, t) for t in tiers)]
        # A tier name may hold "%": the message is %-formatted with the value.
        known = ", ".join(tiers).replace("%", "%%") if tiers else "none are configured"
        field.error_messages = {
            **field.error_messages,
            "invalid_choice": f"%(value)s is not a tier of M2M_AUTH (its tiers: {known}).",
        }

    # The store refuses the same values; checked here too, so each problem
    # is shown beside its own field.

    def clean_client_id(self) -> str:
        client_id: str = self.cleaned_data["client_id"].strip()
        if not client_id:
            raise forms.ValidationError("Enter a client id.")
        return _field_value(check_client_id, client_id)

    def clean_scopes(self) -> str:
        scopes: str = self.cleaned_data["scopes"]
        for scope in scopes.split():
            _field_value(check_scope, scope)
        return scopes

    def clean_tier(self) -> str:
        tier: str = self.cleaned_data["tier"]
        return _field_value(check_tier, tier) if tier else tier

    def clean_allowed_cidrs(self) -> tuple[str, ...]:
        text: str = self.cleaned_data["allowed_cidrs"]
        try:
            return check_allowed_cidrs(text.replace(",", " ").split())
        except ValueError as exc:
            raise forms.ValidationError(str(exc).removeprefix("allowed_cidrs: ")) from None

    def clean_signing_public_key(self) -> str | None:
        text: str = self.cleaned_data["signing_public_key"]
        try:
            return check_signing_public_key(text)
        except ValueError as exc:  # never quotes the text: it may be a private key
            raise forms.ValidationError(str(exc).removeprefix("signing_public_key: ")) from None

    def clean_expires_at(self) -> datetime | None:
        expires: datetime | None = self.cleaned_data.get("expires_at")
        if expires is not None and expires <= timezone.now():
            raise forms.ValidationError("Choose a time in the future.")
        return expires


def _field_value(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise forms.ValidationError(str(exc)) from None


class RotateForm(forms.Form):
    grace_seconds = forms.TypedChoiceField(
        label="Grace period",
        choices=GRACE_CHOICES,
        coerce=int,
        initial=3600,
        widget=forms.RadioSelect,
        help_text="How long each old key keeps working beside its successor.",
    )


@admin.register(APIKey)
class APIKeyAdmin(_ModelAdmin):
    list_display = (
        "key_id",
        "client_id",
        "name",
        "scopes",
        "tier",
        "status_label",
        "created_at",
        "expires_at",
        "last_used_at",
    )
    list_filter = (StatusFilter, "tier", "created_at")
    search_fields = ("key_id", "client_id", "name")
    # Everything stored but the hash, and all of it read-only.
    fields = (
        "key_id",
        "client_id",
        "name",
        "scopes",
        "tier",
        "status_label",
        "created_at",
        "expires_at",
        "revoked_at",
        "remaining_uses",
        "last_used_at",
        "allowed_cidrs",
        "signing_public_key",
        "metadata",
    )
    readonly_fields = fields
    actions = ("revoke_selected", "rotate_selected")

    change_form_template = "admin/m2m_middleware/apikey/change_form.html"
    create_key_template = "admin/m2m_middleware/apikey/create_key.html"
    issued_template = "admin/m2m_middleware/apikey/issued.html"
    rotate_template = "admin/m2m_middleware/apikey/rotate_confirmation.html"

    @admin.display(description="status")
    def status_label(self, obj: APIKey) -> str:
        status = obj.status()
        if status == "unreadable":  # not a filter choice: SQL cannot tell
            return "unreadable (treated as no key)"
        return STATUS_LABELS.get(status, status)

    # -- where the keys are --------------------------------------------------------

    def key_store(self) -> DjangoKeyStore:
        """The store that makes, revokes and rotates keys for the admin."""
        alias, prefix, _ = _configured()
        return DjangoKeyStore(alias or router.db_for_write(APIKey), prefix=prefix)

    def get_queryset(self, request: HttpRequest) -> QuerySet[APIKey]:
        alias = _configured()[0]
        queryset = with_null_flags(super().get_queryset(request))  # for "unreadable"
        return queryset.using(alias) if alias is not None else queryset

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        warning = _configured()[2]
        if warning is not None and request.method == "GET":
            self.message_user(request, warning, messages.WARNING)
        return super().changelist_view(request, extra_context)

    # -- read-only records ---------------------------------------------------------

    def has_change_permission(self, request: HttpRequest, obj: APIKey | None = None) -> bool:
        # Without an object: may the user run the actions (revoke, rotate)?
        # With one: never, so its page is read-only and has nothing to save.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    # -- a key's page: its recent usage -------------------------------------------

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # The admin's links quote the id ("_" is "_5F"); get_object unquotes it, and so
        # must the usage section, or it reads the usage of a key id that names nothing.
        key_id = unquote(object_id)
        usage = self.usage_context(key_id) if request.method in ("GET", "HEAD") else {}
        return super().change_view(request, object_id, form_url, {**usage, **(extra_context or {})})

    def usage_context(self, key_id: str) -> dict[str, Any]:
        """The chart and the table of the key's last days; a note when usage cannot be read."""
        now = timezone.now()
        start = (now - timedelta(days=USAGE_CHART_DAYS - 1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        try:
            rows = self.key_store().usage(key_id=key_id, since=start, granularity="day")
        except Exception as exc:  # a usage table that cannot be read must not hide the key
            return {"usage_error": f"Usage cannot be read: {type(exc).__name__}."}
        chart = usage_chart(
            rows,
            start=start,
            end=now,
            granularity="day",
            title=f"Requests, last {USAGE_CHART_DAYS} days",
            chart_id="m2m-key-usage",
        )
        by_day = {row.period_start.date(): row for row in rows}
        days = [(now - timedelta(days=back)).date() for back in range(USAGE_TABLE_DAYS)]
        return {
            # Safe: usage_chart escapes every text it draws (charts.escape).
            "usage_chart": mark_safe(chart),  # noqa: S308
            "usage_days": [
                {
                    "day": day,
                    "allowed": by_day[day].allowed if day in by_day else 0,
                    "denied": by_day[day].denied if day in by_day else 0,
                    "rate_limited": by_day[day].rate_limited if day in by_day else 0,
                    "units": by_day[day].units if day in by_day else 0,
                }
                for day in days
            ],
            "usage_total": sum(row.requests for row in rows),
            "usage_chart_days": USAGE_CHART_DAYS,
        }

    # -- creating a key: its plaintext on this one page ----------------------------

    def add_view(
        self,
        request: HttpRequest,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = CreateKeyForm(
            request.POST if request.method == "POST" else None, tiers=_configured_tiers()
        )
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            store = self.key_store()
            try:
                with transaction.atomic(using=store.using):
                    issued = store.create_key(
                        data["client_id"],
                        scopes=data["scopes"].split(),
                        tier=data["tier"] or None,
                        name=data["name"] or None,
                        expires_at=data["expires_at"],
                        max_uses=data["max_uses"],
                        allowed_cidrs=data["allowed_cidrs"],
                        signing_public_key=data["signing_public_key"],
                    )
                    self.log_addition(request, self._stored(store, issued.key_id), [{"added": {}}])
            except (ValueError, KeyStoreError) as exc:
                form.add_error(None, str(exc))
            else:
                return self._issued_response(request, [(issued, None)], "API key created")
        opts = self.opts
        context = {
            **self.admin_site.each_context(request),
            "title": f"Add {opts.verbose_name}",
            "subtitle": None,
            "opts": opts,
            "app_label": opts.app_label,
            "form": form,
            "media": self.media + form.media,
            "store_warning": _configured()[2],
            "has_view_permission": self.has_view_permission(request),
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.create_key_template, context)

    def _stored(self, store: DjangoKeyStore, key_id: str) -> APIKey:
        return APIKey.objects.using(store.using).get(pk=key_id)

    def _issued_response(
        self,
        request: HttpRequest,
        issued: Sequence[tuple[IssuedKey, Mapping[str, Any] | None]],
        title: str,
    ) -> TemplateResponse:
        """The one page that ever shows these keys: rendered here, cached nowhere."""
        opts = self.opts
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "subtitle": None,
            "opts": opts,
            "app_label": opts.app_label,
            "has_view_permission": self.has_view_permission(request),
            "keys": [
                {
                    "key": one.key,
                    "key_id": one.key_id,
                    "client_id": one.record.client_id,
                    "name": one.record.name,
                    "scopes": " ".join(sorted(one.record.scopes)),
                    "replaces": replaced,
                }
                for one, replaced in issued
            ],
            "rotated": any(replaced is not None for _, replaced in issued),
        }
        request.current_app = self.admin_site.name
        response = TemplateResponse(request, self.issued_template, context)
        # no-store: no browser, proxy or back button keeps a copy of this page.
        patch_cache_control(
            response, no_store=True, no_cache=True, must_revalidate=True, private=True, max_age=0
        )
        response["Pragma"] = "no-cache"
        return response

    # -- actions -------------------------------------------------------------------

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        store = self.key_store()
        revoked = already = 0
        now = timezone.now()
        for obj in queryset:
            if obj.revoked_at is not None and obj.revoked_at <= now:
                already += 1
                continue
            try:
                store.revoke_key(obj.key_id)
            except KeyNotFound:
                continue  # deleted meanwhile
            self.log_change(request, obj, "Revoked.")
            revoked += 1
        text = f"Revoked {revoked} API key{'s' if revoked != 1 else ''}."
        if already:
            text += f" {already} {'was' if already == 1 else 'were'} revoked already."
        self.message_user(request, text, messages.SUCCESS)

    @admin.action(description="Rotate selected keys", permissions=["change"])
    def rotate_selected(
        self, request: HttpRequest, queryset: QuerySet[APIKey]
    ) -> HttpResponseBase | None:
        form = RotateForm(request.POST if request.POST.get("post") == "yes" else None)
        if form.is_bound and form.is_valid():
            return self._rotate(request, queryset, form.cleaned_data["grace_seconds"])
        opts = self.opts
        context = {
            **self.admin_site.each_context(request),
            "title": "Rotate API keys",
            "subtitle": None,
            "opts": opts,
            "app_label": opts.app_label,
            "queryset": queryset,
            "form": form,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
            "has_view_permission": self.has_view_permission(request),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.rotate_template, context)

    def _rotate(
        self, request: HttpRequest, queryset: QuerySet[APIKey], grace_seconds: int
    ) -> HttpResponseBase | None:
        store = self.key_store()
        issued: list[tuple[IssuedKey, Mapping[str, Any] | None]] = []
        refused: list[str] = []
        ends = timezone.now() + timedelta(seconds=grace_seconds)
        for obj in queryset.order_by("created_at", "key_id"):
            try:
                with transaction.atomic(using=store.using):
                    new = store.rotate_key(obj.key_id, grace_seconds=grace_seconds)
                    until = "now" if grace_seconds == 0 else f"until {ends:%Y-%m-%d %H:%M:%S %Z}"
                    self.log_change(
                        request, obj, f"Rotated: replaced by {new.key_id}; works {until}."
                    )
                    self.log_addition(
                        request,
                        self._stored(store, new.key_id),
                        [{"added": {}}],
                    )
            except (ValueError, KeyStoreError) as exc:
                refused.append(str(exc))
                continue
            issued.append(
                (new, {"key_id": obj.key_id, "until": None if grace_seconds == 0 else ends})
            )
        if refused:
            self.message_user(request, "Not rotated: " + "; ".join(refused), messages.WARNING)
        if not issued:
            return None  # back to the list, which shows the warning
        plural = "s" if len(issued) != 1 else ""
        return self._issued_response(request, issued, f"API key{plural} rotated")

    # -- deleting: revoked first, so every cache drops them at once -----------------

    def delete_model(self, request: HttpRequest, obj: APIKey) -> None:
        self._revoke_quietly([obj.key_id])
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        self._revoke_quietly(list(queryset.values_list("key_id", flat=True)))
        super().delete_queryset(request, queryset)

    def _revoke_quietly(self, key_ids: list[str]) -> None:
        store = self.key_store()
        for key_id in key_ids:
            with suppress(KeyNotFound):  # deleted meanwhile
                store.revoke_key(key_id)
