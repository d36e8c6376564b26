"""Benchmark deepshap_opt.tf.DeepExplainer against shap 0.51's TF DeepExplainer and the floor.

Each (model, method, outputs) case runs in a fresh subprocess, so peak memory (``ru_maxrss``) is that case's
alone. Methods:
  ours   deepshap_opt.tf.DeepExplainer: construction (trace + reference forward), a first call (traces and
         compiles the two steps) and a timed second call
  shap   shap.DeepExplainer (TF): construction and one call
  floor  one forward of the N explicands + one ordinary input-gradient pass (tf.GradientTape, forward and
         backward) of the explained output(s) over the N x M explicand-reference rows, in chunks of
         ``batch_size`` rows (one backward per output)

Usage:
  python benchmarks/bench_tf.py                                  # the full run (four models, top-1)
  python benchmarks/bench_tf.py --models MobileNetV2 --size 96 --n 2 --m 8 --outputs all --classes 10
  python benchmarks/bench_tf.py --models VGG19 --methods shap --threads 1 --rss-cap-mb 14000
Writes a Markdown table to stdout and (with --json) the raw results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = ["VGG19", "ResNet50", "DenseNet201", "EfficientNetB0", "MobileNetV2"]


def _child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import keras
    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, args.model)(weights=None, input_shape=(args.size, args.size, 3),
                                                    classes=args.classes)
    rng = np.random.default_rng(0)
    bg = rng.uniform(0, 1, size=(args.m, args.size, args.size, 3)).astype("float32")
    X = rng.uniform(0, 1, size=(args.n, args.size, args.size, 3)).astype("float32")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranked = 1 if args.outputs == "top1" else None
    res = {"model": args.model, "method": args.method, "outputs": args.outputs, "rss_before_mb": rss0,
           "threads": args.threads or "default"}
    try:
        if args.method == "ours":
            from deepshap_opt.tf import DeepExplainer

            t = time.perf_counter()
            e = DeepExplainer(model, bg, batch_size=args.batch_size or None)
            res["init_s"] = time.perf_counter() - t
            t = time.perf_counter()
            # first call: traces both steps (top-1 traces the same functions as all outputs: per chunk shape)
            e.shap_values(X, ranked_outputs=1, check_additivity=False)
            res["first_call_s"] = time.perf_counter() - t
            t, c = time.perf_counter(), time.process_time()
            out = e.shap_values(X, ranked_outputs=ranked, check_additivity=True)
            res["explain_s"], res["explain_cpu_s"] = time.perf_counter() - t, time.process_time() - c
            res["batch_size"], res["cache_mb"] = e.batch_size, e.cache_nbytes / 2**20
            vals = out[0] if ranked else out
            res["shape"] = list(np.shape(vals))
        elif args.method == "shap":
            import shap

            t = time.perf_counter()
            e = shap.DeepExplainer(model, bg)
            res["init_s"] = time.perf_counter() - t
            t, c = time.perf_counter(), time.process_time()
            out = e.shap_values(X, ranked_outputs=ranked, check_additivity=False)
            res["explain_s"], res["explain_cpu_s"] = time.perf_counter() - t, time.process_time() - c
            vals = out[0] if ranked else out
            res["shape"] = list(np.shape(vals))
        else:
            fwd = tf.function(lambda x: model(x, training=False))
            k_all = args.classes

            @tf.function
            def grad(x, k):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = tf.gather(model(x, training=False), k, axis=1)
                return tape.gradient(y, x)

            rows = np.repeat(X, args.m, 0)
            bs = args.batch_size or 16
            ks = [0] if args.outputs == "top1" else list(range(k_all))
            fwd(tf.constant(X))
            grad(tf.constant(rows[:bs]), tf.constant(0))                          # trace
            t, c = time.perf_counter(), time.process_time()
            fwd(tf.constant(X)).numpy()
            for k in ks:
                for a in range(0, len(rows), bs):
                    grad(tf.constant(rows[a:a + bs]), tf.constant(k)).numpy()
            res["explain_s"], res["explain_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    except Exception as e:  # noqa: BLE001 - report failures (e.g. shap's LookupError) in the table
        msg = str(e).splitlines() or [""]
        inner = [ln.strip() for ln in msg if "Error" in ln]           # tf.function wraps the real error
        res["error"] = (inner[-1] if inner else f"{type(e).__name__}: {msg[0]}")[:140]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def _proc_rss_cpu(pid):
    """(resident MB, CPU seconds) of a running process from /proc (Linux), or (None, None)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(ln.split()[1]) / 1024 for ln in fh if ln.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None, None


