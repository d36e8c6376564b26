"""fuse_rules (torch.compile'd rule kernels) gives the eager kernels' values; None fuses large chunks only."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deepshap_opt.torch import DeepExplainer
from deepshap_opt.torch import _functions
from deepshap_opt.torch import explainer as explainer_module


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1),
                         nn.Conv2d(4, 4, 3), nn.SiLU(), nn.GELU(), nn.Flatten(), nn.Linear(4, 3), nn.Tanh()).eval()


def test_fused_rules_equal_eager():
    model = _model()
    bg, X = torch.randn(6, 2, 6, 6), torch.randn(3, 2, 6, 6)
    eager = DeepExplainer(model, bg, fuse_rules=False).shap_values(X)
    fused = DeepExplainer(model, bg, fuse_rules=True).shap_values(X)    # additivity checked too
    np.testing.assert_allclose(fused, eager, rtol=1e-5, atol=1e-7)


def test_auto_fuses_only_large_chunks(monkeypatch):
    calls = []
    real_get = _functions.RuleKernels.get

    def spy(name, fuse):
        calls.append(fuse)
        return real_get(name, fuse)

    monkeypatch.setattr(_functions.RuleKernels, "get", spy)
    model = _model()
    bg, X = torch.randn(6, 2, 6, 6), torch.randn(3, 2, 6, 6)
    small = DeepExplainer(model, bg).shap_values(X)
    assert calls and not any(calls)                       # tiny chunks: eager kernels
    calls.clear()
    monkeypatch.setattr(explainer_module, "AUTO_FUSE_ELEMENTS", 1)
    large = DeepExplainer(model, bg).shap_values(X)
    assert calls and all(calls)                           # above the threshold: fused kernels
    np.testing.assert_allclose(large, small, rtol=1e-5, atol=1e-7)
