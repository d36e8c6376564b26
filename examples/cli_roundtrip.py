"""The command line end to end: train a digits CNN, then check → export → explain → PNG with `deepshap-opt`.

Step 1 (Python, torch): train a small CNN on sklearn's 8×8 digits (a few seconds) and save it with
``torch.export.save`` as ``digits.pt2``, with 32 background images ``bg.npy`` and 6 test images ``x.npy``.
Step 2 (the shell commands below, run here through ``python -m deepshap_opt``, the same as ``deepshap-opt``)::

    deepshap-opt check   digits.pt2                                   # every op with its rule
    deepshap-opt export  digits.pt2 --background bg.npy -o digits_explained.onnx --outputs top1
    deepshap-opt explain digits_explained.onnx --input x.npy -o explained --png

``explained/`` then holds ``shap_values.npy`` (6, 1, 8, 8, 1), ``predictions.npy``, ``shap_indexes.npy``,
``expected_value.npy`` and ``png/0000.png`` ... (input and heat map side by side).

    python examples/cli_roundtrip.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile


def train(out: str, seed: int = 0) -> None:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]          # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[:1500], perm[1500:]
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(X[tr]), torch.from_numpy(y[tr])
    for _ in range(20):
        for idx in torch.randperm(len(xt)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(X[te])).argmax(1).numpy() == y[te]).mean()
    print(f"trained: test accuracy {acc:.3f}")
    example = (torch.from_numpy(X[tr[:2]]),)
    ep = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("N")},))
    torch.export.save(ep, os.path.join(out, "digits.pt2"))
    np.save(os.path.join(out, "bg.npy"), X[tr[:32]])
    np.save(os.path.join(out, "x.npy"), X[te[:6]])
    np.save(os.path.join(out, "labels.npy"), y[te[:6]])


def sh(*args: str, cwd: str) -> None:
    """Run ``deepshap-opt ARGS`` (as ``python -m deepshap_opt``) and echo it like a shell session."""
    print(f"$ deepshap-opt {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "deepshap_opt", *args], cwd=cwd, text=True, capture_output=True, check=False)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        print(proc.stderr, end="", file=sys.stderr)
        raise SystemExit(f"deepshap-opt {args[0]} failed with exit code {proc.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    a = ap.parse_args()
    out = os.path.abspath(a.out or tempfile.mkdtemp(prefix="cli_roundtrip_"))
    os.makedirs(out, exist_ok=True)
    train(out)
    sh("check", "digits.pt2", cwd=out)
    sh("export", "digits.pt2", "--background", "bg.npy", "-o", "digits_explained.onnx", "--outputs", "top1", cwd=out)
    sh("explain", "digits_explained.onnx", "--input", "x.npy", "-o", "explained", "--png", cwd=out)

    import numpy as np

    d = os.path.join(out, "explained")
    phi = np.load(os.path.join(d, "shap_values.npy")).astype(np.float64)
    pred = np.load(os.path.join(d, "predictions.npy")).astype(np.float64)
    idx = np.load(os.path.join(d, "shap_indexes.npy"))[:, 0]
    ev = np.load(os.path.join(d, "expected_value.npy"))
    total = phi[..., 0].reshape(len(phi), -1).sum(1)
    gap = pred[np.arange(len(pred)), idx] - ev[idx]
    print("labels   :", np.load(os.path.join(out, "labels.npy")).tolist())
    print("predicted:", idx.tolist())
    print(f"completeness: max |sum(phi) - (f(x) - E f)| = {np.abs(total - gap).max():.2e}")
    print(f"pictures: {os.path.join(d, 'png')}")


if __name__ == "__main__":
    main()
