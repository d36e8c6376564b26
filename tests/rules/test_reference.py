"""The NumPy references obey their own axioms: summation to delta, and f' where Δ is tiny."""

from __future__ import annotations

import numpy as np
import pytest

from deepshap_opt.rules import ELEMENTWISE_OPS, OPS, reference as R, rule_for

rng = np.random.default_rng(0)
POSITIVE = {"log", "sqrt", "rsqrt", "reciprocal", "log1p", "pow"}


@pytest.mark.parametrize("op", ELEMENTWISE_OPS)
def test_rescale_sums_to_delta(op):
    x, r = rng.normal(size=50), rng.normal(size=50)
    if op in POSITIVE:
        x, r = np.abs(x) + 0.5, np.abs(r) + 0.5
    f = R.ELEMENTWISE[op].f
    m = R.rescale_multiplier(op, x, r)
    np.testing.assert_allclose(m * (x - r), f(x) - f(r), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["relu", "silu", "tanh", "gelu", "softplus"])
def test_rescale_uses_derivative_where_delta_is_tiny(op):
    x = rng.normal(size=20)
    m = R.rescale_multiplier(op, x, x + 1e-9)
    np.testing.assert_allclose(m, R.ELEMENTWISE[op].df(x))


@pytest.mark.parametrize("op", ["silu", "gelu", "gelu_tanh", "mish", "elu", "softplus", "sigmoid", "erf"])
def test_derivatives_match_finite_differences(op):
    x, h = rng.normal(size=20), 1e-6
    fn = R.ELEMENTWISE[op]
    np.testing.assert_allclose(fn.df(x), (fn.f(x + h) - fn.f(x - h)) / (2 * h), rtol=1e-5, atol=1e-7)


def test_maxpool_sums_to_delta_with_overlapping_windows():
    x, r = rng.normal(size=(2, 5, 5)), rng.normal(size=(2, 5, 5))
    g = np.ones((2, 2, 2))
    m = R.maxpool_backward(x, r, g, kernel=3, stride=2)

    def pool(a):
        return np.array([[[a[c, i * 2:i * 2 + 3, j * 2:j * 2 + 3].max() for j in range(2)] for i in range(2)]
                         for c in range(2)])

    np.testing.assert_allclose((m * (x - r)).sum(), (pool(x) - pool(r)).sum(), rtol=1e-12)


@pytest.mark.parametrize("g2", [np.multiply, np.divide, np.maximum, np.minimum, lambda a, b: np.abs(a) ** b])
def test_shapley_pair_sums_to_delta(g2):
    a_x, a_r = rng.uniform(0.5, 2, 30), rng.uniform(0.5, 2, 30)
    b_x, b_r = rng.uniform(0.5, 2, 30), rng.uniform(0.5, 2, 30)
    m_a, m_b = R.shapley_pair_multipliers(g2, a_x, a_r, b_x, b_r)
    np.testing.assert_allclose(m_a * (a_x - a_r) + m_b * (b_x - b_r), g2(a_x, b_x) - g2(a_r, b_r), rtol=1e-10)


def test_product_multiplier_is_the_operand_mean():
    a_x, a_r, b_x, b_r = rng.normal(size=(4, 10))
    m_a, m_b = R.shapley_pair_multipliers(np.multiply, a_x, a_r, b_x, b_r)
    np.testing.assert_allclose(m_a, 0.5 * (b_x + b_r))
    np.testing.assert_allclose(m_b, 0.5 * (a_x + a_r))


def test_bilinear_matmul_sums_to_delta():
    a_x, a_r, b_x, b_r = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    g = np.zeros((3, 2))
    g[1, 0] = 1
    ga, gb = R.bilinear_backward(g, a_x, a_r, b_x, b_r)
    total = (ga * (a_x - a_r)).sum() + (gb * (b_x - b_r)).sum()
    np.testing.assert_allclose(total, (a_x @ b_x - a_r @ b_r)[1, 0])


def test_softmax_and_log_softmax_sum_to_delta():
    z, zr = rng.normal(size=6) * 3, rng.normal(size=6) * 3
    sm = lambda v: np.exp(v) / np.exp(v).sum()   # noqa: E731
    ls = lambda v: v - np.log(np.exp(v).sum())    # noqa: E731
    for j in range(6):
        g = np.eye(6)[j]
        assert np.isclose(R.softmax_backward(z, zr, g) @ (z - zr), sm(z)[j] - sm(zr)[j])
        assert np.isclose(R.log_softmax_backward(z, zr, g) @ (z - zr), ls(z)[j] - ls(zr)[j])


def test_layer_norm_decomposition_sums_to_delta():
    x, r = rng.normal(size=7), rng.normal(size=7)
    ln = lambda v: (v - v.mean()) / np.sqrt(v.var() + 1e-5)   # noqa: E731
    np.testing.assert_allclose(R.layer_norm_attribution(x, r).sum(1), ln(x) - ln(r), rtol=1e-10)


def test_table_names_a_rule_for_every_elementwise_op():
    assert all(rule_for(op).name == "rescale" for op in ELEMENTWISE_OPS)
    assert set(ELEMENTWISE_OPS) <= set(R.ELEMENTWISE)
    assert rule_for("no_such_op") is None
    assert {r.name for r in OPS.values()} == {"linear", "rescale", "maxpool", "bilinear", "shapley_pair", "softmax",
                                             "log_softmax", "normalization"}


def test_docs_rule_table_is_generated_from_the_spec():
    from pathlib import Path

    from deepshap_opt.rules.__main__ import markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
    assert doc.read_text() == markdown(), "docs/rules.md is stale: python -m deepshap_opt.rules > docs/rules.md"
