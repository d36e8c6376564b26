"""TensorFlow implementations of the rules of :mod:`deepshap_opt.rules.spec` (tested against
:mod:`deepshap_opt.rules.reference`).

Every function takes the explicand side ``*_x`` and the reference side ``*_r`` already shaped to
broadcast against each other (``(n, 1, ...)`` against ``(1, m, ...)``) and returns broadcast results.
"""

from __future__ import annotations

import tensorflow as tf

from ..rules.spec import MAXPOOL_EPS, RESCALE_EPS, pair_eps


def _safe_div(num, den, small):
    return num / tf.where(small, tf.ones_like(den), den)


def small_delta(d, eps, *values):
    """Where d = x − r is too small to divide by: |d| < eps · min(1, max |values|), or d = 0.

    ``values`` are the operands and results the division's numerator and denominator were computed from
    (x, r, f(x), f(r)). When they are of magnitude ≥ 1 this is the spec's absolute threshold (|d| < eps).
    Below 1 it shrinks with them: float rounding of a difference is relative to the magnitudes it was
    computed from, so activations far below 1 (untrained keras.applications models reach 1e-12) keep their
    exact secant instead of falling back — the fallback broke completeness at that scale. Where f(x) stays
    near 1 while x is tiny (sigmoid near 0) the threshold stays the spec's: there the secant would be
    rounding noise and the fallback f'(x) is accurate to second order.
    """
    scale = tf.abs(values[0])
    for v in values[1:]:
        scale = tf.maximum(scale, tf.abs(v))
    scale = tf.minimum(tf.ones_like(d), scale + tf.zeros_like(d))
    return (tf.abs(d) < eps * scale) | tf.equal(d, 0)


def rescale_multiplier(s_x, s_r, y_x, y_r, dfx, eps: float = RESCALE_EPS):
    """m = (y_x − y_r)/(s_x − s_r); f'(s_x) where |s_x − s_r| < eps (spec.Rescale)."""
    d = s_x - s_r
    small = small_delta(d, eps, s_x, s_r, y_x, y_r)
    m = _safe_div(y_x - y_r, d, small)
    return tf.where(small, dfx + tf.zeros_like(m), m)


def softmax_coefficients(z_x, z_r, eps: float = RESCALE_EPS):
    """(u, v, p_x, p_r) of spec.Softmax along the last axis, broadcast."""
    l_x = tf.reduce_logsumexp(z_x, axis=-1, keepdims=True)
    l_r = tf.reduce_logsumexp(z_r, axis=-1, keepdims=True)
    d = z_x - z_r
    small = tf.abs(d) < eps
    ex_lx, er_lx = tf.exp(z_x - l_x), tf.exp(z_r - l_x)
    ex_lr, er_lr = tf.exp(z_x - l_r), tf.exp(z_r - l_r)
    u = tf.where(small, ex_lx + tf.zeros_like(d), _safe_div(ex_lx - er_lx, d, small))
    v = tf.where(small, ex_lr + tf.zeros_like(d), _safe_div(ex_lr - er_lr, d, small))
    return u, v, tf.exp(z_x - l_x) + tf.zeros_like(d), tf.exp(z_r - l_r) + tf.zeros_like(d)


def softmax_grad(g, u, v, p_x, p_r):
    """grad_z = ½ g (u + v) − ½ (v Σ g p_x + u Σ g p_r)."""
    sx = tf.reduce_sum(g * p_x, axis=-1, keepdims=True)
    sr = tf.reduce_sum(g * p_r, axis=-1, keepdims=True)
    return 0.5 * g * (u + v) - 0.5 * (v * sx + u * sr)


def log_softmax_weights(z_x, z_r, eps: float = RESCALE_EPS):
    """w of spec.LogSoftmax: grad_z = g − (Σ g) w."""
    u, _, _, _ = softmax_coefficients(z_x, z_r, eps)
    l_x = tf.reduce_logsumexp(z_x, axis=-1, keepdims=True)
    l_r = tf.reduce_logsumexp(z_r, axis=-1, keepdims=True)
    dl = l_x - l_r
    small = tf.abs(dl) < eps
    factor = _safe_div(dl, -tf.math.expm1(l_r - l_x), small)
    return tf.where(small, u, u * factor)


def pair_multipliers(g2, a_x, a_r, b_x, b_r, eps: float | None = None):
    """(m_a, m_b) of spec.ShapleyPair for z = g2(a, b), in the broadcast output shape (``eps``: the spec's
    threshold for the operands' dtype)."""
    if eps is None:
        eps = pair_eps(a_x.dtype.size)
    gxx, grr = g2(a_x, b_x), g2(a_r, b_r)
    gxr, grx = g2(a_x, b_r), g2(a_r, b_x)
    ca = 0.5 * ((gxx - grx) + (gxr - grr))
    cb = 0.5 * ((gxx - gxr) + (grx - grr))
    da = (a_x - a_r) + tf.zeros_like(ca)
    db = (b_x - b_r) + tf.zeros_like(cb)
    sa, sb = small_delta(da, eps, a_x, a_r, gxx, grr), small_delta(db, eps, b_x, b_r, gxx, grr)
    m_a = tf.where(sa, tf.zeros_like(ca), _safe_div(ca, da, sa))
    m_b = tf.where(sb, tf.zeros_like(cb), _safe_div(cb, db, sb))
    return m_a, m_b


def div_pair_multipliers(a_x, a_r, b_x, b_r):
    """(m_a, m_b) of spec.ShapleyPair for z = a / b in closed form, in the broadcast output shape:
    m_a = ½(1/b_x + 1/b_r), m_b = −½(a_x + a_r)/(b_x·b_r) — the same split without differences of quotients
    divided by Δ (float32 loses their digits when Δa or Δb is small), and with no threshold."""
    zero = tf.zeros_like(a_x * b_r + a_r * b_x)
    m_a = 0.5 * (1 / b_x + 1 / b_r) + zero
    m_b = -0.5 * (a_x + a_r) / (b_x * b_r) + zero
    return m_a, m_b


MAXLIKE_EPS = MAXPOOL_EPS


def _rescale_apply(g, s_x, s_r, y_x, y_r, dfx):
    d = s_x - s_r
    small = small_delta(d, RESCALE_EPS, s_x, s_r, y_x, y_r)
    return g * tf.where(small, dfx, (y_x - y_r) / tf.where(small, tf.ones_like(d), d))


#: g · m of the rescale rule fused into one XLA loop (no (n, m, ...) temporaries); inputs broadcast
rescale_apply = tf.function(_rescale_apply, jit_compile=True, autograph=False, reduce_retracing=False)


def _divide_routed(routed, x, r):
    d = x - r
    small = small_delta(d, MAXPOOL_EPS, x, r)
    return tf.where(small, tf.zeros_like(routed), routed / tf.where(small, tf.ones_like(d), d))


#: the max-pool rule's final step, routed / Δx (0 where Δx is too small), fused: no (n, m, ...) temporaries
divide_routed = tf.function(_divide_routed, jit_compile=True, autograph=False, reduce_retracing=False)
