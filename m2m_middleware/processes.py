"""``memory://`` limits in several worker processes: one WARNING, where it can be told.

``memory://`` counts in the memory of one process, so N worker processes
admit up to N times every limit (``gunicorn -w 2`` admitted 128 of 250
requests against 100/second). The package can tell it runs in more than one
process in two cases, and then logs one WARNING per process on the
``m2m_middleware`` logger, naming ``rate_limit_storage``:

- the process was forked after a limiter counting in memory was built (a
  pre-forking server that loads the app first: ``gunicorn --preload``,
  uWSGI without ``lazy-apps``): seen by an ``os.register_at_fork`` hook in the
  child, which holds a copy of the parent's counters;
- ``WEB_CONCURRENCY`` is above 1 when such a limiter is built: the worker
  count gunicorn and uvicorn default to, and that hosting platforms set.

It cannot tell when each worker loads the app on its own and nothing says how
many there are (``gunicorn -w 2`` without ``--preload``, ``uvicorn --workers
2``); the README says so. Nothing here runs per request.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

logger = logging.getLogger("m2m_middleware")

#: Limiters counting in this process's memory, held weakly: a fork is only worth a
#: warning while one of them is alive.
_memory_limiters: weakref.WeakSet[Any] = weakref.WeakSet()
_warned = False
_lock = threading.Lock()


def watch_memory_limiter(limiter: Any) -> None:
    """Called by a limiter with ``memory://`` storage and limits to count, once built."""
    with _lock:
        _memory_limiters.add(limiter)
    workers = web_concurrency()
    if workers > 1:
        _warn(f"WEB_CONCURRENCY is {workers}")


def web_concurrency() -> int:
    """``$WEB_CONCURRENCY`` as a number of processes; 0 when unset or not a number."""
    text = os.environ.get("WEB_CONCURRENCY", "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def _warn(reason: str) -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    logger.warning(
        "rate_limit_storage is memory:// and %s: every worker process counts its own "
        "limits, so N processes admit up to N times each limit; point rate_limit_storage "
        "at redis:// (or another shared storage) to share one budget",
        reason,
    )


def _after_fork_in_child() -> None:
    # A new process, so its own warning. The lock may have been held by another
    # thread of the parent at the fork (it would never be released here): a new one.
    global _lock, _warned
    _lock = threading.Lock()
    _warned = False
    if len(_memory_limiters):
        _warn(
            "this process was forked after its limits were set up (a pre-forking "
            "server such as gunicorn --preload)"
        )


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
