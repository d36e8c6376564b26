"""The operator-rule specification: which op gets which DeepLIFT rule, and each rule's math.

Every backend (torch, tf, onnx) maps its native ops to the canonical op names of :data:`OPS` and
implements the rule named there; ``deepshap_opt.rules.reference`` holds a NumPy reference of each rule
that every backend is tested against. Notation: ``x`` is the explicand's value at an op, ``r`` the
reference's, ``Δ = x − r``; a *multiplier* ``m`` replaces the local derivative in the backward pass, so
that ``m · Δin = Δout`` ("summation to delta") and completeness follows by the chain rule.
"""

from __future__ import annotations

from dataclasses import dataclass

#: |Δx| below which the rescale rule falls back to the explicand's derivative f'(x) (shap 0.51's value).
RESCALE_EPS = 1e-6
#: |Δx| below which the max-pool and two-operand multipliers are 0 (shap 0.51's value).
MAXPOOL_EPS = 1e-7
PAIR_EPS = 1e-7
#: the two-operand threshold in float64, whose rounding is 2^29 times finer: with 1e-7 the dropped shares
#: break float64 completeness at ~1e-6 of the output scale (found by the property tests)
PAIR_EPS_FLOAT64 = 1e-14


def pair_eps(itemsize: int) -> float:
    """The ShapleyPair threshold for a floating dtype of ``itemsize`` bytes (float64: PAIR_EPS_FLOAT64)."""
    return PAIR_EPS_FLOAT64 if itemsize >= 8 else PAIR_EPS


@dataclass(frozen=True)
class Rule:
    """Base class: a rule is data (its name and threshold); backends implement it."""

    name = "rule"
    eps: float = 0.0


@dataclass(frozen=True)
class Linear(Rule):
    """Linear / passthrough: m = the ordinary Jacobian transpose (conv, matmul by a constant, add, reshape...).

    A linear map satisfies Δy = J·Δx exactly, so no activations are needed: the backward pass is the
    ordinary VJP and nothing is cached for these ops.
    """

    name = "linear"


@dataclass(frozen=True)
class Rescale(Rule):
    """Rescale rule for an element-wise y = f(x) (DeepLIFT, Shrikumar et al. 2017, §3.5.1).

    m = (f(x) − f(r)) / (x − r);  where |x − r| < eps: m = f'(x).
    Some are written without the difference (exact, no eps; float32 keeps its digits when x ≈ r, e.g. a
    narrow LayerNorm's variance, a gate whose input barely moves): rsqrt −1/(√x√r(√x + √r)), sqrt
    1/(√x + √r), reciprocal −1/(xr), square x + r; with Δ = x − r and t(h) = tanh(h)/h (1 at 0),
    sigmoid ½·t(Δ/2)·(σ(x)σ(−r) + σ(−x)σ(r)), tanh 2·t(Δ)·(σ(2x)σ(−2r) + σ(−2x)σ(2r)).
    """

    name = "rescale"
    eps: float = RESCALE_EPS


@dataclass(frozen=True)
class MaxPool(Rule):
    """Max-pool, shap's cross-max split (Lundberg & Lee 2017; shap ``maxpool``).

    Per output window: c = max(y_x, y_r). Route g·(c − y_r) to the explicand's argmax and g·(y_x − c) to
    the reference's argmax, each through the ordinary max-pool backward (a scatter-*add*, so overlapping
    windows sum — shap's max_unpool overwrites there), add the two, and divide by Δx; 0 where |Δx| < eps.
    The routed amounts sum to g·(y_x − y_r), so summation to delta holds per window.
    """

    name = "maxpool"
    eps: float = MAXPOOL_EPS


@dataclass(frozen=True)
class ShapleyPair(Rule):
    """Two varying operands z = g(a, b): the exact two-player Shapley split (Ancona et al. 2018; shap TF).

    m_a = ½[(g(a_x,b_x) − g(a_r,b_x)) + (g(a_x,b_r) − g(a_r,b_r))] / Δa, symmetric for b; 0 where |Δ| < eps
    (eps = PAIR_EPS, in float64 PAIR_EPS_FLOAT64: see :func:`pair_eps`).
    m_a·Δa + m_b·Δb = g(a_x,b_x) − g(a_r,b_r). Broadcast operands: sum the contribution over the
    broadcast axes. Division a / b in closed form (exact, no eps; float32 keeps its digits when Δ is small):
    m_a = ½(1/b_x + 1/b_r), m_b = −½(a_x + a_r)/(b_x·b_r).
    """

    name = "shapley_pair"
    eps: float = PAIR_EPS


