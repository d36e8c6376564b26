"""Hostile inputs and state safety (the torch rows of docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepshap_opt.torch import DeepExplainer

from .._concurrency import run_in_threads


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


BG = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def test_zero_length_X_gives_empty_results():
    e = DeepExplainer(mlp(), BG)
    assert e.shap_values(X[:0]).shape == (0, 4, 3)
    v, idx = e.shap_values(X[:0], ranked_outputs=1)
    assert v.shape == (0, 4, 1) and tuple(idx.shape) == (0, 1)


def test_single_row_background():
    e = DeepExplainer(mlp(), BG[:1])
    phi = e.shap_values(X)
    with torch.no_grad():
        np.testing.assert_allclose(phi.sum(1), (mlp()(X) - mlp()(BG[:1])).numpy(), rtol=1e-5, atol=1e-6)


def test_wrong_rank_and_device():
    e = DeepExplainer(mlp(), BG)
    with pytest.raises(ValueError, match="per-sample shape"):
        e.shap_values(X[0])
    with pytest.raises(ValueError, match="scalar"):
        e.shap_values(torch.tensor(1.0))
    with pytest.raises(ValueError, match="meta"):
        e.shap_values(X.to("meta"))


def test_enormous_background_is_chunked_within_the_memory_budget():
    bg = torch.randn(20000, 4, generator=torch.Generator().manual_seed(2))
    e = DeepExplainer(mlp(), bg, memory_budget=2**20)        # 1 MiB: forces many reference chunks
    n_chunk, m_chunk = e._chunks(3, 3, 20000)
    assert m_chunk < 20000
    phi = e.shap_values(X)
    with torch.no_grad():
        np.testing.assert_allclose(phi.sum(1), (mlp()(X) - mlp()(bg).mean(0)).numpy(), rtol=1e-4, atol=1e-5)


def test_concurrent_threads_get_the_serial_result():
    e = DeepExplainer(mlp(), BG)
    expected = e.shap_values(X)
    results = run_in_threads(lambda i: e.shap_values(X))
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_integer_background_for_the_embedding_layer_form():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 3), nn.Linear(15, 2)

        def forward(self, ids):
            return self.fc(torch.tanh(self.emb(ids)).flatten(1))

    torch.manual_seed(0)
    model = Emb().eval()
    ids_bg, ids = torch.randint(0, 10, (6, 5)), torch.randint(0, 10, (2, 5))
    phi = DeepExplainer((model, model.emb), ids_bg).shap_values(ids)     # w.r.t. the embedding's output
    assert phi.shape == (2, 5, 3, 2)
    with torch.no_grad():
        np.testing.assert_allclose(phi.reshape(2, -1, 2).sum(1), (model(ids) - model(ids_bg).mean(0)).numpy(),
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="floating-point"):
        DeepExplainer(model, ids_bg)


def test_data_dependent_control_flow_is_reported():
    from deepshap_opt.torch._tracer import ControlFlowError

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if bool((x[:, 0] > 0).all()):       # a Python branch on the input's values
                return self.fc(torch.relu(x))
            return self.fc(x)

    bg = BG.clone()
    bg[:, 0] = bg[:, 0].abs() + 0.1
    x = X.clone()
    x[:, 0] = -x[:, 0].abs() - 0.1
    with pytest.raises(ControlFlowError, match="different path"):
        DeepExplainer(Branchy().eval(), bg).shap_values(x)
