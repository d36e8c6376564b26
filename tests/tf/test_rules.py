"""The TF rule implementations (deepshap_opt.tf._rules) against the NumPy references of the spec."""

import numpy as np
import pytest
import tensorflow as tf

from deepshap_opt.rules import reference
from deepshap_opt.tf import _rules

TF_FUNCS = {"relu": tf.nn.relu, "relu6": tf.nn.relu6, "elu": tf.nn.elu, "selu": tf.nn.selu, "sigmoid": tf.sigmoid,
            "tanh": tf.tanh, "softplus": tf.nn.softplus, "softsign": tf.nn.softsign, "silu": tf.nn.silu,
            "gelu": lambda x: tf.nn.gelu(x, approximate=False), "exp": tf.exp, "square": tf.square,
            "leaky_relu": lambda x: tf.nn.leaky_relu(x, 0.01)}


def _pairs(shape=(3, 5, 4)):
    rng = np.random.default_rng(0)
    x, r = rng.normal(size=shape[:1] + shape[2:]), rng.normal(size=shape[1:])
    x[0, 0] = r[0, 0]                          # a zero difference: the f'(x) fallback
    return x, r


@pytest.mark.parametrize("name", sorted(TF_FUNCS))
def test_rescale_matches_reference(name):
    x, r = _pairs()
    f = TF_FUNCS[name]
    xt, rt = tf.constant(x), tf.constant(r)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yx = f(xt)
    dfx = tape.gradient(yx, xt)
    got = _rules.rescale_multiplier(xt[:, None], rt[None], yx[:, None], f(rt)[None], dfx[:, None]).numpy()
    want = reference.rescale_multiplier(name, x[:, None], r[None])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    g = np.random.default_rng(1).normal(size=got.shape)
    fused = _rules.rescale_apply(tf.constant(g), xt[:, None], rt[None], yx[:, None], f(rt)[None], dfx[:, None])
    np.testing.assert_allclose(fused.numpy(), g * want, rtol=1e-6, atol=1e-9)


def test_softmax_and_log_softmax_match_reference():
    rng = np.random.default_rng(2)
    zx, zr, g = rng.normal(size=(2, 6)), rng.normal(size=(3, 6)), rng.normal(size=(2, 3, 6))
    # (the reference divides by Δz with no threshold, so equal logits are left out here)
    u, v, px, pr = _rules.softmax_coefficients(tf.constant(zx)[:, None], tf.constant(zr)[None])
    got = _rules.softmax_grad(tf.constant(g), u, v, px, pr).numpy()
    w = _rules.log_softmax_weights(tf.constant(zx)[:, None], tf.constant(zr)[None]).numpy()
    got_log = g - g.sum(-1, keepdims=True) * w
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], reference.softmax_backward(zx[i], zr[j], g[i, j]), rtol=1e-6,
                                       atol=1e-9)
            np.testing.assert_allclose(got_log[i, j], reference.log_softmax_backward(zx[i], zr[j], g[i, j]),
                                       rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("op", ["div", "maximum", "pow"])
def test_pair_matches_reference(op):
    rng = np.random.default_rng(3)
    f = {"div": (tf.math.divide, np.divide), "maximum": (tf.maximum, np.maximum),
         "pow": (tf.pow, np.power)}[op]
    ax, ar = rng.uniform(0.5, 2, size=(2, 1, 4)), rng.uniform(0.5, 2, size=(1, 3, 4))
    bx, br = rng.uniform(0.5, 2, size=(2, 1, 4)), rng.uniform(0.5, 2, size=(1, 3, 4))
    ma, mb = _rules.pair_multipliers(f[0], *(tf.constant(v) for v in (ax, ar, bx, br)))
    ra, rb = reference.shapley_pair_multipliers(f[1], ax, ar, bx, br)
    np.testing.assert_allclose(ma.numpy(), ra, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mb.numpy(), rb, rtol=1e-6, atol=1e-9)


def test_maxpool_and_layer_norm_rules_through_the_explainer():
    """The max-pool rule (cross-max routing) and the normalization decomposition against the references."""
    import keras
    from keras import layers as L

    from deepshap_opt.tf import DeepExplainer

    rng = np.random.default_rng(4)
    # max-pool of the input, summed: φ = maxpool rule multiplier × Δx (reference.maxpool_backward, g = 1)
    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, L.Lambda(lambda t: tf.reduce_sum(t, axis=[1, 2]))(L.MaxPooling2D(2)(inp)))
    bg, X = rng.normal(size=(3, 4, 4, 1)).astype("float32"), rng.normal(size=(2, 4, 4, 1)).astype("float32")
    sv = DeepExplainer(model, bg).shap_values(X)[..., 0, 0]
    for i in range(2):
        want = np.mean([reference.maxpool_backward(X[i, None, :, :, 0], bg[j, None, :, :, 0], np.ones((1, 2, 2)), 2)[0]
                        * (X[i, :, :, 0] - bg[j, :, :, 0]) for j in range(3)], axis=0)
        np.testing.assert_allclose(sv[i], want, rtol=1e-5, atol=1e-6)
    # layer norm (no affine) of a 5-vector, each output seeded: reference.layer_norm_attribution
    inp = keras.Input((5,))
    model = keras.Model(inp, L.LayerNormalization(center=False, scale=False, epsilon=1e-3)(inp))
    bg, X = rng.normal(size=(1, 5)).astype("float32"), rng.normal(size=(1, 5)).astype("float32")
    sv = DeepExplainer(model, bg).shap_values(X)[0]                        # (5 in, 5 out)
    phi = reference.layer_norm_attribution(X[0].astype(np.float64), bg[0].astype(np.float64), eps=1e-3)
    np.testing.assert_allclose(sv.sum(0), phi.sum(1), rtol=1e-4, atol=1e-5)  # per output: completeness


