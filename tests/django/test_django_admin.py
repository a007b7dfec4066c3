"""The admin: a created key is shown once and never again; revoke and rotate work.

A project as users build it: the admin behind session login, the API behind
our middleware (``/admin/*`` public to it), keys in the project's database
(``key_store="django://"``). Everything runs on Django's test database.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.models import Session
from django.core import checks
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client, override_settings
from django.urls import path

from m2m_middleware import open_key_store
from m2m_middleware.django import get_client
from m2m_middleware.django.admin import APIKeyAdmin
from m2m_middleware.django.models import APIKey
from m2m_middleware.keys import hash_key, is_well_formed
from m2m_middleware.stores import KeyStore

pytestmark = pytest.mark.usefixtures("django_db")

#: The middleware of a project that has the admin and protects its API with ours.
ADMIN_MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "m2m_middleware.django.M2MAuthMiddleware",
]

KEY_RE = re.compile(r"\bm2m_[0-9A-Za-z]{38}\b")
CHANGELIST = "/admin/m2m_middleware/apikey/"
ADD = CHANGELIST + "add/"


def whoami(request: HttpRequest) -> HttpResponse:
    client = get_client(request)
    assert client is not None
    return JsonResponse({"client_id": client.client_id, "scopes": sorted(client.scopes)})


URLCONF = "m2m_django_admin_urls"
_urls = types.ModuleType(URLCONF)
_urls.urlpatterns = [  # type: ignore[attr-defined]
    path("admin/", admin.site.urls),
    path("api/whoami", whoami),
]
sys.modules[URLCONF] = _urls

M2M_AUTH = {
    "key_store": "django://",
    "public_paths": ["/admin", "/admin/*"],
    "key_cache_ttl": 3600,
    # The tiers a new key may have in the admin (test_the_tier_is_a_choice_of_the_configured_ones)
    "tiers": {"gold": "100/second", "gold plus/v2": "100/second", "50%": "1/second"},
}


@pytest.fixture(autouse=True)
def project() -> Iterator[None]:
    with override_settings(ROOT_URLCONF=URLCONF, MIDDLEWARE=ADMIN_MIDDLEWARE, M2M_AUTH=M2M_AUTH):
        yield


@pytest.fixture
def browser() -> Client:
    """A logged-in superuser's browser."""
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def store() -> Iterator[KeyStore]:
    the_store = open_key_store("django://")
    yield the_store
    the_store.close()


def api(key: str) -> Any:
    return Client().get("/api/whoami", headers={"X-API-Key": key})


def key_url(key_id: str, view: str = "change") -> str:
    """A key's admin page, its id quoted as the admin's own links quote it.

    The admin unquotes "_XX" in ids, so "key_3Abc…" unquoted names "key:bc…" and
    one key id in about two hundred would miss its own page.
    """
    return f"{CHANGELIST}{quote(key_id)}/{view}/"


def change_url(key_id: str) -> str:
    return key_url(key_id)


def text(response: Any) -> str:
    return str(response.content.decode())


def add_key(browser: Client, **fields: str) -> Any:
    data = {
        "client_id": "acme",
        "name": "ci",
        "scopes": "orders:read orders:write",
        "tier": "",
        "expires_at_0": "",
        "expires_at_1": "",
        "max_uses": "",
        **fields,
    }
    return browser.post(ADD, data)


def assert_shown_nowhere(browser: Client, key: str, key_id: str) -> None:
    """Every page that could show the key, after the one that did, and every store."""
    pages = [
        "/admin/",
        "/admin/m2m_middleware/",
        CHANGELIST,
        f"{CHANGELIST}?q={key_id}",
        ADD,
        change_url(key_id),
        key_url(key_id, "history"),
        key_url(key_id, "delete"),
    ]
    for url in pages:
        response = browser.get(url)
        assert response.status_code == 200, (url, response.status_code)
        page = text(response)
        assert key not in page, url
        assert key[4:-6] not in page, url
        assert KEY_RE.search(page) is None, url
        assert hash_key(key) not in page, url  # nor its hash
    for cookie in browser.cookies.values():
        assert key not in cookie.value
    for session in Session.objects.all():
        assert key not in repr(session.get_decoded())
    for entry in LogEntry.objects.all():
        assert key not in f"{entry.object_repr} {entry.change_message} {entry}"


# -- the project ---------------------------------------------------------------------


