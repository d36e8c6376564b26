"""Ours (eager and fused rule kernels) against the floor by process CPU time, one thread.

CPU time, not wall-clock: on a machine shared with other work, wall-clock ratios are meaningless, while a
process's own CPU time (one thread, so no spin-waiting) is close to what it would take alone.

    python benchmarks/bench_torch_cpu.py --models resnet50 efficientnet_b0 --size 224 --n 4 --m 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import MODELS  # noqa: E402

from deepshap_opt.torch import DeepExplainer  # noqa: E402


def cpu(f, repeats):
    f()
    ts = []
    for _ in range(repeats):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return sorted(ts)[len(ts) // 2]


def floor(model, X, M, repeats):
    """One forward of the N explicands + one input-gradient backward over the N·M rows (backward timed alone)."""
    for p in model.parameters():
        p.requires_grad_(False)

    def fwd():
        with torch.no_grad():
            model(X)

    bwd = []
    for _ in range(repeats + 1):
        xx = X.repeat_interleave(M, 0).requires_grad_()
        y = model(xx)
        t = time.process_time()
        torch.autograd.grad(y[:, 0].sum(), xx)
        bwd.append(time.process_time() - t)
        del xx, y
    for p in model.parameters():
        p.requires_grad_(True)
    return cpu(fwd, repeats) + sorted(bwd[1:])[len(bwd[1:]) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name](num_classes=10).eval()
        bg, X = torch.randn(args.m, 3, args.size, args.size), torch.randn(args.n, 3, args.size, args.size)
        fl = floor(model, X, args.m, args.repeats)
        row = {"model": name, "floor_s": fl}
        for label, fuse in (("eager", False), ("fused", True)):
            e = DeepExplainer(model, bg, fuse_rules=fuse)
            row[f"{label}_s"] = cpu(lambda e=e: e.shap_values(X, ranked_outputs=1, check_additivity=False),
                                   args.repeats)
            row[f"{label}_ratio"] = row[f"{label}_s"] / fl
        rows.append(row)
        print(f"| {name} | {fl:.2f} | {row['eager_s']:.2f} ({row['eager_ratio']:.2f}x) | "
              f"{row['fused_s']:.2f} ({row['fused_ratio']:.2f}x) |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
