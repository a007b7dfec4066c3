"""Prometheus metrics at ``metrics_path``: what they count, who may read them, and their cost.

Every scrape here is parsed with prometheus_client's own text parser, as a
Prometheus server would read it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from core_support import make_engine
from jwt_support import FakeIdP, Mono, finish_in_a_thread, jwt_engine
from prometheus_client.parser import text_string_to_metric_families

from m2m_middleware import Allowed, ConfigError, Denied, Engine, KeyStore, Settings
from m2m_middleware.errors import StoreUnavailable
from m2m_middleware.request_view import RequestView
from m2m_middleware.stores import KeyRecord, MemoryKeyStore
from m2m_middleware.telemetry.metrics import DECISION_BUCKETS, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Check = Callable[..., "Allowed | Denied"]
JWKS_URL = "https://idp.example.test/.well-known/jwks.json"


class FlakyStore(MemoryKeyStore):
    """A memory store that can be switched off, as a database server can."""

    down = False

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        if self.down:
            raise StoreUnavailable("connection refused")
        return super()._fetch_by_hash(key_hash)


def metrics_engine(store: KeyStore, **fields: Any) -> Engine:
    fields.setdefault("metrics_path", "/metrics")
    fields.setdefault("public_paths", ["/health"])
    fields.setdefault("usage", False)
    fields.setdefault("alerts", False)
    return make_engine(store, **fields)


def scrape(engine: Engine, address: str | None = "127.0.0.1", **view: Any) -> Any:
    view.setdefault("headers", {})
    return engine.serve(
        RequestView(view.pop("method", "GET"), "/metrics", client_address=address, **view)
    )


def samples(engine: Engine) -> Samples:
    """Every sample of one scrape, by (name, labels), as Prometheus parses the text."""
    served = scrape(engine)
    assert served.status == 200, served.body
    parsed: Samples = {}
    for family in text_string_to_metric_families(served.body.decode("utf-8")):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def requests_total(engine: Engine, **labels: str) -> float:
    """The sum of m2m_requests_total over the series that carry ``labels``."""
    wanted = set(labels.items())
    return sum(
        value
        for (name, have), value in samples(engine).items()
        if name == "m2m_requests_total" and wanted <= have
    )


def series(engine: Engine, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples(engine) if n == name]


@pytest.fixture(params=["sync", "async"])
def check(request: pytest.FixtureRequest) -> Check:
    """``check(engine, method, path, authorization, api_key)`` through either front door."""
    if request.param == "sync":
        return lambda engine, *args: engine.check(*args)
    return lambda engine, *args: asyncio.run(engine.acheck(*args))


# -- what is counted ----------------------------------------------------------------------


def test_requests_are_counted_by_outcome_error_and_scheme(
    memory_store: KeyStore, check: Check
) -> None:
    key = memory_store.create_key("acme", scopes=["orders:read"]).key
    engine = metrics_engine(
        memory_store, routes=[{"path": "/admin", "scopes": ["admin"]}], default_limits="3/minute"
    )
    assert check(engine, "GET", "/orders", None, key).allowed
    assert check(engine, "GET", "/orders", None, key).allowed
    assert not check(engine, "GET", "/admin", None, key).allowed  # insufficient_scope
    assert check(engine, "GET", "/orders", None, key).allowed  # a refusal charged nothing
    assert not check(engine, "GET", "/orders", None, key).allowed  # 3/minute spent
    assert not check(engine, "GET", "/orders", None, None).allowed
    assert not check(engine, "GET", "/orders", f"Bearer {key}x", None).allowed
    got = {
        (labels["outcome"], labels["error"], labels["scheme"]): value
        for (name, frozen), value in samples(engine).items()
        if name == "m2m_requests_total"
        for labels in [dict(frozen)]
    }
    assert got == {
        ("allowed", "", "api_key"): 3,
        ("denied", "insufficient_scope", "api_key"): 1,
        ("denied", "rate_limited", "api_key"): 1,
        ("denied", "missing_credentials", ""): 1,
        ("denied", "invalid_token", ""): 1,
    }


def test_a_public_path_is_not_counted_nor_timed(memory_store: KeyStore, check: Check) -> None:
    engine = metrics_engine(memory_store)
    for _ in range(3):
        assert check(engine, "GET", "/health", None, None).allowed
    assert requests_total(engine) == 0
    assert samples(engine)[("m2m_decision_seconds_count", frozenset())] == 0


def test_scraping_is_not_a_request(memory_store: KeyStore) -> None:
    engine = metrics_engine(memory_store)
    samples(engine)
    samples(engine)
    assert requests_total(engine) == 0


def test_a_revoked_key_counts_its_scheme_but_names_no_client(memory_store: KeyStore) -> None:
    issued = memory_store.create_key("acme")
    memory_store.revoke_key(issued.record.key_id)
    engine = metrics_engine(memory_store, metrics_client_labels=True)
    assert not engine.check("GET", "/x", None, issued.key).allowed
    assert series(engine, "m2m_requests_total") == [
        {"outcome": "denied", "error": "invalid_token", "scheme": "api_key", "client": ""}
    ]


def test_jwt_decisions_are_counted_with_the_jwt_scheme() -> None:
    import jwt as pyjwt
    from jwt_support import SECRET, claims

    engine = jwt_engine(metrics_path="/metrics", usage=False, alerts=False)
    token = pyjwt.encode(claims(), SECRET, algorithm="HS256")
    assert engine.check("GET", "/x", f"Bearer {token}", None).allowed
    assert requests_total(engine, outcome="allowed", scheme="jwt") == 1


def test_the_histogram_times_each_counted_decision_in_microsecond_buckets(
    memory_store: KeyStore, check: Check
) -> None:
    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store)
    for _ in range(5):
        check(engine, "GET", "/x", None, key)
    check(engine, "GET", "/x", None, None)
    got = samples(engine)
    assert got[("m2m_decision_seconds_count", frozenset())] == 6
    assert 0 < got[("m2m_decision_seconds_sum", frozenset())] < 6  # seconds, not ns or ms
    bounds = sorted(
        float(dict(labels)["le"]) for (name, labels) in got if name == "m2m_decision_seconds_bucket"
    )
    # An API-key decision takes microseconds: buckets must tell 10 us from 1 ms.
    assert bounds[0] <= 0.00001 and 0.001 in bounds
    assert sum(1 for b in bounds if b < 0.001) >= 5
    assert tuple(bounds[:-1]) == DECISION_BUCKETS


def test_an_app_refusal_has_its_own_counter_and_leaves_the_requests_as_they_were(
    memory_store: KeyStore,
) -> None:
    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store)
    outcome = engine.gate("GET", "/scoped", None, key)
    assert isinstance(outcome, Allowed)
    # What each adapter's require_scopes hands the engine when the view refuses.
    engine.app_refused(Denied(403, "insufficient_scope", [], b"", "", outcome.client))
    got = samples(engine)
    assert got[("m2m_requests_total", _labels(outcome="allowed", error="", scheme="api_key"))] == 1
    assert (
        got[("m2m_app_refusals_total", _labels(error="insufficient_scope", scheme="api_key"))] == 1
    )


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


# -- client labels: off by default, bounded when on ------------------------------------------


def test_client_labels_are_off_by_default(memory_store: KeyStore) -> None:
    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store)
    engine.check("GET", "/x", None, key)
    assert series(engine, "m2m_requests_total") == [
        {"outcome": "allowed", "error": "", "scheme": "api_key"}
    ]
    assert "acme" not in scrape(engine).body.decode()


def test_client_labels_stop_at_the_limit_and_the_rest_are_other(memory_store: KeyStore) -> None:
    keys = [memory_store.create_key(f"client-{n}").key for n in range(5)]
    engine = metrics_engine(memory_store, metrics_client_labels=True, metrics_client_label_limit=2)
    for _ in range(2):
        for key in keys:
            engine.check("GET", "/x", None, key)
    assert requests_total(engine, client="client-0") == 2
    assert requests_total(engine, client="client-1") == 2
    assert requests_total(engine, client="other") == 6
    clients = {labels["client"] for labels in series(engine, "m2m_requests_total")}
    assert clients == {"client-0", "client-1", "other"}


def test_a_refused_client_keeps_its_label(memory_store: KeyStore) -> None:
    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store, metrics_client_labels=True, default_limits="1/minute")
    engine.check("GET", "/x", None, key)
    engine.check("GET", "/x", None, key)
    assert requests_total(engine, client="acme", outcome="denied", error="rate_limited") == 1


def test_no_secret_is_in_the_metrics(memory_store: KeyStore) -> None:
    issued = memory_store.create_key("acme")
    engine = metrics_engine(memory_store, metrics_client_labels=True)
    engine.check("GET", "/x", None, issued.key)
    engine.check("GET", "/x", f"Bearer {issued.key}", None)
    body = scrape(engine).body.decode()
    from hashlib import sha256

    for secret in (issued.key, issued.key[-16:], sha256(issued.key.encode()).hexdigest()):
        assert secret not in body


def test_each_engine_counts_apart(memory_store: KeyStore) -> None:
    key = memory_store.create_key("acme").key
    first, second = metrics_engine(memory_store), metrics_engine(memory_store)
    first.check("GET", "/x", None, key)
    assert requests_total(first) == 1
    assert requests_total(second) == 0


# -- health, read when scraped --------------------------------------------------------------


def test_the_key_store_gauge_follows_an_outage() -> None:
    store = FlakyStore()
    key = store.create_key("acme").key
    engine = metrics_engine(store, key_cache_ttl=0)
    up = ("m2m_key_store_up", frozenset())
    assert samples(engine)[up] == 1
    store.down = True
    assert engine.check("GET", "/x", None, key).status == 503  # type: ignore[union-attr]
    assert samples(engine)[up] == 0
    store.down = False
    assert engine.check("GET", "/x", None, key).allowed
    assert samples(engine)[up] == 1


def test_the_limit_storage_gauge_follows_an_outage(
    memory_store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store, default_limits="100/minute", on_storage_error="allow")
    up = ("m2m_rate_limit_storage_up", frozenset())
    assert samples(engine)[up] == 1
    windows = engine.limiter.windows
    assert windows is not None

    def broken(*args: Any) -> Any:
        raise OSError("storage gone")

    monkeypatch.setattr(windows, "take", broken)
    assert engine.check("GET", "/x", None, key).allowed  # the policy is allow
    assert samples(engine)[up] == 0


def test_jwks_fetches_are_counted_by_result() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt_support import public_jwk

    key = ec.generate_private_key(ec.SECP256R1())
    idp = FakeIdP([public_jwk(key, kid="k1", use="sig", alg="ES256")])
    mono = Mono()
    engine = jwt_engine(
        jwt_jwks_url=JWKS_URL,
        metrics_path="/metrics",
        usage=False,
        alerts=False,
        jwt_algorithms=["ES256"],
    )
    assert engine.tokens is not None and engine.tokens.jwks is not None
    jwks = engine.tokens.jwks
    jwks.fetch, jwks.clock, jwks.spawn = idp, mono, finish_in_a_thread
    got = samples(engine)
    assert got[("m2m_jwks_fetches_total", _labels(result="ok"))] == 0
    assert got[("m2m_jwks_fetches_total", _labels(result="error"))] == 0
    jwks.prepare("k1")
    assert samples(engine)[("m2m_jwks_fetches_total", _labels(result="ok"))] == 1
    assert samples(engine)[("m2m_jwks_up", frozenset())] == 1
    idp.down = OSError("idp down")
    mono.advance(3600)
    jwks.prepare("k1")
    got = samples(engine)
    assert got[("m2m_jwks_fetches_total", _labels(result="error"))] == 1
    assert got[("m2m_jwks_up", frozenset())] == 0


def test_without_a_jwks_url_or_a_token_service_their_metrics_are_absent(
    memory_store: KeyStore,
) -> None:
    names = {name for name, _ in samples(metrics_engine(memory_store))}
    assert not {n for n in names if n.startswith(("m2m_jwks", "m2m_token"))}


def test_tokens_issued_and_refused_are_counted(memory_store: KeyStore) -> None:
    issued = memory_store.create_key("acme")
    engine = metrics_engine(
        memory_store,
        schemes=("api_key", "jwt"),
        token_endpoint="/oauth/token",
        token_issuer="https://api.example.test",
        signing_key_secret="metrics tests: a signing secret",
        invalidation_url="",
    )

    def token_request(secret: str) -> int:
        basic = base64.b64encode(f"{issued.record.key_id}:{secret}".encode()).decode()
        view = RequestView(
            "POST",
            "/oauth/token",
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "authorization": f"Basic {basic}",
            },
            body=urlencode({"grant_type": "client_credentials"}).encode(),
        )
        return engine.serve(view).status

    assert token_request(issued.key) == 200
    assert token_request(issued.key) == 200
    assert token_request("m2m_not_the_key") == 401
    got = samples(engine)
    assert got[("m2m_token_requests_total", _labels(outcome="issued", error=""))] == 2
    assert (
        got[("m2m_token_requests_total", _labels(outcome="refused", error="invalid_client"))] == 1
    )
    jwks = engine.serve(RequestView("GET", "/.well-known/jwks.json", headers={}))
    assert jwks.status == 200 and json.loads(jwks.body)["keys"]
    assert samples(engine)[("m2m_token_requests_total", _labels(outcome="issued", error=""))] == 2


# -- the endpoint --------------------------------------------------------------------------


def test_the_endpoint_serves_the_text_format_uncached(memory_store: KeyStore) -> None:
    served = scrape(metrics_engine(memory_store))
    assert served.status == 200
    assert served.content_type.startswith("text/plain; version=")
    assert ("Cache-Control", "no-store") in served.headers
    assert list(text_string_to_metric_families(served.body.decode()))


def test_head_answers_without_a_body(memory_store: KeyStore) -> None:
    served = scrape(metrics_engine(memory_store), method="HEAD")
    assert (served.status, served.body) == (200, b"")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_allow(memory_store: KeyStore, method: str) -> None:
    served = scrape(metrics_engine(memory_store), method=method)
    assert served.status == 405
    assert ("Allow", "GET, HEAD") in served.headers


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "::1", "10.1.2.3", "172.20.0.5", "192.168.1.9", "fd00::5"]
)
def test_loopback_and_private_networks_may_read_by_default(
    memory_store: KeyStore, address: str
) -> None:
    assert scrape(metrics_engine(memory_store), address).status == 200


@pytest.mark.parametrize("address", ["203.0.113.7", "2001:db8::1", "8.8.8.8", None, "", "junk"])
def test_anyone_else_gets_a_plain_404(memory_store: KeyStore, address: str | None) -> None:
    served = scrape(metrics_engine(memory_store), address)
    assert served.status == 404
    assert b"m2m_" not in served.body
    assert ("Cache-Control", "no-store") in served.headers


def test_an_outsider_gets_404_whatever_the_method(memory_store: KeyStore) -> None:
    assert scrape(metrics_engine(memory_store), "203.0.113.7", method="POST").status == 404


def test_allowed_networks_are_configurable(memory_store: KeyStore) -> None:
    engine = metrics_engine(memory_store, metrics_allowed_networks="203.0.113.0/24")
    assert scrape(engine, "203.0.113.7").status == 200
    assert scrape(engine, "127.0.0.1").status == 404
    anyone = metrics_engine(memory_store, metrics_allowed_networks=["0.0.0.0/0", "::/0"])
    assert scrape(anyone, "8.8.8.8").status == 200


def test_a_request_through_an_untrusted_proxy_is_refused(memory_store: KeyStore) -> None:
    """A proxy on the same host makes every client 127.0.0.1: without ``trusted_proxies``
    a request that says it was forwarded cannot be told from the internet's."""
    engine = metrics_engine(memory_store)
    for name, value in [
        ("x-forwarded-for", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7"),
        ("x-real-ip", "203.0.113.7"),
    ]:
        assert scrape(engine, headers={name: value}).status == 404, name


def test_behind_trusted_proxies_the_forwarded_address_decides(memory_store: KeyStore) -> None:
    engine = metrics_engine(memory_store, trusted_proxies=["127.0.0.1/32"])
    outside = scrape(engine, headers={"x-forwarded-for": "203.0.113.7"})
    inside = scrape(engine, headers={"x-forwarded-for": "10.0.0.9"})
    assert (outside.status, inside.status) == (404, 200)
    # From a peer that is not a trusted proxy, its header is ignored: its own address counts.
    assert scrape(engine, "203.0.113.9", headers={"x-forwarded-for": "10.0.0.9"}).status == 404


def test_under_require_https_plain_http_is_refused(memory_store: KeyStore) -> None:
    engine = metrics_engine(memory_store, require_https=True)
    assert scrape(engine).status == 403
    assert scrape(engine, scheme="https").status == 200


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "not-a-network", 42, ["10.0.0.0/8", None]])
def test_a_bad_network_is_a_config_error_naming_the_field(bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(metrics_allowed_networks=bad)
    assert caught.value.field == "metrics_allowed_networks"


def test_networks_may_be_one_string() -> None:
    settings = Settings(metrics_allowed_networks="10.0.0.0/8, ::1")
    assert settings.metrics_allowed_networks == ("10.0.0.0/8", "::1/128")


# -- multiprocess mode, in fresh interpreters (prometheus_client picks it at import) ---------

_TWO_PROCESSES = r"""
import os, sys
from m2m_middleware import Engine, Settings, open_key_store
from m2m_middleware.request_view import RequestView

store = open_key_store(sys.argv[1])
engine = Engine(Settings(key_store=store, metrics_path="/metrics", usage=False, alerts=False,
                         rate_limit_storage="memory://"))
if sys.argv[2] == "count":
    for _ in range(int(sys.argv[4])):
        engine.check("GET", "/x", None, sys.argv[3])
else:
    served = engine.serve(RequestView("GET", "/metrics", headers={}, client_address="127.0.0.1"))
    sys.stdout.write(served.body.decode())
"""


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_multiprocess_mode_sums_every_process(tmp_path: Path) -> None:
    from m2m_middleware import open_key_store

    url = "sqlite:///" + str(tmp_path / "keys.db")
    store = open_key_store(url)
    key = store.create_key("acme").key
    store.close()
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    for count in ("3", "4"):
        done = _python(_TWO_PROCESSES, url, "count", key, count, env=env)
        assert done.returncode == 0, done.stderr
    shown = _python(_TWO_PROCESSES, url, "show", env=env)
    assert shown.returncode == 0, shown.stderr
    totals = {
        sample.name: sample.value
        for family in text_string_to_metric_families(shown.stdout)
        for sample in family.samples
        if sample.name in ("m2m_requests_total", "m2m_decision_seconds_count")
    }
    assert totals == {"m2m_requests_total": 7, "m2m_decision_seconds_count": 7}
    assert "m2m_key_store_up 1.0" in shown.stdout


@pytest.mark.slow
def test_a_missing_multiprocess_directory_is_a_config_error(tmp_path: Path) -> None:
    code = (
        "from m2m_middleware import ConfigError, Engine, Settings\n"
        "try:\n"
        "    Engine(Settings(key_store='memory://', metrics_path='/metrics'))\n"
        "except ConfigError as exc:\n"
        "    print(exc.field, exc)\n"
    )
    done = _python(code, env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "nowhere")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("metrics_path ")
    assert "PROMETHEUS_MULTIPROC_DIR" in done.stdout
    assert "Traceback" not in done.stderr


def test_metrics_is_the_engines(memory_store: KeyStore) -> None:
    engine = metrics_engine(memory_store)
    assert engine.telemetry is not None
    assert isinstance(engine.telemetry.metrics, Metrics)
    assert engine.telemetry.metrics.multiprocess_directory is None
    assert "/metrics" in engine.endpoints


def test_a_decision_on_a_bucket_bound_is_in_that_bucket(memory_store: KeyStore) -> None:
    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store)
    outcome = engine.check("GET", "/x", None, key)
    metrics = engine.telemetry.metrics  # type: ignore[union-attr]
    assert metrics is not None
    for seconds in (0.00001, 0.0005, 2.0):
        metrics.observe(outcome, seconds)
    got = samples(engine)

    def bucket(le: str) -> float:
        return got[("m2m_decision_seconds_bucket", _labels(le=le))]

    assert bucket("1e-05") >= 1  # exactly 10 us is "<= 1e-05"
    assert bucket("0.0005") - bucket("0.00025") >= 1
    assert bucket("+Inf") - bucket("1.0") == 1  # above the last bound: only +Inf
    assert got[("m2m_decision_seconds_count", frozenset())] == 4


