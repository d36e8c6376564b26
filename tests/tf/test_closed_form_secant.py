"""Rsqrt, Sqrt, Reciprocal, Square, Sigmoid and Tanh rescale multipliers in closed form: float32 keeps its
digits when x and r are close (the variance of a narrow LayerNorm, a gate whose input barely moves), where
(f(x) − f(r)) / (x − r) would lose them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepshap_opt.tf import DeepExplainer
from deepshap_opt.tf.deep import _CLOSED_FORM_SECANT
from deepshap_opt.rules.reference import rescale_multiplier

OPS = {"rsqrt": ("Rsqrt", keras.ops.rsqrt), "sqrt": ("Sqrt", keras.ops.sqrt),
       "reciprocal": ("Reciprocal", keras.ops.reciprocal), "square": ("Square", keras.ops.square),
       "sigmoid": ("Sigmoid", keras.ops.sigmoid), "tanh": ("Tanh", keras.ops.tanh)}


@pytest.mark.parametrize("op", sorted(OPS))
def test_secant_equals_reference(op):
    x, r = np.array([0.3, 2.0, 5.0]), np.array([0.7, 2.0 + 1e-3, 1.5])
    if op in ("sigmoid", "tanh"):          # defined everywhere: negative inputs and Δ = 0 too
        x, r = np.append(x, [-3.0, 0.0, -0.5, 40.0]), np.append(r, [-3.0 - 1e-3, 0.0, 0.5, -40.0])
    got = _CLOSED_FORM_SECANT[OPS[op][0]](tf.constant(x), tf.constant(r)).numpy()
    np.testing.assert_allclose(got, rescale_multiplier(op, x, r), rtol=1e-9)


def _model(f, dtype):
    inp = keras.Input((6,), dtype=dtype)
    return keras.Model(inp, keras.layers.Lambda(lambda x: keras.ops.sum(f(x), axis=-1, keepdims=True),
                                                dtype=dtype)(inp))


@pytest.mark.parametrize("op", sorted(OPS))
def test_float32_close_inputs_match_float64(op):
    rng = np.random.default_rng(0)
    # every explicand 1e-4 from every reference; the float64 run takes the float32-rounded values
    bg = (1 + 1e-4 * rng.standard_normal((4, 6))).astype(np.float32)
    X = (1 + 1e-4 * rng.standard_normal((2, 6))).astype(np.float32)
    f = OPS[op][1]
    exact = DeepExplainer(_model(f, "float64"), bg.astype(np.float64)).shap_values(X.astype(np.float64))
    phi = DeepExplainer(_model(f, "float32"), bg).shap_values(X, check_additivity=False)
    # the difference quotient in float32 is off by ~eps/1e-4 ≈ 1e-3 of the scale here
    assert np.abs(phi - exact).max() <= 1e-5 * np.abs(exact).max()
