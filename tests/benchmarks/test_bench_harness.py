"""Smoke tests of benchmarks/harness.py and benchmarks/bench_torch.py on a tiny model at tiny sizes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import harness

TINY = str(Path(__file__).with_name("bench_tiny_models.py"))
RUNNERS = str(Path(__file__).with_name("bench_runners.py"))  # no torch import: fast child processes


def test_measure_and_completeness_error():
    calls = []
    meas = harness.measure(lambda: calls.append(1) or len(calls), repeats=3, warmup=1)
    assert len(calls) == 4 and len(meas["times_s"]) == 3 and len(meas["warmup_s"]) == 1
    assert meas["result"] == 4 and meas["median_s"] >= 0 and meas["median_cpu_s"] >= 0
    # a first call longer than long_s is kept as the measurement
    meas = harness.measure(lambda: None, repeats=1, warmup=1, long_s=0.0)
    assert len(meas["times_s"]) == 1 and not meas["warmup_s"]

    outputs = np.array([[1.0, 3.0], [2.0, -4.0]])
    expected = np.array([0.5, 1.0])
    idx = np.array([[1], [0]])
    exact = np.array([[2.0], [1.5]])
    assert harness.completeness_error(exact, outputs, expected, idx)["abs_err"] == 0.0
    err = harness.completeness_error(exact + 0.3, outputs, expected, idx)
    assert math.isclose(err["abs_err"], 0.3) and math.isclose(err["rel_err"], 0.1)


def test_isolated_failures_are_reported_not_raised():
    ok = harness.run_isolated(f"{RUNNERS}:ok_runner", {"x": 2}, timeout_s=60, base={"method": "m"})
    assert ok[0]["status"] == "ok" and ok[0]["value"] == 999000 and ok[0]["method"] == "m"
    assert ok[0]["rss_peak_mb"] > 0 and ok[0]["rss_extra_mb"] >= 0
    err = harness.run_isolated(f"{RUNNERS}:raiser", {}, timeout_s=60)
    assert err[0]["status"] == "error" and "boom from the runner" in err[0]["error"]
    slow = harness.run_isolated(f"{RUNNERS}:sleeper", {"seconds": 60}, timeout_s=1.5)
    assert slow[0]["status"] == "timeout" and slow[0]["wall_s"] < 30
    hog = harness.run_isolated(f"{RUNNERS}:hog", {"mb": 600}, timeout_s=60, mem_limit_mb=300)
    assert hog[0]["status"] == "OOM" and hog[0]["wall_s"] < 30


def test_markdown_table_ratios():
    recs = [
        {"model": "a", "mode": "top1", "method": "ours", "status": "ok", "median_s": 2.0, "times_s": [2.0],
         "rel_err": 1e-7, "rss_extra_mb": 10.0, "construct_s": 1.0},
        {"model": "a", "mode": "top1", "method": "shap", "status": "ok", "median_s": 10.0, "times_s": [10.0]},
        {"model": "a", "mode": "top1", "method": "captum", "status": "error", "error": "RuntimeError: x | y"},
        {"model": "a", "mode": "top1", "method": "floor", "status": "ok", "median_s": 1.0, "times_s": []},
    ]
    table = harness.markdown_table(recs, method_order=["ours", "shap", "captum", "floor"]).splitlines()
    assert len(table) == 2 + 4
    ours, shap, captum, floor = table[2:]
    assert "| ours | ok | 2 |" in ours and "2.00×" in ours and "1.0e-07" in ours
    assert ours.count("|") == table[0].count("|")
    assert "10.0×" in shap and "5.00×" in shap
    assert "**error**: RuntimeError: x \\| y" in captum
    assert "0.50×" in floor


def test_bench_torch_smoke(tmp_path, capsys):
    pytest.importorskip("torch")
    from benchmarks import bench_torch

    out = tmp_path / "r.json"
    methods = ["floor", "captum[hook-safe]"]
    rc = bench_torch.main(["--models-module", TINY, "--models", "tiny", "--methods", *methods, "--outputs", "both",
                           "--n", "2", "--m", "3", "--size", "8", "--repeats", "1", "--num-classes", "3",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    got = {(r["method"], r["mode"]) for r in records}
    assert got == {(m, md) for m in methods for md in ("top1", "all")}
    for r in records:
        assert r["status"] == "ok", r
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        assert math.isfinite(r["rss_extra_mb"])
    for r in records:
        if r["method"] != "floor":
            assert math.isfinite(r["rel_err"])
            assert r["out_shape"][-1] == (1 if r["mode"] == "top1" else 3)
    rows = [ln for ln in printed.splitlines() if ln.startswith("| tiny |")]
    assert len(rows) == 4
    assert all("| ok |" in ln for ln in rows)
