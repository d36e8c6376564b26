"""Rescale multipliers in closed form (power functions, sigmoid, tanh): float32 keeps its digits when x and r
are close (the variance of a narrow LayerNorm, a gate whose input barely moves), where (f(x) − f(r)) / (x − r)
would lose them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepshap_opt.rules.reference import rescale_multiplier  # noqa: E402
from deepshap_opt.torch import DeepExplainer  # noqa: E402
from deepshap_opt.torch._functions import CLOSED_FORM_SECANT  # noqa: E402


class Elementwise(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x).sum(-1, keepdim=True)


FUNCS = {"rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "reciprocal": torch.reciprocal, "square": torch.square,
         "rsqrt_method": lambda x: x.rsqrt(), "square_method": lambda x: x.square(),
         "sigmoid": torch.sigmoid, "tanh": torch.tanh, "sigmoid_module": torch.nn.Sigmoid(),
         "tanh_method": lambda x: x.tanh()}


@pytest.mark.parametrize("op", sorted(CLOSED_FORM_SECANT))
def test_secant_equals_reference(op):
    x, r = np.array([0.3, 2.0, 5.0]), np.array([0.7, 2.0 + 1e-3, 1.5])
    if op in ("sigmoid", "tanh"):          # defined everywhere: negative inputs and Δ = 0 too
        x, r = np.append(x, [-3.0, 0.0, -0.5]), np.append(r, [-3.0 - 1e-3, 0.0, 0.5])
    got = CLOSED_FORM_SECANT[op](torch.tensor(x), torch.tensor(r)).numpy()
    np.testing.assert_allclose(got, rescale_multiplier(op, x, r), rtol=1e-9)


@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_bounded_secants_have_no_overflow_or_division_by_zero(op):
    # Δ = 0 gives f'(x); saturated and far-apart inputs give the quotient, with no inf or NaN (where both
    # saturate, the float64 quotient of the reference is itself 0 or noise: absolute tolerance)
    x = torch.tensor([0.0, 1e-30, 40.0, -40.0, 100.0, -100.0, 88.0], dtype=torch.float32)
    r = torch.tensor([0.0, 0.0, 40.0, 40.0, -100.0, 90.0, 88.0], dtype=torch.float32)
    got = CLOSED_FORM_SECANT[op](x, r).double().numpy()
    want = rescale_multiplier(op, x.double().numpy(), r.double().numpy())
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_float32_close_inputs_match_float64(name):
    torch.manual_seed(0)
    # every explicand 1e-4 from every reference (float32 rounding of the inputs is not the error measured:
    # the float64 run takes the float32-rounded values)
    bg = (1 + 1e-4 * torch.randn(4, 6, dtype=torch.float64)).float().double()
    X = (1 + 1e-4 * torch.randn(2, 6, dtype=torch.float64)).float().double()
    model = Elementwise(FUNCS[name])
    exact = DeepExplainer(model, bg).shap_values(X)
    phi = DeepExplainer(model, bg.float()).shap_values(X.float(), check_additivity=False)
    scale = np.abs(exact).max()
    # the difference quotient in float32 is off by ~eps/1e-4 ≈ 1e-3 of the scale here
    assert np.abs(phi - exact).max() <= 1e-5 * scale
