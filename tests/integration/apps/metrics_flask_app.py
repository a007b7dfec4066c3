"""A Flask app serving ``/metrics`` for ``gunicorn -w 2 -c python:metrics_gunicorn_conf``;
answers with its worker's pid, so a test can tell the workers apart."""

from __future__ import annotations

import os
from typing import Any

import flask

from m2m_middleware.flask import M2MAuth, current_client

app = flask.Flask(__name__)
app.config["M2M_AUTH"] = {
    "key_store": os.environ["M2M_TEST_KEY_STORE"],
    "rate_limit_storage": "memory://",
    "public_paths": ["/health"],
    "metrics_path": "/metrics",
    "usage": False,
    "alerts": False,
}
M2MAuth(app)


@app.get("/health")
def health() -> Any:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/ping")
def ping() -> Any:
    return {"pid": os.getpid(), "client_id": current_client.client_id}
