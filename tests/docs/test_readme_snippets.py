"""Every Python snippet of the README type-checks with ``mypy --strict``, as a user's module.

The rule: each fenced block whose info string is ``python`` (or ``py``) is one
module of its own, checked as it stands, with the package and its frameworks
installed (Flask, Django with django-stubs, Starlette). A snippet that cannot
stand alone (a fragment of a bigger file, with ``...`` placeholders) is marked
by the line ``<!-- snippet: fragment -->`` right above its fence and is then
skipped; there is none today, so every snippet is something a user can paste.
Errors are reported at their README line.

The same run checks one module of our own beside them: every setting that holds
several values takes a list, as people write them (it is then a tuple inside).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import m2m_middleware

README = Path(__file__).resolve().parents[2] / "README.md"
FRAGMENT_MARK = "<!-- snippet: fragment -->"
_FENCE = re.compile(r"^```[ \t]*(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)

pytestmark = pytest.mark.slow


@dataclass
class Snippet:
    line: int  # the README line of the snippet's first line of code
    code: str
    fragment: bool

    @property
    def module(self) -> str:
        return f"readme_line_{self.line}"


def snippets(text: str) -> list[Snippet]:
    found = []
    for match in _FENCE.finditer(text):
        if match.group(1).lower() not in ("python", "py"):
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        first_line = text.count("\n", 0, match.start()) + 2
        found.append(Snippet(first_line, match.group(2), before.strip() == FRAGMENT_MARK))
    return found


def test_the_rule_finds_the_readmes_snippets() -> None:
    found = snippets(README.read_text(encoding="utf-8"))
    checked = [s for s in found if not s.fragment]
    assert len(checked) >= 8, [s.line for s in found]
    quickstarts = [s.code for s in checked if "M2MMiddleware" in s.code or "M2MAuth" in s.code]
    assert len(quickstarts) >= 2
    assert any("M2MAuthMiddleware" in s.code for s in checked)  # Django's


def test_the_rule_reads_fences_and_marks() -> None:
    text = "\n".join(
        [
            "# Title",
            "```python",
            "x: int = 1",
            "```",
            "```",
            "not python",
            "```",
            FRAGMENT_MARK,
            "```py",
            "...",
            "```",
        ]
    )
    assert snippets(text) == [Snippet(3, "x: int = 1\n", False), Snippet(10, "...\n", True)]


#: Settings with a list wherever a field holds several values.
SETTINGS_WITH_LISTS = """\
from m2m_middleware import Settings

settings = Settings(
    schemes=["api_key", "jwt"],
    key_store="memory://",
    public_paths=["/health", "/docs/*"],
    routes=[{"path": "/orders*", "methods": ["GET"], "scopes": ["orders:read"], "cost": 2}],
    jwt_audience=["https://api.example.com", "https://orders.example.com"],
    jwt_algorithms=["HS256"],
    jwt_client_id_claims=["client_id", "sub"],
    jwt_keys="an HMAC secret of at least 32 bytes, for this test",
)
"""


def test_settings_that_hold_several_values_are_tuples_inside() -> None:
    namespace: dict[str, object] = {}
    exec(SETTINGS_WITH_LISTS, namespace)
    settings = namespace["settings"]
    for name in (
        "schemes",
        "public_paths",
        "routes",
        "jwt_audience",
        "jwt_algorithms",
        "jwt_client_id_claims",
    ):
        assert isinstance(getattr(settings, name), tuple), name


def test_every_readme_snippet_type_checks_with_mypy_strict(tmp_path: Path) -> None:
    checked = [s for s in snippets(README.read_text(encoding="utf-8")) if not s.fragment]
    for snippet in checked:
        (tmp_path / f"{snippet.module}.py").write_text(snippet.code, encoding="utf-8")
    (tmp_path / "settings_with_lists.py").write_text(SETTINGS_WITH_LISTS, encoding="utf-8")
    # The package as this test process imports it, whether installed or a checkout:
    # a folder holding only a link to it, so mypy sees nothing else from there.
    package_root = tmp_path / "package"
    package_root.mkdir()
    (package_root / "m2m_middleware").symlink_to(Path(m2m_middleware.__file__).parent)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n", encoding="utf-8")  # not the project's own [tool.mypy]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-color-output",
            "--show-error-codes",
            *(f"{s.module}.py" for s in checked),
            "settings_with_lists.py",
        ],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MYPY")},
            "MYPYPATH": str(package_root),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = {s.module: s.line for s in checked}

    def at_readme_line(match: re.Match[str]) -> str:
        return f"README.md:{lines[match.group(1)] + int(match.group(2)) - 1}:"

    report = re.sub(r"(readme_line_\d+)\.py:(\d+):", at_readme_line, result.stdout)
    assert result.returncode == 0, report + result.stderr
