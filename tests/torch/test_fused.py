"""fuse_rules=True (torch.compile'd rule kernels) gives the eager kernels' values."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deepshap_opt.torch import DeepExplainer


def test_fused_rules_equal_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1),
                          nn.Conv2d(4, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4, 3)).eval()
    bg, X = torch.randn(6, 2, 6, 6), torch.randn(3, 2, 6, 6)
    eager = DeepExplainer(model, bg).shap_values(X)
    fused = DeepExplainer(model, bg, fuse_rules=True).shap_values(X)    # additivity checked too
    np.testing.assert_allclose(fused, eager, rtol=1e-5, atol=1e-7)