def test_every_system_check_passes_for_a_project_with_the_admin() -> None:
    # The admin's own checks included: list_display, fields, filters, actions.
    assert checks.run_checks(databases=["default"]) == []


def test_the_model_has_its_migration() -> None:
    # A model change without a migration fails here (and so in CI).
    call_command("makemigrations", "m2m_middleware", check=True, dry_run=True, verbosity=0)


def test_the_templates_are_package_data() -> None:
    # The wheel ships only what [tool.setuptools.package-data] names; the
    # migrations are modules and ship as such.
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["m2m_middleware.django"]
    app = root / "m2m_middleware" / "django"
    templates = [p.relative_to(app).as_posix() for p in (app / "templates").rglob("*.html")]
    assert templates
    for template in templates:
        assert any(fnmatch(template, pattern) for pattern in patterns), template
    assert (app / "migrations" / "__init__.py").exists()


def test_the_admin_is_registered() -> None:
    assert isinstance(admin.site._registry[APIKey], APIKeyAdmin)


# -- adding a key ------------------------------------------------------------------------


def test_a_created_key_is_shown_once_and_never_again(browser: Client) -> None:
    form = browser.get(ADD)
    assert form.status_code == 200
    assert 'name="client_id"' in text(form)
    assert 'name="max_uses"' in text(form)
    assert "key_hash" not in text(form)

    response = add_key(browser, tier="gold", max_uses="5")
    assert response.status_code == 200  # the page itself: no redirect to carry the key
    assert not response.has_header("Location")
    assert "no-store" in response["Cache-Control"]
    page = text(response)
    assert "will not be shown again" in page
    [key] = set(KEY_RE.findall(page))
    assert is_well_formed(key)

    [row] = APIKey.objects.all()
    assert row.key_hash == hash_key(key)
    assert (row.client_id, row.name, row.scopes, row.tier) == (
        "acme",
        "ci",
        "orders:read orders:write",
        "gold",
    )
    assert row.remaining_uses == 5
    assert row.key_id in page
    [entry] = LogEntry.objects.all()
    assert entry.is_addition()
    assert entry.object_id == row.key_id

    assert_shown_nowhere(browser, key, row.key_id)

    answer = api(key)
    assert answer.status_code == 200, answer.content
    assert answer.json() == {"client_id": "acme", "scopes": ["orders:read", "orders:write"]}


def test_the_key_is_not_kept_in_messages_or_the_session(browser: Client) -> None:
    response = add_key(browser)
    [key] = set(KEY_RE.findall(text(response)))
    for morsel in response.cookies.values():
        assert key not in morsel.value
    for session in Session.objects.all():
        assert key not in repr(session.get_decoded())
    # A later page shows no leftover message with it either.
    assert key not in text(browser.get(CHANGELIST))


def test_an_expiry_and_a_usage_limit_are_kept(browser: Client) -> None:
    paris = ZoneInfo("Europe/Paris")
    expires = datetime.now(paris).replace(microsecond=0) + timedelta(days=30)
    with override_settings(TIME_ZONE="Europe/Paris"):  # the admin's own time zone
        response = add_key(
            browser,
            expires_at_0=expires.strftime("%Y-%m-%d"),
            expires_at_1=expires.strftime("%H:%M:%S"),
            max_uses="1",
        )
    [key] = set(KEY_RE.findall(text(response)))
    [row] = APIKey.objects.all()
    assert row.expires_at == expires
    assert open_key_store("django://").get_key(row.key_id).expires_at == expires
    assert api(key).status_code == 200
    assert api(key).json()["error"] == "quota_exceeded"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"client_id": ""}, "This field is required."),
        ({"client_id": "   "}, "This field is required."),
        ({"max_uses": "0"}, "greater than or equal to 1"),
        ({"expires_at_0": "2000-01-01", "expires_at_1": "00:00:00"}, "in the future"),
    ],
    ids=["no_client", "blank_client", "zero_uses", "past_expiry"],
)
def test_a_bad_form_makes_no_key(browser: Client, fields: dict[str, str], error: str) -> None:
    response = add_key(browser, **fields)
    assert response.status_code == 200
    assert error in text(response)
    assert KEY_RE.search(text(response)) is None
    assert not APIKey.objects.exists()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"scopes": 'orders:read orders"write'}, "scopes"),
        ({"scopes": "orders:read orders\\write"}, "scopes"),
        ({"scopes": "orders:r\u00e9ad"}, "scopes"),
        ({"scopes": "orders:read orders:\x01write"}, "scopes"),
        ({"scopes": "orders:\x7fread"}, "scopes"),
        ({"tier": "gold\r\nX-Injected: 1"}, "tier"),
        ({"tier": "gold\u2603"}, "tier"),
        ({"tier": 'gold"'}, "tier"),
        ({"client_id": "acme\x1b[2J"}, "client_id"),
        ({"client_id": "acme\u2028allowed GET /admin"}, "client_id"),
        ({"client_id": "acme\x00"}, "client_id"),  # Django's own validator: held before
    ],
    ids=lambda value: repr(value) if isinstance(value, str) else None,
)
def test_a_value_that_would_break_a_response_is_a_form_error(
    browser: Client, fields: dict[str, str], field: str
) -> None:
    response = add_key(browser, **fields)
    assert response.status_code == 200
    # Shown beside its own field, not as a failure of the whole form.
    assert f'class="form-row errors field-{field}"' in text(response)
    assert text(response).count('class="form-row errors') == 1
    assert KEY_RE.search(text(response)) is None
    assert not APIKey.objects.exists()
    # The widest value accepted for the same field still makes a key.
    good = {
        "scopes": "orders:read https://x.example/a#b",
        "tier": "gold plus/v2",
        "client_id": "Acme GmbH \u00e9",
    }
    response = add_key(browser, **{field: good[field]})
    assert response.status_code == 200
    assert KEY_RE.search(text(response)) is not None


