"""Bad input gets a clear error naming the problem; the model and the user's tensors are left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshap_opt import UnsupportedOperatorError
from deepshap_opt.torch import DeepExplainer


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()


BG = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.randn(3, 5), ValueError, "per-sample shape"),
    (torch.randn(3, 4).double(), TypeError, "dtype"),
    (torch.full((3, 4), float("nan")), ValueError, "NaN"),
    (torch.tensor([[0.0, float("inf"), 0, 0]]), ValueError, "NaN or Inf"),
    (torch.zeros(3, 4, dtype=torch.long), TypeError, "floating-point"),
    ([torch.randn(3, 4)], TypeError, "single input"),
    ("not a tensor", TypeError, "torch.Tensor or numpy"),
])
def test_bad_explicands(bad, exc, match):
    with pytest.raises(exc, match=match):
        DeepExplainer(mlp(), BG).shap_values(bad)


def test_bad_background_and_model():
    with pytest.raises(ValueError, match="empty"):
        DeepExplainer(mlp(), BG[:0])
    with pytest.raises(ValueError, match="NaN"):
        DeepExplainer(mlp(), torch.full((4, 4), float("nan")))
    with pytest.raises(TypeError, match="nn.Module"):
        DeepExplainer(lambda x: x, BG)
    with pytest.raises(ValueError, match="not a submodule"):
        DeepExplainer((mlp(), nn.Linear(2, 2)), BG)
    with pytest.raises(ValueError, match="batch_size"):
        DeepExplainer(mlp(), BG, batch_size=0)
    with pytest.raises(ValueError, match="memory_budget must be a positive number"):
        DeepExplainer(mlp(), BG, memory_budget=0)
    with pytest.raises(ValueError, match="output_rank_order"):
        DeepExplainer(mlp(), BG).shap_values(X, ranked_outputs=1, output_rank_order="best")
    with pytest.raises(ValueError, match="ranked_outputs"):
        DeepExplainer(mlp(), BG).shap_values(X, ranked_outputs=0)


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x


class Cube(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 2, 2, 1)


def test_model_output_must_be_n_by_k():
    with pytest.raises(TypeError, match="tuple"):
        DeepExplainer(TupleOut(), BG)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        DeepExplainer(Cube(), BG)


class Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumprod(self.fc(x), 1)


class Masks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.where(h > 0, h, 0.1 * h)   # a hand-written leaky ReLU: data-dependent mask


class Detaches(nn.Module):
    def forward(self, x):
        return torch.exp(x - x.max(1, keepdim=True).values.detach())


class InputWeightedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 1, 1, 1))

    def forward(self, x):                      # the conv weight is computed from the batch: not linear
        h = x.reshape(-1, 1, 2, 2)
        return F.conv2d(h, self.w * x.mean()).flatten(1)


def test_unsupported_op_names_op_and_module():
    with pytest.raises(UnsupportedOperatorError, match=r"conv2d.*weight or bias depends on the explained input"):
        DeepExplainer(InputWeightedConv().eval(), BG)
    with pytest.raises(UnsupportedOperatorError, match=r"cumprod.*\(called in fc|cumprod.*Sorts"):
        DeepExplainer(Sorts().eval(), BG)
    with pytest.raises(UnsupportedOperatorError, match=r"where.*gt"):
        DeepExplainer(Masks().eval(), BG)
    with pytest.raises(UnsupportedOperatorError, match="detach"):
        DeepExplainer(Detaches().eval(), BG)


def test_training_dropout_call_is_refused():
    class Drop(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5)           # training=True by default: random
    with pytest.raises(UnsupportedOperatorError, match="dropout"):
        DeepExplainer(Drop().eval(), BG)


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()],
            [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks)) for m in model.modules()])


@pytest.mark.parametrize("train", [False, True])
def test_model_and_inputs_left_untouched(train):
    model = mlp()
    model.train(train)
    model[0].weight.grad = torch.ones_like(model[0].weight)     # a user's pending gradient
    before, x0, b0 = _state(model), X.clone(), BG.clone()
    ctx = pytest.warns(UserWarning, match="training mode") if train else _nullcontext()
    with ctx:
        e = DeepExplainer(model, BG)
        e.shap_values(X)
    with pytest.raises(ValueError):
        e.shap_values(torch.randn(2, 7))                       # an error path too
    after = _state(model)
    for a, b in zip(before[0].values(), after[0].values()):
        assert torch.equal(a, b)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert before[2] == after[2] and before[3] == after[3]
    assert torch.equal(X, x0) and torch.equal(BG, b0)
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks


def test_inplace_first_op_does_not_modify_user_input():
    class InplaceIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(x, inplace=True))

    x0 = X.clone()
    DeepExplainer(InplaceIn().eval(), BG).shap_values(X)
    assert torch.equal(X, x0)


def test_channels_last_and_non_contiguous_inputs_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    bg, x = torch.randn(5, 3, 6, 6), torch.randn(2, 3, 6, 6)
    ref = DeepExplainer(model, bg).shap_values(x)
    np.testing.assert_allclose(DeepExplainer(model, bg.to(memory_format=torch.channels_last)).shap_values(
        x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-7)
    xt = torch.randn(2, 3, 6, 6).transpose(2, 3)
    assert not xt.is_contiguous()
    np.testing.assert_allclose(DeepExplainer(model, bg).shap_values(xt),
                               DeepExplainer(model, bg).shap_values(xt.contiguous()), rtol=1e-5, atol=1e-7)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
