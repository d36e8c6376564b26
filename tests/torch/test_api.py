"""Drop-in parity with shap 0.51's DeepExplainer: values where shap is right, shapes for every API form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deepshap_opt
from deepshap_opt import AdditivityError
from deepshap_opt.torch import DeepExplainer

shap = pytest.importorskip("shap")


def relu_cnn(k=4, seed=0):
    """Plain Conv→ReLU→MaxPool (non-overlapping windows)→Linear: where shap 0.51 is right."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, k)).eval()


def data(n, shape=(1, 8, 8), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


@pytest.mark.parametrize("k", [1, 4])
def test_equals_shap_on_relu_cnn(k):
    model, bg, X = relu_cnn(k), data(10), data(3, seed=1)
    ours, theirs = DeepExplainer(model, bg), shap.DeepExplainer(model, bg)
    a, b = ours.shap_values(X), theirs.shap_values(X)
    assert a.shape == np.asarray(b).shape == (3, 1, 8, 8, k) and a.dtype == np.float64
    assert rel_err(a, b) <= 1e-5
    np.testing.assert_allclose(ours.expected_value, theirs.expected_value, rtol=1e-6)
    assert isinstance(ours.expected_value, np.ndarray) and ours.expected_value.shape == (k,)


@pytest.mark.parametrize("order", ["max", "min", "max_abs"])
def test_ranked_outputs_match_shap(order):
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    a, ia = DeepExplainer(model, bg).shap_values(X, ranked_outputs=2, output_rank_order=order)
    b, ib = shap.DeepExplainer(model, bg).shap_values(X, ranked_outputs=2, output_rank_order=order,
                                                       check_additivity=False)
    assert a.shape == np.asarray(b).shape == (3, 1, 8, 8, 2)
    assert isinstance(ia, torch.Tensor) and tuple(ia.shape) == (3, 2)
    np.testing.assert_array_equal(ia.numpy(), np.asarray(ib))
    assert rel_err(a, b) <= 1e-5


class TwoInputs(nn.Module):
    """ReLU modules (not F.relu: shap 0.51 does not see functional calls and is wrong there)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(3, 6), nn.Linear(6, 2)
        self.ra, self.rb = nn.ReLU(), nn.ReLU()

    def forward(self, x, y):
        return self.c(self.ra(self.a(x)) + self.rb(self.b(y)))


def test_multi_input_matches_shap():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    bg, X = [data(8, (5,)), data(8, (3,), 1)], [data(3, (5,), 2), data(3, (3,), 3)]
    a, b = DeepExplainer(model, bg).shap_values(X), shap.DeepExplainer(model, bg).shap_values(X)
    assert isinstance(a, list) and [x.shape for x in a] == [np.asarray(y).shape for y in b] == [(3, 5, 2), (3, 3, 2)]
    for x, y in zip(a, b):
        assert rel_err(x, y) <= 1e-5
    (v, idx) = DeepExplainer(model, bg).shap_values(X, ranked_outputs=1)
    assert [x.shape for x in v] == [(3, 5, 1), (3, 3, 1)] and tuple(idx.shape) == (3, 1)


def test_layer_form_matches_shap():
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    a = DeepExplainer((model, model[3]), bg).shap_values(X)
    b = shap.DeepExplainer((model, model[3]), bg).shap_values(X)
    assert a.shape == np.asarray(b).shape == (3, 4, 4, 4, 4)
    assert rel_err(a, b) <= 1e-5


def test_explanation_call_fills_base_values():
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    e = DeepExplainer(model, bg)
    ex = e(X)
    assert isinstance(ex, shap.Explanation)
    assert ex.values.shape == (3, 1, 8, 8, 4)
    np.testing.assert_allclose(ex.base_values, np.tile(e.expected_value, (3, 1)))
    assert np.asarray(ex.data).shape == (3, 1, 8, 8)


def test_dispatcher_and_numpy_inputs():
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    e = deepshap_opt.DeepExplainer(model, bg.numpy())
    assert isinstance(e, DeepExplainer)
    np.testing.assert_allclose(e.shap_values(X.numpy()), DeepExplainer(model, bg).shap_values(X), rtol=1e-6)


def test_scalar_output_model_keeps_k_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1), nn.Flatten(0)).eval()   # (N,)
    e = DeepExplainer(model, data(6, (4,)))
    assert e.shap_values(data(2, (4,), 1)).shape == (2, 4, 1) and e.expected_value.shape == (1,)


def test_additivity_error_is_assertion_and_names_output():
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    e = DeepExplainer(model, bg)
    e.expected_value = e.expected_value + 1.0        # sabotage: the check must catch it
    with pytest.raises(AdditivityError, match="output") as info:
        e.shap_values(X)
    assert isinstance(info.value, AssertionError)
    e.shap_values(X, check_additivity=False)


def test_batch_size_chunks_give_the_same_values():
    model, bg, X = relu_cnn(), data(10), data(5, seed=1)
    full = DeepExplainer(model, bg).shap_values(X)
    for bs in (1, 3, 7, 40):
        np.testing.assert_allclose(DeepExplainer(model, bg, batch_size=bs).shap_values(X), full, rtol=1e-5,
                                   atol=1e-7)


def test_cache_rebuilds_when_weights_change():
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    e = DeepExplainer(model, bg)
    e.shap_values(X)
    with torch.no_grad():
        model[0].weight.mul_(1.5)                     # e.g. an optimizer step
    fresh = DeepExplainer(model, bg)
    np.testing.assert_allclose(e.shap_values(X), fresh.shap_values(X), rtol=1e-6)
    np.testing.assert_allclose(e.expected_value, fresh.expected_value, rtol=1e-6)


def test_results_are_deterministic():
    model, bg, X = relu_cnn(), data(10), data(3, seed=1)
    e = DeepExplainer(model, bg)
    np.testing.assert_array_equal(e.shap_values(X), e.shap_values(X))
