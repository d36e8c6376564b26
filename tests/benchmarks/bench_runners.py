"""Runners for the harness tests of ``benchmarks/harness.run_isolated``: no torch import, so that each child
process starts in a fraction of a second (the tiny model zoo lives in ``bench_tiny_models.py``)."""

from __future__ import annotations


def sleeper(seconds: float = 60.0):
    import time

    time.sleep(seconds)
    return {"slept": seconds}


def hog(mb: int = 2000):
    import numpy as np

    block = np.ones(mb * 2**20 // 8)  # touched: resident
    import time

    time.sleep(30)
    return {"size": block.size}


def raiser():
    raise ValueError("boom from the runner")


def ok_runner(x: int = 1):
    from benchmarks import harness

    harness.mark_baseline()
    meas = harness.measure(lambda: sum(range(1000)) * x, repeats=3)
    return {"median_s": meas["median_s"], "times_s": meas["times_s"], "value": meas["result"]}
