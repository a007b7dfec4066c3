"""The ``m2m`` command, run in-process through ``main()`` (and twice as a real process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import m2m_middleware
from m2m_middleware import cli
from m2m_middleware.keys import hash_key, is_well_formed
from m2m_middleware.stores import KeyStore, open_key_store

Result = tuple[int, str, str]


@pytest.fixture(autouse=True)
def _no_store_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.STORE_ENV, raising=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"  # an absolute path: four slashes


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def create(capsys: pytest.CaptureFixture[str], url: str, *extra: str) -> dict[str, Any]:
    code, out, err = run(capsys, "keys", "create", "--store", url, *extra, "--json")
    assert (code, err) == (0, "")
    data: dict[str, Any] = json.loads(out)
    return data


@contextmanager
def opened(url: str) -> Iterator[KeyStore]:
    store = open_key_store(url)
    try:
        yield store
    finally:
        store.close()


def list_json(capsys: pytest.CaptureFixture[str], url: str, *extra: str) -> list[dict[str, Any]]:
    code, out, err = run(capsys, "keys", "list", "--store", url, "--json", *extra)
    assert (code, err) == (0, "")
    data: list[dict[str, Any]] = json.loads(out)
    return data


def assert_one_line_error(result: Result, exit_code: int) -> str:
    code, out, err = result
    assert code == exit_code
    assert out == ""
    assert err.startswith("m2m: error: ")
    assert err.endswith("\n") and err.count("\n") == 1
    assert "Traceback" not in err
    return err


def close_to(moment: datetime, expected: datetime, seconds: float = 5) -> bool:
    return abs((moment - expected).total_seconds()) <= seconds


# -- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("30d", 30 * 86400),
        ("2w", 14 * 86400),
        ("1h30m", 5400),
        ("1d12h", 36 * 3600),
        ("90", 90),
        ("1.5h", 5400),
        (" 2H ", 7200),
        ("0", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "5y", "-1h", "1h-", "1 h", "h1", "1e3", "inf", "nan", "1.h", "10000000w"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        cli.parse_duration(text)


# -- create --------------------------------------------------------------------------


def test_create_json_prints_a_key_that_verifies(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    data = create(capsys, url, "--client", "billing")
    assert is_well_formed(data["key"]) and data["key"].startswith("m2m_")
    with opened(url) as store:
        record = store.find_by_hash(hash_key(data["key"]))
    assert record is not None
    assert record.key_id == data["key_id"]
    assert record.client_id == data["client_id"] == "billing"
    assert record.is_active()


def test_create_stores_scopes_tier_name_uses_and_expiry(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    before = datetime.now(timezone.utc)
    data = create(
        capsys,
        url,
        "--client", "billing",
        "--scope", "orders:read orders:write",
        "--scope", "refunds",
        "--scope", "orders:read",
        "--tier", "gold",
        "--name", "billing worker",
        "--max-uses", "3",
        "--expires-in", "2h",
    )  # fmt: skip
    with opened(url) as store:
        record = store.get_key(data["key_id"])
    assert record.scopes == {"orders:read", "orders:write", "refunds"}
    assert record.tier == "gold"
    assert record.name == "billing worker"
    assert record.remaining_uses == 3
    assert record.expires_at is not None
    assert close_to(record.expires_at, before + timedelta(hours=2))
    assert data["scopes"] == ["orders:read", "orders:write", "refunds"]
    assert (data["tier"], data["name"], data["max_uses"]) == ("gold", "billing worker", 3)
    assert datetime.fromisoformat(data["expires_at"]) == record.expires_at


def test_create_defaults_to_no_scopes_no_expiry_unlimited(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    data = create(capsys, url, "--client", "billing")
    assert data["scopes"] == [] and data["expires_at"] is None and data["max_uses"] is None
    with opened(url) as store:
        record = store.get_key(data["key_id"])
    assert (record.scopes, record.expires_at, record.remaining_uses, record.tier) == (
        frozenset(),
        None,
        None,
        None,
    )


def test_create_human_output_shows_the_key_once_with_a_warning(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code, out, err = run(capsys, "keys", "create", "--store", url, "--client", "billing")
    assert (code, err) == (0, "")
    with opened(url) as store:
        [record] = store.list_keys()
    keys = [word for word in out.split() if is_well_formed(word)]
    assert len(keys) == 1
    with opened(url) as store:
        found = store.find_by_hash(hash_key(keys[0]))
    assert found is not None and found.key_id == record.key_id
    assert record.key_id in out
    assert "will not be shown again" in out


def test_plaintext_key_is_in_no_file(
    capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path
) -> None:
    plaintexts = [create(capsys, url, "--client", "billing")["key"]]
    code, out, _ = run(capsys, "keys", "create", "--store", url, "--client", "other")
    assert code == 0
    plaintexts += [word for word in out.split() if is_well_formed(word)]
    assert len(plaintexts) == 2
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    for key in plaintexts:
        assert hash_key(key).encode() in blob  # the files read do hold the store
        assert key.encode() not in blob
        assert key.partition("_")[2][:32].encode() not in blob


# -- list ----------------------------------------------------------------------------


def test_list_table(capsys: pytest.CaptureFixture[str], url: str) -> None:
    first = create(capsys, url, "--client", "billing", "--scope", "a b", "--tier", "gold",
                   "--name", "worker", "--max-uses", "7", "--expires-in", "1d")  # fmt: skip
    second = create(capsys, url, "--client", "reports")
    code, out, err = run(capsys, "keys", "list", "--store", url)
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split("  ")[0] == "KEY ID"
    columns = ["KEY ID", "CLIENT", "NAME", "SCOPES", "TIER", "STATUS", "EXPIRES", "USES LEFT",
               "LAST USED"]  # fmt: skip
    positions = [header.index(c) for c in columns]
    assert positions == sorted(positions)
    assert len(rows) == 2
    row = next(r for r in rows if r.startswith(first["key_id"]))
    cells = [c.strip() for c in row.split("  ") if c.strip()]
    assert cells[1:6] == ["billing", "worker", "a b", "gold", "active"]
    assert cells[6].startswith(first["expires_at"][:10])
    assert cells[7:] == ["7", "never"]
    other = next(r for r in rows if r.startswith(second["key_id"]))
    assert "reports" in other and "unlimited" in other
    for data in (first, second):
        assert data["key"] not in out
        assert hash_key(data["key"]) not in out


def test_list_client_filter(capsys: pytest.CaptureFixture[str], url: str) -> None:
    billing = create(capsys, url, "--client", "billing")
    reports = create(capsys, url, "--client", "reports")
    code, out, _ = run(capsys, "keys", "list", "--store", url, "--client", "billing")
    assert code == 0
    assert billing["key_id"] in out and reports["key_id"] not in out
    assert [r["key_id"] for r in list_json(capsys, url, "--client", "reports")] == [
        reports["key_id"]
    ]
    assert list_json(capsys, url, "--client", "nobody") == []


def test_list_json(capsys: pytest.CaptureFixture[str], url: str) -> None:
    data = create(capsys, url, "--client", "billing", "--scope", "b a", "--max-uses", "2")
    with opened(url) as store:
        record = store.get_key(data["key_id"])
    [item] = list_json(capsys, url)
    assert item == {**record.to_dict(), "status": "active"}
    assert item["scopes"] == ["a", "b"]
    text = json.dumps(item)
    assert data["key"] not in text and hash_key(data["key"]) not in text


def test_list_shows_expired_keys(capsys: pytest.CaptureFixture[str], url: str) -> None:
    with opened(url) as store:
        old = store.create_key(
            "billing", expires_at=datetime.now(timezone.utc) - timedelta(hours=1)
        ).record
    [item] = list_json(capsys, url)
    assert (item["key_id"], item["status"]) == (old.key_id, "expired")
    _, out, _ = run(capsys, "keys", "list", "--store", url)
    assert " expired " in out.splitlines()[1]


def test_list_neutralises_control_characters(capsys: pytest.CaptureFixture[str], url: str) -> None:
    create(capsys, url, "--client", "billing", "--name", "evil\x1b[2Jname")
    _, out, _ = run(capsys, "keys", "list", "--store", url)
    assert "\x1b" not in out
    assert "evil?[2Jname" in out


def test_list_of_a_missing_store_is_empty_and_creates_no_file(
    capsys: pytest.CaptureFixture[str], url: str, db_path: Path
) -> None:
    assert list_json(capsys, url) == []
    code, out, _ = run(capsys, "keys", "list", "--store", url)
    assert (code, out) == (0, "No keys.\n")
    assert not db_path.exists()


# -- revoke --------------------------------------------------------------------------


def test_revoke_then_list_shows_revoked(capsys: pytest.CaptureFixture[str], url: str) -> None:
    data = create(capsys, url, "--client", "billing")
    kept = create(capsys, url, "--client", "billing")
    code, out, err = run(capsys, "keys", "revoke", "--store", url, data["key_id"])
    assert (code, err) == (0, "")
    assert out.count("\n") == 1 and "Revoked" in out and data["key_id"] in out
    statuses = {item["key_id"]: item["status"] for item in list_json(capsys, url)}
    assert statuses == {data["key_id"]: "revoked", kept["key_id"]: "active"}
    _, table, _ = run(capsys, "keys", "list", "--store", url)
    row = next(r for r in table.splitlines() if r.startswith(data["key_id"]))
    assert " revoked " in row
    with opened(url) as store:
        record = store.find_by_hash(hash_key(data["key"]))
    assert record is not None and not record.is_active()


def test_revoke_twice_says_already_revoked(capsys: pytest.CaptureFixture[str], url: str) -> None:
    data = create(capsys, url, "--client", "billing")
    assert run(capsys, "keys", "revoke", "--store", url, data["key_id"])[0] == 0
    code, out, err = run(capsys, "keys", "revoke", "--store", url, data["key_id"])
    assert (code, err) == (0, "")
    assert "already revoked" in out


# -- rotate --------------------------------------------------------------------------


def test_rotate_with_grace(capsys: pytest.CaptureFixture[str], url: str) -> None:
    old = create(capsys, url, "--client", "billing", "--scope", "a b", "--tier", "gold")
    code, out, err = run(
        capsys, "keys", "rotate", "--store", url, old["key_id"], "--grace", "1h", "--json"
    )
    assert (code, err) == (0, "")
    now = datetime.now(timezone.utc)
    new = json.loads(out)
    assert new["replaces"] == old["key_id"]
    assert new["key_id"] != old["key_id"] and new["key"] != old["key"]
    with opened(url) as store:
        old_record = store.find_by_hash(hash_key(old["key"]))
        new_record = store.find_by_hash(hash_key(new["key"]))
    assert old_record is not None and new_record is not None
    assert old_record.is_active()  # still works during the grace period
    assert old_record.revoked_at is None
    assert old_record.expires_at is not None
    assert close_to(old_record.expires_at, now + timedelta(hours=1))
    assert datetime.fromisoformat(new["old_key_expires_at"]) == old_record.expires_at
    assert new_record.key_id == new["key_id"] and new_record.is_active()
    assert (new_record.client_id, new_record.scopes, new_record.tier) == (
        "billing",
        frozenset({"a", "b"}),
        "gold",
    )


def test_rotate_without_grace_stops_the_old_key_now(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    old = create(capsys, url, "--client", "billing")
    code, out, _ = run(capsys, "keys", "rotate", "--store", url, old["key_id"], "--json")
    assert code == 0
    new = json.loads(out)
    assert close_to(datetime.fromisoformat(new["old_key_expires_at"]), datetime.now(timezone.utc))
    statuses = {item["key_id"]: item["status"] for item in list_json(capsys, url)}
    assert statuses == {old["key_id"]: "revoked", new["key_id"]: "active"}


def test_rotate_human_output(capsys: pytest.CaptureFixture[str], url: str) -> None:
    old = create(capsys, url, "--client", "billing")
    code, out, err = run(capsys, "keys", "rotate", "--store", url, old["key_id"], "--grace", "15m")
    assert (code, err) == (0, "")
    keys = [word for word in out.split() if is_well_formed(word)]
    assert len(keys) == 1 and keys[0] != old["key"]
    with opened(url) as store:
        assert store.find_by_hash(hash_key(keys[0])) is not None
    assert old["key_id"] in out
    assert "will not be shown again" in out


# -- where the store is ----------------------------------------------------------------


def test_store_from_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    db_path: Path,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(cli.STORE_ENV, url)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "keys", "create", "--client", "billing", "--json")
    assert code == 0
    key_id = json.loads(out)["key_id"]
    assert db_path.exists() and not (tmp_path / "m2m_keys.db").exists()
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and key_id in out


def test_store_option_beats_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str
) -> None:
    from_env = tmp_path / "env.db"
    monkeypatch.setenv(cli.STORE_ENV, f"sqlite:///{from_env}")
    data = create(capsys, url, "--client", "billing")
    assert not from_env.exists()
    assert [item["key_id"] for item in list_json(capsys, url)] == [data["key_id"]]


def test_default_store_is_m2m_keys_db_in_working_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "keys", "create", "--client", "billing", "--json")
    assert code == 0
    assert (tmp_path / "m2m_keys.db").exists()
    with opened("sqlite:///" + str(tmp_path / "m2m_keys.db")) as store:
        assert [r.key_id for r in store.list_keys()] == [json.loads(out)["key_id"]]


def test_store_is_closed_on_success_and_on_failure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    closed: list[str] = []

    def spying_open(store_url: str) -> KeyStore:
        store = open_key_store(store_url)
        real_close = store.close

        def close() -> None:
            closed.append(store_url)
            real_close()

        store.close = close  # type: ignore[method-assign]
        return store

    monkeypatch.setattr(cli, "open_key_store", spying_open)
    create(capsys, url, "--client", "billing")
    assert closed == [url]
    assert run(capsys, "keys", "revoke", "--store", url, "key_missing")[0] == 1
    assert closed == [url, url]


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exit_code", "fragment"),
    [
        (["keys", "revoke", "key_missing"], 1, "key_missing"),
        (["keys", "rotate", "key_missing"], 1, "key_missing"),
        (["keys", "rotate", "key_missing", "--grace", "soon"], 2, "--grace"),
        (["keys", "create", "--client", "c", "--expires-in", "5y"], 2, "--expires-in"),
        (["keys", "create", "--client", "c", "--expires-in", "0"], 2, "--expires-in"),
        (["keys", "create", "--client", "c", "--expires-in", ""], 2, "--expires-in"),
        (["keys", "create", "--client", "c", "--expires-in", "99999999w"], 2, "--expires-in"),
        (["keys", "create", "--client", "c", "--max-uses", "0"], 2, "--max-uses"),
        (["keys", "create", "--client", "c", "--max-uses", "-1"], 2, "--max-uses"),
        (["keys", "create", "--client", "c", "--max-uses", "x"], 2, "--max-uses"),
        (["keys", "create", "--client", "c", "--max-uses", "1.5"], 2, "--max-uses"),
        (["keys", "create", "--client", "c", "--max-uses", "9" * 5000], 2, "--max-uses"),
        (["keys", "create", "--client", "c", "--scope", " "], 2, "--scope"),
        (["keys", "create", "--client", "c", "--tier", ""], 2, "--tier"),
        (["keys", "create", "--client", ""], 2, "--client"),
        # What would break a response header or a log line, refused as bad usage.
        (["keys", "create", "--client", "c", "--scope", 'bad scope"'], 2, "--scope: invalid scope"),
        (["keys", "create", "--client", "c", "--scope", "ok caf\u00e9"], 2, "RFC 6749"),
        (["keys", "create", "--client", "c", "--scope", "a\\b"], 2, "--scope"),
        (["keys", "create", "--client", "c", "--tier", "gold\r\nX-Injected: 1"], 2, "--tier"),
        (["keys", "create", "--client", "c", "--tier", "gold\u2603"], 2, "--tier"),
        (["keys", "create", "--client", "c", "--tier", 'gold"'], 2, "--tier"),
        (["keys", "create", "--client", "c\nallowed GET /admin"], 2, "--client"),
        (["keys", "create", "--client", "c\x1b[2J"], 2, "--client"),
        (["keys", "create", "--client", "c\u2028"], 2, "--client"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], url: str, args: list[str], exit_code: int, fragment: str
) -> None:
    create(capsys, url, "--client", "someone")  # the store exists
    err = assert_one_line_error(run(capsys, *args, "--store", url), exit_code)
    assert fragment in err
    assert err[:-1].isprintable()  # one line: bad values are shown escaped
    if args[:2] == ["keys", "create"]:
        with opened(url) as store:
            assert [r.client_id for r in store.list_keys()] == ["someone"]


@pytest.mark.parametrize(
    ("store_url", "exit_code", "secret"),
    [
        ("foo://host/x", 2, None),
        ("sqlite:///", 2, None),
        ("sqlite://relative.db", 2, None),
        # libpq quotes the bad part of a URL, here the password: it must not show
        ("postgresql://admin:hunter2secret%zz@db.internal/keys", 2, "hunter2secret"),
        ("redis://:hunter2secret@cache:6379/0", 2, "hunter2secret"),
        ("", 2, None),
        ("sqlite:////nonexistent-m2m-dir/sub/keys.db", 1, None),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["keys", "create", "--client", "c"],
        ["keys", "list"],
        ["keys", "revoke", "key_x"],
        ["keys", "rotate", "key_x"],
    ],
)
def test_bad_store_url_is_one_line(
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    store_url: str,
    exit_code: int,
    secret: str | None,
) -> None:
    err = assert_one_line_error(run(capsys, *command, "--store", store_url), exit_code)
    if secret is not None:
        assert secret not in err


@pytest.mark.parametrize("command", [["keys", "revoke", "key_x"], ["keys", "rotate", "key_x"]])
def test_missing_store_file_is_an_error_and_not_created(
    capsys: pytest.CaptureFixture[str], url: str, db_path: Path, command: list[str]
) -> None:
    err = assert_one_line_error(run(capsys, *command, "--store", url), 1)
    assert "no key store" in err
    assert not db_path.exists()


@pytest.mark.parametrize(
    "command",
    [["keys", "create", "--client", "c"], ["keys", "list"], ["keys", "revoke", "key_x"]],
)
def test_a_file_that_is_not_a_database_is_one_line(
    capsys: pytest.CaptureFixture[str], url: str, db_path: Path, command: list[str]
) -> None:
    db_path.write_bytes(b"this is not an SQLite database, not even close" * 100)
    assert_one_line_error(run(capsys, *command, "--store", url), 1)


def test_rotating_a_revoked_key_is_one_line(capsys: pytest.CaptureFixture[str], url: str) -> None:
    data = create(capsys, url, "--client", "billing")
    assert run(capsys, "keys", "revoke", "--store", url, data["key_id"])[0] == 0
    err = assert_one_line_error(run(capsys, "keys", "rotate", "--store", url, data["key_id"]), 1)
    assert "is revoked" in err


def test_rotating_a_used_up_key_is_one_line(capsys: pytest.CaptureFixture[str], url: str) -> None:
    data = create(capsys, url, "--client", "billing", "--max-uses", "1")
    with opened(url) as store:
        assert store.take_use(data["key_id"]) == 0
    err = assert_one_line_error(run(capsys, "keys", "rotate", "--store", url, data["key_id"]), 1)
    assert "no uses left" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], url: str) -> None:
    for argv in ([], ["keys"], ["keys", "create"], ["keys", "list", "--bogus"], ["nope"]):
        with pytest.raises(SystemExit) as exc_info:
            cli.main(argv)
        assert exc_info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_keyboard_interrupt_exits_130_quietly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_keys_list", interrupted)
    assert run(capsys, "keys", "list", "--store", url) == (130, "", "")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        cli.main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.split() == ["m2m", m2m_middleware.__version__]


# -- demo ----------------------------------------------------------------------------


def test_demo_passes_its_arguments_through(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    demo = types.ModuleType("m2m_middleware.demo")

    def demo_main(argv: list[str]) -> int:
        calls.append(argv)
        return 3

    demo.main = demo_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "m2m_middleware.demo", demo)
    assert run(capsys, "demo", "--once", "--port", "8123")[0] == 3
    assert run(capsys, "demo")[0] == 3
    assert calls == [["--once", "--port", "8123"], []]


def test_demo_missing_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "m2m_middleware.demo", None)
    err = assert_one_line_error(run(capsys, "demo", "--once"), 2)
    assert "demo" in err


# -- as a real process ---------------------------------------------------------------


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(cli.STORE_ENV, None)
    return env


def test_python_dash_m_lists_keys(capsys: pytest.CaptureFixture[str], url: str) -> None:
    data = create(capsys, url, "--client", "billing")
    proc = subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "keys", "list", "--store", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=_subprocess_env(),
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert data["key_id"] in proc.stdout and "billing" in proc.stdout
    assert data["key"] not in proc.stdout


def test_python_dash_m_bad_invocation_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "keys", "create", "--client", "c",
         "--max-uses", "x", "--store", f"sqlite:///{tmp_path / 'missing' / 'k.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_subprocess_env(),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("m2m: error: --max-uses")
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


# -- tiers: refused where the app's settings are known -----------------------------------


def test_the_plain_command_accepts_any_tier(capsys: pytest.CaptureFixture[str], url: str) -> None:
    # It cannot know which tiers the app that reads this store configures.
    assert create(capsys, url, "--client", "c", "--tier", "no-such-tier")["tier"] == "no-such-tier"


def keys_in_app(
    capsys: pytest.CaptureFixture[str], url: str, tiers: Any, *argv: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.keys_main(list(argv), prog="app keys", store=url, tiers=tiers)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("tiers", "given", "names"),
    [
        (("pro", "free"), "gold", "the app's tiers are free, pro"),
        (("pro", "free"), "Pro", "the app's tiers are free, pro"),  # exact, as the limiter
        (("pro",), "pro ", "the app's tiers are pro"),
        ((), "gold", "the app configures no tiers"),
    ],
)
def test_a_tier_the_app_does_not_configure_is_refused_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str], url: str, tiers: Any, given: str, names: str
) -> None:
    code, out, err = keys_in_app(capsys, url, tiers, "create", "--client", "c", "--tier", given)
    assert (code, out) == (2, "")
    expected = f"--tier: unknown tier {given!r}: {names}; without --tier a key gets default_limits"
    assert err == f"app keys: error: {expected}\n"
    with opened(url) as store:
        assert store.list_keys() == []


def test_a_configured_tier_or_none_is_accepted_in_the_app(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    tiers = {"pro": (), "free": ()}  # a mapping, as Settings.tier_limit_items
    code, out, err = keys_in_app(
        capsys, url, tiers, "create", "--client", "c", "--tier", "pro", "--json"
    )
    assert (code, err) == (0, "")
    assert json.loads(out)["tier"] == "pro"
    code, out, err = keys_in_app(capsys, url, tiers, "create", "--client", "c", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["tier"] is None


def test_rotating_a_key_whose_tier_is_not_configured_warns_and_rotates(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    old = create(capsys, url, "--client", "c", "--tier", "gold")  # made with the plain CLI
    code, out, err = keys_in_app(capsys, url, ("pro",), "rotate", old["key_id"], "--json")
    assert code == 0  # a leaked key must be replaceable whatever its tier
    assert json.loads(out)["tier"] == "gold"
    assert err == (
        f"app keys: warning: key {old['key_id']} has tier 'gold', which is not configured "
        "(the app's tiers are pro): its successor keeps the tier and gets default_limits\n"
    )
    fine = create(capsys, url, "--client", "c", "--tier", "pro")
    code, _, err = keys_in_app(capsys, url, ("pro",), "rotate", fine["key_id"])
    assert (code, err) == (0, "")


# -- negative durations: a message about the value, not argparse's -----------------------

EXPIRY_IN_THE_PAST = (
    "--expires-in: the expiry must be in the future: give a positive duration such as 30d"
)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--expires-in", "-1d"),  # argparse alone: "expected one argument"
        ("--expires-in=", "-1d"),
        ("--expires", "-1d"),  # an abbreviation argparse accepts
        ("--expires-in", "-5"),  # a negative number argparse passes on as a value
        ("--expires-in", "-0"),
        ("--expires-in", "-.5h"),
        ("--expires-in=", " -1d"),
        ("--expires-in=", "-1d\n"),
    ],
)
def test_a_negative_expiry_says_it_must_be_in_the_future(
    capsys: pytest.CaptureFixture[str], url: str, option: str, value: str
) -> None:
    create(capsys, url, "--client", "someone")  # the store exists
    given = [option + value] if option.endswith("=") else [option, value]
    err = assert_one_line_error(
        run(capsys, "keys", "create", "--client", "c", *given, "--store", url), 2
    )
    assert err == f"m2m: error: {EXPIRY_IN_THE_PAST}, got {value!r}\n"
    with opened(url) as store:
        assert [r.client_id for r in store.list_keys()] == ["someone"]


@pytest.mark.parametrize("given", [["--grace", "-1h"], ["--grace=-1h"], ["--gr", "-30"]])
def test_a_negative_grace_says_it_cannot_be_negative(
    capsys: pytest.CaptureFixture[str], url: str, given: list[str]
) -> None:
    key_id = create(capsys, url, "--client", "c")["key_id"]
    err = assert_one_line_error(run(capsys, "keys", "rotate", key_id, *given, "--store", url), 2)
    assert err.startswith("m2m: error: --grace: the grace period cannot be negative")
    with opened(url) as store:
        assert len(store.list_keys()) == 1  # nothing rotated


def test_only_option_values_are_attached(capsys: pytest.CaptureFixture[str], url: str) -> None:
    # A value that merely looks negative elsewhere, or after "--", is left alone.
    untouched = ["--client", "-1d", "--name", "-2h", "--max-uses", "-3"]
    assert cli._negative_values_attached(untouched) == untouched
    data = create(capsys, url, "--client=-1d", "--name=-2h", "--expires-in", "1d")
    assert (data["client_id"], data["name"]) == ("-1d", "-2h")
    assert cli._negative_values_attached(["--expires-in", "-1d", "--", "--grace", "-1"]) == [
        "--expires-in=-1d",
        "--",
        "--grace",
        "-1",
    ]
    assert cli._negative_values_attached(["--expires-in", "--json"]) == ["--expires-in", "--json"]


def test_a_negative_expiry_through_the_app_commands(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    capsys.readouterr()
    code = cli.keys_main(
        ["create", "--client", "c", "--expires-in", "-1d"], prog="app keys", store=url
    )
    _, err = capsys.readouterr()
    assert code == 2
    assert err == f"app keys: error: {EXPIRY_IN_THE_PAST}, got '-1d'\n"


def spoil_metadata(db_path: Path, key_id: str) -> None:
    """A row edited by hand: metadata that is not JSON."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db_path)) as raw, raw:
        raw.execute("UPDATE m2m_api_keys SET metadata = '{oops' WHERE key_id = ?", (key_id,))


