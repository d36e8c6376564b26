"""Train a small Keras CNN on the bundled digits data, explain it with deepshap_opt.tf.DeepExplainer, and
save the shap-style image plot (``examples/out/keras_digits.png``).

Trains in a few seconds on a CPU; nothing is downloaded.

    python examples/keras_digits.py [--out DIR] [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import keras
import numpy as np
from keras import layers as L
from sklearn.datasets import load_digits

from deepshap_opt.tf import DeepExplainer


def digits_cnn() -> keras.Model:
    """Conv → ReLU → MaxPool ×2 → Dense on 8×8×1 grey digits, 10 softmax classes (NHWC)."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(16, 3, padding="same", activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(32, 3, padding="same", activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(64, activation="relu"), L.Dropout(0.2), L.Dense(10, activation="softmax")])


def load(seed: int = 0):
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]                    # (1797, 8, 8, 1) in [0, 1]
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm[:1500]], d.target[perm[:1500]], x[perm[1500:]], d.target[perm[1500:]]


def plot(shap_values, images, labels, path):
    """shap.image_plot when shap is installed, otherwise a matplotlib grid of the same layout."""
    import matplotlib.pyplot as plt

    try:
        import shap

        shap.image_plot([shap_values[..., k] for k in range(10)], -images, labels=labels, show=False)
        plt.savefig(path, dpi=80, bbox_inches="tight")
        plt.close("all")
    except ImportError:
        n = len(images)
        fig, axes = plt.subplots(n, 11, figsize=(11, n))
        lim = np.abs(shap_values).max()
        for i in range(n):
            axes[i, 0].imshow(images[i, :, :, 0], cmap="gray_r")
            for k in range(10):
                axes[i, k + 1].imshow(shap_values[i, :, :, 0, k], cmap="bwr", vmin=-lim, vmax=lim)
        for ax in axes.flat:
            ax.axis("off")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = load()

    t = time.perf_counter()
    model = digits_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=0)
    acc = model.evaluate(x_test, y_test, verbose=0)[1]
    print(f"trained in {time.perf_counter() - t:.1f}s, test accuracy {acc:.3f}")

    background = x_train[:100]
    explainer = DeepExplainer(model, background)
    t = time.perf_counter()
    shap_values = explainer.shap_values(x_test[:5])                       # (5, 8, 8, 1, 10), additivity checked
    print(f"explained 5 digits x 10 classes against 100 references in {time.perf_counter() - t:.1f}s")
    total = shap_values.sum(axis=(1, 2, 3))
    err = np.abs(total - (model.predict(x_test[:5], verbose=0) - explainer.expected_value)).max()
    print(f"max |sum(phi) - (f(x) - E f)| = {err:.2e}")
    labels = np.array([[str(k) for k in range(10)]] * 5)
    path = os.path.join(args.out, "keras_digits.png")
    plot(shap_values, x_test[:5], labels, path)
    print(f"saved {path}")
    return path, err, acc


if __name__ == "__main__":
    main()