def test_adding_needs_the_add_permission(store: KeyStore) -> None:
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_apikey"))
    client = Client()
    client.force_login(viewer)
    assert client.get(CHANGELIST).status_code == 200
    assert client.get(ADD).status_code == 403
    assert client.post(ADD, {"client_id": "acme"}).status_code == 403
    assert not APIKey.objects.exists()
    issued = store.create_key("acme")
    revoke = {"action": "revoke_selected", "_selected_action": [issued.key_id], "index": "0"}
    client.post(CHANGELIST, revoke)
    assert store.get_key(issued.key_id).revoked_at is None  # no action without change rights


# -- the records -------------------------------------------------------------------------


def test_the_change_page_is_read_only_and_hides_the_hash(browser: Client, store: KeyStore) -> None:
    issued = store.create_key("acme", scopes=["a"], metadata={"team": "billing"})
    response = browser.get(change_url(issued.key_id))
    assert response.status_code == 200
    page = text(response)
    for shown in (issued.key_id, "acme", "billing", "active"):
        assert shown in page
    assert hash_key(issued.key) not in page
    assert "key hash" not in page.lower()
    assert 'name="client_id"' not in page  # nothing to edit
    assert 'name="_save"' not in page
    before = APIKey.objects.get(pk=issued.key_id)
    refused = browser.post(change_url(issued.key_id), {"client_id": "mallory"})
    assert refused.status_code == 403
    assert APIKey.objects.get(pk=issued.key_id).client_id == before.client_id


def test_the_list_shows_filters_and_searches(browser: Client, store: KeyStore) -> None:
    active = store.create_key("acme", name="deploy", scopes=["orders:read"], tier="gold")
    revoked = store.revoke_key(store.create_key("globex").key_id)
    expired = store.create_key("initech", expires_at=datetime.now(timezone.utc) - timedelta(1))
    page = text(browser.get(CHANGELIST))
    for shown in (active.key_id, revoked.key_id, expired.key_id, "deploy", "gold", "orders:read"):
        assert shown in page
    for column in ("Key id", "Client id", "Status", "Created", "Expires", "Last used"):
        assert column.lower() in page.lower()

    def listed(query: str) -> set[str]:
        body = text(browser.get(CHANGELIST + query))
        return {k for k in (active.key_id, revoked.key_id, expired.key_id) if k in body}

    assert listed("?status=active") == {active.key_id}
    assert listed("?status=revoked") == {revoked.key_id}
    assert listed("?status=expired") == {expired.key_id}
    assert listed("?q=globex") == {revoked.key_id}
    assert listed(f"?q={active.key_id}") == {active.key_id}
    assert listed("?q=deploy") == {active.key_id}


