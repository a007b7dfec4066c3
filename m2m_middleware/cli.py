"""The ``m2m`` command: manage API keys in a key store, and run the demo.

    m2m keys create --client billing --scope "orders:read orders:write" --expires-in 90d
    m2m keys list [--client billing] [--json]
    m2m keys revoke key_... [--notify redis://...]
    m2m keys rotate key_... --grace 1h [--notify redis://...]
    m2m usage [--client ID] [--key KEY_ID] [--since 7d] [--by hour|day|month] [--json | --csv]
    m2m demo [--once] [--port 8000] [--host 127.0.0.1] [--store URL]
    m2m dashboard [--store URL] [--port 8300] [--host 127.0.0.1] [--public]

Every ``keys`` command and ``usage`` take ``--store URL`` (default: ``$M2M_KEY_STORE``,
else ``sqlite:///m2m_keys.db``). A plaintext key is printed once, on standard
output, by ``create`` and ``rotate``, and is written nowhere else.

Exit status: 0 on success, 1 when an operation fails (unknown key id,
unreachable store), 2 for bad usage (a bad option value or store URL),
130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import logging
import math
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from . import __version__
from .client_keys import MAX_PUBLIC_KEY_PEM, check_allowed_cidrs, check_signing_public_key
from .errors import ConfigError, M2MError
from .stores import KeyRecord, KeyStore, SQLiteKeyStore, open_key_store
from .syntax import check_client_id, check_scope, check_tier
from .telemetry.records import UsageRow

PROG = "m2m"
STORE_ENV = "M2M_KEY_STORE"
NOTIFY_ENV = "M2M_INVALIDATION_URL"
DEFAULT_STORE = "sqlite:///m2m_keys.db"

#: Longest accepted duration: beyond this, datetimes overflow and nobody means it.
MAX_DURATION_SECONDS = 100 * 366 * 86400

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}[smhdw])+|{_NUMBER}")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})([smhdw])")
_MAX_USES_RE = re.compile(r"[0-9]{1,18}")

_NEVER_SHOWN_AGAIN = "Store this key now: only its hash is kept, and it will not be shown again."


class CommandError(Exception):
    """A failure to report as one ``m2m: error:`` line with this exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CommandError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


# -- argument values -------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``1h``, ``30d``, ``2w``, ``1h30m``; bare numbers are seconds."""
    value = text.strip().lower()
    if not _DURATION_RE.fullmatch(value):
        raise ValueError(
            f"invalid duration {text!r}: use a number of seconds or units s, m, h, d, w "
            "such as 30s, 15m, 1h, 30d, 2w or 1h30m"
        )
    if value[-1].isdigit():
        seconds = float(value)
    else:
        seconds = sum(
            float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART_RE.findall(value)
        )
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"invalid duration {text!r}: at most 100 years")
    return seconds


#: The options whose value may be written with a minus sign by mistake, and what
#: their value is: a minus there gets a message of its own instead of argparse's.
_DURATION_OPTIONS = {
    "--expires-in": "the expiry must be in the future: give a positive duration such as 30d",
    "--grace": "the grace period cannot be negative: give a duration such as 1h, or 0",
    "--since": "give how long ago as a positive duration such as 7d, or a date",
    "--until": "give how long ago as a positive duration such as 1d, or a date",
}
_NEGATIVE_VALUE = re.compile(r"-[0-9.]")


