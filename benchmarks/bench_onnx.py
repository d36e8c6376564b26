"""One-shot ONNX deployment: onnxruntime latency of the exported explanation file against the torch floor,
shap's torch DeepExplainer and our torch backend, on the four models of the ONNXExplainer paper.

Every case runs in a fresh subprocess (so ``resource.getrusage`` gives that case's own peak memory); the
onnxruntime case imports only numpy + onnxruntime. All cases explain the top-1 output of the same N
explicands against the same M references with the same weights (seeded), CPU, the same thread count.

  floor       torch: one forward of N (no grad) + one ordinary input-gradient backward over N×M rows
              (the backward alone is timed; its forward is not counted)
  shap        shap 0.51 DeepExplainer (PyTorch), ranked_outputs=1
  ours_torch  deepshap_opt.torch.DeepExplainer, ranked_outputs=1
  onnx        onnxruntime InferenceSession on the file from deepshap_opt.onnx.export(..., outputs="top1")

Usage:  python benchmarks/bench_onnx.py [--size 224 --n 4 --m 32 --models resnet50,...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ["efficientnet_b0", "resnet50", "densenet201", "vgg19"]
METHODS = ["floor", "shap", "ours_torch", "onnx"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timeit(fn, repeats: int, warmup: int):
    """Median wall time, all wall times, all process CPU times (user + system, all threads) of fn()."""
    for _ in range(warmup):
        fn()
    ts, cs = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), ts, cs


def _torch_setup(args, hook_safe: bool = False):
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    from torch_models import MODELS as TM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        model = TM[args.model](num_classes=args.classes, hook_safe=hook_safe).eval()
    except TypeError:
        model = TM[args.model](num_classes=args.classes).eval()
    data = np.load(args.data)
    return torch, model, torch.from_numpy(data["bg"]), torch.from_numpy(data["x"])


def case_export(args):
    _torch, model, bg, _X = _torch_setup(args)
    sys.path.insert(0, ROOT)
    import deepshap_opt.onnx as dso

    kw = {} if args.onnx_budget_mb < 0 else {"memory_budget": int(args.onnx_budget_mb * 2**20) or None}
    kw["cache"] = args.onnx_cache
    t0 = time.perf_counter()
    dso.export(model, bg, args.file, outputs="top1", check=False, **kw)
    export_s = time.perf_counter() - t0
    import onnx

    meta = {p.key: p.value for p in onnx.load(args.file, load_external_data=False).metadata_props}
    data = args.file + ".data"              # export's external data file (initializers over protobuf's 2 GB)
    return {"export_s": export_s, "file_mb": (os.path.getsize(args.file) + (os.path.getsize(data) if os.path.exists(
        data) else 0)) / 2**20, "external_data": os.path.exists(data),
            "cache": meta.get("deepshap_opt.cache")}


def case_floor(args):
    torch, model, bg, X = _torch_setup(args)
    model.requires_grad_(False)
    M = bg.shape[0]
    rows = X.repeat_interleave(M, 0)
    chunk = args.floor_chunk or len(rows)

    def once():
        """(wall, CPU) of: a no-grad forward of N + the input-gradient backward over N x M rows (its
        forward, which a cached-reference method does not need, is not counted). With --floor-chunk the
        backward runs over row chunks (same work; bounded memory) and the chunks' times are summed."""
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            model(X)
        tw, tc = time.perf_counter() - t0, time.process_time() - c0
        for s in range(0, len(rows), chunk):
            xr = rows[s:s + chunk].clone().requires_grad_(True)
            y = model(xr)
            sel = y[:, 0].sum()
            c0, t0 = time.process_time(), time.perf_counter()
            torch.autograd.grad(sel, xr)
            tw, tc = tw + time.perf_counter() - t0, tc + time.process_time() - c0
            del y, sel, xr
        return tw, tc

    for _ in range(args.warmup):
        once()
    ts, cs = zip(*[once() for _ in range(args.repeats)])
    return {"latency_s": statistics.median(ts), "all_s": list(ts), "cpu_s": list(cs)}


def case_shap(args):
    # shap's hooks crash on the torchvision code paths (in-place ops, ResNet's reused ReLU): same weights,
    # hook-safe module structure (torch_models' hook_safe=True)
    _torch, model, bg, X = _torch_setup(args, hook_safe=True)
    import shap

    e = shap.DeepExplainer(model, bg)
    med, ts, cs = _timeit(lambda: e.shap_values(X, ranked_outputs=1, check_additivity=False), args.repeats,
                          args.warmup)
    return {"latency_s": med, "all_s": ts, "cpu_s": cs}


