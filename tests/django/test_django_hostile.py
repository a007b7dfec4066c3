"""Django specifics of hostile input: ``require_scopes`` arguments.

The HTTP cases shared by every adapter are in
tests/conformance/test_hostile_input_conformance.py; the admin's create form
in tests/django/test_django_admin.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from m2m_middleware import ConfigError
from m2m_middleware.django import require_scopes


@pytest.mark.parametrize(
    "scopes",
    [
        ("orders:read\r\nX-Injected: 1",),
        ("orders read",),
        ('orders"read',),
        ("orders\\read",),
        ("r\u00e9ad",),
        ("ok", ""),
        (["orders:read"],),  # a list where a string belongs
    ],
    ids=repr,
)
def test_require_scopes_refuses_a_bad_scope_when_it_decorates(scopes: tuple[Any, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        require_scopes(*scopes)
    assert caught.value.field == "require_scopes"
    assert "\n" not in str(caught.value)


def test_require_scopes_accepts_every_scope_token() -> None:
    every = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')
    require_scopes(every, "orders:read", "https://api.example/orders#read")
