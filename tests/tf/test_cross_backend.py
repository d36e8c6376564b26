"""The same network in PyTorch and in Keras (same weights) gives the same SHAP values from both backends."""

import keras
import numpy as np
import pytest
from keras import layers as L

from deepshap_opt.tf import DeepExplainer as TFExplainer

torch = pytest.importorskip("torch")
torch_backend = pytest.importorskip("deepshap_opt.torch")


def _build(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, size=(4, 2, 3, 3)).astype("float32")   # torch OIHW
    b1 = rng.normal(0, 0.1, size=4).astype("float32")
    w2 = rng.normal(0, 0.4, size=(5, 4, 3, 3)).astype("float32")
    b2 = rng.normal(0, 0.1, size=5).astype("float32")
    w3 = rng.normal(0, 0.5, size=(6, 5)).astype("float32")         # torch (out, in)
    b3 = rng.normal(0, 0.1, size=6).astype("float32")
    w4 = rng.normal(0, 0.5, size=(3, 6)).astype("float32")
    b4 = rng.normal(0, 0.1, size=3).astype("float32")

    nn = torch.nn
    tmodel = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3), nn.Softmax(dim=1))
    with torch.no_grad():
        for mod, (w, b) in zip([tmodel[0], tmodel[3], tmodel[7], tmodel[9]], [(w1, b1), (w2, b2), (w3, b3), (w4, b4)]):
            mod.weight.copy_(torch.from_numpy(w))
            mod.bias.copy_(torch.from_numpy(b))
    tmodel.eval()

    kmodel = keras.Sequential([
        keras.Input((10, 10, 2)), L.Conv2D(4, 3), L.ReLU(), L.MaxPooling2D(2), L.Conv2D(5, 3),
        L.Activation("gelu"), L.GlobalAveragePooling2D(), L.Dense(6, activation="silu"), L.Dense(3),
        L.Activation("softmax")])
    kmodel.layers[0].set_weights([w1.transpose(2, 3, 1, 0), b1])
    kmodel.layers[3].set_weights([w2.transpose(2, 3, 1, 0), b2])
    kmodel.layers[6].set_weights([w3.T, b3])
    kmodel.layers[7].set_weights([w4.T, b4])
    return tmodel, kmodel


def test_torch_and_keras_agree():
    tmodel, kmodel = _build()
    rng = np.random.default_rng(1)
    bg = rng.normal(size=(8, 10, 10, 2)).astype("float32")
    X = rng.normal(size=(3, 10, 10, 2)).astype("float32")
    np.testing.assert_allclose(kmodel(X).numpy(), tmodel(torch.from_numpy(X.transpose(0, 3, 1, 2))).detach().numpy(),
                               atol=1e-5)
    ke = TFExplainer(kmodel, bg)
    te = torch_backend.DeepExplainer(tmodel, torch.from_numpy(bg.transpose(0, 3, 1, 2)))
    kv = ke.shap_values(X)                                                   # (N, H, W, C, K)
    tv = te.shap_values(torch.from_numpy(X.transpose(0, 3, 1, 2)))           # (N, C, H, W, K)
    tv = np.asarray(tv).transpose(0, 2, 3, 1, 4)
    np.testing.assert_allclose(np.asarray(ke.expected_value), np.asarray(te.expected_value), atol=1e-5)
    scale = max(np.abs(kv).max(), 1e-12)
    assert np.abs(kv - tv).max() <= 1e-4 * scale, np.abs(kv - tv).max() / scale
