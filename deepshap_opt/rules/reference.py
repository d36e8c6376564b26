"""NumPy reference implementations of every rule in :mod:`deepshap_opt.rules.spec`.

Written for clarity, not speed (float64, explicit loops where that is clearer). Each backend's tests
compare its rule against these. Shapes: ``x`` and ``r`` are one explicand's and one reference's values
at the op (any shape, no batch axis unless stated); ``g`` is the upstream multiplier of the op's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .spec import MAXPOOL_EPS, RESCALE_EPS, pair_eps

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(x, beta=1.0, threshold=20.0):
    bx = beta * x
    return np.where(bx > threshold, x, np.logaddexp(0.0, bx) / beta)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@dataclass(frozen=True)
class Elementwise:
    """An element-wise function f with its derivative f' (both NumPy, float64)."""

    f: Callable[..., np.ndarray]
    df: Callable[..., np.ndarray]


_SELU_A, _SELU_S = 1.6732632423543772, 1.0507009873554805
_GELU_TANH_C = math.sqrt(2 / math.pi)

#: NumPy f and f' of every element-wise op in ``spec.ELEMENTWISE_OPS``; keyword parameters as in torch.
ELEMENTWISE: dict[str, Elementwise] = {
    "relu": Elementwise(lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "relu6": Elementwise(lambda x: np.clip(x, 0, 6), lambda x: ((x > 0) & (x < 6)).astype(float)),
    "leaky_relu": Elementwise(lambda x, alpha=0.01: np.where(x > 0, x, alpha * x),
                              lambda x, alpha=0.01: np.where(x > 0, 1.0, alpha)),
    "prelu": Elementwise(lambda x, alpha=0.25: np.where(x > 0, x, alpha * x),
                         lambda x, alpha=0.25: np.where(x > 0, 1.0, alpha)),
    "elu": Elementwise(lambda x, alpha=1.0: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))),
                       lambda x, alpha=1.0: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0)))),
    "celu": Elementwise(lambda x, alpha=1.0: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0) / alpha)),
                        lambda x, alpha=1.0: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0) / alpha))),
    "selu": Elementwise(lambda x: _SELU_S * np.where(x > 0, x, _SELU_A * np.expm1(np.minimum(x, 0))),
                        lambda x: _SELU_S * np.where(x > 0, 1.0, _SELU_A * np.exp(np.minimum(x, 0)))),
    "gelu": Elementwise(lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
                        lambda x: 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)),
    "gelu_tanh": Elementwise(_gelu_tanh, lambda x: (
        0.5 * (1 + np.tanh(_GELU_TANH_C * (x + 0.044715 * x**3)))
        + 0.5 * x * (1 - np.tanh(_GELU_TANH_C * (x + 0.044715 * x**3)) ** 2) * _GELU_TANH_C * (1 + 3 * 0.044715 * x**2))),
    "silu": Elementwise(lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
    "mish": Elementwise(lambda x: x * np.tanh(_softplus(x)), lambda x: (
        np.tanh(_softplus(x)) + x * (1 - np.tanh(_softplus(x)) ** 2) * _sigmoid(x))),
    "hardswish": Elementwise(lambda x: x * np.clip(x + 3, 0, 6) / 6,
                             lambda x: np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2 * x + 3) / 6))),
    "hardsigmoid": Elementwise(lambda x: np.clip(x / 6 + 0.5, 0, 1),
                               lambda x: np.where((x > -3) & (x < 3), 1 / 6, 0.0)),
    "hardtanh": Elementwise(lambda x, lo=-1.0, hi=1.0: np.clip(x, lo, hi),
                            lambda x, lo=-1.0, hi=1.0: ((x > lo) & (x < hi)).astype(float)),
    "clip": Elementwise(lambda x, lo=-np.inf, hi=np.inf: np.clip(x, lo, hi),
                        lambda x, lo=-np.inf, hi=np.inf: ((x >= lo) & (x <= hi)).astype(float)),
    "sigmoid": Elementwise(_sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x))),
    "tanh": Elementwise(np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "softplus": Elementwise(_softplus, lambda x, beta=1.0, threshold=20.0: np.where(beta * x > threshold, 1.0, _sigmoid(beta * x))),
    "softsign": Elementwise(lambda x: x / (1 + np.abs(x)), lambda x: 1 / (1 + np.abs(x)) ** 2),
    "logsigmoid": Elementwise(lambda x: -np.logaddexp(0.0, -x), lambda x: 1 - _sigmoid(x)),
    "exp": Elementwise(np.exp, np.exp),
    "log": Elementwise(np.log, lambda x: 1 / x),
    "log1p": Elementwise(np.log1p, lambda x: 1 / (1 + x)),
    "expm1": Elementwise(np.expm1, np.exp),
    "sqrt": Elementwise(np.sqrt, lambda x: 0.5 / np.sqrt(x)),
    "rsqrt": Elementwise(lambda x: 1 / np.sqrt(x), lambda x: -0.5 * x ** -1.5),
    "reciprocal": Elementwise(lambda x: 1 / x, lambda x: -1 / x**2),
    "square": Elementwise(np.square, lambda x: 2 * x),
    "pow": Elementwise(lambda x, p=2.0: np.power(x, p), lambda x, p=2.0: p * np.power(x, p - 1)),
    "abs": Elementwise(np.abs, np.sign),
    "erf": Elementwise(_erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x * x)),
    "sin": Elementwise(np.sin, np.cos),
    "cos": Elementwise(np.cos, lambda x: -np.sin(x)),
    "thresholded_relu": Elementwise(lambda x, theta=1.0: np.where(x > theta, x, 0.0),
                                    lambda x, theta=1.0: (x > theta).astype(float)),
}


