"""The M2M settings of the apps here, from the environment the test sets."""

from __future__ import annotations

import os
from typing import Any


def m2m_config() -> dict[str, Any]:
    return {
        "key_store": os.environ["M2M_TEST_KEY_STORE"],
        "rate_limit_storage": os.environ["M2M_TEST_RATE_LIMIT_STORAGE"],
        "default_limits": os.environ["M2M_TEST_DEFAULT_LIMITS"],
        "public_paths": ["/health"],
    }
