"""Small sweeps for the documentation plots: latency vs references, latency vs batch size, memory vs references.

Compares ``shap.DeepExplainer`` (0.51), ``captum.attr.DeepLiftShap`` (0.9) and
``deepshap_opt.torch.DeepExplainer`` on a small CNN (3x32x32 input, two conv + ReLU + max-pool blocks, two
linear layers, 10 classes; random weights, fixed seed). Every method explains the top-1 output of each
explicand (``ranked_outputs=1``, captum ``target=`` the top-1 class, computed inside the timed call).

Each case (method, N, M) runs in a fresh subprocess (``--case``) with one torch thread:

* latency: construction (shap / ours build their explainer once; timed separately, not plotted), then one
  warm-up call and the median of ``--repeats`` timed calls, as wall-clock time and as the process's CPU
  time (``time.process_time``; with one thread this is the latency on an otherwise idle core). The plots
  show the CPU time (``--metric wall`` for wall-clock), which stays meaningful on a shared machine;
* memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the model and data are built (baseline) and
  after the timed calls (peak); the plot shows the difference, the memory the method needed on top of the
  interpreter, the imports, the model and the data.

    python benchmarks/plots.py                 # writes docs/img/bench_*.png (about 5 minutes on 1 core)
    python benchmarks/plots.py --m 4 8 --n 1 2 --repeats 1 --out /tmp/plots   # a smaller run
    python benchmarks/plots.py --from-json run1.json run2.json              # redraw, pooling runs

This module is also a model zoo for ``benchmarks/bench_torch.py --models-module benchmarks/plots.py``
(``MODELS = {"small_cnn": ...}``), which ``deepshap-opt bench --quick`` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("shap", "captum", "ours")
LABELS = {"shap": "shap 0.51 DeepExplainer", "captum": "captum 0.9 DeepLiftShap", "ours": "deepshap_opt (torch)"}
COLORS = {"shap": "tab:orange", "captum": "tab:green", "ours": "tab:blue"}


# ------------------------------------------------------------------------------------------ model zoo
def small_cnn(num_classes: int = 10, hook_safe: bool = True):
    """A small CNN for 3x32x32 inputs; no in-place ops and no reused modules (hook-safe for shap/captum)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, num_classes))


def calibrate_batchnorm(model, data):
    return model.eval()


MODELS = {"small_cnn": small_cnn}


# ------------------------------------------------------------------------------------------ one case
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def run_case(method: str, n: int, m: int, repeats: int, seed: int = 0) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    if method == "shap":
        import shap
    elif method == "captum":
        from captum.attr import DeepLiftShap
    else:
        from deepshap_opt.torch import DeepExplainer
    torch.manual_seed(seed)
    model = small_cnn().eval()
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, 32, 32, generator=gen)
    bg = torch.randn(m, 3, 32, 32, generator=gen)
    with torch.no_grad():
        model(X), model(bg)
    base = _rss_mb()

    t0 = time.perf_counter()
    if method == "shap":
        e = shap.DeepExplainer(model, bg)
        call = lambda: e.shap_values(X, ranked_outputs=1, check_additivity=False)
    elif method == "captum":
        dl = DeepLiftShap(model)

        def call():
            with torch.no_grad():
                top = model(X).argmax(1)
            return dl.attribute(X, baselines=bg, target=top)
    else:
        e = DeepExplainer(model, bg)
        call = lambda: e.shap_values(X, ranked_outputs=1, check_additivity=False)
    build_s = time.perf_counter() - t0
    call()                                                  # warm-up
    times, cpu = [], []
    for _ in range(max(1, repeats)):
        t, c = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = _rss_mb()
    return {"method": method, "n": n, "m": m, "build_s": build_s, "latency_s": statistics.median(times),
            "cpu_s": statistics.median(cpu), "times_s": times, "cpu_times_s": cpu, "rss_base_mb": base,
            "rss_peak_mb": peak, "rss_extra_mb": peak - base}


