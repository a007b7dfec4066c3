"""``m2m signing-keys list|rotate``: the house style of ``m2m keys``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2m_middleware import cli

SECRET = "correct horse battery staple 1"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["signing-keys", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("M2M_SIGNING_SECRET", SECRET)
    return f"sqlite:///{tmp_path / 'keys.db'}"


def test_rotate_and_list(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--store", store_url, "--json")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = run(capsys, "rotate", "--store", store_url, "--json")
    first = json.loads(out)
    assert code == 0 and first["state"] == "signing"  # a new store's first key signs at once
    code, out, _ = run(capsys, "rotate", "--store", store_url, "--json")
    second = json.loads(out)
    assert code == 0 and second["state"] == "pending"
    code, out, _ = run(capsys, "list", "--store", store_url, "--json")
    listed = {k["kid"]: k for k in json.loads(out)}
    assert {k: v["state"] for k, v in listed.items()} == {
        first["kid"]: "signing",
        second["kid"]: "pending",
    }
    assert listed[first["kid"]]["retire_after"] is not None
    assert SECRET not in out and "PRIVATE" not in out and "seal" not in out
    code, out, _ = run(capsys, "list", "--store", store_url)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["KID", "ALGORITHM", "STATE"]
    assert first["kid"] in out and second["kid"] in out and "pending" in out


def test_rotate_takes_the_algorithm(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rotate", "--store", store_url, "--algorithm", "EdDSA", "--json")
    assert code == 0 and json.loads(out)["algorithm"] == "EdDSA"
    with pytest.raises(SystemExit) as exited:
        cli.main(["signing-keys", "rotate", "--store", store_url, "--algorithm", "HS256"])
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_list_creates_no_store_file(
    tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "list", "--store", store_url)
    assert (code, out.strip()) == (0, "No signing keys.")
    assert not (tmp_path / "keys.db").exists()


def test_rotate_without_a_secret_is_bad_usage(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("M2M_SIGNING_SECRET")
    code, out, err = run(capsys, "rotate", "--store", store_url)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "M2M_SIGNING_SECRET" in err


def test_rotate_with_a_wrong_secret_fails_in_one_line(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "rotate", "--store", store_url)[0] == 0
    wrong = "not the secret, but long enough"
    monkeypatch.setenv("M2M_SIGNING_SECRET", wrong)
    code, _, err = run(capsys, "rotate", "--store", store_url)
    assert code == 2 and len(err.splitlines()) == 1
    assert "signing_key_secret" in err and wrong not in err and SECRET not in err
    monkeypatch.setenv("M2M_SIGNING_SECRET", SECRET)
    code, out, _ = run(capsys, "list", "--store", store_url, "--json")
    assert len(json.loads(out)) == 1  # nothing was sealed under the wrong secret


def test_bad_usage(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["signing-keys"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["signing-keys", "rotate", "--token-ttl", "0"])
    assert exited.value.code == 2 and "outside 1..86400" in capsys.readouterr().err
    code, _, err = run(capsys, "list", "--store", "ftp://nowhere")
    assert code == 2 and len(err.splitlines()) == 1 and "--store" in err


def test_rotate_waits_the_apps_jwks_max_age(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An app with ``jwks_max_age=900``: verifiers cache its JWKS for 15 minutes, so a
    key rotated for it must not sign sooner (the default wait is 300 s)."""
    from datetime import datetime

    assert run(capsys, "rotate", "--store", store_url, "--json")[0] == 0
    code, out, _ = run(capsys, "rotate", "--store", store_url, "--jwks-max-age", "900", "--json")
    assert code == 0
    new = json.loads(out)
    wait = datetime.fromisoformat(new["signs_from"]) - datetime.fromisoformat(new["publish_from"])
    assert wait.total_seconds() >= 900
    for bad in ("29", "86401", "soon"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["signing-keys", "rotate", "--store", store_url, "--jwks-max-age", bad])
        assert exited.value.code == 2
        capsys.readouterr()
