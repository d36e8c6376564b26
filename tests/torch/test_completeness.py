"""Completeness Σφ = f(x) − E f(background) on a model per supported op (float64 and float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepshap_opt.torch import DeepExplainer

from .models import zoo

ZOO = zoo()


def build(name, dtype, seed=0):
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():
        model(torch.randn(2, *shape))            # materialise lazy layers
    for m in model.modules():                     # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model = model.to(dtype).eval()
    bg = torch.randn(7, *shape, dtype=dtype)
    X = torch.randn(3, *shape, dtype=dtype)
    return model, bg, X


def completeness_error(model, bg, X, phi):
    with torch.no_grad():
        f_x, f_r = model(X), model(bg)
    target = (f_x - f_r.mean(0)).double().numpy()                      # (N, K)
    total = phi.reshape(phi.shape[0], -1, phi.shape[-1]).sum(1)          # (N, K)
    scale = max(float(f_x.abs().max()), float(f_r.abs().max()), 1e-12)
    return float(np.abs(total - target).max()) / scale


@pytest.mark.parametrize("name", sorted(ZOO))
def test_completeness_float64(name):
    model, bg, X = build(name, torch.float64)
    phi = DeepExplainer(model, bg).shap_values(X)
    assert phi.dtype == np.float64 and phi.shape == (X.shape[0], *X.shape[1:], 3)
    assert completeness_error(model, bg, X, phi) <= 1e-5


@pytest.mark.parametrize("name", sorted(ZOO))
def test_completeness_float32(name):
    model, bg, X = build(name, torch.float32)
    phi = DeepExplainer(model, bg).shap_values(X)
    assert completeness_error(model, bg, X, phi) <= 1e-4
