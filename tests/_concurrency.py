"""Run calls from several threads at once, for the backends' thread-safety tests."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(work: Callable[[int], object], n: int = 6) -> list:
    """``[work(0), ..., work(n - 1)]``, each call on its own thread, all started before any is joined;
    the first exception raised in a thread is re-raised here."""
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