def test_counts_are_exact_under_threads(memory_store: KeyStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    keys = [memory_store.create_key(f"c{n}").key for n in range(4)]
    engine = metrics_engine(memory_store, metrics_client_labels=True)

    def send(key: str) -> None:
        for _ in range(500):
            engine.check("GET", "/x", None, key)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(send, keys * 2))
    assert requests_total(engine) == 4000
    for n in range(4):
        assert requests_total(engine, client=f"c{n}") == 1000
    assert samples(engine)[("m2m_decision_seconds_count", frozenset())] == 4000


def test_a_forked_child_reports_its_own_requests(memory_store: KeyStore, tmp_path: Path) -> None:
    """A pre-forking server's worker (no PROMETHEUS_MULTIPROC_DIR) starts from zero:
    what the parent counted before the fork is the parent's."""
    import warnings

    key = memory_store.create_key("acme").key
    engine = metrics_engine(memory_store)
    for _ in range(3):
        engine.check("GET", "/x", None, key)
    result = tmp_path / "child.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: forking with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            before = requests_total(engine)
            engine.check("GET", "/x", None, key)
            result.write_text(json.dumps([before, requests_total(engine)]))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(result.read_text()) == [0, 1]
    assert requests_total(engine) == 3


def test_a_collection_that_fails_is_a_503_whose_log_keeps_a_password_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from m2m_middleware.telemetry import metrics as metrics_module

    engine = metrics_engine(MemoryKeyStore())

    def torn(registry: Any) -> bytes:
        raise RuntimeError("cannot reach postgresql://app:hunter2@db/keys")

    monkeypatch.setattr(metrics_module, "generate_latest", torn)
    with caplog.at_level("ERROR", logger="m2m_middleware"):
        served = scrape(engine)
    assert served.status == 503
    text = " ".join(record.getMessage() for record in caplog.records)
    assert "metrics cannot be collected" in text
    assert "hunter2" not in text