def _run_case(base, model, method, outputs, timeout, rss_cap_mb=0):
    """One case in a fresh subprocess; with rss_cap_mb, the child is killed when its resident memory passes
    the cap (polled every 0.2 s) and the result says so ("> cap"), with the time and CPU time it had run."""
    cmd = [sys.executable, __file__, "--child", "--model", model, "--method", method, "--outputs", outputs] + base
    head = {"model": model, "method": method, "outputs": outputs}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, peak, cpu = time.monotonic(), 0.0, None
    while True:
        try:
            out, err = p.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            rss, c = _proc_rss_cpu(p.pid)
            if rss is not None:
                peak, cpu = max(peak, rss), c
            elapsed = time.monotonic() - t0
            if rss_cap_mb and rss is not None and rss > rss_cap_mb:
                p.kill()
                p.communicate()
                return {**head, "error": f"> cap: RSS passed {rss_cap_mb} MB (killed)", "killed_rss_mb": rss,
                        "killed_after_s": elapsed, "killed_cpu_s": c, "rss_cap_mb": rss_cap_mb}
            if elapsed > timeout:
                p.kill()
                p.communicate()
                return {**head, "error": f"timeout after {timeout}s", "max_rss_seen_mb": peak, "cpu_s": cpu}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {**head, "error": f"exit {p.returncode}: {err.strip().splitlines()[-1][:160] if err.strip() else ''}"}


def _table(results, args):
    lines = [(f"N={args.n}, M={args.m}, {args.size}x{args.size}, weights=None, classes={args.classes}, "
              f"batch_size={args.batch_size}, {os.cpu_count()} CPU cores"), "",
             ("| model | outputs | floor s (wall / CPU) | ours s | ours / floor (CPU) | shap s | shap / ours (CPU) | ours peak MB | "
              "shap peak MB | ours / shap peak |"), "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["method"], r["outputs"]): r for r in results}
    for model in args.models:
        for outputs in args.outputs_list:
            f, o, s = (by.get((model, m, outputs), {}) for m in ("floor", "ours", "shap"))

            def t(r):
                if "explain_s" not in r:
                    return r.get("error", "-")
                return f"{r['explain_s']:.1f} / {r['explain_cpu_s']:.0f}" if "explain_cpu_s" in r else \
                    f"{r['explain_s']:.1f}"

            def ratio(a, b):       # CPU-time ratio where both have it (wall clock is noisy on a shared machine)
                key = "explain_cpu_s" if "explain_cpu_s" in a and "explain_cpu_s" in b else "explain_s"
                return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"

            def mem(r):
                if "rss_cap_mb" in r:
                    return f"> {r['rss_cap_mb']} (killed)"
                return f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r and "error" not in r else "-"

            if mem(o) != "-" and "rss_cap_mb" in s:
                mr = f"< {o['peak_rss_mb'] / s['rss_cap_mb']:.2f}"
            else:
                mr = f"{o['peak_rss_mb'] / s['peak_rss_mb']:.2f}" if mem(o) != "-" and mem(s) != "-" else "-"
            lines.append(f"| {model} | {outputs} | {t(f)} | {t(o)} | {ratio(o, f)} | {t(s)} | {ratio(s, o)} | "
                         f"{mem(o)} | {mem(s)} | {mr} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["VGG19", "ResNet50", "DenseNet201", "EfficientNetB0"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="rows per backward pass (ours and the floor's chunks); 0: ours picks it from its memory "
                         "budget, the floor uses 16")
    ap.add_argument("--outputs", default="top1", help="top1, all, or top1,all")
    ap.add_argument("--methods", default="floor,ours,shap")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow intra- and inter-op threads (0: its default)")
    ap.add_argument("--rss-cap-mb", type=int, default=0,
                    help="kill a case whose resident memory passes this many MB and report it as '> cap' (0: none)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    args.outputs_list = args.outputs.split(",")
    base = ["--size", str(args.size), "--n", str(args.n), "--m", str(args.m), "--classes", str(args.classes),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    results = []
    for model in args.models:
        for outputs in args.outputs_list:
            for method in args.methods.split(","):
                r = _run_case(base, model, method, outputs, args.timeout, args.rss_cap_mb)
                print(json.dumps(r), file=sys.stderr, flush=True)
                results.append(r)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(_table(results, args))


if __name__ == "__main__":
    main()
