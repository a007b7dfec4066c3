"""A Flask app for ``gunicorn transport_flask_app:app``: echoes what the server saw."""

from __future__ import annotations

from typing import Any

import flask
from transport_settings import m2m_config

from m2m_middleware.flask import M2MAuth

app = flask.Flask(__name__)
app.config["M2M_AUTH"] = m2m_config()
M2MAuth(app)


@app.get("/health")
def health() -> Any:
    return {"status": "ok"}


@app.get("/seen")
def seen() -> Any:
    environ = flask.request.environ
    return {"peer": environ.get("REMOTE_ADDR"), "scheme": environ.get("wsgi.url_scheme")}
