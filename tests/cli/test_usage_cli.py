"""``m2m usage``: the counts of a key store as a table, JSON or CSV (the billing export).

The counts are made the way an app makes them, by an engine on an SQLite
file with an injected clock (``Engine(telemetry_clock=...)``), flushed, and
then read by the command in-process through ``main()`` (and once as a real
process, after another process counted and exited).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from m2m_middleware import Engine, KeyStore, Settings, cli, open_key_store

Result = tuple[int, str, str]

MARCH_14_09 = datetime(2026, 3, 14, 9, 30, tzinfo=timezone.utc)
MARCH_14_10 = datetime(2026, 3, 14, 10, 5, tzinfo=timezone.utc)
MARCH_20 = datetime(2026, 3, 20, 17, 0, tzinfo=timezone.utc)
APRIL_2 = datetime(2026, 4, 2, 8, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def _no_store_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.STORE_ENV, raising=False)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keys.db'}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own refusals (a --by it does not know)
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result: Result, exit_code: int) -> str:
    code, _, err = result
    assert code == exit_code, result
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("m2m"), err
    assert ": error: " in lines[-1]
    return lines[-1]


def count(store: KeyStore, when: datetime, key: str, times: int = 1, path: str = "/orders") -> None:
    """``times`` requests with ``key`` at ``when``, through an engine, flushed."""
    engine = Engine(
        Settings(
            key_store=store,
            rate_limit_storage="memory://",
            default_limits="30/minute",
            tiers={"small": "3/minute"},
            routes=[{"path": "/reports/*", "cost": 10}],
        ),
        telemetry_clock=when.timestamp,
    )
    for _ in range(times):
        engine.check("GET", path, None, key)
    engine.flush()


@pytest.fixture
def billing(url: str) -> Iterator[dict[str, Any]]:
    """Two clients, three keys, requests in two months; the key ids by name."""
    store = open_key_store(url)
    acme_a = store.create_key("acme")
    acme_b = store.create_key("acme", tier="small")
    globex = store.create_key("globex")
    count(store, MARCH_14_09, acme_a.key, 2)
    count(store, MARCH_14_10, acme_a.key, 1, "/reports/q1")  # 10 units
    count(store, MARCH_14_10, acme_b.key, 4)  # 3 a minute: one 429
    count(store, MARCH_20, globex.key, 1)
    count(store, APRIL_2, acme_a.key, 3)
    store.close()
    yield {
        "acme_a": acme_a.record.key_id,
        "acme_b": acme_b.record.key_id,
        "globex": globex.record.key_id,
        "secrets": [acme_a.key, acme_b.key, globex.key],
    }


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- output ---------------------------------------------------------------------------


def test_the_table_lists_each_hour_and_the_totals(
    capsys: pytest.CaptureFixture[str], url: str, billing: dict[str, Any]
) -> None:
    code, out, err = run(capsys, "usage", "--store", url, "--since", "2026-03")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "PERIOD",
        "CLIENT",
        "KEY",
        "ALLOWED",
        "DENIED",
        "RATE",
        "LIMITED",
        "UNITS",
    ]
    body = [line.split() for line in lines[1:-2]]
    assert [row[:2] for row in body] == sorted(row[:2] for row in body)  # oldest first
    assert sorted(body) == sorted(
        [
            ["2026-03-14", "09:00", "acme", billing["acme_a"], "2", "0", "0", "2"],
            ["2026-03-14", "10:00", "acme", billing["acme_a"], "1", "0", "0", "10"],
            ["2026-03-14", "10:00", "acme", billing["acme_b"], "3", "0", "1", "3"],
            ["2026-03-20", "17:00", "globex", billing["globex"], "1", "0", "0", "1"],
            ["2026-04-02", "08:00", "acme", billing["acme_a"], "3", "0", "0", "3"],
        ]
    )
    assert set(lines[-2]) <= {"-", " "}
    assert lines[-1].split() == ["TOTAL", "10", "0", "1", "19"]
    for secret in billing["secrets"]:
        assert secret not in out


def test_json_is_a_list_of_the_store_s_rows(
    capsys: pytest.CaptureFixture[str], url: str, billing: dict[str, Any]
) -> None:
    code, out, err = run(capsys, "usage", "--store", url, "--since", "all", "--by", "day", "--json")
    assert (code, err) == (0, "")
    rows = json.loads(out)
    # Within a period the order is by key id, which is random here.
    assert next(r for r in rows if r["key_id"] == billing["acme_a"]) == {
        "client_id": "acme",
        "key_id": billing["acme_a"],
        "period_start": "2026-03-14T00:00:00+00:00",
        "allowed": 3,
        "denied": 0,
        "rate_limited": 0,
        "units": 12,
    }
    assert [(r["period_start"][:10], r["client_id"], r["allowed"]) for r in rows] == [
        ("2026-03-14", "acme", 3),
        ("2026-03-14", "acme", 3),
        ("2026-03-20", "globex", 1),
        ("2026-04-02", "acme", 3),
    ]


def test_the_billing_export_is_monthly_totals_per_client_and_key(
    capsys: pytest.CaptureFixture[str], url: str, billing: dict[str, Any]
) -> None:
    code, out, err = run(capsys, "usage", "--store", url, "--by", "month", "--csv")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "period_start,client_id,key_id,allowed,denied,rate_limited,units"
    rows = csv_rows(out)
    assert [
        (
            r["period_start"],
            r["client_id"],
            r["key_id"],
            r["allowed"],
            r["rate_limited"],
            r["units"],
        )
        for r in rows
    ] == sorted(
        [
            ("2026-03-01T00:00:00+00:00", "acme", billing["acme_a"], "3", "0", "12"),
            ("2026-03-01T00:00:00+00:00", "acme", billing["acme_b"], "3", "1", "3"),
            ("2026-03-01T00:00:00+00:00", "globex", billing["globex"], "1", "0", "1"),
            ("2026-04-01T00:00:00+00:00", "acme", billing["acme_a"], "3", "0", "3"),
        ]
    )
    assert "\r" not in out


def test_per_client_adds_each_client_s_keys_up(
    capsys: pytest.CaptureFixture[str], url: str, billing: dict[str, Any]
) -> None:
    code, out, _ = run(capsys, "usage", "--store", url, "--by", "month", "--per", "client", "--csv")
    assert code == 0
    rows = csv_rows(out)
    assert list(rows[0]) == [
        "period_start",
        "client_id",
        "allowed",
        "denied",
        "rate_limited",
        "units",
    ]
    assert [(r["period_start"][:7], r["client_id"], r["allowed"], r["units"]) for r in rows] == [
        ("2026-03", "acme", "6", "15"),
        ("2026-03", "globex", "1", "1"),
        ("2026-04", "acme", "3", "3"),
    ]
    code, out, _ = run(
        capsys, "usage", "--store", url, "--by", "month", "--per", "client", "--json"
    )
    assert "key_id" not in json.loads(out)[0]  # absent, not None (None is a token's)
    code, out, _ = run(capsys, "usage", "--store", url, "--by", "month", "--per", "client")
    assert out.splitlines()[0].split() == [
        "PERIOD",
        "CLIENT",
        "ALLOWED",
        "DENIED",
        "RATE",
        "LIMITED",
        "UNITS",
    ]


def test_client_and_key_pick_rows(
    capsys: pytest.CaptureFixture[str], url: str, billing: dict[str, Any]
) -> None:
    _, out, _ = run(
        capsys, "usage", "--store", url, "--since", "all", "--client", "globex", "--json"
    )
    assert [r["client_id"] for r in json.loads(out)] == ["globex"]
    _, out, _ = run(
        capsys, "usage", "--store", url, "--since", "all", "--key", billing["acme_b"], "--json"
    )
    assert [r["key_id"] for r in json.loads(out)] == [billing["acme_b"]]
    code, out, _ = run(capsys, "usage", "--store", url, "--since", "all", "--client", "nobody")
    assert code == 0 and out.startswith("No usage recorded")


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        ("2026-03-14T10:00Z", None, 4),  # an aware time
        ("2026-03-14T10:00", None, 4),  # a naive one is UTC
        ("2026-03-14T10:59+00:00", None, 4),  # rounded down to its hour
        ("2026-03-15", None, 2),
        ("2026-04", None, 1),
        ("2026-03", "2026-04", 4),  # until is exclusive
        ("2026-03-14", "2026-03-14T10:00Z", 1),
    ],
)
def test_since_and_until_take_dates_and_times(
    capsys: pytest.CaptureFixture[str],
    url: str,
    billing: dict[str, Any],
    since: str,
    until: str | None,
    expected: int,
) -> None:
    argv = ["usage", "--store", url, "--json", "--since", since]
    if until is not None:
        argv += ["--until", until]
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    assert len(json.loads(out)) == expected


def test_by_default_hours_and_days_go_back_a_week_and_months_to_the_start(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    store = open_key_store(url)
    issued = store.create_key("acme")
    now = datetime.now(timezone.utc)
    count(store, now - timedelta(days=10), issued.key, 1)
    count(store, now - timedelta(days=2), issued.key, 2)
    store.close()
    for by in ("hour", "day"):
        _, out, _ = run(capsys, "usage", "--store", url, "--by", by, "--json")
        assert [r["allowed"] for r in json.loads(out)] == [2], by
    _, out, _ = run(capsys, "usage", "--store", url, "--by", "day", "--since", "12d", "--json")
    assert [r["allowed"] for r in json.loads(out)] == [1, 2]
    _, out, _ = run(capsys, "usage", "--store", url, "--by", "month", "--json")
    assert sum(r["allowed"] for r in json.loads(out)) == 3
    _, out, _ = run(capsys, "usage", "--store", url, "--since", "12d", "--until", "5d", "--json")
    assert [r["allowed"] for r in json.loads(out)] == [1]


def test_the_store_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    url: str,
    billing: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cli.STORE_ENV, url)
    code, out, _ = run(capsys, "usage", "--since", "all", "--json")
    assert code == 0 and len(json.loads(out)) == 5


def test_a_client_id_a_spreadsheet_would_run_is_quoted_in_csv(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    store = open_key_store(url)
    issued = store.create_key('=HYPERLINK("http://evil")')
    count(store, MARCH_14_09, issued.key)
    store.close()
    _, out, _ = run(capsys, "usage", "--store", url, "--since", "all", "--csv")
    (row,) = csv_rows(out)
    assert row["client_id"] == '\'=HYPERLINK("http://evil")'
    _, out, _ = run(capsys, "usage", "--store", url, "--since", "all", "--json")
    assert json.loads(out)[0]["client_id"] == '=HYPERLINK("http://evil")'  # JSON as stored


def test_stored_text_cannot_steer_the_terminal(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    from m2m_middleware import UsageRow
    from m2m_middleware.telemetry.tables import usage_table_for

    store = open_key_store(url)
    # As a row written by hand, or by an older version, might hold it.
    usage_table_for(store).add([UsageRow("evil\x1b[2J\nTOTAL", None, MARCH_14_09, 1)])
    store.close()
    _, out, _ = run(capsys, "usage", "--store", url, "--since", "all")
    assert "\x1b" not in out
    assert [line.split()[0] for line in out.splitlines()].count("TOTAL") == 1


# -- bad input: one line, never a traceback ---------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--since", "yesterday"], "--since"),
        (["--since", "-7d"], "--since"),
        (["--since", "2026-13"], "--since"),
        (["--until", "soon"], "--until"),
        (["--until", "-1d"], "--until"),
        (["--since", "2026-03-15", "--until", "2026-03-14"], "--until"),
        (["--since", "1d", "--until", "2d"], "--until"),
        (["--since", "999999d"], "--since"),
        (["--since", "2026-02-30"], "--since"),
        (["--by", "week"], "--by"),
        (["--per", "team"], "--per"),
        (["--json", "--csv"], "--csv"),
        (["--client", ""], "--client"),
        (["--client", "a\nb"], "--client"),
        (["--key", " "], "--key"),
        (["--store", "ftp://x"], "--store"),
        (["--store", ""], "--store"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str], url: str, argv: list[str], named: str
) -> None:
    if "--store" not in argv:
        argv = [*argv, "--store", url]
    line = one_line_error(run(capsys, "usage", *argv), 2)
    assert named in line


def test_a_store_that_cannot_be_read_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    line = one_line_error(run(capsys, "usage", "--store", f"sqlite:///{garbage}"), 1)
    assert "not a database" in line
    line = one_line_error(run(capsys, "usage", "--store", f"sqlite:///{tmp_path}/no/such.db"), 1)
    assert "does not exist" in line


def test_a_store_file_that_does_not_exist_has_no_usage_and_is_not_made(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "typo.db"
    code, out, _ = run(capsys, "usage", "--store", f"sqlite:///{path}", "--json")
    assert (code, json.loads(out)) == (0, [])
    assert not path.exists()


@pytest.mark.postgres
def test_an_unreachable_postgres_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(
        run(capsys, "usage", "--store", "postgresql://m2m:hunter2@127.0.0.1:1/none"), 1
    )
    assert "hunter2" not in line


@pytest.mark.postgres
def test_usage_on_postgres(capsys: pytest.CaptureFixture[str], postgres_url: str) -> None:
    store = open_key_store(postgres_url)
    issued = store.create_key("acme")
    count(store, MARCH_14_09, issued.key, 2)
    store.close()
    code, out, err = run(capsys, "usage", "--store", postgres_url, "--since", "all", "--json")
    assert (code, err) == (0, "")
    assert [(r["client_id"], r["allowed"]) for r in json.loads(out)] == [("acme", 2)]


# -- end to end: another process counts and exits ------------------------------------

COUNT_THEN_EXIT = textwrap.dedent(
    """
    import sys
    from m2m_middleware import Engine, Settings

    engine = Engine(Settings(key_store=sys.argv[1], rate_limit_storage="memory://"))
    for _ in range(3):
        engine.check("GET", "/orders", None, sys.argv[2])
    """
)


def test_the_command_reads_what_an_app_process_counted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    store = open_key_store(url)
    issued = store.create_key("acme")
    store.close()
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    app = subprocess.run(
        [sys.executable, "-c", COUNT_THEN_EXIT, url, issued.key],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert app.returncode == 0, app.stderr
    command = subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "usage", "--store", url, "--csv"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert command.returncode == 0, command.stderr
    (row,) = csv_rows(command.stdout)
    assert (row["client_id"], row["key_id"], row["allowed"], row["units"]) == (
        "acme",
        issued.record.key_id,
        "3",
        "3",
    )
    assert issued.key not in command.stdout
