"""PyTorch DeepSHAP benchmark: deepshap_opt vs shap 0.51 vs captum 0.9 vs the gradient floor.

For every model in :data:`benchmarks.torch_models.MODELS` (random weights, BatchNorm statistics calibrated on
one random batch, ``eval()``, 10 classes), ``N`` explicands and ``M`` references drawn from a fixed-seed
normal distribution, each (method, model, outputs) case runs in its own subprocess (see
:mod:`benchmarks.harness`) and is timed on the same call a user would make:

``ours``     ``deepshap_opt.torch.DeepExplainer(model, bg)`` (construction timed separately: it runs the
             references forward once), then ``shap_values(X, ranked_outputs=1, check_additivity=False)``
             (top1) or ``shap_values(X, check_additivity=False)`` (all outputs).
``shap``     ``shap.DeepExplainer(model, bg).shap_values(X, ranked_outputs=1 | None,
             check_additivity=False)`` (construction timed separately).
``captum``   ``captum.attr.DeepLiftShap(model).attribute(X, baselines=bg, target=top1)``, the top-1 class
             computed inside the timed call (a no-grad forward of X); all outputs = one call per class.
``floor``    one no-grad forward of the N explicands + one ordinary input-gradient backward
             (``torch.autograd.grad``) over the N*M rows "x_n repeated M times", seeded with the top-1
             output of each row; for all outputs, K such backwards (K separate ``autograd.grad`` calls with
             ``retain_graph=True``; ``is_grads_batched`` is not used). Only the ``autograd.grad`` calls
             are timed, not the forward that builds the graph. The N*M rows are processed in chunks of
             ``--floor-chunk`` rows (default M: one explicand's rows per graph, so that the graph fits in
             memory on every model); the backward time is the sum over chunks of the median per chunk.
             Parameters are frozen (``requires_grad_(False)``) for the floor. Two cost savers, off by
             default and recorded in every floor record: ``--floor-sample S`` times only the first S
             chunks and scales their backward time to all N*M rows (all chunks have the same shapes);
             ``--floor-all scale`` takes K x the measured top-1 backward instead of timing K backwards.
``shap[hook-safe]``, ``captum[hook-safe]``
             the same calls on the model built with ``hook_safe=True``: same weights and outputs, but no
             in-place ops and no module called twice. shap and captum crash on the torchvision code paths
             (in-place ReLU/SiLU, ``out += identity``, ResNet's reused ReLU module); this is the rewrite
             they need, and it is where their speed can be measured.

Completeness error: max |Σφ − (f(x) − mean f(bg))| over explicands and explained outputs, divided by
max(|f(x)|, |mean f(bg)|) over the same outputs.

Example (the documented run; see docs/benchmarks.md)::

    python benchmarks/bench_torch.py --outputs both --repeats 3 --out results_torch.json

Small smoke run::

    python benchmarks/bench_torch.py --models efficientnet_b0 --size 64 --n 2 --m 4 --repeats 1
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness

RUNNER = "benchmarks.bench_torch:run_case"
METHODS = ("ours", "shap", "captum", "shap[hook-safe]", "captum[hook-safe]", "floor")
DEFAULT_METHODS = METHODS
MODES = ("top1", "all")


# ------------------------------------------------------------------------------------------ child side
def _build(model_name: str, hook_safe: bool, n: int, m: int, size: int, seed: int, num_classes: int,
           calibrate_bn: bool, cache_dir: str | None, models_module: str):
    """Model, explicands, references, f(X) and mean f(bg). Weights come from ``seed``; BatchNorm statistics,
    f(X) and E f are cached on disk (they cost forwards that would otherwise be repeated in every case)."""
    import torch

    zoo = harness.import_module_or_file(models_module)
    torch.manual_seed(seed)
    model = zoo.MODELS[model_name](num_classes=num_classes, hook_safe=hook_safe)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, size, size, generator=gen)
    bg = torch.randn(m, 3, size, size, generator=gen)
    calib = torch.randn(4, 3, size, size, generator=gen)

    key = json.dumps([models_module, model_name, n, m, size, seed, num_classes, calibrate_bn, torch.__version__])
    path = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
    if path and os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        model.load_state_dict(cached["buffers"], strict=False)
        model.eval()
        fx, ef = cached["fx"], cached["ef"]
    else:
        if calibrate_bn:
            zoo.calibrate_batchnorm(model, calib)
        model.eval()
        with torch.no_grad():
            fx = model(X).double()
            ef = model(bg).double().mean(0)
        if path:
            buffers = {k: v for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
            torch.save({"buffers": buffers, "fx": fx, "ef": ef}, path + ".tmp")
            os.replace(path + ".tmp", path)
    return model, X, bg, fx.numpy(), ef.numpy()


def _sums(values, n: int):
    """(N, *in, k) attributions -> (N, k) sums over the input features."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return values.reshape(n, -1, values.shape[-1]).sum(axis=1)