@pytest.mark.parametrize("name,secant", [("relu", True), ("relu6", True), ("tanh", True), ("silu", True),
                                          ("leaky_relu", True), ("sigmoid", False), ("softplus", False)])
def test_thresholds_shrink_with_values_below_one(name, secant):
    """Activations of 1e-9 (untrained deep nets) keep their exact secant (m·Δs = Δy), not the f'(x) fallback;
    where f stays near 1 (sigmoid, softplus near 0) the spec's threshold and its fallback stay."""
    x, r = _pairs()
    x, r = x * 1e-9, r * 1e-9
    f = TF_FUNCS.get(name, tf.nn.softplus)
    xt, rt = tf.constant(x)[:, None], tf.constant(r)[None]
    yx, yr = f(xt), f(rt)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = f(xt)
    dfx = tape.gradient(y, xt)
    got = _rules.rescale_multiplier(xt, rt, yx, yr, dfx).numpy()
    eps = 1e-6 * 1e-9 if secant else 1e-6                          # the spec's eps, rescaled to the values
    np.testing.assert_allclose(got, reference.rescale_multiplier(name, x[:, None], r[None], eps=eps), rtol=1e-6,
                               atol=1e-9)
    d, dy = (xt - rt).numpy(), (yx - yr).numpy()
    if secant:
        np.testing.assert_allclose((got * d)[d != 0], dy[d != 0], rtol=1e-9, atol=0)
    assert got[0, 0, 0] == dfx.numpy()[0, 0, 0]                 # Δs = 0 exactly: f'(x)
    # values of magnitude >= 1 keep the spec's absolute threshold: |Δs| = 5e-7 falls back to f'(x)
    a, b = tf.constant([[2.0]], tf.float64), tf.constant([[2.0 - 5e-7]], tf.float64)
    big = _rules.rescale_multiplier(a, b, f(a), f(b), tf.constant([[123.0]], tf.float64))
    assert big.numpy().item() == 123.0


def test_maxpool_division_keeps_tiny_differences():
    x = tf.constant([[[3e-10, 0.0]]], tf.float64)
    r = tf.constant([[[1e-10, 0.0]]], tf.float64)
    routed = tf.constant([[[4e-10, 5.0]]], tf.float64)
    np.testing.assert_allclose(_rules.divide_routed(routed, x, r).numpy(), [[[2.0, 0.0]]], rtol=1e-12)
    got = _rules.divide_routed(tf.constant([[[1.0]]], tf.float64), tf.constant([[[3.0]]], tf.float64),
                               tf.constant([[[3.0 - 5e-8]]], tf.float64))
    assert got.numpy().item() == 0.0                            # |Δx| < 1e-7 at magnitude 3: the spec's 0


@pytest.mark.parametrize("affine", [False, True])
def test_normalization_centring_is_cancellation_free_in_float32(affine):
    """Keras normalizes as x·inv + (β − μ·inv) with (x − μ)² as a SquaredDifference; the backend rewrites that
    into the spec's decomposition, (x − μ)·inv with a rescale on (x − μ)² (c = x − μ computed once). With a
    reference whose 2 features are almost equal (3.0 and 3.013: variance 4e-5, inv ≈ 150) Keras' own form was
    2e-4 of the output scale from the float64 reference values of the decomposition in float32 (the pair rule
    on (x, μ) and the two bilinear terms cancelling); the rewritten form is within 2e-5 (measured 8e-6
    without and 1.1e-5 with γ, β)."""
    import keras
    from keras import layers as L

    from deepshap_opt.tf import DeepExplainer

    bg = np.array([[3.0, 3.0 + 1.3e-2]], np.float32)
    X = np.array([[-0.4, 1.1], [0.3, 0.25]], np.float32)
    ln = L.LayerNormalization(epsilon=1e-5, center=affine, scale=affine)
    inp = keras.Input((2,))
    model = keras.Model(inp, ln(inp))
    gamma, beta = np.array([1.5, -0.5], np.float32), np.array([0.2, 0.1], np.float32)
    if affine:
        ln.set_weights([gamma, beta])
    e = DeepExplainer(model, bg)
    assert e.prog.rewritten == 2                        # the centred product and the centred square
    sv = e.shap_values(X)                               # (2 explicands, 2 in, 2 out)
    for i in range(2):
        want = reference.layer_norm_attribution(X[i], bg[0], eps=1e-5)       # (out, in), no affine
        if affine:
            want = want * gamma[:, None]
        scale = np.abs(want.sum(1)).max()
        assert np.abs(sv[i].T - want).max() <= 2e-5 * max(scale, 1.0)
