"""A Flask app for ``gunicorn -w 2 usage_flask_app:app`` on the key store the test names.

Usage is flushed every minute only: what the test reads after SIGTERM was
written by each worker's exit flush.
"""

from __future__ import annotations

import os
from typing import Any

import flask
from usage_settings import ROUTES

from m2m_middleware.flask import M2MAuth

app = flask.Flask(__name__)
app.config["M2M_AUTH"] = {
    "key_store": os.environ["M2M_TEST_KEY_STORE"],
    "rate_limit_storage": "memory://",
    "default_limits": "1000000/hour",
    "public_paths": ["/health"],
    "routes": ROUTES,
    "usage_flush_interval": 60,
}
M2MAuth(app)


@app.get("/health")
def health() -> Any:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/<path:name>")
def anything(name: str) -> Any:
    return {"pid": os.getpid()}
