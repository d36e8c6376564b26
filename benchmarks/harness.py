"""A small harness for side-by-side benchmark runs, independent of the framework being benchmarked.

Each case runs in a fresh Python subprocess, so its peak memory is its own and a crash, an out-of-memory kill
or a hang loses only that case. A case is a *runner*: ``"package.module:function"`` called in the child with
keyword arguments; it returns one record (a dict) or a list of records. Inside the runner, use
:func:`mark_baseline` after building the model and data, :func:`measure` to time the call under test and
:func:`completeness_error` for the error; the harness adds the memory fields.

Memory (fields of every record):

* ``rss_base_mb``  -- ``ru_maxrss`` of the child when the runner called :func:`mark_baseline` (interpreter,
  imported libraries, model weights and input data);
* ``rss_peak_mb``  -- ``ru_maxrss`` at the end of the case (high-water mark of the whole process);
* ``rss_extra_mb`` -- the difference: the peak memory the method needed on top of model + data. The tables
  report this one: the import footprint of shap/TensorFlow/... differs between methods and is not what is
  being compared.

Timing (:func:`measure`): one warm-up call, then the median of ``repeats`` timed calls. A call that takes
longer than ``long_s`` seconds is not repeated for warming up: such a first call is kept as a measurement
(one-off warm-up costs are small against it), and repeats stop once ``budget_s`` seconds have been spent on
the case (at least one measured call is always kept). The record says how many calls were measured.

Failures: a child killed by a signal, exceeding ``mem_limit_mb`` of resident memory (polled every 0.2 s) or
raising an allocation error is reported with status ``"OOM"``; one running past ``timeout_s`` with
``"timeout"``; any other exception with ``"error"`` and its message. Nothing of that aborts the run.

Run this file's :func:`markdown_table` on the records for a table with ratios to the floor and speed-ups of
"ours" over the other methods.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "@@HARNESS_RESULT@@"
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror",
             "failed to allocate", "bad_alloc")

_baseline_mb: float | None = None


# --------------------------------------------------------------------------------------------- in child
def rss_high_water_mb() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mark_baseline() -> float:
    """Record the memory high-water mark after model and data construction (see module docstring)."""
    global _baseline_mb
    _baseline_mb = rss_high_water_mb()
    return _baseline_mb


def measure(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, long_s: float = 60.0,
            budget_s: float | None = None) -> dict[str, Any]:
    """Time ``fn`` (see module docstring). Returns ``{"median_s", "times_s", "cpu_s", "median_cpu_s",
    "warmup_s", "result"}``: wall-clock seconds per measured call, and the CPU seconds (user + system, all
    threads of this process) of the same calls -- less sensitive than wall clock to other processes
    sharing the machine. ``result`` is the last call's return value."""
    warmups: list[float] = []
    times: list[float] = []
    cpus: list[float] = []
    result = None
    spent = 0.0

    def once():
        nonlocal result, spent
        c0, t0 = _cpu_s(), time.perf_counter()
        result = fn()
        dt, dc = time.perf_counter() - t0, _cpu_s() - c0
        spent += dt
        return dt, dc

    for _ in range(max(warmup, 0)):
        dt, dc = once()
        if dt >= long_s:      # too long to throw away: keep it as a measurement
            times.append(dt)
            cpus.append(dc)
            break
        warmups.append(dt)
    while len(times) < max(repeats, 1):
        if times and budget_s is not None and spent >= budget_s:
            break
        dt, dc = once()
        times.append(dt)
        cpus.append(dc)
    return {"median_s": statistics.median(times), "times_s": times, "median_cpu_s": statistics.median(cpus),
            "cpu_s": cpus, "warmup_s": warmups, "result": result}


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def completeness_error(phi_sums: np.ndarray, outputs: np.ndarray, expected: np.ndarray,
                       indexes: np.ndarray) -> dict[str, float]:
    """Completeness (summation-to-delta) error of attributions.

    phi_sums: (N, k) sum of the attributions over all input features, for the explained outputs;
    outputs: (N, K) f(x); expected: (K,) mean f over the references; indexes: (N, k) explained outputs.
    Returns ``abs_err`` = max |Σφ − (f(x) − E f)|, ``scale`` = max(|f(x)|, |E f|) over the explained
    outputs (the project's additivity-check scale) and ``rel_err`` = abs_err / scale.
    """
    phi_sums = np.asarray(phi_sums, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    indexes = np.asarray(indexes)
    rows = np.arange(outputs.shape[0])[:, None]
    target = outputs[rows, indexes] - expected[indexes]
    abs_err = float(np.abs(phi_sums - target).max())
    scale = max(float(np.abs(outputs[rows, indexes]).max()), float(np.abs(expected[indexes]).max()), 1e-30)
    return {"abs_err": abs_err, "scale": scale, "rel_err": abs_err / scale}


def import_module_or_file(name: str):
    """``importlib.import_module(name)``, or, for a name ending in ``.py``, the module loaded from that file."""
    import importlib
    import importlib.util

    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name).resolve()
    mod_name = "_bench_" + path.stem
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def _child_main(target: str, kwargs_json: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    status, payload = "ok", None
    try:
        module_name, func_name = target.rsplit(":", 1)
        payload = getattr(import_module_or_file(module_name), func_name)(**json.loads(kwargs_json))
    except BaseException as exc:  # noqa: BLE001 -- report everything, including MemoryError
        text = f"{type(exc).__name__}: {exc}"
        status = "OOM" if any(s in text.lower() for s in _OOM_TEXT) else "error"
        payload = {"status": status, "error": text.strip().splitlines()[0][:500] if text.strip() else text,
                   "traceback": traceback.format_exc()[-4000:]}
    records = payload if isinstance(payload, list) else [payload]
    peak = rss_high_water_mb()
    load = os.getloadavg()[0]
    for rec in records:
        rec["loadavg_1min_end"] = load
        rec.setdefault("status", "ok")
        rec["rss_peak_mb"] = peak
        if _baseline_mb is not None:
            rec["rss_base_mb"] = _baseline_mb
            rec["rss_extra_mb"] = peak - _baseline_mb
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(records, default=_json_default), flush=True)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# -------------------------------------------------------------------------------------------- in parent
def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_isolated(target: str, kwargs: dict[str, Any], *, timeout_s: float | None = None,
                 mem_limit_mb: float | None = None, threads: int | None = None,
                 base: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``target(**kwargs)`` in a fresh subprocess; always returns a list of records.

    ``target`` is ``"package.module:function"`` or ``"path/to/file.py:function"``.

    ``base`` is merged into every record (use it for the case's identity: model, method, mode, ...).
    ``threads`` sets OMP/MKL thread counts in the child's environment (the runner should also call the
    framework's own setter).
    """
    base = dict(base or {})
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    # the caller's PYTHONPATH first (e.g. a snapshot of the package under test), then the repository root;
    # -P keeps the working directory off sys.path so that it cannot shadow them
    env["PYTHONPATH"] = os.pathsep.join(([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []) + [str(ROOT)])
    code = "import sys; from benchmarks.harness import _child_main; _child_main(sys.argv[1], sys.argv[2])"
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *flags, "-c", code, target, json.dumps(kwargs)]
    t_start = time.perf_counter()
    max_rss = 0.0
    killed_for: str | None = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=out, stderr=err, start_new_session=True)
        while proc.poll() is None:
            time.sleep(0.2)
            max_rss = max(max_rss, _rss_mb(proc.pid))
            elapsed = time.perf_counter() - t_start
            if mem_limit_mb is not None and max_rss > mem_limit_mb:
                killed_for = "OOM"
            elif timeout_s is not None and elapsed > timeout_s:
                killed_for = "timeout"
            if killed_for:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
        wall = time.perf_counter() - t_start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()

    records: list[dict] | None = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            records = json.loads(line[len(RESULT_MARK):])
            break
    if records is None:
        rc = proc.returncode
        if killed_for == "OOM":
            rec = {"status": "OOM", "error": f"resident memory passed the {mem_limit_mb:.0f} MiB limit"}
        elif killed_for == "timeout":
            rec = {"status": "timeout", "error": f"still running after {timeout_s:.0f} s"}
        else:
            tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
            oom = rc in (-signal.SIGKILL, 137) or any(s in stderr.lower() for s in _OOM_TEXT)
            rec = {"status": "OOM" if oom else "error",
                   "error": f"child exited with {rc}" + (" (killed: out of memory?)" if oom else "")
                   + (f": {tail[0][:400]}" if tail[0] else "")}
        rec["stderr_tail"] = stderr[-3000:]
        records = [rec]
    for rec in records:
        for key, value in base.items():
            rec.setdefault(key, value)
        rec["wall_s"] = wall
        rec["rss_polled_max_mb"] = max_rss
    if log is not None:
        for rec in records:
            log(_one_line(rec))
    return records


def _one_line(rec: dict) -> str:
    ident = " ".join(f"{k}={rec[k]}" for k in ("model", "mode", "method") if k in rec)
    if rec.get("status") != "ok":
        return f"[{rec.get('status')}] {ident}: {rec.get('error', '')}"
    parts = [f"[ok] {ident}: {rec.get('median_s', float('nan')):.3f} s"]
    if rec.get("construct_s") is not None:
        parts.append(f"construct {rec['construct_s']:.3f} s")
    if rec.get("rss_extra_mb") is not None:
        parts.append(f"+{rec['rss_extra_mb']:.0f} MiB")
    if rec.get("rel_err") is not None:
        parts.append(f"rel err {rec['rel_err']:.1e}")
    parts.append(f"(case wall {rec.get('wall_s', 0):.0f} s)")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ table
def _fmt_s(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×"


def _status_text(rec: dict, width: int = 90) -> str:
    status = rec.get("status", "?")
    if status == "ok":
        return "ok"
    text = str(rec.get("error", "")).replace("|", "\\|").replace("\n", " ")
    if len(text) > width:
        text = text[: width - 1] + "…"
    return f"**{status}**: {text}" if text else f"**{status}**"


def markdown_table(records: Iterable[dict], *, group_keys: Sequence[str] = ("model", "mode"),
                   floor: str = "floor", ours: str = "ours",
                   method_order: Sequence[str] | None = None) -> str:
    """One row per record, grouped by ``group_keys``; within a group:

    * ``× floor`` = the method's median latency / the floor's (record with method ``floor``);
    * ``ours ×faster`` = the method's latency / ours' latency (on every non-ours row: how much faster ours
      is than shap, captum, ...; below 1 means ours is slower).
    ``CPU s`` is the median CPU time (user + system, all threads) of the measured calls; the two ``(CPU)``
    columns are the same ratios on CPU time, which other processes sharing the machine distort less.
    ``construct s`` is reported separately and is not part of the latency.
    """
    records = list(records)
    order = list(method_order or [])

    def method_rank(m: str) -> tuple[int, str]:
        return (order.index(m) if m in order else len(order), m)

    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(k) for k in group_keys), []).append(rec)

    head = [*group_keys, "method", "status", "latency s (median)", "n", "CPU s", "construct s", "× floor",
            "ours ×faster", "× floor (CPU)", "ours ×faster (CPU)", "peak extra MiB", "completeness rel. err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key, recs in groups.items():
        by_method = {r.get("method"): r for r in recs}
        f_rec, o_rec = by_method.get(floor), by_method.get(ours)
        f_lat = f_rec.get("median_s") if f_rec and f_rec.get("status") == "ok" else None
        o_lat = o_rec.get("median_s") if o_rec and o_rec.get("status") == "ok" else None
        f_cpu = f_rec.get("median_cpu_s") if f_rec and f_rec.get("status") == "ok" else None
        o_cpu = o_rec.get("median_cpu_s") if o_rec and o_rec.get("status") == "ok" else None
        for rec in sorted(recs, key=lambda r: method_rank(str(r.get("method")))):
            ok = rec.get("status") == "ok"
            lat = rec.get("median_s") if ok else None
            x_floor = lat / f_lat if (lat is not None and f_lat and rec is not f_rec) else None
            x_ours = lat / o_lat if (lat is not None and o_lat and rec is not o_rec) else None
            cpu = rec.get("median_cpu_s") if ok else None
            c_floor = cpu / f_cpu if (cpu is not None and f_cpu and rec is not f_rec) else None
            c_ours = cpu / o_cpu if (cpu is not None and o_cpu and rec is not o_rec) else None
            rel = rec.get("rel_err") if ok else None
            extra = rec.get("rss_extra_mb") if ok else None
            row = [*(str(k) for k in key), str(rec.get("method")), _status_text(rec), _fmt_s(lat),
                   str(rec.get("n_measured", len(rec.get("times_s", [])))) if ok else "",
                   _fmt_s(rec.get("median_cpu_s")) if ok else "", _fmt_s(rec.get("construct_s")),
                   _fmt_ratio(x_floor), _fmt_ratio(x_ours), _fmt_ratio(c_floor), _fmt_ratio(c_ours),
                   f"{extra:.0f}" if extra is not None else "",
                   f"{rel:.1e}" if rel is not None else ("n/a" if ok else "")]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_records(path: str | os.PathLike) -> list[dict]:
    with open(path) as fh:
        data = json.load(fh)
    return data["records"] if isinstance(data, dict) else data


def save_records(path: str | os.PathLike, records: list[dict], meta: dict | None = None) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta or {}, "records": records}, fh, indent=1, default=_json_default)
    os.replace(tmp, path)
