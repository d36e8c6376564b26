"""The top-level ``deepshap_opt.DeepExplainer`` dispatch and the metrics' argument checks."""

from __future__ import annotations

import numpy as np
import pytest

import deepshap_opt
from deepshap_opt import metrics

torch = pytest.importorskip("torch")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).eval()


def test_dispatch_torch_module_and_pair():
    from deepshap_opt.torch import DeepExplainer as TorchExplainer

    model, bg = _mlp(), torch.randn(6, 4)
    assert isinstance(deepshap_opt.DeepExplainer(model, bg), TorchExplainer)
    assert isinstance(deepshap_opt.DeepExplainer((model, model[1]), bg), TorchExplainer)


def test_dispatch_onnx_path_and_proto(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import warnings

    model, bg = _mlp(), np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 4),), str(path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "N"}})
    X = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    want = deepshap_opt.DeepExplainer(model, torch.from_numpy(bg)).shap_values(torch.from_numpy(X))
    for m in (str(path), path, onnx.load(str(path))):
        e = deepshap_opt.DeepExplainer(m, bg)
        assert type(e).__module__.startswith("deepshap_opt.onnx")
        np.testing.assert_allclose(e.shap_values(X), want, atol=1e-5)


def test_dispatch_keras_model():
    keras = pytest.importorskip("keras")
    from deepshap_opt.tf import DeepExplainer as TFExplainer

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)])
    assert isinstance(deepshap_opt.DeepExplainer(model, np.zeros((3, 4), np.float32)), TFExplainer)


def test_dispatch_unknown_object(monkeypatch):
    import sys

    for name in ("keras", "tensorflow"):            # as if neither were imported
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(TypeError, match="cannot tell the framework of a dict"):
        deepshap_opt.DeepExplainer({"not": "a model"}, np.zeros((2, 3)))


def _predict(x):
    z = x.reshape(len(x), -1)[:, :3].astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"x": np.zeros((2, 3, 4, 4)), "channel_axis": None}, "with channel_axis=None, x must be"),
    ({"x": np.zeros((2, 4, 4))}, "x must be \\(N, C, H, W\\) or \\(N, H, W, C\\)"),
    ({"x": np.zeros((2, 3, 4, 4)), "channel_axis": 0}, "channel_axis cannot be the batch axis"),
    ({"x": np.zeros((2, 3, 4, 4)), "substrate": lambda x: x[:, :, :2]}, "the substrate must have x's shape"),
])
def test_metric_argument_errors(kwargs, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    with pytest.raises(ValueError, match=match):
        metrics.deletion_auc(_predict, x, np.ones(x.shape), target=0, **kwargs)


def test_predict_must_return_probabilities():
    x = np.random.default_rng(0).random((2, 1, 4, 4))
    with pytest.raises(ValueError, match="predict must return probabilities"):
        metrics.insertion_auc(lambda b: b.sum((1, 2, 3)), x, x, target=0)


def test_gaussian_blur_sigma_zero_is_identity_and_tensors_are_accepted():
    x = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(metrics.gaussian_blur(x, 0.0), x)
    tf = pytest.importorskip("tensorflow")
    a = metrics.deletion_auc(_predict, tf.constant(x), tf.constant(x), target=1)
    b = metrics.deletion_auc(_predict, x, x, target=1)
    np.testing.assert_allclose(a, b)