def rescale_multiplier(op: str, x, r, eps: float = RESCALE_EPS, **params) -> np.ndarray:
    """Rescale rule: m = (f(x) − f(r)) / (x − r), or f'(x) where |x − r| < eps. Broadcasts x against r."""
    fn = ELEMENTWISE[op]
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    d = x - r
    small = np.abs(d) < eps
    with np.errstate(divide="ignore", invalid="ignore"):
        m = (fn.f(x, **params) - fn.f(r, **params)) / np.where(small, 1.0, d)
    return np.where(small, fn.df(x, **params) * np.ones_like(d), m)


def maxpool_backward(x, r, g, kernel: int, stride: int | None = None, eps: float = MAXPOOL_EPS) -> np.ndarray:
    """Max-pool rule on one (C, H, W) explicand/reference pair with square windows and no padding.

    g: the upstream multiplier, (C, Ho, Wo). Returns the input multiplier, (C, H, W).
    """
    x, r, g = (np.asarray(a, np.float64) for a in (x, r, g))
    stride = stride or kernel
    C, H, W = x.shape
    Ho, Wo = (H - kernel) // stride + 1, (W - kernel) // stride + 1
    routed = np.zeros_like(x)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                win = np.s_[c, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
                wx, wr = x[win], r[win]
                ix, ir = np.unravel_index(np.argmax(wx), wx.shape), np.unravel_index(np.argmax(wr), wr.shape)
                yx, yr = wx[ix], wr[ir]
                cmax = max(yx, yr)
                routed[c, i * stride + ix[0], j * stride + ix[1]] += g[c, i, j] * (cmax - yr)
                routed[c, i * stride + ir[0], j * stride + ir[1]] += g[c, i, j] * (yx - cmax)
    d = x - r
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(d) < eps, 0.0, routed / np.where(np.abs(d) < eps, 1.0, d))


