"""Train a small CNN on the bundled digits data, explain it with deepshap_opt's DeepExplainer, and save
the shap-style image plot (``examples/out/torch_digits.png``).

Runs in well under a minute on a laptop CPU; nothing is downloaded.

    python examples/torch_digits.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from deepshap_opt.torch import DeepExplainer  # noqa: E402


def digits_cnn() -> nn.Module:
    """Conv → ReLU → MaxPool ×2 → Linear: 8×8 grey digits, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


def load(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)          # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def train(model, x, y, epochs: int = 15, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def plot(shap_values, images, labels, path):
    """shap.image_plot when shap is installed, otherwise a plain matplotlib grid of the same layout."""
    try:
        import shap

        shap.image_plot([shap_values[..., k].transpose(0, 2, 3, 1) for k in range(10)],
                        -images.transpose(0, 2, 3, 1), labels=labels, show=False)
        import matplotlib.pyplot as plt

        plt.savefig(path, dpi=80, bbox_inches="tight")
        plt.close("all")
    except ImportError:
        import matplotlib.pyplot as plt

        n = len(images)
        fig, axes = plt.subplots(n, 11, figsize=(11, n))
        lim = np.abs(shap_values).max()
        for i in range(n):
            axes[i, 0].imshow(images[i, 0], cmap="gray_r")
            for k in range(10):
                axes[i, k + 1].imshow(shap_values[i, 0, :, :, k], cmap="bwr", vmin=-lim, vmax=lim)
        for ax in axes.flat:
            ax.axis("off")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    x_train, y_train, x_test, y_test = load()
    model = train(digits_cnn(), x_train, y_train)
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {acc:.3f}")

    background = x_train[:100]                      # the references: run forward once, cached
    explainer = DeepExplainer(model, background)
    t = time.perf_counter()
    shap_values = explainer.shap_values(x_test[:5])                  # (5, 1, 8, 8, 10), float64
    print(f"explained 5 digits x 10 outputs against {len(background)} references in {time.perf_counter() - t:.2f}s")

    with torch.no_grad():
        f_x = model(x_test[:5]).numpy()
    err = np.abs(shap_values.sum(axis=(1, 2, 3)) - (f_x - explainer.expected_value)).max()
    print(f"completeness: max |sum(phi) - (f(x) - E f)| = {err:.2e}")

    labels = np.array([[str(k) for k in range(10)]] * 5)
    path = os.path.join(args.out, "torch_digits.png")
    plot(shap_values, x_test[:5].numpy(), labels, path)
    print(f"wrote {path}")
    return shap_values


if __name__ == "__main__":
    main()