def case_ours_torch(args):
    _torch, model, bg, X = _torch_setup(args)
    sys.path.insert(0, ROOT)
    from deepshap_opt.torch import DeepExplainer

    t0 = time.perf_counter()
    e = DeepExplainer(model, bg)
    init = time.perf_counter() - t0
    med, ts, cs = _timeit(lambda: e.shap_values(X, ranked_outputs=1, check_additivity=False), args.repeats,
                          args.warmup)
    return {"latency_s": med, "all_s": ts, "cpu_s": cs, "init_s": init}


def case_onnx(args):
    import numpy as np
    import onnxruntime as ort

    blocked = [m for m in ("torch", "tensorflow", "deepshap_opt") if m in sys.modules]
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if args.onnx_no_mem_pattern:            # onnxruntime's memory pattern off (see --onnx-no-mem-pattern)
        so.enable_mem_pattern = False
    t0 = time.perf_counter()
    sess = ort.InferenceSession(args.file, so, providers=["CPUExecutionProvider"])
    init = time.perf_counter() - t0
    init_peak = _peak_mb()                  # the session's load (references' branch folded into constants)
    X = np.load(args.data)["x"]
    step = args.onnx_chunk or len(X)        # --onnx-chunk: the file called on row chunks (bounded memory)
    med, ts, cs = _timeit(lambda: [sess.run(["shap_values", "shap_indexes"], {"input": X[s:s + step]})
                                   for s in range(0, len(X), step)], args.repeats, args.warmup)
    return {"latency_s": med, "all_s": ts, "cpu_s": cs, "init_s": init, "init_peak_rss_mb": init_peak,
            "frameworks_loaded": blocked}


def run_case(args):
    fn = {"export": case_export, "floor": case_floor, "shap": case_shap, "ours_torch": case_ours_torch,
          "onnx": case_onnx}[args.case]
    res = fn(args)
    res["peak_rss_mb"] = _peak_mb()
    print("RESULT " + json.dumps(res))


def spawn(case, model, data, file, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--model", model, "--data", data,
           "--file", file, "--threads", str(a.threads), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
           "--classes", str(a.classes), "--floor-chunk", str(a.floor_chunk), "--onnx-chunk", str(a.onnx_chunk),
           "--onnx-budget-mb", str(a.onnx_budget_mb), "--onnx-cache", a.onnx_cache] + (
               ["--onnx-no-mem-pattern"] if a.onnx_no_mem_pattern else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    lock = None
    if a.lock:                      # one heavy case at a time across processes sharing the machine
        import fcntl

        lock = open(a.lock, "a")    # noqa: SIM115 - held across the subprocess, closed below
        fcntl.flock(lock, fcntl.LOCK_EX)
    capped = None
    try:
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
            t0 = time.perf_counter()
            while p.poll() is None:
                if time.perf_counter() - t0 > a.timeout:
                    p.kill()
                if a.mem_cap_mb:          # --mem-cap-mb: the case is killed when its RSS passes the cap
                    try:
                        import psutil

                        rss = psutil.Process(p.pid).memory_info().rss / 2**20
                    except Exception:  # noqa: BLE001 - the process ended between poll and read
                        rss = 0.0
                    if rss > a.mem_cap_mb:
                        capped = rss
                        p.kill()
                time.sleep(0.2)
            fo.seek(0)
            fe.seek(0)
            out, err = fo.read(), fe.read()
    finally:
        if lock is not None:
            lock.close()
    if capped is not None:
        return {"error": f"killed: RSS {capped:.0f} MiB passed the cap --mem-cap-mb {a.mem_cap_mb}",
                "mem_capped": True}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (err or out)[-800:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=None)
    ap.add_argument("--stat", default="min", choices=["min", "median"],
                    help="which statistic of the repeats the table shows (min: least disturbed by other load)")
    ap.add_argument("--metric", default="wall", choices=["wall", "cpu"],
                    help="wall-clock seconds, or process CPU seconds (user + system over all threads: with "
                         "--threads 1 the least disturbed by other processes on a shared machine)")
    ap.add_argument("--floor-chunk", type=int, default=0,
                    help="floor: run the N x M-row backward in chunks of this many rows (0: all at once)")
    ap.add_argument("--onnx-chunk", type=int, default=0,
                    help="onnx: call the file on chunks of this many explicands (0: all N in one call)")
    ap.add_argument("--onnx-budget-mb", type=float, default=-1,
                    help="export's memory_budget in MiB (the explanation's Loop over explicand chunks; 0: no "
                         "Loop, all N x M rows in one run; default: export's default)")
    ap.add_argument("--onnx-cache", default="auto", choices=["auto", "embed", "recompute", "runtime"],
                    help="export's cache mode (default: auto, export's default)")
    ap.add_argument("--onnx-no-mem-pattern", action="store_true",
                    help="onnx: SessionOptions.enable_mem_pattern = False. With the pattern (the default), from the "
                         "second call on onnxruntime allocates the outer graph's planned block anew while its "
                         "arena keeps the first call's chunks: with cache='runtime' that doubles the references' "
                         "activations held (DenseNet201, M=4, N=1: peak 1.5 GB in the first call, 2.3 GB from "
                         "the second; 1.5 GB without the pattern)")
    ap.add_argument("--mem-cap-mb", type=float, default=0,
                    help="kill a case whose resident memory passes this many MiB (recorded as an error)")
    ap.add_argument("--lock", default=None,
                    help="flock this file around every case (shared machines: one heavy process at a time)")
    # internal (one case per subprocess)
    ap.add_argument("--case")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--file")
    ap.add_argument("--table-from", nargs="+", default=None,
                    help="print the table from --out JSON files of earlier runs (later files override cases)")
    a = ap.parse_args()
    if a.case:
        return run_case(a)
    if a.table_from:
        rows: dict[str, dict] = {}
        for fn in a.table_from:
            with open(fn) as f:
                if fn.endswith(".log"):          # the progress lines "model case {...}" of a run's stdout
                    import ast

                    results = {}
                    for line in f:
                        parts = line.split(" ", 2)
                        if len(parts) == 3 and parts[0] in MODELS and parts[2].startswith("{"):
                            results.setdefault(parts[0], {"model": parts[0]})[parts[1]] = ast.literal_eval(parts[2])
                    results = list(results.values())
                else:
                    results = json.load(f)["results"]
                for r in results:
                    rows.setdefault(r["model"], {}).update({k: v for k, v in r.items() if not (
                        isinstance(v, dict) and "error" in v and not v.get("mem_capped"))})
        print(table([rows[m] for m in MODELS if m in rows], a))
        return None
    import numpy as np

    rng = np.random.default_rng(0)
    results = []
    tmp = tempfile.mkdtemp(prefix="bench_onnx_")
    data = os.path.join(tmp, "data.npz")
    np.savez(data, bg=rng.normal(size=(a.m, 3, a.size, a.size)).astype(np.float32),
             x=rng.normal(size=(a.n, 3, a.size, a.size)).astype(np.float32))
    methods = a.methods.split(",")
    print(f"# size {a.size}x{a.size}, N={a.n}, M={a.m}, classes={a.classes}, threads={a.threads}, "
          f"repeats={a.repeats} ({a.stat} {a.metric} time shown), warmup={a.warmup}", flush=True)
    for model in a.models.split(","):
        file = os.path.join(tmp, f"{model}.onnx")
        row = {"model": model}
        if "onnx" in methods:
            row["export"] = spawn("export", model, data, file, a)
            print(model, "export", row["export"], flush=True)
        for meth in methods:
            row[meth] = spawn(meth, model, data, file, a)
            print(model, meth, row[meth], flush=True)
        results.append(row)
        for fn in (file, file + ".data"):
            if os.path.exists(fn):
                os.remove(fn)
    print()
    print(table(results, a))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "results": results}, f, indent=1)