def spawn(method: str, n: int, m: int, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", method, "--n", str(n), "--m", str(m),
           "--repeats", str(repeats)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "m": m, "error": "timeout"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()
    return {"method": method, "n": n, "m": m, "error": tail[-1] if tail else f"exit {p.returncode}"}


# ------------------------------------------------------------------------------------------ plots
def plot(results: list[dict], out: Path, n_fixed: int, m_fixed: int, metric: str = "cpu") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    written = []

    def series(method, key, vary, fixed_key, fixed_val):
        pts = sorted((r[vary], r[key]) for r in ok if r["method"] == method and r[fixed_key] == fixed_val)
        return [p[0] for p in pts], [p[1] for p in pts]

    lat = "cpu_s" if metric == "cpu" else "latency_s"
    ylab = "CPU time per call, 1 thread (ms)" if metric == "cpu" else "latency per call (ms)"
    specs = [
        ("bench_latency_vs_references.png", lat, "m", "n", n_fixed, 1000.0,
         "references M (background size)", ylab, f"Latency vs references (N = {n_fixed})"),
        ("bench_latency_vs_batch.png", lat, "n", "m", m_fixed, 1000.0,
         "explicands N (batch size)", ylab, f"Latency vs batch size (M = {m_fixed})"),
        ("bench_memory_vs_references.png", "rss_extra_mb", "m", "n", n_fixed, 1.0,
         "references M (background size)", "peak RSS above model + data (MiB)",
         f"Memory vs references (N = {n_fixed})"),
    ]
    for fname, key, vary, fixed_key, fixed_val, scale, xl, yl, title in specs:
        fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
        for method in METHODS:
            xs, ys = series(method, key, vary, fixed_key, fixed_val)
            if xs:
                ax.plot(xs, [y * scale for y in ys], "o-", color=COLORS[method], label=LABELS[method])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[vary] for r in ok if r[fixed_key] == fixed_val}) or [1])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        if key != "rss_extra_mb":
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title + ", small CNN 3x32x32, 1 CPU thread", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def pool(runs: list[list[dict]]) -> list[dict]:
    """One record per (method, N, M) from several runs: medians over all timed calls and over the peaks."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for r in run:
            groups.setdefault((r["method"], r["n"], r["m"]), []).append(r)
    out = []
    for (method, n, m), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out.append(rs[0])
            continue
        times = [t for r in ok for t in r["times_s"]]
        cpu = [t for r in ok for t in r.get("cpu_times_s", [])]
        out.append({"method": method, "n": n, "m": m, "runs": len(ok), "calls": len(times),
                    "latency_s": statistics.median(times), "cpu_s": statistics.median(cpu) if cpu else float("nan"),
                    "times_s": times, "cpu_times_s": cpu, "build_s": statistics.median(r["build_s"] for r in ok),
                    "rss_extra_mb": statistics.median(r["rss_extra_mb"] for r in ok)})
    return out


def table(results: list[dict]) -> str:
    lines = ["| method | N | M | CPU time (ms) | wall latency (ms) | build (ms) | peak RSS above model+data (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (METHODS.index(r["method"]), r["n"], r["m"])):
        if "error" in r:
            lines.append(f"| {r['method']} | {r['n']} | {r['m']} | error: {r['error'][:60]} | | | |")
        else:
            lines.append(f"| {r['method']} | {r['n']} | {r['m']} | {r['cpu_s'] * 1e3:.1f} | {r['latency_s'] * 1e3:.1f} | "
                         f"{r['build_s'] * 1e3:.1f} | {r['rss_extra_mb']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[4, 8, 16, 32], help="references for the M sweeps")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 2, 4], help="explicands for the N sweep")
    ap.add_argument("--n-fixed", type=int, default=2, help="N of the M sweeps")
    ap.add_argument("--m-fixed", type=int, default=16, help="M of the N sweep")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNGs")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="only redraw the plots from --json files; several runs are pooled per case (median over "
                    "all their timed calls, median of their memory peaks)")
    ap.add_argument("--metric", default="cpu", choices=("cpu", "wall"), help="latency plots: CPU or wall time")
    ap.add_argument("--case", choices=METHODS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        res = run_case(a.case, a.n[0], a.m[0], a.repeats)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.from_json:
        results = pool([json.loads(Path(f).read_text())["results"] for f in a.from_json])
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for p in plot(results, Path(a.out), a.n_fixed, a.m_fixed, a.metric):
            print(f"wrote {p}")
        print(table(results))
        return 0
    cases = sorted({(a.n_fixed, m) for m in a.m} | {(n, a.m_fixed) for n in a.n})
    results = []
    for method in a.methods:
        for n, m in cases:
            r = spawn(method, n, m, a.repeats, a.timeout)
            results.append(r)
            msg = r.get("error") or (f"cpu {r['cpu_s'] * 1e3:.1f} ms, wall {r['latency_s'] * 1e3:.1f} ms, "
                                     f"+{r['rss_extra_mb']:.1f} MiB")
            print(f"{time.strftime('%H:%M:%S')} {method:6s} N={n:<3d} M={m:<3d} {msg}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    for p in plot(results, out, a.n_fixed, a.m_fixed, a.metric):
        print(f"wrote {p}")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
