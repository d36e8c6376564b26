"""Each torch rule against its NumPy reference in deepshap_opt.rules.reference (float64, one-op models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshap_opt.rules import reference as R
from deepshap_opt.torch import DeepExplainer

TORCH_OPS = {  # canonical op → (torch function, numpy params)
    "relu": (torch.relu, {}), "relu6": (F.relu6, {}), "leaky_relu": (lambda t: F.leaky_relu(t, 0.2), {"alpha": 0.2}),
    "elu": (F.elu, {}), "selu": (F.selu, {}), "celu": (lambda t: F.celu(t, 0.7), {"alpha": 0.7}),
    "gelu": (F.gelu, {}), "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), {}), "silu": (F.silu, {}),
    "mish": (F.mish, {}), "hardswish": (F.hardswish, {}), "hardsigmoid": (F.hardsigmoid, {}),
    "hardtanh": (F.hardtanh, {}), "sigmoid": (torch.sigmoid, {}), "tanh": (torch.tanh, {}),
    "softplus": (F.softplus, {}), "softsign": (F.softsign, {}), "logsigmoid": (F.logsigmoid, {}),
    "exp": (torch.exp, {}), "square": (torch.square, {}), "abs": (torch.abs, {}), "erf": (torch.erf, {}),
    "sin": (torch.sin, {}), "cos": (torch.cos, {}), "clip": (lambda t: t.clamp(-0.3, 0.4), {"lo": -0.3, "hi": 0.4}),
    "log": (torch.log, {}), "sqrt": (torch.sqrt, {}), "rsqrt": (torch.rsqrt, {}), "reciprocal": (torch.reciprocal, {}),
    "pow": (lambda t: t.pow(1.5), {"p": 1.5}),
}
POSITIVE = {"log", "sqrt", "rsqrt", "reciprocal", "pow"}


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def data(n, shape, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x.abs() + 0.5 if positive else x


def phis(fn, X, bg):
    """φ (N, *in, K) of the one-op model fn."""
    return DeepExplainer(Fn(fn).eval(), bg).shap_values(X)


@pytest.mark.parametrize("op", sorted(TORCH_OPS))
def test_rescale_matches_reference(op):
    fn, params = TORCH_OPS[op]
    X, bg = data(3, (5,), op in POSITIVE), data(4, (5,), op in POSITIVE, seed=1)
    phi = phis(fn, X, bg)                                           # (N, F, F)
    x, r = X.numpy()[:, None, :], bg.numpy()[None, :, :]           # (N,1,F), (1,M,F)
    expected = (R.rescale_multiplier(op, x, r, **params) * (x - r)).mean(1)     # (N, F)
    np.testing.assert_allclose(np.einsum("njj->nj", phi), expected, rtol=1e-9, atol=1e-12)
    off_diagonal = phi - np.einsum("nj,jk->njk", np.einsum("njj->nj", phi), np.eye(5))
    assert np.abs(off_diagonal).max() == 0


def test_rescale_uses_derivative_where_delta_is_tiny():
    X = data(2, (5,))
    bg = X[:1].clone() + 1e-9
    phi = phis(F.silu, X[:1], bg)
    assert np.isfinite(phi).all()
    np.testing.assert_allclose(np.einsum("njj->nj", phi)[0], (R.ELEMENTWISE["silu"].df(X[0].numpy()) * -1e-9),
                               rtol=1e-6)


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2), (3, 1)])
def test_maxpool_matches_reference(kernel, stride):
    X, bg = data(2, (2, 5, 5)), data(3, (2, 5, 5), seed=1)
    phi = phis(lambda t: F.max_pool2d(t, kernel, stride).flatten(1), X, bg)     # (N, 2, 5, 5, K)
    K = phi.shape[-1]
    for n in range(2):
        for o in range(K):
            g = np.zeros(K)
            g[o] = 1
            g = g.reshape(2, (5 - kernel) // stride + 1, -1)
            exp = np.mean([R.maxpool_backward(X[n].numpy(), b.numpy(), g, kernel, stride) * (X[n] - b).numpy()
                           for b in bg], axis=0)
            np.testing.assert_allclose(phi[n, ..., o], exp, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,g2,positive_b", [("mul", torch.mul, False), ("div", torch.div, True),
                                                 ("maximum", torch.maximum, False), ("minimum", torch.minimum, False)])
def test_two_varying_operands_match_reference(name, g2, positive_b):
    X, bg = data(2, (8,)), data(3, (8,), seed=1)
    if positive_b:
        X[:, 4:], bg[:, 4:] = X[:, 4:].abs() + 0.5, bg[:, 4:].abs() + 0.5
    phi = phis(lambda t: g2(t[:, :4], t[:, 4:]), X, bg)                          # (N, 8, 4)
    npf = {"mul": np.multiply, "div": np.divide, "maximum": np.maximum, "minimum": np.minimum}[name]
    x, r = X.numpy()[:, None], bg.numpy()[None]
    m_a, m_b = R.shapley_pair_multipliers(npf, x[..., :4], r[..., :4], x[..., 4:], r[..., 4:])
    exp_a, exp_b = (m_a * (x[..., :4] - r[..., :4])).mean(1), (m_b * (x[..., 4:] - r[..., 4:])).mean(1)
    np.testing.assert_allclose(np.einsum("njj->nj", phi[:, :4]), exp_a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.einsum("njj->nj", phi[:, 4:]), exp_b, rtol=1e-9, atol=1e-12)


def test_matmul_matches_reference():
    X, bg = data(2, (3, 6)), data(3, (3, 6), seed=1)
    phi = phis(lambda t: (t[:, :, :3] @ t[:, :, 3:].transpose(1, 2)).flatten(1), X, bg)
    for n in range(2):
        for o in range(phi.shape[-1]):
            g = np.zeros(phi.shape[-1])
            g[o] = 1
            tot = 0
            for b in bg.numpy():
                xa, xb, ra, rb = X[n].numpy()[:, :3], X[n].numpy()[:, 3:].T, b[:, :3], b[:, 3:].T
                ga, gb = R.bilinear_backward(g.reshape(3, 3), xa, ra, xb, rb)
                tot += (ga * (xa - ra)).sum() + (gb * (xb - rb)).sum()
            np.testing.assert_allclose(phi[n, ..., o].sum(), tot / 3, rtol=1e-9)


@pytest.mark.parametrize("which", ["softmax", "log_softmax"])
def test_softmax_matches_reference(which):
    X, bg = data(2, (5,)) * 3, data(3, (5,), seed=1) * 3
    fn = (lambda t: torch.softmax(t, 1)) if which == "softmax" else (lambda t: torch.log_softmax(t, 1))
    ref = R.softmax_backward if which == "softmax" else R.log_softmax_backward
    phi = phis(fn, X, bg)
    for n in range(2):
        for j in range(5):
            exp = np.mean([ref(X[n].numpy(), b.numpy(), np.eye(5)[j]) * (X[n] - b).numpy() for b in bg], axis=0)
            np.testing.assert_allclose(phi[n, :, j], exp, rtol=1e-8, atol=1e-12)


def test_softmax_is_stable_for_large_logits():
    # float32 logits whose exp differs by up to e^40 between explicand and reference: the rule's terms
    # grow like exp(L_r - L_x) and cancel, so it computes in float64 (documented limit: ~30 nats of gap)
    X, bg = data(2, (5,)) * 10, data(3, (5,), seed=1) * 10
    phi = DeepExplainer(Fn(lambda t: torch.softmax(t, 1)).eval(), bg.float()).shap_values(X.float())
    assert np.isfinite(phi).all()   # shap_values' additivity check also passed


def test_layer_norm_matches_reference():
    X, bg = data(2, (6,)), data(3, (6,), seed=1)
    phi = phis(lambda t: F.layer_norm(t, (6,)), X, bg)                          # (N, F_in, F_out)
    for n in range(2):
        exp = np.mean([R.layer_norm_attribution(X[n].numpy(), b) for b in bg.numpy()], axis=0)  # (out, in)
        np.testing.assert_allclose(phi[n].T, exp, rtol=1e-8, atol=1e-12)
