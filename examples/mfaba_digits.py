"""MFABA on a small CNN trained on scikit-learn's 8x8 digits, next to DeepSHAP.

Trains the CNN in-process (a few seconds on a CPU), explains a handful of test digits with MFABA's two
variants (and with ``deepshap_opt.torch.DeepExplainer`` when it is available) and saves the maps as a PNG.
With ``--table`` it also measures insertion / deletion AUC on the whole test split for MFABA, captum's
Saliency, IntegratedGradients and SmoothGrad, and DeepSHAP, and prints a markdown table (docs/mfaba.md).

    python examples/mfaba_digits.py --out mfaba_digits.png
    python examples/mfaba_digits.py --table          # + faithfulness table (needs captum)
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn

from deepshap_opt.torch import MFABA


def digits(seed: int = 0):
    """load_digits as (N, 1, 8, 8) float32 in [0, 1] (pixel values are 0..16), split 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, d.target, test_size=0.2, random_state=seed, stratify=d.target)


def make_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def train(x, y, epochs: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def deepshap(model, background, x):
    """DeepSHAP values of each image's predicted class, or None when the explainer is not available."""
    try:
        from deepshap_opt.torch import DeepExplainer
    except ImportError:
        return None
    explainer = DeepExplainer(model, torch.from_numpy(background))
    values, _ = explainer.shap_values(torch.from_numpy(x), ranked_outputs=1)
    return np.asarray(values)[..., 0]


def plot(x, pred, maps: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["input"] + list(maps)
    fig, axes = plt.subplots(len(x), len(cols), figsize=(1.6 * len(cols), 1.6 * len(x)), squeeze=False)
    for i in range(len(x)):
        axes[i, 0].imshow(x[i, 0], cmap="gray_r")
        axes[i, 0].set_ylabel(f"pred {pred[i]}")
        for j, name in enumerate(maps, start=1):
            a = maps[name][i, 0]
            lim = np.abs(a).max() or 1.0
            axes[i, j].imshow(a, cmap="bwr", vmin=-lim, vmax=lim)  # red: evidence for the class
    for j, name in enumerate(cols):
        axes[0, j].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def faithfulness_table(model, x_train, x_test, y_test) -> str:
    """Insertion and deletion AUC, pixel by pixel, on the whole test split, with both substrates."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    warnings.filterwarnings("ignore", module="captum")  # "input does not require grad" notices

    from deepshap_opt.metrics import deletion_auc, insertion_auc

    def predict(z):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(z)), 1).numpy()

    xt = torch.from_numpy(x_test)
    target = torch.from_numpy(predict(x_test).argmax(1))
    methods = {
        "MFABA sharp (ours)": lambda: MFABA(model, "sharp").attribute(xt, target),
        "MFABA smooth (ours)": lambda: MFABA(model, "smooth").attribute(xt, target),
        "Saliency (captum)": lambda: Saliency(model).attribute(xt, target=target),
        "IntegratedGradients (captum, 50 steps)": lambda: IntegratedGradients(model).attribute(
            xt, target=target, n_steps=50),
        "SmoothGrad (captum, 50 samples, σ=0.15)": lambda: NoiseTunnel(Saliency(model)).attribute(
            xt, nt_type="smoothgrad", nt_samples=50, stdevs=0.15, target=target),
    }
    try:
        from deepshap_opt.torch import DeepExplainer

        bg = torch.from_numpy(x_train[:100])
        methods["DeepSHAP (ours, 100 background)"] = lambda: torch.from_numpy(np.asarray(
            DeepExplainer(model, bg).shap_values(xt, ranked_outputs=1)[0])[..., 0])
    except ImportError as e:
        print(f"DeepSHAP left out: {e}")
    rng = np.random.default_rng(0)
    methods["random ranking"] = lambda: torch.from_numpy(rng.random(x_test.shape))

    acc = float((predict(x_test).argmax(1) == y_test).mean())
    lines = [(f"{len(x_test)} test digits, test accuracy {acc:.3f}; pixel by pixel (64 steps). Substrates: "
              "zeros (the digits' background) or a blurred copy (σ = 1 px)."), "",
             ("| method | insertion AUC ↑ (blur) | deletion AUC ↓ (zeros) | insertion AUC ↑ (zeros) | "
              "deletion AUC ↓ (blur) | seconds |"), "|---|---|---|---|---|---|"]
    tg = target.numpy()
    for name, fn in methods.items():
        t0 = time.perf_counter()
        a = fn().detach().numpy()
        sec = time.perf_counter() - t0
        cells = [insertion_auc(predict, x_test, a, tg, step=1, substrate="blur").mean(),
                 deletion_auc(predict, x_test, a, tg, step=1, substrate="zeros").mean(),
                 insertion_auc(predict, x_test, a, tg, step=1, substrate="zeros").mean(),
                 deletion_auc(predict, x_test, a, tg, step=1, substrate="blur").mean()]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) + f" | {sec:.2f} |")
    return "\n".join(lines)


def completeness_gaps(model, x_test) -> str:
    """Σ A against f_c(x0) − f_c(x_T), per variant: MFABA is a first-order (left Riemann) sum."""
    xt = torch.from_numpy(x_test)
    lines = ["| variant | mean T | flipped | mean f_c(x0) − f_c(x_T) | mean abs(gap) | median rel. gap |",
             "|---|---|---|---|---|---|"]
    rows = torch.arange(len(xt))
    with torch.no_grad():
        p0 = torch.softmax(model(xt), 1)
    c = p0.argmax(1)
    for variant, kw in [("sharp", {}), ("smooth", {}), ("sharp", dict(alpha=1e-4, steps=500))]:
        a, path = MFABA(model, variant, **kw).attribute(xt, return_path=True)
        with torch.no_grad():
            pT = torch.softmax(model(path.points[path.lengths, rows]), 1)
        drop = (p0[rows, c] - pT[rows, c]).double()
        gap = (a.flatten(1).sum(1).double() - drop).abs()
        flipped = (pT.argmax(1) != c).float().mean()
        name = variant + "".join(f", {k}={v}" for k, v in kw.items())
        lines.append(f"| {name} | {path.lengths.float().mean():.1f} | {flipped:.2f} | {drop.mean():.4f} | "
                     f"{gap.mean():.2e} | {(gap / drop.clamp_min(1e-12)).median():.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="mfaba_digits.png", help="where to save the PNG")
    p.add_argument("--n", type=int, default=6, help="digits to show")
    p.add_argument("--table", action="store_true", help="also print the faithfulness table (needs captum)")
    a = p.parse_args(argv)
    # one thread: the model is tiny, and extra threads only contend on a busy machine
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    x_train, x_test, y_train, y_test = digits()
    model = train(x_train, y_train)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"trained in {time.perf_counter() - t0:.1f} s, test accuracy {acc:.3f}")

    x = x_test[:a.n]
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    maps = {f"MFABA {v}": MFABA(model, v).attribute(x) for v in ("sharp", "smooth")}  # numpy in, numpy out
    ds = deepshap(model, x_train[:100], x)
    if ds is not None:
        maps["DeepSHAP"] = ds
    plot(x, pred, maps, a.out)
    print(f"saved {a.out} ({', '.join(maps)})")
    if a.table:
        print(completeness_gaps(model, x_test))
        print()
        print(faithfulness_table(model, x_train, x_test, y_test))


if __name__ == "__main__":
    main()
