"""The README's settings table is the reference users read: every field is in it, once."""

from __future__ import annotations

import re

from readme_anchors import README

from m2m_middleware.settings import SETTING_FIELDS

_ROW = re.compile(r"^\| `([a-z_]+)` \|", re.MULTILINE)


def _settings_table() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Settings\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_setting_has_one_row_in_the_readme_table() -> None:
    rows = _ROW.findall(_settings_table())
    missing = [name for name in SETTING_FIELDS if name not in rows]
    assert not missing, f"settings without a row in README.md's Settings table: {missing}"
    repeated = sorted({name for name in rows if rows.count(name) > 1})
    assert not repeated, f"settings with two rows: {repeated}"
    unknown = sorted(set(rows) - set(SETTING_FIELDS))
    assert not unknown, f"rows for settings that do not exist: {unknown}"
