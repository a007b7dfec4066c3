"""The admin's key page shows that key's recent usage: the dashboard's chart and a table.

Usage rows are added to the usage table of the store the admin reads, as the
middleware's flush would add them; the page is read-only.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.urls import path
from django.utils import timezone

from m2m_middleware.django.admin import USAGE_CHART_DAYS, APIKeyAdmin
from m2m_middleware.django.store import DjangoKeyStore
from m2m_middleware.keys import hash_key
from m2m_middleware.telemetry.records import UsageRow
from m2m_middleware.telemetry.tables import usage_table_for

pytestmark = pytest.mark.usefixtures("django_db")

ADMIN_MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "m2m_middleware.django.M2MAuthMiddleware",
]
URLCONF = "m2m_django_admin_usage_urls"
_urls = types.ModuleType(URLCONF)
_urls.urlpatterns = [path("admin/", admin.site.urls)]  # type: ignore[attr-defined]
sys.modules[URLCONF] = _urls
M2M_AUTH = {"key_store": "django://", "public_paths": ["/admin", "/admin/*"]}
CHANGELIST = "/admin/m2m_middleware/apikey/"


def change_url(key_id: str) -> str:
    """A key's change page, its id quoted as the admin's links quote it ("_" is "_5F")."""
    return f"{CHANGELIST}{quote(key_id)}/change/"


@pytest.fixture(autouse=True)
def project() -> Iterator[None]:
    with override_settings(ROOT_URLCONF=URLCONF, MIDDLEWARE=ADMIN_MIDDLEWARE, M2M_AUTH=M2M_AUTH):
        yield


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[DjangoKeyStore]:
    """The admin's store, one object for the test: until usage has a table of its own
    in the Django database, a store keeps its usage beside the object."""
    the_store = DjangoKeyStore()
    monkeypatch.setattr(APIKeyAdmin, "key_store", lambda self: the_store)
    yield the_store
    the_store.close()


@pytest.fixture
def browser() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(html)
    return parser.found


def usage_section(response: Any) -> str:
    page = response.content.decode()
    start = page.index('id="m2m-key-usage"')
    return page[start : page.index("</fieldset>", start)]


def test_a_keys_page_shows_its_recent_usage(browser: Client, store: DjangoKeyStore) -> None:
    issued = store.create_key("acme", name="worker")
    other = store.create_key("acme", name="other")
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    usage_table_for(store).add(
        [
            UsageRow("acme", issued.key_id, today + timedelta(hours=1), allowed=40, denied=2),
            UsageRow("acme", issued.key_id, today - timedelta(days=1), allowed=7, rate_limited=3),
            UsageRow("acme", issued.key_id, today - timedelta(days=30), allowed=999),  # too old
            UsageRow("acme", other.key_id, today, allowed=5000),  # another key
        ]
    )
    response = browser.get(change_url(issued.key_id))
    assert response.status_code == 200
    section = usage_section(response)
    tags = elements(section)
    svg = [attrs for tag, attrs in tags if tag == "svg"]
    assert len(svg) == 1 and svg[0]["role"] == "img"
    assert [attrs["data-series"] for tag, attrs in tags if tag == "g"] == [
        "allowed",
        "denied",
        "rate_limited",
    ]
    assert f"Requests, last {USAGE_CHART_DAYS} days" in section
    assert f"52 requests in the last {USAGE_CHART_DAYS} days" in section
    rows = section[section.index("<tbody>") :]
    assert f"<td>{today:%Y-%m-%d}</td>\n  <td>40</td>\n  <td>2</td>\n  <td>0</td>" in rows
    yesterday = today - timedelta(days=1)
    assert f"<td>{yesterday:%Y-%m-%d}</td>\n  <td>7</td>\n  <td>0</td>\n  <td>3</td>" in rows
    assert rows.count("<tr>") == 7  # the last seven days, quiet ones too
    assert "5000" not in section and "999" not in section
    assert hash_key(issued.key) not in response.content.decode()
    assert issued.key not in response.content.decode()


def test_a_key_without_usage_shows_an_empty_chart(browser: Client, store: DjangoKeyStore) -> None:
    issued = store.create_key("acme")
    section = usage_section(browser.get(change_url(issued.key_id)))
    assert "No requests in this period" in section
    assert f"0 requests in the last {USAGE_CHART_DAYS} days" in section


def test_the_chart_escapes_what_it_shows(browser: Client, store: DjangoKeyStore) -> None:
    issued = store.create_key("<script>alert(1)</script>", name="<img src=x>")
    usage_table_for(store).add(
        [UsageRow(issued.record.client_id, issued.key_id, timezone.now(), allowed=1)]
    )
    response = browser.get(change_url(issued.key_id))
    assert response.status_code == 200
    assert {tag for tag, _ in elements(usage_section(response))} <= {
        "fieldset", "h2", "div", "svg", "title", "desc", "text", "rect", "line", "g",
        "p", "table", "thead", "tr", "th", "tbody", "td",
    }  # fmt: skip
    assert "<script>alert(1)</script>" not in response.content.decode()


def test_usage_that_cannot_be_read_leaves_the_key_page_up(
    browser: Client, store: DjangoKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = store.create_key("acme")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no such table: m2m_usage")

    monkeypatch.setattr(store, "usage", broken)
    response = browser.get(change_url(issued.key_id))
    assert response.status_code == 200
    assert issued.key_id in response.content.decode()
    section = usage_section(response)
    assert "Usage cannot be read: RuntimeError." in section
    assert "<svg" not in section


def test_the_usage_section_is_read_only(browser: Client, store: DjangoKeyStore) -> None:
    issued = store.create_key("acme")
    section = usage_section(browser.get(change_url(issued.key_id)))
    assert "<form" not in section and "<input" not in section
    assert browser.post(change_url(issued.key_id), {}).status_code == 403