@dataclass(frozen=True)
class Bilinear(Rule):
    """ShapleyPair for a bilinear g (product, matmul, bmm, einsum): m_a = ½(b_x + b_r) exactly.

    So the backward is the ordinary VJP of g evaluated at the operand means: grad_a = VJP_a(g)(b̄),
    grad_b = VJP_b(g)(ā) with ā = ½(a_x + a_r), b̄ = ½(b_x + b_r). No division, no threshold.
    """

    name = "bilinear"


@dataclass(frozen=True)
class Softmax(Rule):
    """Softmax along an axis, decomposed exactly: e = exp(z) (rescale), s = Σe (linear), y = e/s (ShapleyPair).

    Fused and computed stably with L = logsumexp(z), p = softmax(z):
      u_j = (exp(z_x,j − L_x) − exp(z_r,j − L_x)) / Δz_j     (= m_exp_j / s_x;  p_x,j where |Δz_j| < eps)
      v_j = (exp(z_x,j − L_r) − exp(z_r,j − L_r)) / Δz_j     (= m_exp_j / s_r;  exp(z_x,j − L_r) likewise)
      grad_z_j = ½ g_j (u_j + v_j) − ½ (v_j Σ_i g_i p_x,i + u_j Σ_i g_i p_r,i).
    With x = r this is the ordinary softmax VJP. (shap's torch backend treats softmax as element-wise,
    which breaks completeness.)
    """

    name = "softmax"
    eps: float = RESCALE_EPS


@dataclass(frozen=True)
class LogSoftmax(Rule):
    """Log-softmax, decomposed exactly: y = z − log(s), s = Σ exp(z) (rescale on exp, linear sum, rescale on log).

      grad_z_j = g_j − (Σ_i g_i) · w_j,  w_j = m_log · m_exp_j
               = (L_x − L_r) · u_j / (1 − exp(L_r − L_x))      (u_j as in :class:`Softmax`)
               = u_j                                           where |L_x − L_r| < eps (m_log = 1/s_x).
    """

    name = "log_softmax"
    eps: float = RESCALE_EPS


@dataclass(frozen=True)
class Normalization(Rule):
    """LayerNorm / GroupNorm / InstanceNorm / RMSNorm, decomposed into rules that each hold exactly:

      μ = mean(x) (linear), c = x − μ (linear), v = mean(c²) (rescale on square, linear mean),
      s = rsqrt(v + ε) (rescale), n = c · s (Bilinear: two varying operands), y = n·γ + β (linear).
    RMSNorm skips μ. Backends rewrite the op into these primitives; nothing else is special.
    """

    name = "normalization"


LINEAR, RESCALE, MAXPOOL = Linear(), Rescale(), MaxPool()
PAIR, BILINEAR = ShapleyPair(), Bilinear()
SOFTMAX, LOG_SOFTMAX, NORMALIZATION = Softmax(), LogSoftmax(), Normalization()

#: Element-wise functions that take the rescale rule; their NumPy f and f' live in ``reference.ELEMENTWISE``.
ELEMENTWISE_OPS = (
    "relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "gelu_tanh", "silu", "mish",
    "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "logsigmoid",
    "exp", "log", "sqrt", "rsqrt", "reciprocal", "square", "pow", "abs", "erf", "clip", "sin", "cos",
    "log1p", "expm1", "thresholded_relu",
)

#: The rule table, op → rule (the one screen to read). Ops absent here have no rule: an
#: ``UnsupportedOperatorError`` naming the op and where it sits, never a silent plain gradient.
OPS: dict[str, Rule] = {
    # linear in the varying input: the ordinary gradient
    **dict.fromkeys((
        "conv", "conv_transpose", "linear", "matmul_const", "batch_norm_eval", "avg_pool", "adaptive_avg_pool",
        "global_avg_pool", "upsample", "pad", "reshape", "flatten", "transpose", "squeeze", "unsqueeze",
        "concat", "stack", "split", "slice", "gather", "scatter", "expand", "tile", "identity", "dropout",
        "cast", "add", "sub", "neg", "sum", "mean", "mul_const", "div_const", "embedding_output",
        "pixel_shuffle", "roll", "flip", "cumsum", "trace_const", "where_const", "select", "copy",
    ), LINEAR),
    **dict.fromkeys(ELEMENTWISE_OPS, RESCALE),
    **dict.fromkeys(("max_pool", "adaptive_max_pool", "global_max_pool", "reduce_max", "reduce_min"), MAXPOOL),
    **dict.fromkeys(("mul", "matmul", "bmm", "einsum"), BILINEAR),
    **dict.fromkeys(("div", "pow_pair", "maximum", "minimum"), PAIR),
    "softmax": SOFTMAX,
    "log_softmax": LOG_SOFTMAX,
    **dict.fromkeys(("layer_norm", "group_norm", "instance_norm", "rms_norm"), NORMALIZATION),
}


def rule_for(op: str) -> Rule | None:
    """The rule for canonical op name ``op``, or None when the op has none."""
    return OPS.get(op)
