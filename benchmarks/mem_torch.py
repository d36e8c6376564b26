"""Peak resident memory of ``deepshap_opt.torch.DeepExplainer`` (construction and one call), sampled.

A thread samples the process's resident set every 20 ms; *extra* is the peak minus the resident set after
the model and the data were built (as ``bench_torch.py``'s "peak extra").

    python benchmarks/mem_torch.py vgg19 --size 224 --n 4 --m 32 [--keep-freed-memory off]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import MODELS, calibrate_batchnorm  # noqa: E402

from deepshap_opt.torch import DeepExplainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--keep-freed-memory", choices=["auto", "on", "off"], default="auto",
                    help="the explainer's keep_freed_memory (auto: the library's default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    model = MODELS[args.model](num_classes=10).eval()
    bg, X = torch.randn(args.m, 3, args.size, args.size), torch.randn(args.n, 3, args.size, args.size)
    calibrate_batchnorm(model, bg)
    base = proc.memory_info().rss
    keep = {"auto": None, "on": True, "off": False}[args.keep_freed_memory]
    e = DeepExplainer(model, bg, keep_freed_memory=keep)
    cache = sum(t.numel() * t.element_size() for _, _, ts in e._cache.sites for t in ts)
    e.shap_values(X, ranked_outputs=1)          # additivity checked
    done.set()
    mib = 2**20
    print(f"{args.model} (keep_freed_memory={args.keep_freed_memory}): baseline {base / mib:.0f} MiB, cache {cache / mib:.0f} MiB, "
          f"peak extra {(peak[0] - base) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