def test_list_skips_a_row_it_cannot_read_with_a_warning(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    url: str,
    db_path: Path,
) -> None:
    good = create(capsys, url, "--client", "billing")
    bad = create(capsys, url, "--client", "shipping")
    spoil_metadata(db_path, bad["key_id"])
    code, out, err = run(capsys, "keys", "list", "--store", url)
    assert (code, err) == (0, "")
    assert good["key_id"] in out and bad["key_id"] not in out
    code, out, _ = run(capsys, "keys", "list", "--store", url, "--json")
    assert code == 0 and [r["key_id"] for r in json.loads(out)] == [good["key_id"]]
    assert any(bad["key_id"] in r.getMessage() for r in caplog.records)
    # Asked for by id, the row is named as unreadable: an error, not a traceback.
    code, out, err = run(capsys, "keys", "revoke", "--store", url, bad["key_id"])
    assert code == 1 and "cannot be read" in err and "Traceback" not in err


def test_python_dash_m_list_warns_on_one_line_about_a_row_it_cannot_read(
    capsys: pytest.CaptureFixture[str], url: str, db_path: Path
) -> None:
    good = create(capsys, url, "--client", "billing")
    bad = create(capsys, url, "--client", "shipping")
    spoil_metadata(db_path, bad["key_id"])
    proc = subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "keys", "list", "--store", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=_subprocess_env(),
        check=False,
    )
    assert proc.returncode == 0
    assert good["key_id"] in proc.stdout and bad["key_id"] not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2m: warning: key "), proc.stderr
    assert bad["key_id"] in lines[0] and "metadata" in lines[0]
    assert hash_key(good["key"]) not in proc.stderr