def shapley_pair_multipliers(g2, a_x, a_r, b_x, b_r, eps: float | None = None):
    """Two-player Shapley split for an element-wise z = g2(a, b): returns (m_a, m_b), broadcast shape.
    ``eps`` defaults to the spec's threshold for the operands' dtype (:func:`..spec.pair_eps`)."""
    if eps is None:
        eps = pair_eps(np.result_type(a_x, b_x).itemsize)
    a_x, a_r, b_x, b_r = (np.asarray(v, np.float64) for v in (a_x, a_r, b_x, b_r))
    da, db = a_x - a_r, b_x - b_r
    with np.errstate(divide="ignore", invalid="ignore"):
        ca = 0.5 * ((g2(a_x, b_x) - g2(a_r, b_x)) + (g2(a_x, b_r) - g2(a_r, b_r)))
        cb = 0.5 * ((g2(a_x, b_x) - g2(a_x, b_r)) + (g2(a_r, b_x) - g2(a_r, b_r)))
        m_a = np.where(np.abs(da) < eps, 0.0, ca / np.where(np.abs(da) < eps, 1.0, da))
        m_b = np.where(np.abs(db) < eps, 0.0, cb / np.where(np.abs(db) < eps, 1.0, db))
    return m_a, m_b


def bilinear_backward(g, a_x, a_r, b_x, b_r):
    """Bilinear rule for a matrix product z = a @ b (2-D): (grad_a, grad_b) at the operand means."""
    a_bar, b_bar = 0.5 * (np.asarray(a_x) + a_r), 0.5 * (np.asarray(b_x) + b_r)
    g = np.asarray(g, np.float64)
    return g @ b_bar.T, a_bar.T @ g


def softmax_backward(z_x, z_r, g, eps: float = RESCALE_EPS) -> np.ndarray:
    """Softmax rule on 1-D logits, by the literal decomposition exp (rescale) → Σ (linear) → e/s (pair)."""
    z_x, z_r, g = (np.asarray(v, np.float64) for v in (z_x, z_r, g))
    e_x, e_r = np.exp(z_x), np.exp(z_r)
    s_x, s_r = e_x.sum(), e_r.sum()
    m_e, m_s = shapley_pair_multipliers(lambda e, s: e / s, e_x, e_r, s_x, s_r, eps=0.0)
    # y_i = e_i / s: grad of e_j = g_j m_e_j + (Σ_i g_i m_s_i) (s = Σ e: linear)
    grad_e = g * m_e + np.sum(g * m_s)
    return grad_e * rescale_multiplier("exp", z_x, z_r, eps)


def log_softmax_backward(z_x, z_r, g, eps: float = RESCALE_EPS) -> np.ndarray:
    """Log-softmax rule on 1-D logits, by the literal decomposition z − log(Σ exp z)."""
    z_x, z_r, g = (np.asarray(v, np.float64) for v in (z_x, z_r, g))
    s_x, s_r = np.exp(z_x).sum(), np.exp(z_r).sum()
    m_log = rescale_multiplier("log", s_x, s_r, eps)
    return g - np.sum(g) * m_log * rescale_multiplier("exp", z_x, z_r, eps)


def layer_norm_attribution(x, r, eps: float = 1e-5) -> np.ndarray:
    """φ of LayerNorm (no affine) over a 1-D feature vector, output j seeded, for all j: (F_out, F_in).

    Built from the :class:`~deepshap_opt.rules.spec.Normalization` decomposition with the primitive
    rules above; row j sums to y_x[j] − y_r[j].
    """
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    F = x.size
    center = np.eye(F) - 1.0 / F                       # c = center @ x  (linear)
    c_x, c_r = center @ x, center @ r
    v_x, v_r = np.mean(c_x**2), np.mean(c_r**2)
    m_sq = rescale_multiplier("square", c_x, c_r)      # (F,)
    m_rs = rescale_multiplier("rsqrt", v_x + eps, v_r + eps)
    s_bar, c_bar = 0.5 * (1 / np.sqrt(v_x + eps) + 1 / np.sqrt(v_r + eps)), 0.5 * (c_x + c_r)
    # n_j = c_j · s  → dn_j/dc = s̄ e_j + c̄_j m_rs (1/F) m_sq^T
    dn_dc = s_bar * np.eye(F) + np.outer(c_bar, m_rs * m_sq / F)
    return (dn_dc @ center) * (x - r)[None, :]


def deeplift_phi(multiplier, x, r) -> np.ndarray:
    """φ = multiplier · (x − r): the attribution of one explicand against one reference."""
    return np.asarray(multiplier) * (np.asarray(x, np.float64) - np.asarray(r, np.float64))