def table(results, a) -> str:
    def lat(r, k):
        v = r.get(k, {})
        key = "cpu_s" if getattr(a, "metric", "wall") == "cpu" else "all_s"
        if not isinstance(v, dict) or not v.get(key):
            return None
        return min(v[key]) if a.stat == "min" else statistics.median(v[key])

    lines = [("| model | floor (s) | shap torch (s) | ours torch (s) | onnx one-shot (s) | onnx / floor | "
              "onnx / ours torch | speed-up vs shap | file (MiB) | onnx peak RSS (MiB) | onnx peak after load "
              "(MiB) | floor peak RSS (MiB) | ours torch peak RSS (MiB) | shap peak RSS (MiB) | "
              "onnx session init (s) | cache |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def f(v, p=2):
        return "—" if v is None else f"{v:.{p}f}"

    def ratio(u, v):
        return None if (u is None or v is None) else u / v

    def peak(r, k):
        v = r.get(k, {})
        if isinstance(v, dict) and v.get("mem_capped"):
            return f"killed at the {getattr(a, 'mem_cap_mb', 0) or '?'} MiB cap"
        return f(v.get("peak_rss_mb") if isinstance(v, dict) else None, 0)

    for r in results:
        fl, sh, ot, on = (lat(r, k) for k in ("floor", "shap", "ours_torch", "onnx"))
        onx = r.get("onnx", {})
        lines.append(f"| {r['model']} | {f(fl)} | {f(sh)} | {f(ot)} | {f(on)} | {f(ratio(on, fl))} | "
                     f"{f(ratio(on, ot))} | {f(ratio(sh, on), 1)}× | {f(r.get('export', {}).get('file_mb'), 1)} | "
                     f"{peak(r, 'onnx')} | {f(onx.get('init_peak_rss_mb'), 0)} | "
                     f"{peak(r, 'floor')} | {peak(r, 'ours_torch')} | "
                     f"{peak(r, 'shap')} | {f(onx.get('init_s'))} | "
                     f"{r.get('export', {}).get('cache') or '—'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
