"""The M2M settings of the transport apps, from the environment the test sets."""

from __future__ import annotations

import json
import os
from typing import Any


def m2m_config() -> dict[str, Any]:
    return {
        "key_store": os.environ["M2M_TEST_KEY_STORE"],
        "public_paths": ["/health"],
        "trusted_proxies": json.loads(os.environ.get("M2M_TEST_TRUSTED_PROXIES", "[]")),
        "require_https": os.environ.get("M2M_TEST_REQUIRE_HTTPS") == "1",
    }
