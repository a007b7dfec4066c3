"""The attack catalogue again, against apps that have already verified good tokens.

The verifier remembers the parsed header of a token whose signature verified,
by its text (see ``TokenVerifier.parse``). The catalogue's forgeries mostly carry
the very header texts that good HS256 and ES256 tokens carry, so here each of
Starlette, Flask and Django first lets good tokens through: every attack then
meets the remembered headers, and must still be a 401 ``invalid_token``.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_jwt_conformance import (
    ATTACKS,
    Keys,
    Maker,
    assert_invalid_token,
    bearer,
    catalogue_config,
    claims,
    es256,
    hs256,
    keys,  # noqa: F401 - the module-scoped fixture, shared with that suite's keys
)

from m2m_middleware import open_key_store


@pytest.fixture(scope="module")
def warm_apps() -> dict[str, Any]:
    return {}


@pytest.fixture
def warm_app(make_app: Maker, framework: str, keys: Keys, warm_apps: dict[str, Any]) -> Any:  # noqa: F811
    """One catalogue app per framework that has verified a good HS256 and ES256 token."""
    app = warm_apps.get(framework)
    if app is None:
        store = open_key_store("memory://")
        app = make_app(catalogue_config(store, keys, default_limits="100000/minute"))
        for good in (hs256(claims()), es256(claims(), keys.idp)):
            assert app.get("/whoami", bearer(good)).status == 200
        warm_apps[framework] = app
    return app


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_attack_after_good_tokens_is_401_invalid_token(
    warm_app: Any,
    keys: Keys,  # noqa: F811
    case: str,
) -> None:
    token = ATTACKS[case](keys)
    assert_invalid_token(warm_app.get("/whoami", bearer(token)), token)
    # And the good tokens still pass beside the attacks.
    assert warm_app.get("/whoami", bearer(hs256(claims()))).status == 200
