"""In-place activations put their rule on the tape directly (no copy_); chunks favour one forward per call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshap_opt.torch import DeepExplainer
from deepshap_opt.torch import _functions


class Activations(nn.Module):
    """Every in-place form a model may use, or the same network out of place (``inplace=False``)."""

    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu, self.silu = nn.ReLU(inplace=inplace), nn.SiLU(inplace=inplace)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        h = self.silu(h * 1.5)
        h = h - 0.1
        if self.inplace:
            h[:, :2].sigmoid_()                          # a view of h, modified in place
            h = F.hardtanh(h, -0.5, 0.8, inplace=True)   # an activation with parameters
            torch.tanh_(h)
        else:
            h = torch.cat([h[:, :2].sigmoid(), h[:, 2:]], 1)
            h = torch.tanh(F.hardtanh(h, -0.5, 0.8))
        return self.fc(h.flatten(1))


def test_inplace_activations_equal_their_out_of_place_twins(monkeypatch):
    calls = []
    real = _functions.RescaleInPlace.apply

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(_functions.RescaleInPlace, "apply", spy)
    bg, X = torch.randn(7, 3, 4, 4), torch.randn(5, 3, 4, 4)
    X_before = X.clone()
    inplace = DeepExplainer(Activations(True), bg).shap_values(X)     # additivity is checked too
    # relu, silu, hardtanh (parameters: no closed form, op None) and tanh_ write their input in place, with
    # no copy_ on the tape; sigmoid_ on a view of h keeps the copy_ (autograd's rule for views)
    assert set(calls) == {"relu", "silu", None, "tanh"}
    out_of_place = DeepExplainer(Activations(False), bg).shap_values(X)
    np.testing.assert_allclose(inplace, out_of_place, rtol=1e-5, atol=1e-6)
    assert torch.equal(X, X_before)


def test_inplace_rule_in_double_precision_is_complete():
    model = Activations(True).double()
    bg, X = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    phi = DeepExplainer(model, bg).shap_values(X)
    with torch.no_grad():
        gap = (model(X.clone()) - model(bg.clone()).mean(0)).numpy()
    np.testing.assert_allclose(phi.sum((1, 2, 3)), gap, rtol=1e-10, atol=1e-12)   # phi: (N, *in, K)


@pytest.mark.parametrize("batch_size, n, k, M, expected", [
    (36, 4, 1, 32, (4, 8)),      # all explicands in one forward, references in four equal slices
    (10, 4, 1, 32, (4, 2)),
    (36, 100, 1, 32, (36, 1)),   # many explicands: as many per forward as fit, one reference at a time
    (1000, 4, 2, 32, (4, 32)),   # everything fits: one chunk
    (40, 4, 3, 32, (4, 3)),      # k outputs share the rows: ceil(32 / ceil(32 / 3)) = 3
])
def test_chunks_take_all_explicands_per_forward_when_they_fit(batch_size, n, k, M, expected):
    e = DeepExplainer(nn.Linear(2, 1), torch.randn(M, 2), batch_size=batch_size)
    n_chunk, m_chunk = e._chunks(n, k, M)
    assert (n_chunk, m_chunk) == expected
    assert n_chunk * k * m_chunk <= max(batch_size, k)


def test_explicands_per_forward_are_bounded_by_what_their_forward_keeps():
    # five ReLU sites of 1000 floats: one explicand's forward keeps ~5 x 4000 bytes for the rules, the
    # largest site is 4000 bytes; a budget of 240,000 bytes gives 10 backward rows and 2 explicands
    layers = [nn.Linear(2, 1000)] + [m for _ in range(4) for m in (nn.ReLU(), nn.Linear(1000, 1000))]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(1000, 1))
    bg, X = torch.randn(16, 2), torch.randn(8, 2)
    e = DeepExplainer(model, bg, memory_budget=240_000)
    assert e._cache.row_nbytes() == 5 * 4000
    assert e._chunks(8, 1, 16) == (2, 4)
    one_chunk = DeepExplainer(model, bg, batch_size=10_000)
    np.testing.assert_allclose(e.shap_values(X), one_chunk.shap_values(X), rtol=1e-5, atol=1e-6)
