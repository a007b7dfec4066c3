"""One process of tests/integration/test_usage_across_processes.py.

``python -m usage_worker INDEX REQUESTS``: an Engine of its own on the store
``M2M_TEST_KEY_STORE``, two threads each sending REQUESTS decisions for the
keys in ``M2M_TEST_KEYS`` (JSON ``[[client_id, key_id, key], ...]``), then it
prints what it saw per key as JSON and exits normally. Even indexes call
``engine.flush()`` before a last few requests; odd ones never do, so only the
background flush and the exit flush write their counts.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from usage_settings import PATHS, ROUTES

from m2m_middleware import Engine, Settings


def main(index: int, requests: int) -> None:
    keys = json.loads(os.environ["M2M_TEST_KEYS"])
    engine = Engine(
        Settings(
            key_store=os.environ["M2M_TEST_KEY_STORE"],
            rate_limit_storage="memory://",
            default_limits="1000000/hour",
            routes=ROUTES,
            usage_flush_interval=1,  # the least: background flushes meet the other processes'
        )
    )
    seen: dict[str, list[int]] = {key_id: [0, 0, 0, 0] for _, key_id, _ in keys}
    lock = threading.Lock()

    def send(thread: int, count: int) -> None:
        for n in range(count):
            _, key_id, key = keys[(n + thread + index) % len(keys)]
            outcome = engine.check("GET", PATHS[n % len(PATHS)], None, key)
            with lock:
                counts = seen[key_id]
                if outcome.allowed:
                    counts[0] += 1
                    counts[3] += outcome.cost  # type: ignore[union-attr]
                elif outcome.error == "rate_limited":  # type: ignore[union-attr]
                    counts[2] += 1
                else:
                    counts[1] += 1
            if n % 40 == 39:
                time.sleep(0.3)  # a run of seconds: background flushes happen mid-traffic

    threads = [threading.Thread(target=send, args=(t, requests)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if index % 2 == 0:
        engine.flush()
        send(0, 7)  # left for the exit flush
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
