"""Every error code a client can be answered with has its own section in the README,
and every problem ``type`` URL points at it.

The ``type`` of a problem body (RFC 9457) is where a person who meets the
error goes to read what it means: a fragment that names no heading lands on
the top of the page. The conformance suite checks the bodies the three
adapters actually send the same way (``assert_problem``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from urllib.parse import urlsplit

import pytest
from readme_anchors import (
    README,
    REPOSITORY_URL,
    error_sections,
    headings,
    readme_anchors,
    readme_headings,
    slug,
)

import m2m_middleware
from m2m_middleware.errors import AuthError
from m2m_middleware.outcome import deny


def _every_module_imported() -> None:
    """An AuthError subclass may live in any module: import them all first."""
    for module in pkgutil.walk_packages(m2m_middleware.__path__, "m2m_middleware."):
        if module.name != "m2m_middleware.__main__":  # runs the CLI
            importlib.import_module(module.name)


def auth_error_classes() -> list[type[AuthError]]:
    _every_module_imported()
    found: list[type[AuthError]] = [AuthError]
    for cls in found:
        found.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return found


def every_code() -> dict[str, int]:
    """Each ``error`` code the package can answer, with its status (its first class's)."""
    codes: dict[str, int] = {}
    for cls in auth_error_classes():
        codes.setdefault(cls.error, cls.status)
    return codes


def every_status() -> dict[str, set[int]]:
    """Each code with every status it is answered with (``invalid_request``: 400 and 413)."""
    statuses: dict[str, set[int]] = {}
    for cls in auth_error_classes():
        statuses.setdefault(cls.error, set()).add(cls.status)
    return statuses


# -- the anchors are GitHub's -----------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        # What github.com gives the README's own headings (and its links use).
        ("Starlette (or any ASGI app)", "starlette-or-any-asgi-app"),
        (
            "Keys in the project's database, managed in the admin",
            "keys-in-the-projects-database-managed-in-the-admin",
        ),
        ("Error `invalid_token`", "error-invalid_token"),
        ("HTTP answers", "http-answers"),
        ("`m2m_middleware.testing`: a kit", "m2m_middlewaretesting-a-kit"),
        ("Ünïcode — dash", "ünïcode--dash"),
    ],
)
def test_anchors_follow_github(heading: str, anchor: str) -> None:
    assert headings(f"# {heading}\n")[0].anchor == anchor


def test_repeated_headings_and_code_blocks() -> None:
    parsed = headings("# Flask\n\n```python\n# settings.py\n```\n\n## Flask\n### Flask ##\n")
    assert [h.anchor for h in parsed] == ["flask", "flask-1", "flask-2"]
    assert slug("a  b") == "a--b"


def test_every_link_inside_the_readme_lands_on_a_heading() -> None:
    text = README.read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links  # the README links to its own sections
    assert links <= readme_anchors(), sorted(links - readme_anchors())


# -- one section per code -----------------------------------------------------------------


def test_every_known_code_is_found() -> None:
    # The codes of the contract's table, at the least: the search above is not blind.
    assert every_code().items() >= {
        ("missing_credentials", 401),
        ("invalid_token", 401),
        ("invalid_request", 400),
        ("insufficient_scope", 403),
        ("rate_limited", 429),
        ("quota_exceeded", 429),
        ("temporarily_unavailable", 503),
    }


@pytest.mark.parametrize("code", sorted(every_code()))
def test_every_code_has_a_section_a_person_can_act_on(code: str) -> None:
    sections = error_sections()
    assert code in sections, f"README has no '### Error `{code}`' section under '## Errors'"
    body = sections[code].body
    assert f"**{every_code()[code]}.**" in body  # the status, first
    for status in every_status()[code]:  # and every other status the code comes with
        assert f"**{status}.**" in body
    assert "**Client:**" in body  # what the client should do
    assert "**Operator:**" in body  # what the operator can change


def test_every_section_is_a_code_the_package_answers() -> None:
    assert set(error_sections()) <= set(every_code())


def test_the_http_answers_table_links_each_code_to_its_section() -> None:
    table = next(h for h in readme_headings() if h.text == "HTTP answers").body
    linked = dict(re.findall(r"\[`([a-z_]+)`\]\(#([^)]+)\)", table))
    sections = error_sections()
    assert linked == {code: sections[code].anchor for code in linked}
    assert set(linked) == set(sections)


@pytest.mark.parametrize("cls", auth_error_classes(), ids=lambda cls: cls.__name__)
def test_every_type_url_lands_on_its_code_section(cls: type[AuthError]) -> None:
    problem = json.loads(deny(cls("detail"), "api").body)
    url = urlsplit(problem["type"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == REPOSITORY_URL
    assert url.fragment in readme_anchors()
    assert url.fragment == error_sections()[problem["error"]].anchor