# -- networks and request-signing keys ------------------------------------------------------


def _pem_files(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    public_file = tmp_path / "client.pub.pem"
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private_file = tmp_path / "client.pem"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return public_file, private_file


def test_create_with_networks_and_a_signing_key(
    capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path
) -> None:
    public_file, _ = _pem_files(tmp_path)
    data = create(
        capsys,
        url,
        "--client",
        "billing",
        "--allow-cidr",
        "10.0.0.0/8",
        "--allow-cidr",
        "2001:DB8::/32",
        "--signing-key",
        str(public_file),
    )
    assert data["allowed_cidrs"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert data["signing_public_key"] == public_file.read_text()
    [listed] = list_json(capsys, url)
    assert listed["allowed_cidrs"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert listed["signing_public_key"] == public_file.read_text()
    code, out, _ = run(
        capsys, "keys", "create", "--store", url, "--client", "b", "--allow-cidr", "10.0.0.0/8"
    )
    assert code == 0
    assert "networks:  10.0.0.0/8" in out


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--allow-cidr", "10.0.0.1/8", "has host bits set"),
        ("--allow-cidr", "nonsense", "not a network"),
        ("--signing-key", "/nonexistent/key.pem", "cannot read"),
    ],
)
def test_bad_networks_or_key_files_are_usage_errors(
    capsys: pytest.CaptureFixture[str], url: str, option: str, value: str, problem: str
) -> None:
    code, out, err = run(capsys, "keys", "create", "--store", url, "--client", "b", option, value)
    assert code == 2
    assert option in err and problem in err
    assert out == ""


def test_a_private_signing_key_is_refused_and_never_printed(
    capsys: pytest.CaptureFixture[str], url: str, db_path: Path, tmp_path: Path
) -> None:
    _, private_file = _pem_files(tmp_path)
    code, out, err = run(
        capsys,
        "keys",
        "create",
        "--store",
        url,
        "--client",
        "b",
        "--signing-key",
        str(private_file),
    )
    assert code == 2
    assert "private key" in err
    secret_line = private_file.read_text().splitlines()[1]
    assert secret_line not in out + err
    with opened(url) as store:
        assert store.list_keys() == []