def test_the_list_labels_a_row_the_store_cannot_read(browser: Client, store: KeyStore) -> None:
    from django.db import connection

    good, bad = store.create_key("acme"), store.create_key("globex")
    with connection.cursor() as cursor:  # a garbled time Django itself reads as None
        cursor.execute(
            "UPDATE m2m_middleware_apikey SET revoked_at = 'yesterday' WHERE key_id = %s",
            [bad.key_id],
        )
    response = browser.get(CHANGELIST)
    assert response.status_code == 200
    page = text(response)
    assert good.key_id in page and bad.key_id in page
    assert "unreadable (treated as no key)" in page
    assert "unreadable" in text(browser.get(change_url(bad.key_id)))


def test_the_admin_warns_when_the_middleware_reads_another_store(browser: Client) -> None:
    with override_settings(M2M_AUTH={**M2M_AUTH, "key_store": "memory://"}):
        for url in (CHANGELIST, ADD):
            assert "the middleware does not read" in text(browser.get(url)), url
    assert "the middleware does not read" not in text(browser.get(CHANGELIST))


# -- revoking ----------------------------------------------------------------------------


def test_revoking_selected_keys(browser: Client, store: KeyStore) -> None:
    first, second, kept = (store.create_key("acme") for _ in range(3))
    for issued in (first, second, kept):
        assert api(issued.key).status_code == 200  # now cached for an hour
    response = browser.post(
        CHANGELIST,
        {
            "action": "revoke_selected",
            "_selected_action": [first.key_id, second.key_id],
            "index": "0",
        },
        follow=True,
    )
    assert "Revoked 2 API keys." in text(response)
    for issued in (first, second):
        assert store.get_key(issued.key_id).status() == "revoked"
        assert api(issued.key).status_code == 401  # the cache heard of it at once
    assert api(kept.key).status_code == 200
    messages = set(LogEntry.objects.values_list("change_message", flat=True))
    assert messages == {"Revoked."}
    again = browser.post(
        CHANGELIST,
        {"action": "revoke_selected", "_selected_action": [first.key_id], "index": "0"},
        follow=True,
    )
    assert "1 was revoked already" in text(again)


def test_deleting_a_key_ends_it_at_once(browser: Client, store: KeyStore) -> None:
    issued = store.create_key("acme")
    assert api(issued.key).status_code == 200  # cached
    response = browser.post(key_url(issued.key_id, "delete"), {"post": "yes"})
    assert response.status_code == 302
    assert not APIKey.objects.exists()
    assert api(issued.key).status_code == 401


# -- rotating ----------------------------------------------------------------------------


def rotate(browser: Client, key_ids: list[str], grace: int | None) -> Any:
    data: dict[str, Any] = {"action": "rotate_selected", "_selected_action": key_ids}
    if grace is None:  # the list page's form: ask first
        data["index"] = "0"
    else:  # the confirmation page's form
        data.update(post="yes", grace_seconds=str(grace))
    return browser.post(CHANGELIST, data)


def test_rotating_asks_for_a_grace_period_first(browser: Client, store: KeyStore) -> None:
    issued = store.create_key("acme")
    response = rotate(browser, [issued.key_id], None)
    assert response.status_code == 200
    page = text(response)
    assert 'name="grace_seconds"' in page
    for choice in ('value="0"', 'value="3600"', 'value="86400"'):
        assert choice in page
    assert issued.key_id in page
    assert APIKey.objects.count() == 1  # nothing rotated yet
    assert KEY_RE.search(page) is None


def test_a_rotated_key_is_shown_once_and_the_old_one_works_through_the_grace(
    browser: Client, store: KeyStore
) -> None:
    old = store.create_key("acme", scopes=["orders:read"], name="deploy")
    response = rotate(browser, [old.key_id], 3600)
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    page = text(response)
    assert "will not be shown again" in page
    [new_key] = set(KEY_RE.findall(page))
    assert new_key != old.key
    new_row = APIKey.objects.get(key_hash=hash_key(new_key))
    assert new_row.metadata == {"rotated_from": old.key_id}
    assert (new_row.client_id, new_row.scopes, new_row.name) == ("acme", "orders:read", "deploy")
    assert old.key_id in page

    assert api(new_key).status_code == 200
    assert api(old.key).status_code == 200  # the grace period
    old_record = store.get_key(old.key_id)
    assert old_record.expires_at is not None
    in_an_hour = datetime.now(timezone.utc) + timedelta(hours=1)
    assert abs((old_record.expires_at - in_an_hour).total_seconds()) < 60
    assert not old_record.is_active(in_an_hour + timedelta(minutes=1))
    assert LogEntry.objects.filter(object_id=old.key_id, change_message__startswith="Rotated")

    assert_shown_nowhere(browser, new_key, new_row.key_id)


