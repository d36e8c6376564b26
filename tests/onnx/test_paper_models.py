"""The four models of the ONNXExplainer paper export and explain (small inputs); values equal the torch
backend's. DenseNet201 and VGG19 are slow here (VGG19 needs 224×224: torch's TorchScript exporter cannot
write its adaptive 7×7 average pool for smaller inputs)."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import deepshap_opt.onnx as dso

from ._onnx_util import completeness_error, run, torch_backend

CASES = [
    pytest.param("resnet50", 64, 3, 2, id="resnet50"),
    pytest.param("efficientnet_b0", 64, 3, 2, id="efficientnet_b0"),
    pytest.param("densenet201", 64, 3, 2, id="densenet201", marks=pytest.mark.slow),
    pytest.param("vgg19", 224, 2, 1, id="vgg19", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size,m,n", CASES)
def test_paper_model_exports_and_explains(name, size, m, n, tmp_path):
    torch_models = pytest.importorskip("torch_models")
    torch.manual_seed(0)
    model = torch_models.MODELS[name](num_classes=10).eval()
    bg = torch.randn(m, 3, size, size)
    X = torch.randn(n, 3, size, size)
    path = tmp_path / f"{name}.onnx"
    dso.export(model, bg, path, outputs="top1")           # runs onnx.checker full_check
    proto = onnx.load(path)
    out = run(proto, {"input": X.numpy()})
    assert out["shap_values"].shape == (n, 3, size, size, 1)
    err, scale = completeness_error(proto, out)
    assert err <= 1e-4 * scale, err
    TDE = torch_backend()
    if TDE is None:
        pytest.skip("torch backend not importable")
    tv, tidx = TDE(model, bg).shap_values(X, ranked_outputs=1)
    np.testing.assert_array_equal(np.asarray(tidx), out["shap_indexes"])
    assert np.abs(np.asarray(tv) - out["shap_values"]).max() <= 1e-4 * scale
