"""One-shot deployment of an explanation: a digits CNN and its DeepSHAP graph in ONE .onnx file.

Step 1 (needs torch, scikit-learn, deepshap_opt): train a small CNN on sklearn's 8×8 digits (a few seconds),
export it with ``deepshap_opt.onnx.export`` next to 32 background images.
Step 2 (needs only numpy + onnxruntime; run in a fresh process that cannot import torch or deepshap_opt):
load the file, predict and explain in one ``session.run``, check Σφ = f(x) − E[f].

    python examples/onnx_digits.py [--out digits_explained.onnx]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile


def train_and_export(path: str, seed: int = 0) -> None:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import deepshap_opt.onnx as dso

    torch.manual_seed(seed)
    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]          # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    tr, te = perm[:1500], perm[1500:]
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(X[tr]), torch.from_numpy(y[tr])
    for epoch in range(12):
        for idx in torch.randperm(len(xt)).split(128):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(X[te])).argmax(1).numpy() == y[te]).mean()
    print(f"trained: test accuracy {acc:.3f}")
    background = X[tr[:32]]
    dso.export(model, background, path, outputs="top1")
    np.save(path + ".test.npy", X[te[:8]])
    np.save(path + ".labels.npy", y[te[:8]])
    print(f"exported {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


def explain(path: str) -> None:
    """Only numpy + onnxruntime from here on."""
    import numpy as np
    import onnxruntime as ort

    for banned in ("torch", "deepshap_opt"):
        assert banned not in sys.modules, banned
    so = ort.SessionOptions()
    so.enable_mem_pattern = False          # recommended for explanation files (docs/deployment.md)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    expected = np.array([float(v) for v in meta["deepshap_opt.expected_value"].split(",")])
    X = np.load(path + ".test.npy")
    labels = np.load(path + ".labels.npy")
    logits, phi, idx = sess.run(["output", "shap_values", "shap_indexes"], {"input": X})
    pred = idx[:, 0]
    total = phi[..., 0].reshape(len(X), -1).sum(1)
    gap = logits[np.arange(len(X)), pred] - expected[pred]
    err = np.abs(total - gap).max()
    print("outputs:", [o.name for o in sess.get_outputs()])
    print("labels   :", labels.tolist())
    print("predicted:", pred.tolist())
    for n in range(min(3, len(X))):
        m = phi[n, 0, :, :, 0]
        r, c = np.unravel_index(np.argmax(np.abs(m)), m.shape)
        print(f"image {n}: class {pred[n]}, sum(phi) {total[n]:+.4f} = f(x) - E f {gap[n]:+.4f}; "
              f"most important pixel ({r}, {c}) phi {m[r, c]:+.4f}")
    print(f"completeness error {err:.2e} (output scale {np.abs(logits).max():.2f})")
    assert err <= 1e-4 * max(np.abs(logits).max(), 1.0)
    print("OK")


_BLOCK = ("import sys\n"
          "class B:\n"
          "    def find_spec(self, name, path=None, target=None):\n"
          "        if name.split('.')[0] in ('torch', 'tensorflow', 'deepshap_opt'):\n"
          "            raise ImportError(name + ' is blocked: only numpy + onnxruntime here')\n"
          "sys.meta_path.insert(0, B())\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--explain-only", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.explain_only:
        return explain(a.explain_only)
    path = a.out or os.path.join(tempfile.mkdtemp(prefix="digits_"), "digits_explained.onnx")
    train_and_export(path)
    # step 2 in a fresh process where torch / deepshap_opt cannot be imported
    code = _BLOCK + f"sys.argv = [{__file__!r}, '--explain-only', {path!r}]\n" + \
        f"exec(compile(open({__file__!r}).read(), {__file__!r}, 'exec'))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(path))


if __name__ == "__main__":
    main()