def test_rotating_without_grace_ends_the_old_keys_at_once(browser: Client, store: KeyStore) -> None:
    first, second = store.create_key("acme"), store.create_key("globex", max_uses=3)
    for issued in (first, second):
        assert api(issued.key).status_code == 200  # cached
    response = rotate(browser, [first.key_id, second.key_id], 0)
    keys = set(KEY_RE.findall(text(response)))
    assert len(keys) == 2
    assert api(first.key).status_code == 401
    assert api(second.key).status_code in (401, 429)  # ended, and its uses handed over
    for key in keys:
        assert api(key).status_code == 200
    successor = APIKey.objects.get(client_id="globex", metadata__rotated_from=second.key_id)
    assert successor.remaining_uses == 1  # 3, less the two requests above


def test_a_key_that_cannot_be_rotated_is_reported(browser: Client, store: KeyStore) -> None:
    revoked = store.revoke_key(store.create_key("acme").key_id)
    response = rotate(browser, [revoked.key_id], 3600)
    assert response.status_code == 302  # back to the list: nothing to show
    page = text(browser.get(response["Location"]))
    assert "Not rotated" in page
    assert "revoked" in page
    assert APIKey.objects.count() == 1


# -- tiers: a choice of the configured ones ----------------------------------------------


def test_the_tier_is_a_choice_of_the_configured_ones(browser: Client) -> None:
    page = text(browser.get(ADD))
    select = re.search(r'<select name="tier"[^>]*>(.*?)</select>', page, re.S)
    assert select is not None, page
    options = re.findall(r'<option value="([^"]*)"', select.group(1))
    assert options == ["", "50%", "gold", "gold plus/v2"]

    response = add_key(browser, tier="")
    assert KEY_RE.search(text(response)) is not None
    assert APIKey.objects.get().tier is None


@pytest.mark.parametrize("tier", ["platinum", "Gold", "gold ", "50%%"])
def test_a_tier_that_is_not_configured_is_refused_naming_the_known_ones(
    browser: Client, tier: str
) -> None:
    response = add_key(browser, tier=tier)
    assert response.status_code == 200
    page = text(response)
    assert 'class="form-row errors field-tier"' in page
    assert "is not a tier of M2M_AUTH (its tiers: 50%, gold, gold plus/v2)." in page
    assert KEY_RE.search(page) is None
    assert not APIKey.objects.exists()


def test_without_tiers_only_the_default_limits_can_be_chosen(browser: Client) -> None:
    with override_settings(M2M_AUTH={"key_store": "django://", "public_paths": ["/admin/*"]}):
        page = text(browser.get(ADD))
        assert re.findall(r'<option value="([^"]*)"', page) == [""]
        response = add_key(browser, tier="gold")
    assert "is not a tier of M2M_AUTH (its tiers: none are configured)." in text(response)
    assert not APIKey.objects.exists()


def test_a_key_can_be_made_with_networks_and_a_signing_key(browser: Client) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    form = text(browser.get(ADD))
    assert 'name="allowed_cidrs"' in form and 'name="signing_public_key"' in form
    response = add_key(
        browser, allowed_cidrs="10.0.0.0/8\n2001:DB8::/32", signing_public_key=public
    )
    assert response.status_code == 200
    [row] = APIKey.objects.all()
    record = row.to_record()
    assert record.allowed_cidrs == ("10.0.0.0/8", "2001:db8::/32")
    assert record.signing_public_key == public
    page = text(browser.get(change_url(row.key_id)))
    assert "2001:db8::/32" in page and "BEGIN PUBLIC KEY" in page


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"allowed_cidrs": "10.0.0.1/8"}, "has host bits set"),
        ({"signing_public_key": "not a key"}, "not a PEM public key"),
    ],
)
def test_bad_networks_or_signing_keys_are_form_errors(
    browser: Client, fields: dict[str, str], error: str
) -> None:
    response = add_key(browser, **fields)
    assert response.status_code == 200
    assert error in text(response)
    assert not APIKey.objects.exists()


def test_a_private_key_in_the_form_is_refused_and_not_shown_back(browser: Client) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    secret = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    response = add_key(browser, signing_public_key=secret)
    page = text(response)
    assert "private key" in page
    assert not APIKey.objects.exists()
    assert secret.splitlines()[1] not in page
