"""Finding the one credential a request carries."""

from __future__ import annotations

import pytest

from m2m_middleware.credentials import extract_credential
from m2m_middleware.errors import AuthError, InvalidRequest, InvalidToken

KEY = "m2m_" + "a" * 38
OTHER = "m2m_" + "b" * 38


def extract(authorization: str | None = None, api_key: str | None = None) -> str | None:
    return extract_credential(authorization, api_key, header_name="X-API-Key", max_length=200)


def test_nothing_sent_is_none() -> None:
    assert extract() is None


@pytest.mark.parametrize(
    "authorization", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"  Bearer   {KEY}  "]
)
def test_bearer(authorization: str) -> None:
    assert extract(authorization=authorization) == KEY


def test_api_key_header() -> None:
    assert extract(api_key=KEY) == KEY
    assert extract(api_key=f"  {KEY} ") == KEY


def test_both_headers_with_the_same_credential_are_fine() -> None:
    assert extract(authorization=f"Bearer {KEY}", api_key=KEY) == KEY


def test_two_different_credentials_are_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        extract(authorization=f"Bearer {KEY}", api_key=OTHER)
    assert caught.value.status == 400
    assert caught.value.error == "invalid_request"
    assert KEY not in caught.value.detail and OTHER not in caught.value.detail


def test_repeated_api_key_header_with_different_values_is_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        extract(api_key=f"{KEY}, {OTHER}")
    assert caught.value.status == 400
    assert "X-API-Key" in caught.value.detail


def test_repeated_api_key_header_with_the_same_value_collapses() -> None:
    assert extract(api_key=f"{KEY}, {KEY}") == KEY
    assert extract(api_key=f"{KEY},{KEY}") == KEY


def test_repeated_authorization_header_is_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        extract(authorization=f"Bearer {KEY}, Bearer {OTHER}")
    assert caught.value.status == 400


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Digest x=1", "Token abc", ""])
def test_other_authorization_schemes_are_not_ours(authorization: str) -> None:
    assert extract(authorization=authorization) is None
    assert extract(authorization=authorization, api_key=KEY) == KEY


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer ", "Bearer    "])
def test_empty_bearer_is_an_invalid_token(authorization: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        extract(authorization=authorization)
    assert caught.value.status == 401
    assert caught.value.error == "invalid_token"


def test_empty_api_key_header_is_an_invalid_token() -> None:
    with pytest.raises(InvalidToken):
        extract(api_key="  ")


def test_oversize_credential_is_an_invalid_token() -> None:
    long = "m2m_" + "a" * 197
    assert len(long) == 201
    with pytest.raises(InvalidToken) as caught:
        extract(authorization=f"Bearer {long}")
    assert long not in caught.value.detail
    with pytest.raises(InvalidToken):
        extract(api_key=long)
    assert extract(api_key=long[:200]) == long[:200]


def test_every_error_is_an_auth_error() -> None:
    for call in (
        lambda: extract(authorization="Bearer "),
        lambda: extract(authorization=f"Bearer {KEY}", api_key=OTHER),
    ):
        with pytest.raises(AuthError):
            call()


def test_a_comma_inside_one_bearer_value_is_one_bad_credential_not_two_headers() -> None:
    # A JWS JSON serialization has commas but no second "<scheme> ": it is one
    # credential (refused later as invalid_token), not a 400 for repeated headers.
    json_jws = '{"payload":"e30","signatures":[{"protected":"e30","signature":"AA"}]}'
    assert extract(authorization=f"Bearer {json_jws}") == json_jws
    for joined in (f"Bearer {KEY}, Bearer {OTHER}", f"Bearer {KEY},Basic dXNlcjpwdw=="):
        with pytest.raises(InvalidRequest, match="more than one Authorization"):
            extract(authorization=joined)
