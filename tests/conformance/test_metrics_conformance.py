"""``metrics_path`` in Starlette, Flask and Django: one endpoint, the same answers.

Each scrape is parsed with prometheus_client's own text parser. The counters
move with the requests each framework's app saw, its ``require_scopes``
refusals have their own counter, and only loopback and private networks may
read the endpoint unless told otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_http_conformance import Maker, api_key, config

from m2m_middleware import KeyStore, open_key_store


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def metrics_config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    return config(store, metrics_path="/metrics", usage=False, alerts=False, **overrides)


def parsed(reply: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert reply.status == 200, reply.body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.body.decode("utf-8"))
        for sample in family.samples
    }


def count(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_the_endpoint_answers_the_text_format(make_app: Maker, store: KeyStore) -> None:
    app = make_app(metrics_config(store))
    reply = app.get("/metrics")
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    assert reply.headers["Cache-Control"] == "no-store"
    names = {name for name, _ in parsed(reply)}
    assert {"m2m_decision_seconds_count", "m2m_key_store_up", "m2m_rate_limit_storage_up"} <= names


def test_the_counters_move_with_the_requests(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    other = store.create_key("other").key
    app = make_app(metrics_config(store))
    for _ in range(3):
        assert app.get("/orders", api_key(key)).status == 200
    assert app.get("/orders", api_key(other)).status == 403
    assert app.get("/orders").status == 401
    assert app.get("/health").status == 200  # public: not counted
    samples = parsed(app.get("/metrics"))
    total = "m2m_requests_total"
    assert count(samples, total, outcome="allowed", error="", scheme="api_key") == 3
    assert (
        count(samples, total, outcome="denied", error="insufficient_scope", scheme="api_key") == 1
    )
    assert count(samples, total, outcome="denied", error="missing_credentials", scheme="") == 1
    assert sum(v for (n, _), v in samples.items() if n == total) == 5
    assert samples[("m2m_decision_seconds_count", frozenset())] == 5


def test_a_require_scopes_refusal_is_counted_apart(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(metrics_config(store))
    assert app.get("/scoped", api_key(key)).status == 403
    assert app.get("/scoped-async", api_key(key)).status == 403
    samples = parsed(app.get("/metrics"))
    # Admitted by the middleware, refused by the view: allowed there, and a refusal here.
    assert count(samples, "m2m_requests_total", outcome="allowed", error="", scheme="api_key") == 2
    refusals = count(
        samples, "m2m_app_refusals_total", error="insufficient_scope", scheme="api_key"
    )
    assert refusals == 2


def test_client_labels_when_asked(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(metrics_config(store, metrics_client_labels=True))
    app.get("/orders", api_key(key))
    samples = parsed(app.get("/metrics"))
    labels = {"outcome": "allowed", "error": "", "scheme": "api_key", "client": "acme"}
    assert count(samples, "m2m_requests_total", **labels) == 1
    assert key not in app.get("/metrics").body.decode()


def test_head_answers_without_a_body(make_app: Maker, store: KeyStore) -> None:
    reply = make_app(metrics_config(store))("HEAD", "/metrics")
    assert reply.status == 200
    assert reply.body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_405_with_allow(make_app: Maker, store: KeyStore, method: str) -> None:
    reply = make_app(metrics_config(store))(method, "/metrics")
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"
    assert reply.headers["Cache-Control"] == "no-store"


def test_an_address_outside_the_allowed_networks_gets_404(make_app: Maker, store: KeyStore) -> None:
    app = make_app(metrics_config(store))
    reply = app("GET", "/metrics", peer="203.0.113.7")
    assert reply.status == 404
    assert b"m2m_" not in reply.body
    assert app("GET", "/metrics", peer="10.20.30.40").status == 200


def test_a_forwarded_request_without_trusted_proxies_gets_404(
    make_app: Maker, store: KeyStore
) -> None:
    app = make_app(metrics_config(store))
    assert app("GET", "/metrics", {"X-Forwarded-For": "203.0.113.7"}).status == 404


def test_behind_a_trusted_proxy_the_client_address_decides(
    make_app: Maker, store: KeyStore
) -> None:
    app = make_app(metrics_config(store, trusted_proxies=["127.0.0.1/32"]))
    assert app("GET", "/metrics", {"X-Forwarded-For": "203.0.113.7"}).status == 404
    assert app("GET", "/metrics", {"X-Forwarded-For": "10.0.0.7"}).status == 200


def test_the_allowed_networks_are_configurable(make_app: Maker, store: KeyStore) -> None:
    app = make_app(metrics_config(store, metrics_allowed_networks=["203.0.113.0/24"]))
    assert app("GET", "/metrics", peer="203.0.113.7").status == 200
    assert app("GET", "/metrics").status == 404  # loopback is no longer in the list


def test_one_answer_in_three_frameworks(every_framework: dict[str, Maker], store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    seen = {}
    for name, make in every_framework.items():
        app = make(metrics_config(store))
        app.get("/orders", api_key(key))
        app.get("/orders")
        samples = {
            k: v for k, v in parsed(app.get("/metrics")).items() if k[0] == "m2m_requests_total"
        }
        seen[name] = samples
    first, *rest = seen.values()
    assert all(other == first for other in rest), seen
