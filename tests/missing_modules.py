"""Make an optional package look uninstalled, the two ways an import can fail."""

from __future__ import annotations

import builtins
import sys
from typing import Any

import pytest

#: ``sys.modules[name] = None`` ("import of name halted") and an ``__import__``
#: that raises ModuleNotFoundError, as where the package was never installed.
WAYS = ["sys.modules", "__import__"]


def hide(monkeypatch: pytest.MonkeyPatch, module: str, how: str = "sys.modules") -> None:
    """Make ``import module`` (and its submodules) fail until the test ends."""
    if how == "sys.modules":
        for name in [module, *(n for n in sys.modules if n.startswith(module + "."))]:
            monkeypatch.setitem(sys.modules, name, None)
        return
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == module or name.startswith(module + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
