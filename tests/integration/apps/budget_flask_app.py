"""A Flask app for ``gunicorn -w 2 budget_flask_app:app``; answers with its worker's pid."""

from __future__ import annotations

import os
from typing import Any

import flask
from budget_settings import m2m_config

from m2m_middleware.flask import M2MAuth, current_client

app = flask.Flask(__name__)
app.config["M2M_AUTH"] = m2m_config()
M2MAuth(app)


@app.get("/health")
def health() -> Any:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/ping")
def ping() -> Any:
    return {"pid": os.getpid(), "client_id": current_client.client_id}
