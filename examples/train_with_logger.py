"""Watch a digits CNN's attributions while it trains: AttributionLogger attached to the optimizer writes a
TensorBoard log (heat-maps, histograms, drift scalars) and a JSONL/NPZ log, and this script plots the drift
curve to ``<out>/train_with_logger_drift.png``.

Halfway through, the training data changes: a *shortcut* appears — a marker pixel in the (otherwise blank)
left column at the row of the label (labels 0–7). The drift curve shows the attributions re-ranking and the
share of attribution moving onto that column as the model starts to rely on the shortcut.

Runs in well under a minute on a laptop CPU; nothing is downloaded.

    python examples/train_with_logger.py [--out DIR] [--epochs 10] [--every 20]
    tensorboard --logdir examples/out/train_with_logger/tb
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from deepshap_opt.logging_sinks import FileSink, MemorySink, TensorBoardSink
from deepshap_opt.torch import AttributionLogger


def digits_cnn() -> nn.Module:
    """Conv-BN-ReLU-MaxPool ×2 → Linear-ReLU-Dropout → Linear: 8×8 grey digits, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


def load(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)          # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def with_shortcut(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A marker pixel at (row = label, column 0) for labels 0-7: column 0 of the digits is blank."""
    x = x.clone()
    rows = torch.nonzero(y < 8).squeeze(1)
    x[rows, 0, y[rows], 0] = 1.0
    return x


def plot_drift(records, change_step, path):
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("spearman_prev", "-o"), ("spearman_first", "-s"), ("topk_prev", "--o"), ("topk_first", "--s")):
        a1.plot(steps, [r.metrics[key] for r in records], style, ms=3, label=key)
    a1.set_xlabel("optimizer step")
    a1.set_ylabel("vs previous / first log")
    a1.set_ylim(-0.2, 1.05)
    a1.set_title("attribution drift on the probe")
    col0 = [np.abs(r.attributions[..., 0]).sum() / max(np.abs(r.attributions).sum(), 1e-30) for r in records]
    a2.plot(steps, col0, "-o", ms=3, color="C3")
    a2.set_xlabel("optimizer step")
    a2.set_ylabel("share of |attribution|")
    a2.set_title("share on the shortcut column")
    for ax in (a1, a2):
        ax.axvline(change_step, color="grey", ls=":", label="shortcut appears")
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return col0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "train_with_logger"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--every", type=int, default=20, help="log every N optimizer steps")
    ap.add_argument("--method", default="deepshap", choices=["deepshap", "mfaba"])
    ap.add_argument("--train-size", type=int, default=1500, help="training rows used (at most 1500)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)                       # a tiny CNN: one thread is as fast, and steadier

    x_train, y_train, x_test, y_test = load()
    x_train, y_train = x_train[:args.train_size], y_train[:args.train_size]
    x_short = with_shortcut(x_train, y_train)
    torch.manual_seed(0)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    memory = MemorySink()
    logger = AttributionLogger(
        model, background=x_train[:16], probe=with_shortcut(x_test[:8], y_test[:8]), targets=y_test[:8],
        every_n_steps=args.every, method=args.method,
        sink=[memory, TensorBoardSink(os.path.join(args.out, "tb")), FileSink(os.path.join(args.out, "records"))])

    change_epoch = args.epochs // 2
    change_step = None
    t0 = time.perf_counter()
    with logger.attach(opt):                       # one log every `every` optimizer steps
        for epoch in range(args.epochs):
            if epoch == change_epoch:
                change_step = logger.global_step
            data = x_short if epoch >= change_epoch else x_train
            model.train()
            for idx in torch.randperm(len(data)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(data[idx]), y_train[idx]).backward()
                opt.step()
    logger.close()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        acc_short = (model(with_shortcut(x_test, y_test)).argmax(1) == y_test).float().mean().item()
    records = memory.records
    log_s = sum(r.seconds for r in records)
    print(f"trained {logger.global_step} steps in {seconds:.1f}s; {len(records)} logs took {log_s:.1f}s "
          f"({100 * log_s / seconds:.0f}% of the run)")
    print(f"test accuracy {acc:.3f} clean, {acc_short:.3f} with the shortcut marker")
    path = os.path.join(args.out, "train_with_logger_drift.png")
    col0 = plot_drift(records, change_step, path)
    before = [c for r, c in zip(records, col0) if r.step <= change_step]
    after = [c for r, c in zip(records, col0) if r.step > change_step]
    if before and after:
        print(f"share of |attribution| on the shortcut column: {before[-1]:.3f} at the data change, "
              f"{after[-1]:.3f} at the end")
    print(f"max completeness error {max(r.metrics.get('completeness_error', 0.0) for r in records):.1e}")
    print(f"wrote {path}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'tb')}")
    return records


if __name__ == "__main__":
    main()
