"""Rescale multipliers in closed form, written once for every array library.

m(x, r) = (f(x) − f(r)) / (x − r) computed as a difference of two rounded values keeps about eps·|f|/|Δ| of
relative error in float32 when x and r are close (a narrow LayerNorm's variance, a gate whose input barely
moves). For these functions the secant has an exact form without that difference, so no threshold is needed
where x and r are close (at Δ = 0 each gives f'(x)); see the spec's ``Rescale``. ``xp`` is the array library's
namespace (``sigmoid``, ``tanh``, ``sqrt``, ``rsqrt``, ``where``, ``ones_like``): the torch and TF backends
each build their table from it (the ONNX backend writes the same formulas as graph nodes).
"""

from __future__ import annotations


def closed_form_secants(xp) -> dict:
    """canonical op name (``rules.spec``) → m(x, r), element-wise with broadcasting."""

    def tanh_ratio(h):
        # tanh(h) / h, 1 at h = 0 (accurate for small h: tanh is)
        zero = h == 0
        one = xp.ones_like(h)
        return xp.where(zero, one, xp.tanh(h) / xp.where(zero, one, h))

    def sigmoid(x, r):
        # σ(x) − σ(r) = tanh(Δ/2) · (σ(x)σ(−r) + σ(−x)σ(r)), Δ = x − r: a product of accurate terms
        s = xp.sigmoid(x) * xp.sigmoid(-r) + xp.sigmoid(-x) * xp.sigmoid(r)
        return 0.5 * tanh_ratio(0.5 * (x - r)) * s

    def tanh(x, r):
        # tanh x − tanh r = tanh(Δ) · (1 − tanh x tanh r), 1 − tanh x tanh r = 2(σ(2x)σ(−2r) + σ(−2x)σ(2r))
        s = xp.sigmoid(2 * x) * xp.sigmoid(-2 * r) + xp.sigmoid(-2 * x) * xp.sigmoid(2 * r)
        return 2 * tanh_ratio(x - r) * s

    return {
        # 1/√x − 1/√r = (r − x) / (√x √r (√x + √r))
        "rsqrt": lambda x, r: -(xp.rsqrt(x) * xp.rsqrt(r)) / (xp.sqrt(x) + xp.sqrt(r)),
        "sqrt": lambda x, r: 1 / (xp.sqrt(x) + xp.sqrt(r)),
        "reciprocal": lambda x, r: -1 / (x * r),
        "square": lambda x, r: x + r,
        "sigmoid": sigmoid,
        "tanh": tanh,
    }
