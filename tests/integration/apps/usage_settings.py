"""What the usage apps here share: routes that refuse, rate-limit and charge more.

Every request of a known client lands in one of the usage counts: ``/admin``
needs a scope no key has (403, counted denied), ``/limited`` allows a few a
minute per process (then 429, counted rate-limited), ``/heavy`` costs 3 units.
"""

from __future__ import annotations

from typing import Any

PATHS = ("/orders", "/admin", "/heavy", "/limited")
ROUTES: list[dict[str, Any]] = [
    {"path": "/admin", "scopes": ["admin"]},
    {"path": "/heavy", "cost": 3},
    {"path": "/limited", "limits": "5/minute"},
]
#: Units an admitted request of each path is charged.
UNITS = {"/heavy": 3}
