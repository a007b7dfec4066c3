"""Flask's audit record where only WSGI goes: exceptions that propagate out of
the app, and a response started only while its body is read. The records of
ordinary requests and refusals are pinned against Starlette's and Django's in
tests/conformance/test_audit_conformance.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import flask
import pytest
from werkzeug.test import EnvironBuilder

from m2m_middleware import KeyStore, Settings, open_key_store
from m2m_middleware.flask import M2MAuth

AUDIT = "m2m_middleware.audit"


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def statuses(caplog: pytest.LogCaptureFixture) -> list[tuple[bool, int]]:
    return [
        (r.m2m_allowed, r.m2m_status)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == AUDIT
    ]


def test_an_exception_flask_lets_through_is_one_500_record(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    app = flask.Flask("m2m_flask_audit")
    app.config["TESTING"] = True  # PROPAGATE_EXCEPTIONS: the server answers it

    @app.get("/boom")
    def boom() -> Any:
        raise LookupError("the view's own bug")

    M2MAuth(app, settings=Settings(key_store=store))
    key = store.create_key("acme").key
    with pytest.raises(LookupError):
        app.test_client().get("/boom", headers={"X-API-Key": key})
    assert statuses(caplog) == [(True, 500)]


def test_a_response_started_while_its_body_is_read_is_recorded_when_it_closes(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    app = flask.Flask("m2m_flask_audit")
    M2MAuth(app, settings=Settings(key_store=store, default_limits="100/minute"))

    def lazy(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        # A generator: start_response runs only once the server reads the body.
        start_response("202 ACCEPTED", [("Content-Type", "text/plain")])
        yield b"later"

    app.wsgi_app.wsgi_app = lazy  # type: ignore[attr-defined]  # what the gate wraps
    key = store.create_key("acme").key
    environ = EnvironBuilder("/", headers={"X-API-Key": key}).get_environ()
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started.append((status, headers))

    body = app.wsgi_app(environ, start_response)
    assert started == [] and statuses(caplog) == []  # nothing answered yet
    assert list(body) == [b"later"]
    [(status, headers)] = started
    assert status == "202 ACCEPTED" and "RateLimit" in dict(headers)
    assert statuses(caplog) == []  # read, not yet closed
    body.close()  # type: ignore[attr-defined]  # as every WSGI server does
    assert statuses(caplog) == [(True, 202)]
