"""Ours (default, eager or fused rule kernels) against the floor by process CPU time, one thread.

CPU time, not wall-clock: on a machine shared with other work, wall-clock ratios are meaningless, while a
process's own CPU time (one thread, so no spin-waiting) is close to what it would take alone.

    python benchmarks/bench_torch_cpu.py --models resnet50 efficientnet_b0 --size 224 --n 4 --m 32
    python benchmarks/bench_torch_cpu.py --kernels default --outputs top1 all     # the issue's two cases

The floor for ``all`` outputs is one forward of N plus K input-gradient backwards over the N·M rows.

``--malloc tuned`` re-runs the script with glibc's allocator told to keep freed memory
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, see docs/benchmarks.md): on this VM a page fault costs
~2 µs, and by default glibc returns every freed tensor over 32 MB to the system, so each new one faults again.
Floor and ours always run in the same process, under the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import MODELS, calibrate_batchnorm  # noqa: E402

from deepshap_opt.torch import DeepExplainer  # noqa: E402

#: glibc settings of ``--malloc tuned``: serve and keep every allocation in the heap (no mmap per tensor,
#: no trimming of freed memory back to the system)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def cpu(f, repeats, warmup=1):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(repeats):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return sorted(ts)[len(ts) // 2]


def floor(model, X, M, repeats, outputs=(0,), warmup=1):
    """One forward of the N explicands + one input-gradient backward over the N·M rows per explained output
    (the backwards timed alone, M rows at a time: the forward of the N·M rows is not part of the floor)."""
    for p in model.parameters():
        p.requires_grad_(False)

    def fwd():
        with torch.no_grad():
            model(X)

    bwd = []
    for _ in range(repeats + warmup):
        total = 0.0
        for i in range(X.shape[0]):   # one explicand's M rows at a time: the N·M-row tape would not fit
            xx = X[i:i + 1].repeat_interleave(M, 0).requires_grad_()
            y = model(xx)
            t = time.process_time()
            for j, o in enumerate(outputs):
                torch.autograd.grad(y[:, o].sum(), xx, retain_graph=j < len(outputs) - 1)
            total += time.process_time() - t
            del xx, y
        bwd.append(total)
    for p in model.parameters():
        p.requires_grad_(True)
    timed = bwd[warmup:]
    return cpu(fwd, repeats) + sorted(timed)[len(timed) // 2]


KERNELS = {"default": None, "eager": False, "fused": True}
#: ``keep_freed_memory`` settings of ours (``auto``: the library's default; ``off``: glibc as it is)
KEEP = {"auto": None, "off": False}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (floor and ours)")
    ap.add_argument("--kernels", nargs="+", default=["eager", "fused"], choices=list(KERNELS),
                    help="fuse_rules settings to time (default = fuse_rules=None, the automatic choice)")
    ap.add_argument("--keep-freed-memory", nargs="+", default=["auto"], choices=list(KEEP),
                    help="ours' keep_freed_memory settings to time (auto = the library's default)")
    ap.add_argument("--outputs", nargs="+", default=["top1"], choices=["top1", "all"])
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--malloc", choices=["default", "tuned"], default="default",
                    help="glibc allocator setting for the whole run (floor and ours alike)")
    args = ap.parse_args(argv)
    if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        # glibc reads these once, at start-up: run again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    torch.set_num_threads(1)
    labels = [(k, keep) for k in args.kernels for keep in args.keep_freed_memory]
    names = {(k, keep): k if keep == "auto" else f"{k}/keep-off" for k, keep in labels}
    rows = []
    print(f"malloc: {args.malloc}")
    heads = " | ".join(f"ours {names[lb]} CPU s (/ floor)" for lb in labels)
    print(f"| model | outputs | floor CPU s | {heads} |")
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name](num_classes=args.num_classes).eval()
        bg, X = torch.randn(args.m, 3, args.size, args.size), torch.randn(args.n, 3, args.size, args.size)
        calibrate_batchnorm(model, bg)
        for outputs in args.outputs:
            ranked = 1 if outputs == "top1" else None
            with torch.no_grad():
                top = model(X).argmax(1).tolist() if outputs == "top1" else list(range(args.num_classes))
            # top-1 floor: one backward of the N·M rows (each explicand's own top class is one seed row)
            fl = floor(model, X, args.m, args.repeats, outputs=top[:1] if outputs == "top1" else top,
                       warmup=args.warmup)
            row = {"model": name, "outputs": outputs, "floor_s": fl}
            for kern, keep in labels:
                label = names[kern, keep]
                e = DeepExplainer(model, bg, fuse_rules=KERNELS[kern], keep_freed_memory=KEEP[keep])
                def call(e=e, r=ranked):
                    return e.shap_values(X, ranked_outputs=r, check_additivity=False)

                row[f"{label}_s"] = cpu(call, args.repeats, args.warmup)
                row[f"{label}_ratio"] = row[f"{label}_s"] / fl
                del e
            rows.append(row)
            print(f"| {name} | {outputs} | {fl:.2f} | " + " | ".join(
                f"{row[f'{names[lb]}_s']:.2f} ({row[f'{names[lb]}_ratio']:.2f}x)" for lb in labels) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