def _negative_values_attached(argv: Sequence[str]) -> list[str]:
    """``--expires-in -1d`` as ``--expires-in=-1d``.

    argparse takes ``-1d`` for an option (it only knows plain negative numbers
    such as ``-1`` as values) and answers "expected one argument", which names
    neither the value nor the problem. Attached with ``=``, the value reaches
    :func:`_duration_option`, which says what is wrong with it. Abbreviations
    of the option (argparse accepts ``--expires``) are recognised too; nothing
    after ``--`` is touched.
    """
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":  # the end of the options
            out.extend(words[i:])
            break
        option = _duration_option_named(word)
        if option is not None and i + 1 < len(words) and _NEGATIVE_VALUE.match(words[i + 1]):
            out.append(f"{word}={words[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def _duration_option_named(word: str) -> str | None:
    if not word.startswith("--") or len(word) < 3:
        return None
    found = [name for name in _DURATION_OPTIONS if name.startswith(word)]
    return found[0] if len(found) == 1 else None


def _cidrs_option(values: list[str]) -> tuple[str, ...]:
    """--allow-cidr, repeated (or several separated by commas or spaces)."""
    cidrs = [part for value in values for part in value.replace(",", " ").split()]
    try:
        return check_allowed_cidrs(cidrs)
    except ValueError as exc:
        raise UsageError(f"--allow-cidr: {str(exc).removeprefix('allowed_cidrs: ')}") from None


def _signing_key_option(path: str) -> str:
    """--signing-key FILE: the PEM public key in it, checked (never echoed back)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PUBLIC_KEY_PEM + 1)
    except OSError as exc:
        raise UsageError(f"--signing-key: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        checked = check_signing_public_key(data)
    except ValueError as exc:
        problem = str(exc).removeprefix("signing_public_key: ")
        raise UsageError(f"--signing-key: {problem}") from None
    if checked is None:
        raise UsageError(f"--signing-key: {path!r} is empty")
    return checked


def _duration_option(option: str, text: str, *, allow_zero: bool) -> float:
    if text.strip().startswith("-"):
        raise UsageError(f"{option}: {_DURATION_OPTIONS[option]}, got {text!r}")
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if seconds == 0 and not allow_zero:
        raise UsageError(f"{option}: the duration must be more than zero, got {text!r}")
    return seconds


def _max_uses_option(text: str) -> int:
    value = text.strip()
    if not _MAX_USES_RE.fullmatch(value) or int(value) < 1:
        raise UsageError(f"--max-uses: expected a whole number of 1 or more, got {text!r}")
    return int(value)


def _scopes_option(values: Sequence[str]) -> list[str]:
    scopes: list[str] = []
    for value in values:
        parts = value.split()
        if not parts:
            raise UsageError("--scope: a scope cannot be empty")
        scopes.extend(_checked("--scope", check_scope, part) for part in parts)
    return sorted(set(scopes))


def _known_tiers(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The app's configured tiers (``flask m2m keys``, ``manage.py m2m_keys``), or
    None for the plain ``m2m`` command, which cannot know which tiers an app has."""
    tiers: tuple[str, ...] | None = getattr(args, "app_tiers", None)
    return tiers


def _tiers_text(tiers: Sequence[str]) -> str:
    if not tiers:
        return "the app configures no tiers"
    return f"the app's tiers are {', '.join(sorted(tiers))}"


def _configured_tier(args: argparse.Namespace, tier: str) -> None:
    """A key with a tier the app does not configure would quietly get default_limits."""
    known = _known_tiers(args)
    if known is not None and tier not in known:
        raise UsageError(
            f"--tier: unknown tier {tier!r}: {_tiers_text(known)}; "
            "without --tier a key gets default_limits"
        )


def _non_empty(option: str, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise UsageError(f"{option}: cannot be empty")
    return value


def _checked(option: str, check: Callable[[str], str], value: str) -> str:
    """The store would refuse it too, as a failed operation (exit 1): it is bad usage (2)."""
    try:
        return check(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


# -- output helpers --------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _when(value: datetime | None, missing: str = "never") -> str:
    if value is None:
        return missing
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(value: str) -> str:
    """Keep stored text from steering the terminal (escape sequences, newlines)."""
    return "".join(ch if ch.isprintable() else "?" for ch in value)


def key_status(record: KeyRecord, now: datetime | None = None) -> str:
    return record.status(now)


def _end_of_life(record: KeyRecord) -> datetime | None:
    """When a key stops working: the earlier of its expiry and its revocation."""
    ends = [t for t in (record.expires_at, record.revoked_at) if t is not None]
    return min(ends) if ends else None


def _emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- the store -------------------------------------------------------------------


def _store_url(args: argparse.Namespace) -> str:
    url: str | None = args.store
    if url is None:
        url = os.environ.get(STORE_ENV) or DEFAULT_STORE
    if not url.strip():
        raise UsageError("--store: the key-store URL cannot be empty")
    return url


def _open_store(url: str) -> KeyStore:
    try:
        return open_key_store(url)
    except ConfigError as exc:
        problem = exc.problem if exc.field == "key_store" else str(exc)
        raise UsageError(f"--store: {problem}") from None


def _store_missing(store: KeyStore) -> bool:
    """True for an SQLite store whose file does not exist yet (opening would create it)."""
    return (
        isinstance(store, SQLiteKeyStore)
        and store.path != ":memory:"
        and not os.path.exists(store.path)
    )


def _require_existing(store: KeyStore, *, allow_missing_file: bool = False) -> bool:
    """Refuse an SQLite path that does not exist; False when the file may be made later."""
    if not _store_missing(store):
        return True
    assert isinstance(store, SQLiteKeyStore)
    directory = os.path.dirname(os.path.abspath(store.path))
    if not os.path.isdir(directory):
        raise CommandError(
            f"cannot open SQLite key store {store.path!r}: directory {directory!r} does not exist"
        )
    if allow_missing_file:
        return False
    raise CommandError(
        f"no key store at {store.path!r}: create a key first, or pass --store or set {STORE_ENV}"
    )


# -- commands --------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace, store: KeyStore) -> int:
    _checked("--client", check_client_id, args.client)
    scopes = _scopes_option(args.scope)
    tier = _non_empty("--tier", args.tier)
    if tier is not None:
        _checked("--tier", check_tier, tier)
        _configured_tier(args, tier)
    name = _non_empty("--name", args.name)
    max_uses = _max_uses_option(args.max_uses) if args.max_uses is not None else None
    expires_at = None
    if args.expires_in is not None:
        seconds = _duration_option("--expires-in", args.expires_in, allow_zero=False)
        expires_at = (_utcnow() + timedelta(seconds=seconds)).replace(microsecond=0)
    cidrs = _cidrs_option(args.allow_cidr)
    public_key = _signing_key_option(args.signing_key) if args.signing_key else None

    issued = store.create_key(
        args.client,
        scopes=scopes,
        tier=tier,
        name=name,
        expires_at=expires_at,
        max_uses=max_uses,
        allowed_cidrs=cidrs,
        signing_public_key=public_key,
    )
    record = issued.record
    if args.json:
        _emit_json(
            {
                "key": issued.key,
                "key_id": record.key_id,
                "client_id": record.client_id,
                "name": record.name,
                "scopes": sorted(record.scopes),
                "tier": record.tier,
                "created_at": _iso(record.created_at),
                "expires_at": _iso(record.expires_at),
                "max_uses": record.remaining_uses,
                "allowed_cidrs": list(record.allowed_cidrs),
                "signing_public_key": record.signing_public_key,
            }
        )
        return 0
    print(f"Created a key for client {_printable(record.client_id)!r}.")
    print()
    _print_details(record)
    print()
    print(f"  key:       {issued.key}")
    print()
    print(_NEVER_SHOWN_AGAIN)
    return 0


def _print_details(record: KeyRecord) -> None:
    uses = "unlimited" if record.remaining_uses is None else str(record.remaining_uses)
    print(f"  key id:    {record.key_id}")
    print(f"  client:    {_printable(record.client_id)}")
    if record.name is not None:
        print(f"  name:      {_printable(record.name)}")
    print(f"  scopes:    {_printable(' '.join(sorted(record.scopes))) or '(none)'}")
    print(f"  tier:      {_printable(record.tier) if record.tier is not None else '(default)'}")
    print(f"  expires:   {_when(record.expires_at)}")
    print(f"  max uses:  {uses}")
    if record.allowed_cidrs:
        print(f"  networks:  {' '.join(record.allowed_cidrs)}")
    if record.signing_public_key:
        print("  signing:   a request-signing public key")


_LIST_COLUMNS = (
    "KEY ID",
    "CLIENT",
    "NAME",
    "SCOPES",
    "TIER",
    "STATUS",
    "EXPIRES",
    "USES LEFT",
    "LAST USED",
)


def cmd_keys_list(args: argparse.Namespace, store: KeyStore) -> int:
    # Listing must not create a store file as a side effect (a typo in the
    # path would otherwise leave an empty database behind).
    exists = _require_existing(store, allow_missing_file=True)
    records = store.list_keys(args.client) if exists else []
    now = _utcnow()
    if args.json:
        _emit_json([{**r.to_dict(), "status": key_status(r, now)} for r in records])
        return 0
    if not records:
        print("No keys." if args.client is None else f"No keys for client {args.client!r}.")
        return 0
    rows = [_LIST_COLUMNS] + [
        (
            r.key_id,
            r.client_id,
            r.name or "-",
            " ".join(sorted(r.scopes)) or "-",
            r.tier or "-",
            key_status(r, now),
            _when(r.expires_at),
            "unlimited" if r.remaining_uses is None else str(r.remaining_uses),
            _when(r.last_used_at),
        )
        for r in records
    ]
    cells = [[_printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_LIST_COLUMNS))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _notify(args: argparse.Namespace) -> None:
    """Publish the revocation to running instances over Redis, when a URL is given."""
    url = args.notify
    if url is None:
        url = getattr(args, "app_notify", None) or os.environ.get(NOTIFY_ENV, "")
    if not url:
        return
    from .settings import INVALIDATION_SCHEMES

    if not url.startswith(INVALIDATION_SCHEMES):
        raise UsageError(f"--notify: expected a redis:// URL, got {url.partition('://')[0]!r}")
    from .invalidation import redis_bus

    redis_bus(url, listen=False)


def cmd_keys_revoke(args: argparse.Namespace, store: KeyStore) -> int:
    _notify(args)
    _require_existing(store)
    before = store.get_key(args.key_id)
    if before.revoked_at is not None and before.revoked_at <= _utcnow():
        print(f"Key {before.key_id} was already revoked at {_when(before.revoked_at)}.")
        return 0
    record = store.revoke_key(args.key_id)
    print(
        f"Revoked key {record.key_id} (client {_printable(record.client_id)!r}) "
        f"at {_when(record.revoked_at)}."
    )
    return 0


def cmd_keys_rotate(args: argparse.Namespace, store: KeyStore) -> int:
    grace = _duration_option("--grace", args.grace, allow_zero=True)
    _notify(args)
    _require_existing(store)
    old = store.get_key(args.key_id)
    if old.remaining_uses == 0:
        # The successor inherits the uses left; none are.
        raise CommandError(f"key {old.key_id!r} has no uses left; create a new key instead")
    known = _known_tiers(args)
    if known is not None and old.tier is not None and old.tier not in known:
        # Warned, not refused: rotating is how a leaked key is replaced, and
        # the tier was already the key's. The successor keeps it.
        prog = getattr(args, "prog", PROG)
        print(
            f"{prog}: warning: key {old.key_id} has tier {_printable(old.tier)!r}, which "
            f"is not configured ({_tiers_text(known)}): its successor keeps the tier and "
            "gets default_limits",
            file=sys.stderr,
        )
    issued = store.rotate_key(args.key_id, grace_seconds=grace)
    old_end = _end_of_life(store.get_key(args.key_id))
    record = issued.record
    if args.json:
        _emit_json(
            {
                "key": issued.key,
                "key_id": record.key_id,
                "replaces": old.key_id,
                "old_key_expires_at": _iso(old_end),
                "client_id": record.client_id,
                "scopes": sorted(record.scopes),
                "tier": record.tier,
                "expires_at": _iso(record.expires_at),
                "max_uses": record.remaining_uses,
            }
        )
        return 0
    print(f"Rotated key {old.key_id} for client {_printable(record.client_id)!r}.")
    print()
    _print_details(record)
    print()
    print(f"  key:       {issued.key}")
    print()
    print(f"The old key {old.key_id} stops working at {_when(old_end, 'once its grace ends')}.")
    print(_NEVER_SHOWN_AGAIN)
    return 0


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        demo = importlib.import_module(f"{__package__}.demo")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.demo":
            raise UsageError("the demo is not available in this installation") from None
        raise UsageError(
            f"the demo needs packages that are not installed ({exc}): "
            "pip install 'm2m-middleware[demo]'"
        ) from None
    except ImportError as exc:
        raise UsageError(f"the demo cannot be loaded: {exc}") from None
    demo_main = getattr(demo, "main", None)
    if not callable(demo_main):
        raise UsageError("the demo is not available in this installation")
    demo_argv: list[str] = []
    if args.once:
        demo_argv.append("--once")
    if args.port is not None:
        demo_argv += ["--port", str(args.port)]
    if args.host is not None:
        demo_argv += ["--host", args.host]
    if args.store is not None:
        demo_argv += ["--store", args.store]
    demo_argv += extra
    result = demo_main(demo_argv)
    return result if isinstance(result, int) else 0


# -- usage ---------------------------------------------------------------------------

#: ``--since 2026-03``: a month, the billing period (``fromisoformat`` wants a day too).
_YEAR_MONTH_RE = re.compile(r"([0-9]{4})-([0-9]{2})")
_MOMENT_HINT = (
    "how long ago, such as 7d, 12h or 2w, or a UTC date or time, such as 2026-03, "
    "2026-03-14 or 2026-03-14T09:00Z"
)
_USAGE_FIELDS = ("allowed", "denied", "rate_limited", "units")
#: How each granularity's period is written in the text table.
_PERIOD_FORMATS = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}
#: Cells a spreadsheet would run as a formula (OWASP "CSV injection"); client ids
#: from an outside identity provider are whatever its ``sub`` says.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: A ";" before what would start a formula (after spaces, which a spreadsheet may trim).
_AFTER_SEMICOLON = re.compile(r";(?=\s*[=+\-@\t\r])")


def _moment_option(option: str, text: str, now: datetime) -> datetime:
    """``--since`` / ``--until``: a duration back from now, or a UTC date or time."""
    value = text.strip()
    if value.startswith("-"):
        raise UsageError(f"{option}: give {_MOMENT_HINT}; got {text!r}")
    try:
        return now - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    month = _YEAR_MONTH_RE.fullmatch(value)
    try:
        if month is not None:
            moment = datetime(int(month[1]), int(month[2]), 1)
        else:
            moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option}: expected {_MOMENT_HINT}; got {text!r}") from None
    if moment.tzinfo is None:  # the store counts in UTC hours
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _usage_window(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    now = _utcnow()
    since: datetime | None
    if args.since is None:
        # Months are what a billing export asks for: all of them. Hours and days
        # would list every row ever kept; a week is what one looks at.
        since = None if args.by == "month" else now - timedelta(days=7)
    elif args.since.strip().lower() == "all":
        since = None
    else:
        since = _moment_option("--since", args.since, now)
    until = None if args.until is None else _moment_option("--until", args.until, now)
    if since is not None and until is not None and until <= since:
        raise UsageError(f"--until ({_when(until)}) must be later than --since ({_when(since)})")
    return since, until


def _usage_rows(args: argparse.Namespace, store: KeyStore) -> list[UsageRow]:
    client = args.client
    if client is not None:
        _checked("--client", check_client_id, client)
    key = _non_empty("--key", args.key)
    since, until = _usage_window(args)
    if not _require_existing(store, allow_missing_file=True):
        return []  # no file: nothing was ever counted (and none is made by looking)
    rows = store.usage(client_id=client, key_id=key, since=since, until=until, granularity=args.by)
    if args.per == "client":
        rows = _per_client(rows)
    return rows


def _per_client(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """Each client's keys (and tokens) added up per period: what an invoice lists."""
    totals: dict[tuple[datetime, str], list[int]] = {}
    for row in rows:
        found = totals.setdefault((row.period_start, row.client_id), [0, 0, 0, 0])
        for index, name in enumerate(_USAGE_FIELDS):
            found[index] += getattr(row, name)
    return [
        UsageRow(client_id, None, start, *values)
        for (start, client_id), values in sorted(totals.items())
    ]


def _usage_dict(row: UsageRow, per_client: bool) -> dict[str, Any]:
    shown = row.to_dict()
    if per_client:
        del shown["key_id"]  # not None: None is a token of an outside identity provider
    return shown


def _spreadsheet_safe(text: str) -> str:
    if ";" in text:
        # Where the list separator is ";" (Excel in most of continental Europe), a
        # spreadsheet opens a .csv splitting on it, quotes or not: what follows a
        # ";" starts a cell of its own, so it gets the leading "'" too.
        text = _AFTER_SEMICOLON.sub(";'", text)
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def _print_usage_csv(rows: Sequence[UsageRow], per_client: bool) -> None:
    # "\n", not the csv module's "\r\n": the export goes through pipes and
    # shells first; spreadsheets read either.
    writer = csv.writer(sys.stdout, lineterminator="\n")
    names = ["period_start", "client_id", *(() if per_client else ("key_id",)), *_USAGE_FIELDS]
    writer.writerow(names)
    for row in rows:
        cells: list[object] = [row.period_start.isoformat(), _spreadsheet_safe(row.client_id)]
        if not per_client:
            cells.append(_spreadsheet_safe(row.key_id or ""))
        cells.extend(getattr(row, name) for name in _USAGE_FIELDS)
        writer.writerow(cells)


def _print_usage_table(
    rows: Sequence[UsageRow], args: argparse.Namespace, per_client: bool
) -> None:
    if not rows:
        print(
            "No usage recorded for this selection. Counts reach the store within the "
            "app's usage_flush_interval (10 s by default) and when it exits."
        )
        return
    columns = [
        "PERIOD",
        "CLIENT",
        *(() if per_client else ("KEY",)),
        "ALLOWED",
        "DENIED",
        "RATE LIMITED",
        "UNITS",
    ]
    numbers = len(_USAGE_FIELDS)
    table = [columns]
    for row in rows:
        table.append(
            [
                row.period_start.strftime(_PERIOD_FORMATS[args.by]),
                _printable(row.client_id),
                *(() if per_client else (_printable(row.key_id or "(token)"),)),
                *(f"{getattr(row, name):,}" for name in _USAGE_FIELDS),
            ]
        )
    totals = [sum(getattr(row, name) for row in rows) for name in _USAGE_FIELDS]
    text_columns = len(columns) - numbers
    table.append(["TOTAL", *([""] * (text_columns - 1)), *(f"{t:,}" for t in totals)])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        text = [c.ljust(w) for c, w in zip(cells[:text_columns], widths, strict=False)]
        figures = [
            c.rjust(w) for c, w in zip(cells[text_columns:], widths[text_columns:], strict=True)
        ]
        return "  ".join([*text, *figures]).rstrip()

    for cells in table[:-1]:
        print(line(cells))
    print("  ".join("-" * w for w in widths))
    print(line(table[-1]))


def cmd_usage(args: argparse.Namespace, store: KeyStore) -> int:
    rows = _usage_rows(args, store)
    per_client = args.per == "client"
    if args.json:
        _emit_json([_usage_dict(row, per_client) for row in rows])
    elif args.csv:
        _print_usage_csv(rows, per_client)
    else:
        _print_usage_table(rows, args, per_client)
    return 0


def add_usage_arguments(
    parser: argparse.ArgumentParser,
    *,
    store_help: str = f"key-store URL (default: ${STORE_ENV}, else {DEFAULT_STORE})",
) -> None:
    """The options of ``m2m usage``, ``flask m2m usage`` and ``manage.py m2m_usage``."""
    parser.add_argument("--client", metavar="ID", help="only this client")
    parser.add_argument("--key", metavar="KEY_ID", help="only this key")
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="from this moment (rounded down to its period): how long ago, such as 7d or "
        "12h, or a UTC date or time, such as 2026-03 or 2026-03-14T09:00Z; 'all' for "
        "everything kept (default: 7d; with --by month: all)",
    )
    parser.add_argument(
        "--until", metavar="WHEN", help="up to, not including, this moment (same forms)"
    )
    parser.add_argument(
        "--by",
        choices=("hour", "day", "month"),
        default="hour",
        help="one row per client, key and hour, day or month (default: hour)",
    )
    parser.add_argument(
        "--per",
        choices=("key", "client"),
        default="key",
        help="'client' adds each client's keys and tokens up: the invoice lines (default: key)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON list of rows")
    output.add_argument(
        "--csv", action="store_true", help="print CSV with a header line (the billing export)"
    )
    parser.add_argument("--store", metavar="URL", help=store_help)
    parser.set_defaults(handler=cmd_usage)


def usage_with_options(options: Mapping[str, Any], *, prog: str, store: KeyStore | str) -> int:
    """``m2m usage`` with options another parser read (``manage.py m2m_usage``, whose
    parser is Django's): the names of :func:`add_usage_arguments`, missing ones default."""
    parser = argparse.ArgumentParser(prog=prog)
    add_usage_arguments(parser)
    args = parser.parse_args([])
    for name in ("client", "key", "since", "until", "by", "per", "json", "csv", "store"):
        if options.get(name) is not None:
            setattr(args, name, options[name])
    args.app_store, args.prog = store, prog
    return _guarded(prog, lambda: _run_keys_command(args, cmd_usage))


def usage_main(argv: Sequence[str], *, prog: str, store: KeyStore | str) -> int:
    """``m2m usage`` on an app's own store: ``flask m2m usage`` and ``manage.py
    m2m_usage``. The same options and output; ``--store`` defaults to the app's."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Requests counted per client, key and period in this app's key store.",
    )
    add_usage_arguments(parser, store_help="key-store URL (default: the app's key_store)")
    parser.set_defaults(app_store=store, prog=prog)

    def run() -> int:
        args = parser.parse_args(_negative_values_attached(argv))
        return _run_keys_command(args, args.handler)

    return _guarded(prog, run)


# -- dashboard -------------------------------------------------------------------


def add_dashboard_command(commands: Any) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="serve a read-only page of the key store: keys, usage charts, alerts",
        description="Serve a read-only page of the key store on 127.0.0.1 until Ctrl-C.",
    )
    dashboard.add_argument(
        "--store",
        metavar="URL",
        help=f"key-store URL (default: ${STORE_ENV}, else {DEFAULT_STORE})",
    )
    dashboard.add_argument(
        "--port", type=parse_port, default=8300, metavar="N", help="port (default: 8300)"
    )
    dashboard.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    dashboard.add_argument(
        "--public",
        action="store_true",
        help="allow a non-loopback --host: the page has no login, so only behind your own auth",
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard.server import DashboardError, run
    from .redaction import redact_url

    url = _store_url(args)
    store = _open_store(url)
    try:
        _require_existing(store)
        return run(
            store, host=args.host, port=args.port, public=args.public, store_label=redact_url(url)
        )
    except DashboardError as exc:
        raise CommandError(str(exc), exc.exit_code) from None
    finally:
        with contextlib.suppress(Exception):
            store.close()


_KeysCommand = Callable[[argparse.Namespace, KeyStore], int]


def _run_keys_command(args: argparse.Namespace, handler: _KeysCommand) -> int:
    app_store = getattr(args, "app_store", None)
    if args.store is None and isinstance(app_store, KeyStore):
        # The app's own store object: use it, flush what we wrote, leave it open.
        code = handler(args, app_store)
        app_store.flush_last_used()
        return code
    if args.store is None and isinstance(app_store, str):
        args.store = app_store
    store = _open_store(_store_url(args))
    try:
        code = handler(args, store)
    except BaseException:
        with contextlib.suppress(Exception):
            store.close()
        raise
    store.close()  # flushes pending last-used times
    return code


# -- signing keys (the token issuer) ---------------------------------------------


def _signing_keys(args: argparse.Namespace, store: KeyStore, *, secret_needed: bool) -> Any:
    try:
        from .issuer import SigningKeys
        from .issuer.signing_keys import SECRET_ENVIRONMENT_VARIABLE
    except ImportError as exc:
        raise CommandError(
            f'signing keys need the issuer extra ({exc.name}): pip install "m2m-middleware[issuer]"'
        ) from None
    # The secret comes from the environment only: a command-line option would
    # show it to everyone who can list processes, and keep it in shell history.
    secret = os.environ.get(SECRET_ENVIRONMENT_VARIABLE) or None
    if secret_needed and secret is None:
        raise CommandError(
            f"rotating needs the secret the signing keys are encrypted with: set "
            f"{SECRET_ENVIRONMENT_VARIABLE} (the app's signing_key_secret)",
            exit_code=2,
        )
    return SigningKeys(
        store,
        secret=secret,
        algorithm=args.algorithm,
        token_ttl=args.token_ttl,
        jwks_max_age=args.jwks_max_age,
    )


def _signing_key_rows(infos: Sequence[Any]) -> None:
    columns = ("KID", "ALGORITHM", "STATE", "PUBLISHED", "SIGNS FROM", "RETIRES")
    rows = [columns] + [
        (
            i.kid,
            i.algorithm,
            i.state,
            _when(i.publish_from),
            _when(i.signs_from),
            _when(i.retire_after),
        )
        for i in infos
    ]
    widths = [max(len(row[n]) for row in rows) for n in range(len(columns))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_signing_keys_list(args: argparse.Namespace, store: KeyStore) -> int:
    exists = _require_existing(store, allow_missing_file=True)
    infos = _signing_keys(args, store, secret_needed=False).list_keys() if exists else []
    if args.json:
        _emit_json([i.to_dict() for i in infos])
    elif not infos:
        print("No signing keys.")
    else:
        _signing_key_rows(infos)
    return 0


def cmd_signing_keys_rotate(args: argparse.Namespace, store: KeyStore) -> int:
    info = _signing_keys(args, store, secret_needed=True).rotate()
    if args.json:
        _emit_json(info.to_dict())
    else:
        print(
            f"New signing key {info.kid} ({info.algorithm}): published now, signs from "
            f"{_when(info.signs_from)}; the keys before it retire once their tokens expire."
        )
    return 0


def add_signing_key_commands(parser: argparse.ArgumentParser) -> None:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--store",
        metavar="URL",
        help=f"key-store URL (default: ${STORE_ENV}, else {DEFAULT_STORE})",
    )
    options.add_argument("--json", action="store_true", help="print the result as JSON")
    commands = parser.add_subparsers(dest="signing_command", metavar="ACTION", required=True)
    listing = commands.add_parser(
        "list", parents=[options], help="list the signing keys (never a private key)"
    )
    listing.set_defaults(
        handler=cmd_signing_keys_list, algorithm="ES256", token_ttl=300, jwks_max_age=300
    )
    rotate = commands.add_parser(
        "rotate",
        parents=[options],
        help="make a new signing key: published now, signing once every JWKS cache has it",
    )
    rotate.add_argument(
        "--algorithm",
        choices=("ES256", "EdDSA", "RS256"),
        default="ES256",
        help="the new key's algorithm: the app's signing_algorithm (default: ES256)",
    )
    rotate.add_argument(
        "--token-ttl",
        type=_token_ttl_option,
        default=300,
        metavar="SECONDS",
        help="the app's token_ttl: the old keys stay published that long after the new "
        "one signs (default: 300)",
    )
    rotate.add_argument(
        "--jwks-max-age",
        type=_jwks_max_age_option,
        default=300,
        metavar="SECONDS",
        help="the app's jwks_max_age: the new key signs only once every cached JWKS "
        "has expired (default: 300)",
    )
    rotate.set_defaults(handler=cmd_signing_keys_rotate)


def _seconds(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text[:40]!r}") from None
    if not minimum <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{value} is outside {minimum}..86400")
    return value


def _token_ttl_option(text: str) -> int:
    return _seconds(text, 1)


def _jwks_max_age_option(text: str) -> int:
    return _seconds(text, 30)  # the bounds Settings puts on jwks_max_age


# -- parser ----------------------------------------------------------------------


def parse_port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use 0 to 65535")
    return port


def add_keys_commands(
    parser: argparse.ArgumentParser,
    *,
    store_help: str = f"key-store URL (default: ${STORE_ENV}, else {DEFAULT_STORE})",
    notify_help: str = f"${NOTIFY_ENV}, if set",
) -> None:
    """The ``create``, ``list``, ``revoke`` and ``rotate`` actions, under ``parser``."""
    store_options = argparse.ArgumentParser(add_help=False)
    store_options.add_argument(
        "--store",
        metavar="URL",
        help=store_help,
    )

    notify_options = argparse.ArgumentParser(add_help=False)
    notify_options.add_argument(
        "--notify",
        metavar="REDIS_URL",
        help="also publish the change to running instances over Redis, so they drop the key "
        "at once (SQLite and PostgreSQL stores tell them by themselves; other stores need "
        f"this) (default: {notify_help})",
    )

    keys_commands = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = keys_commands.add_parser(
        "create", parents=[store_options], help="issue a new key (printed once)"
    )
    create.add_argument("--client", required=True, metavar="ID", help="client id of the key")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="SCOPE",
        help="a scope the key grants; repeat, or give several separated by spaces",
    )
    create.add_argument("--tier", metavar="TIER", help="rate-limit tier of the client")
    create.add_argument("--name", metavar="NAME", help="a label for people")
    create.add_argument(
        "--expires-in",
        metavar="DURATION",
        help="lifetime such as 3600, 30m, 12h, 30d, 2w (default: never expires)",
    )
    create.add_argument(
        "--max-uses", metavar="N", help="number of requests the key admits (default: unlimited)"
    )
    create.add_argument(
        "--allow-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="a network the key may be used from, e.g. 10.0.0.0/8 or 2001:db8::/32; repeat "
        "for several (default: anywhere)",
    )
    create.add_argument(
        "--signing-key",
        metavar="FILE",
        help="PEM file with the client's Ed25519 or P-256 public key for request signatures",
    )
    create.add_argument("--json", action="store_true", help="print the result as JSON")
    create.set_defaults(handler=cmd_keys_create)

    listing = keys_commands.add_parser(
        "list", parents=[store_options], help="list keys (never the keys themselves)"
    )
    listing.add_argument("--client", metavar="ID", help="only the keys of this client")
    listing.add_argument("--json", action="store_true", help="print the result as JSON")
    listing.set_defaults(handler=cmd_keys_list)

    revoke = keys_commands.add_parser(
        "revoke", parents=[store_options, notify_options], help="revoke a key at once"
    )
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=cmd_keys_revoke)

    rotate = keys_commands.add_parser(
        "rotate",
        parents=[store_options, notify_options],
        help="issue a successor key; the old one keeps working for the grace period",
    )
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument(
        "--grace",
        default="0",
        metavar="DURATION",
        help="how long the old key keeps working, such as 1h (default: 0, it stops at once)",
    )
    rotate.add_argument("--json", action="store_true", help="print the result as JSON")
    rotate.set_defaults(handler=cmd_keys_rotate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage m2m-middleware API keys and signing keys, and run the demo.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = commands.add_parser("keys", help="create, list, revoke and rotate API keys")
    add_keys_commands(keys)

    usage = commands.add_parser(
        "usage",
        help="requests counted per client, key and period (text, --json or --csv)",
        description="Requests counted per client, key and period: allowed, denied, "
        "rate limited, and the cost units charged.",
    )
    add_usage_arguments(usage)

    signing_keys = commands.add_parser(
        "signing-keys", help="list and rotate the token issuer's signing keys"
    )
    add_signing_key_commands(signing_keys)

    demo = commands.add_parser(
        "demo",
        help="run the example API and walk through its answers",
        description="Run the Starlette example API with demo keys and a JWT, walk through its "
        "answers over real HTTP, then serve it until Ctrl-C.",
    )
    demo.add_argument(
        "--once", action="store_true", help="run the walkthrough and exit (0 when all went well)"
    )
    demo.add_argument(
        "--port", type=parse_port, metavar="N", help="port to listen on (default: a free one)"
    )
    demo.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    demo.add_argument(
        "--store",
        metavar="URL",
        help="key store for the demo keys (default: a temporary SQLite file, removed at exit)",
    )
    add_dashboard_command(commands)
    return parser


def _dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args, extra = parser.parse_known_args(
        _negative_values_attached(sys.argv[1:] if argv is None else argv)
    )
    if args.command == "demo":
        return cmd_demo(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "dashboard":
        return cmd_dashboard(args)
    handler: _KeysCommand = args.handler
    return _run_keys_command(args, handler)


def _fail(prog: str, message: str, exit_code: int) -> int:
    text = " ".join(message.split()) or "unexpected failure"
    print(f"{prog}: error: {text}", file=sys.stderr)
    return exit_code


def _silence_stdout() -> None:
    """After a broken pipe, stop Python from failing again while flushing at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _guarded(prog: str, run: Callable[[], int]) -> int:
    """Run a command: failures become one line on stderr and an exit status."""
    try:
        return run()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except CommandError as exc:
        return _fail(prog, str(exc), exc.exit_code)
    except ConfigError as exc:
        return _fail(prog, str(exc), 2)
    except (M2MError, ValueError, OSError, OverflowError, sqlite3.Error) as exc:
        return _fail(prog, str(exc), 1)


def _warnings_as_lines(prog: str) -> None:
    """Our warnings (a key row that cannot be read, left out of a listing) as
    ``m2m: warning: ...`` lines on stderr, like the errors, when nothing else
    handles logging; Python's fallback would print them bare."""
    package = logging.getLogger("m2m_middleware")
    if logging.getLogger().handlers or any(getattr(h, "m2m_cli", False) for h in package.handlers):
        return
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    handler.m2m_cli = True  # type: ignore[attr-defined]
    package.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    # With no logging set up, the pool's reconnection warnings would reach
    # stderr beside our own one-line error; the error says what matters.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    _warnings_as_lines(PROG)
    parser = build_parser()
    return _guarded(PROG, lambda: _dispatch(parser, argv))


def keys_main(
    argv: Sequence[str],
    *,
    prog: str,
    store: KeyStore | str,
    notify: str | None = None,
    tiers: Iterable[str] | None = None,
) -> int:
    """The ``keys`` actions on an app's own store: ``flask m2m keys`` and
    ``manage.py m2m_keys``. The same options and output as ``m2m keys``, but
    ``--store`` defaults to the app's ``key_store`` and ``--notify`` to its
    ``invalidation_url``. ``tiers`` are the app's configured tier names: a
    ``--tier`` outside them is refused (None: any tier, as ``m2m keys``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Create, list, revoke and rotate API keys in this app's key store."
    )
    add_keys_commands(
        parser,
        store_help="key-store URL (default: the app's key_store setting)",
        notify_help="the app's invalidation_url, if it has one",
    )
    parser.set_defaults(
        app_store=store,
        app_notify=notify,
        app_tiers=tuple(tiers) if tiers is not None else None,
        prog=prog,
    )

    def run() -> int:
        args = parser.parse_args(_negative_values_attached(argv))
        return _run_keys_command(args, args.handler)

    return _guarded(prog, run)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
