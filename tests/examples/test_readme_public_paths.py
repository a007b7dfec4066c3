"""The README's Django quickstart opens the admin to its own login, at /admin too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from m2m_middleware import Engine, Settings
from m2m_middleware.outcome import PUBLIC

README = Path(__file__).resolve().parents[2] / "README.md"


def django_quickstart_public_paths() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Django") :]
    found = re.search(r'"public_paths": (\[[^\]]*\])', section)
    assert found is not None, "the Django quickstart sets no public_paths"
    paths: list[str] = ast.literal_eval(found[1])
    return paths


def test_the_django_quickstart_opens_every_admin_path_and_nothing_else() -> None:
    engine = Engine(Settings(key_store="memory://", public_paths=django_quickstart_public_paths()))
    for path in ("/admin", "/admin/", "/admin/login/", "/admin/m2m_middleware/apikey/add/"):
        assert engine.check("GET", path, None, None) is PUBLIC, path
    for path in ("/orders", "/administrator", "/admins/x"):
        assert engine.check("GET", path, None, None) is not PUBLIC, path
