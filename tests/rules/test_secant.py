"""rules.secant: the closed-form rescale multipliers equal the spec's quotient (the NumPy reference, float64)
and keep float32's digits where the quotient loses them."""

from types import SimpleNamespace

import numpy as np
import pytest

from deepshap_opt.rules.reference import rescale_multiplier
from deepshap_opt.rules.secant import closed_form_secants


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))        # no overflow warning for large |x|


NP = SimpleNamespace(sigmoid=_sigmoid, tanh=np.tanh, sqrt=np.sqrt, rsqrt=lambda x: 1 / np.sqrt(x),
                     where=np.where, ones_like=np.ones_like)
SECANTS = closed_form_secants(NP)
POSITIVE = ["rsqrt", "sqrt", "reciprocal"]     # defined for x, r > 0 here


def test_the_table_is_the_spec_s_closed_forms():
    assert sorted(SECANTS) == ["reciprocal", "rsqrt", "sigmoid", "sqrt", "square", "tanh"]


@pytest.mark.parametrize("op", sorted(SECANTS))
def test_equals_the_reference_quotient_in_float64(op):
    rng = np.random.default_rng(0)
    x, r = rng.uniform(0.2, 4, 200), rng.uniform(0.2, 4, 200)
    if op not in POSITIVE:
        x, r = x * rng.choice([-1, 1], 200), r * rng.choice([-1, 1], 200)
    x[:5] = r[:5] + np.array([1e-3, -1e-3, 1e-5, 0.0, 2e-6])   # close pairs, Δ = 0 (the reference's f'(x))
    np.testing.assert_allclose(SECANTS[op](x, r), rescale_multiplier(op, x, r), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("op", sorted(SECANTS))
def test_float32_keeps_its_digits_where_the_quotient_loses_them(op):
    x64 = np.array([0.6, 1.3, 2.2])
    r64 = x64 + 3e-5
    x32, r32 = x64.astype(np.float32), r64.astype(np.float32)
    exact = rescale_multiplier(op, x32.astype(np.float64), r32.astype(np.float64))
    closed = SECANTS[op](x32, r32).astype(np.float64)
    assert np.abs(closed / exact - 1).max() < 1e-5
    if op != "square":      # x + r has no difference to lose; the others' float32 quotient is ~1e-3 off
        f = {"rsqrt": lambda v: 1 / np.sqrt(v), "sqrt": np.sqrt, "reciprocal": lambda v: 1 / v,
             "sigmoid": _sigmoid, "tanh": np.tanh}[op]
        quotient = ((f(x32) - f(r32)) / (x32 - r32)).astype(np.float64)
        assert np.abs(quotient / exact - 1).max() > 1e-4
