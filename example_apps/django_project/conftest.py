from typing import Any

import pytest

pytest_plugins = ["m2m_middleware.testing"]


@pytest.fixture(autouse=True)
def keys_in_memory(settings: Any) -> None:
    """The keys the tests make live in memory, never in the example's key file.

    pytest-django's ``settings`` fixture, so the change ends with the test.
    """
    settings.M2M_AUTH = {**settings.M2M_AUTH, "key_store": "memory://"}