def run_case(model: str, method: str, mode: str, n: int = 4, m: int = 32, size: int = 224, seed: int = 0,
             num_classes: int = 10, repeats: int = 3, threads: int = 2, long_s: float = 60.0,
             budget_s: float | None = 600.0, calibrate_bn: bool = True, floor_chunk: int | None = None,
             floor_sample: int | None = None, floor_all: str = "measure",
             cache_dir: str | None = None, models_module: str = "benchmarks.torch_models") -> list[dict]:
    """One case, in the child process. ``mode`` is ``top1``, ``all`` or (floor only) ``both``."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    base = {"model": model, "method": method}
    variant_hook_safe = method.endswith("[hook-safe]")
    lib = method.split("[")[0]
    if lib == "shap":
        import shap
    elif lib == "captum":
        import captum.attr
    elif lib == "ours":
        import deepshap_opt
        from deepshap_opt.torch import DeepExplainer

        base["ours_package"] = str(Path(deepshap_opt.__file__).parent)

    net, X, bg, fx, ef = _build(model, variant_hook_safe, n, m, size, seed, num_classes, calibrate_bn,
                                cache_dir, models_module)
    K = fx.shape[1]
    top = fx.argmax(axis=1)
    harness.mark_baseline()
    timing = {"repeats": repeats, "long_s": long_s, "budget_s": budget_s}

    def finish(rec: dict, meas: dict, sums, idx) -> dict:
        rec.update(median_s=meas["median_s"], times_s=meas["times_s"], warmup_s=meas["warmup_s"],
                   median_cpu_s=meas["median_cpu_s"], cpu_s=meas["cpu_s"])
        if sums is not None:
            rec.update(harness.completeness_error(sums, fx, ef, idx))
        return rec

    def guarded(rec: dict, body) -> dict:
        try:
            return body(rec)
        except Exception as exc:  # noqa: BLE001 -- report the library's own error text in the table
            text = f"{type(exc).__name__}: {exc}".strip()
            status = "OOM" if any(s in text.lower() for s in harness._OOM_TEXT) else "error"
            rec.update(status=status, error=text.splitlines()[0][:500])
            return rec

    if lib in ("shap", "ours"):
        def body(rec):
            t0 = time.perf_counter()
            e = shap.DeepExplainer(net, bg) if lib == "shap" else DeepExplainer(net, bg)
            rec["construct_s"] = time.perf_counter() - t0
            if mode == "top1":
                meas = harness.measure(lambda: e.shap_values(X, ranked_outputs=1, check_additivity=False),
                                       **timing)
                values, idx = meas["result"]
                idx = np.asarray(idx)
                if not np.array_equal(idx[:, 0], top):
                    rec["note"] = "ranked output differs from argmax f(x)"
            else:
                meas = harness.measure(lambda: e.shap_values(X, check_additivity=False), **timing)
                values, idx = meas["result"], np.broadcast_to(np.arange(K), (n, K))
            if isinstance(values, list):  # a list per output (old shap layout); stack on the last axis
                values = np.stack([np.asarray(v) for v in values], axis=-1)
            rec["out_shape"] = list(np.shape(values))
            return finish(rec, meas, _sums(values, n), idx)
        return [guarded({**base, "mode": mode}, body)]

    if lib == "captum":
        def body(rec):
            t0 = time.perf_counter()
            dl = captum.attr.DeepLiftShap(net)
            rec["construct_s"] = time.perf_counter() - t0

            if mode == "top1":
                def call():
                    with torch.no_grad():
                        target = net(X).argmax(1)
                    return dl.attribute(X, baselines=bg, target=target).unsqueeze(-1)
                idx = top[:, None]
            else:
                def call():
                    return torch.stack([dl.attribute(X, baselines=bg, target=k) for k in range(K)], dim=-1)
                idx = np.broadcast_to(np.arange(K), (n, K))
            meas = harness.measure(lambda: call().detach().numpy(), **timing)
            rec["out_shape"] = list(meas["result"].shape)
            return finish(rec, meas, _sums(meas["result"], n), idx)
        return [guarded({**base, "mode": mode}, body)]

    if lib == "floor":
        return _floor(net, X, m, K, top, mode, floor_chunk or m, timing, base, guarded, floor_sample, floor_all)

    raise ValueError(f"unknown method {method!r}")


def _floor(net, X, m, K, top, mode, chunk, timing, base, guarded, sample=None, all_mode="measure") -> list[dict]:
    """The floor (see module docstring). ``sample``: measure only this many chunks (the first ones) and scale
    their mean backward time to all N*M rows (every chunk has the same shapes, so the same work).
    ``all_mode``: ``"measure"`` times the K backwards per chunk; ``"scale"`` takes K x the measured top-1
    backward (the K backwards run the same graph with the same shapes; only the seed differs)."""
    import torch

    net.requires_grad_(False)
    n = X.shape[0]
    modes = ["top1", "all"] if mode == "both" else [mode]
    timed_modes = modes if all_mode == "measure" else ["top1"]
    starts = list(range(0, n * m, chunk))
    sampled = starts[: sample] if sample else starts
    recs = {md: {**base, "mode": md, "floor_chunk": chunk, "floor_chunks_measured": len(sampled),
                 "floor_chunks_total": len(starts), "floor_all": all_mode if md == "all" else None}
            for md in modes}

    def body(_):
        fwd = harness.measure(lambda: _no_grad(net, X), **timing)
        rows = X.repeat_interleave(m, dim=0)               # (N*M, ...) row r belongs to explicand r // M
        owner = torch.arange(n * m) // m
        top_t = torch.as_tensor(top)
        per_chunk = {md: [] for md in timed_modes}
        per_chunk_cpu = {md: [] for md in timed_modes}
        counts = {md: [] for md in timed_modes}

        def grads(y, xc, seeds):
            return [torch.autograd.grad(y, xc, s, retain_graph=True) for s in seeds]

        for a in sampled:
            xc = rows[a:a + chunk].clone().requires_grad_(True)
            y = net(xc)
            for md in timed_modes:
                if md == "top1":
                    seed = torch.zeros_like(y)
                    seed[torch.arange(y.shape[0]), top_t[owner[a:a + chunk]]] = 1.0
                    seeds = [seed]
                else:
                    seeds = [torch.zeros_like(y) for _ in range(K)]
                    for k, s in enumerate(seeds):
                        s[:, k] = 1.0
                # warm up once, on the first chunk only
                meas = harness.measure(lambda y=y, xc=xc, seeds=seeds: grads(y, xc, seeds),
                                       **{**timing, "warmup": 1 if a == 0 and md == timed_modes[0] else 0})
                per_chunk[md].append(meas["median_s"])
                per_chunk_cpu[md].append(meas["median_cpu_s"])
                counts[md].append(len(meas["times_s"]))
            del y, xc
        scale = len(starts) / len(sampled)
        for md in modes:
            src, factor = (md, 1) if md in timed_modes else ("top1", K)
            bwd = sum(per_chunk[src]) * scale * factor
            bwd_cpu = sum(per_chunk_cpu[src]) * scale * factor
            recs[md].update(median_s=fwd["median_s"] + bwd, forward_s=fwd["median_s"], backward_s=bwd,
                            median_cpu_s=fwd["median_cpu_s"] + bwd_cpu, times_s=[], n_measured=min(counts[src]),
                            chunk_backward_s=per_chunk[src])

    out = guarded(recs[modes[0]], body)
    if out is not None and out.get("status") not in (None, "ok"):  # body returns None on success
        for md in modes:
            recs[md].update(status=out["status"], error=out.get("error"))
    return [recs[md] for md in modes]


def _no_grad(net, X):
    import torch

    with torch.no_grad():
        return net(X)


# ----------------------------------------------------------------------------------------- parent side
def plan_cases(models, methods, outputs: str, skip=()) -> list[dict]:
    modes = ["top1", "all"] if outputs == "both" else [outputs]
    cases = []
    for model in models:
        for method in methods:
            if method == "floor":
                cases.append({"model": model, "method": method, "mode": "both" if len(modes) == 2 else modes[0],
                              "modes": modes})
                continue
            for mode in modes:
                cases.append({"model": model, "method": method, "mode": mode, "modes": [mode]})
    for case in cases:
        case["skipped"] = any(fnmatch.fnmatch(f"{case['method']}/{md}/{case['model']}", pat)
                              for pat in skip for md in case["modes"])
    return cases


def ours_available() -> str | None:
    """None if ``from deepshap_opt.torch import DeepExplainer`` works, else the error text."""
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []) + [str(ROOT)])
    proc = subprocess.run([sys.executable, "-c", "from deepshap_opt.torch import DeepExplainer"], cwd="/",
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--models-module", default="benchmarks.torch_models")
    MODELS = harness.import_module_or_file(pre.parse_known_args(argv)[0].models_module).MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="default: all four")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--outputs", choices=("top1", "all", "both"), default="both")
    ap.add_argument("--n", type=int, default=4, help="explicands")
    ap.add_argument("--m", type=int, default=32, help="references (background)")
    ap.add_argument("--size", type=int, default=224, help="image side")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median reported)")
    ap.add_argument("--long-s", type=float, default=60.0,
                    help="a first call longer than this is kept as a measurement instead of a warm-up")
    ap.add_argument("--case-budget-s", type=float, default=600.0,
                    help="stop repeating once a case has spent this long in timed calls (>= 1 kept)")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per case, wall clock of the subprocess")
    ap.add_argument("--mem-limit-mb", type=float, default=12000.0,
                    help="kill a case whose resident memory passes this (reported as OOM)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor-chunk", type=int, default=None, help="rows per floor graph (default: M)")
    ap.add_argument("--floor-sample", type=int, default=None,
                    help="measure the floor backward on only this many chunks and scale to all N*M rows")
    ap.add_argument("--floor-all", choices=("measure", "scale"), default="measure",
                    help="all-outputs floor: time the K backwards, or K x the measured top-1 backward")
    ap.add_argument("--no-bn-calibration", action="store_true",
                    help="keep torchvision's initial BatchNorm statistics (EfficientNet-B0's outputs are then ~1e-13)")
    ap.add_argument("--skip", nargs="*", default=[], metavar="METHOD/MODE/MODEL",
                    help="fnmatch patterns of cases not to run, e.g. 'shap*/all/vgg19' (reported as skipped)")
    ap.add_argument("--skip-reason", default="not run (--skip)", help="text shown for skipped cases")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: print the table of --out, listing the planned cases it lacks as "
                    "'not run' (with --skip-reason), and write them back to --out")
    ap.add_argument("--cache-dir", default=os.path.join("/tmp", f"deepshap_bench_cache_{os.getuid()}"))
    ap.add_argument("--models-module", default="benchmarks.torch_models",
                    help="module or .py file with MODELS {name: factory(num_classes, hook_safe)} and "
                    "calibrate_batchnorm(model, data) (default: benchmarks.torch_models)")
    ap.add_argument("--out", default=None, help="write records (JSON) here, after every case")
    ap.add_argument("--resume", action="store_true", help="keep the cases already in --out, run the rest")
    args = ap.parse_args(argv)

    if args.models_module.endswith(".py"):
        args.models_module = str(Path(args.models_module).resolve())
    methods = list(dict.fromkeys(args.methods))
    records: list[dict] = []
    previous_meta: dict = {}
    if (args.resume or args.report_only) and args.out and os.path.exists(args.out):
        with open(args.out) as fh:
            saved = json.load(fh)
        records = saved["records"]
        previous_meta = saved.get("meta", {})
    done = {(r.get("model"), r.get("method"), r.get("mode")) for r in records}
    meta = {"argv": sys.argv, "n": args.n, "m": args.m, "size": args.size, "num_classes": args.num_classes,
            "repeats": args.repeats, "threads": args.threads, "seed": args.seed, "long_s": args.long_s,
            "case_budget_s": args.case_budget_s, "mem_limit_mb": args.mem_limit_mb,
            "bn_calibration": not args.no_bn_calibration, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    from importlib import metadata

    for dist in ("torch", "shap", "captum", "numpy"):
        try:
            meta[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            meta[dist] = None
    meta["invocations"] = [*previous_meta.get("invocations", []),
                           {"argv": sys.argv, "started": meta["started"]}]

    import subprocess

    git = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%H %cI"], capture_output=True, text=True,
                         check=False)
    meta["git_head"] = git.stdout.strip()
    meta["pythonpath"] = os.environ.get("PYTHONPATH", "")
    ours_err = ours_available() if "ours" in methods and not args.report_only else None
    if ours_err:
        print(f"# deepshap_opt.torch not importable ({ours_err}); its cases are reported as errors", flush=True)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    for case in plan_cases(args.models, methods, args.outputs, args.skip):
        keys = [(case["model"], case["method"], md) for md in case["modes"]]
        if all(k in done for k in keys):
            continue
        base = {"model": case["model"], "method": case["method"]}
        if len(case["modes"]) == 1:
            base["mode"] = case["modes"][0]   # failed cases (OOM, timeout, crash) come back without it
        if case["skipped"] or args.report_only:
            new = [{**base, "mode": md, "status": "not run", "error": args.skip_reason} for md in case["modes"]
                   if (case["model"], case["method"], md) not in done]
            log(f"[skipped] {case['model']} {case['method']} {case['mode']}")
        elif case["method"] == "ours" and ours_err:
            new = [{**base, "mode": md, "status": "error", "error": f"import failed: {ours_err}"}
                   for md in case["modes"]]
        else:
            kwargs = {"model": case["model"], "method": case["method"], "mode": case["mode"], "n": args.n,
                      "m": args.m, "size": args.size, "seed": args.seed, "num_classes": args.num_classes,
                      "repeats": args.repeats, "threads": args.threads, "long_s": args.long_s,
                      "budget_s": args.case_budget_s, "calibrate_bn": not args.no_bn_calibration,
                      "floor_chunk": args.floor_chunk, "floor_sample": args.floor_sample,
                      "floor_all": args.floor_all, "cache_dir": args.cache_dir,
                      "models_module": args.models_module}
            new = harness.run_isolated(RUNNER, kwargs, timeout_s=args.timeout_s, mem_limit_mb=args.mem_limit_mb,
                                       threads=args.threads, base=base, log=log)
            if len(new) == 1 and case["mode"] == "both" and new[0].get("status") != "ok":
                new = [{**new[0], "mode": md} for md in case["modes"]]   # a failed floor fails both modes
        records = [r for r in records if (r.get("model"), r.get("method"), r.get("mode")) not in
                   {(x["model"], x["method"], x.get("mode")) for x in new}] + new
        if args.out:
            harness.save_records(args.out, records, meta)

    order = ["ours", "shap", "shap[hook-safe]", "captum", "captum[hook-safe]", "floor"]
    records.sort(key=lambda r: (args.models.index(r["model"]) if r.get("model") in args.models else 99,
                                MODES.index(r["mode"]) if r.get("mode") in MODES else 9))
    print()
    print(harness.markdown_table(records, method_order=order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
