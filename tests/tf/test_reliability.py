"""Hostile inputs and state safety of deepshap_opt.tf.DeepExplainer (the TF rows of docs/reliability.md)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import deepshap_opt
from deepshap_opt.rules import reference
from deepshap_opt.tf import DeepExplainer

from .._concurrency import run_in_threads

RNG = np.random.default_rng(0)
BG = RNG.normal(size=(8, 4)).astype("float32")
X = RNG.normal(size=(3, 4)).astype("float32")


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), L.Dense(6, activation="relu"), L.Dropout(0.3),
                             L.BatchNormalization(), L.Dense(3)])


@pytest.fixture(scope="module")
def model():
    return mlp()


@pytest.fixture(scope="module")
def explainer(model):
    return DeepExplainer(model, BG)


def _target(model, x, bg):
    return model(x, training=False).numpy() - model(bg, training=False).numpy().mean(0)


# -- (model, layer) with a layer of several inputs ---------------------------------------------------------
def _merge_model(kind):
    keras.utils.set_random_seed(11)
    inp = keras.Input((5,))
    a = L.Dense(4, activation="relu")(inp)
    b = L.Dense(4 if kind != "concat" else 3, activation="tanh")(inp)
    merge = {"add": L.Add(name="merge"), "concat": L.Concatenate(name="merge"),
             "multiply": L.Multiply(name="merge")}[kind]
    h = merge([a, b])
    return keras.Model(inp, L.Dense(3)(L.Activation("relu")(h))), merge


@pytest.mark.parametrize("kind", ["add", "concat", "multiply"])
def test_layer_with_several_inputs_gives_one_array_per_input(kind):
    model, merge = _merge_model(kind)
    rng = np.random.default_rng(12)
    bg, x = rng.normal(size=(6, 5)).astype("float32"), rng.normal(size=(2, 5)).astype("float32")
    e = DeepExplainer((model, merge), bg)
    sv = e.shap_values(x)
    widths = [4, 3] if kind == "concat" else [4, 4]
    assert isinstance(sv, list) and [s.shape for s in sv] == [(2, w, 3) for w in widths]
    total = sum(s.sum(axis=1) for s in sv)
    np.testing.assert_allclose(total, _target(model, x, bg), rtol=1e-5, atol=1e-5)
    assert all(np.abs(s).max() > 1e-3 for s in sv)          # both inputs get attributions
    v, idx = e.shap_values(x, ranked_outputs=1)
    assert isinstance(v, list) and [s.shape for s in v] == [(2, w, 1) for w in widths] and idx.shape == (2, 1)
    np.testing.assert_allclose(v[0][..., 0], np.take_along_axis(sv[0], idx[:, None, :], 2)[..., 0], rtol=1e-6)
    ex = e(x)
    assert isinstance(ex, list) and len(ex) == 2 and ex[1].values.shape == (2, widths[1], 3)
    assert ex[0].data.shape == (2, widths[0])                   # the layer's input values, not X
    if kind == "add":         # relu(a + b) then Dense: φ_a = mean_r W · m(s_x, s_r) · (a_x − a_r), m the ReLU rescale
        split = keras.Model(model.inputs[0], merge.input)
        (ax, bx), (ar, br) = ([t.numpy().astype(np.float64) for t in split(v)] for v in (x, bg))
        W = model.layers[-1].kernel.numpy().astype(np.float64)
        sx, sr = (ax + bx)[:, None], (ar + br)[None]
        m = reference.rescale_multiplier("relu", np.broadcast_to(sx, (2, 6, 4)), np.broadcast_to(sr, (2, 6, 4)))
        for phi, (dx, dr) in zip(sv, ((ax, ar), (bx, br))):
            expect = np.einsum("nri,ik->nik", m * (dx[:, None] - dr[None]), W) / 6
            np.testing.assert_allclose(phi, expect, rtol=1e-4, atol=1e-6)


def test_layer_with_several_arguments_multi_head_attention():
    """MultiHeadAttention(query, value): one array per argument, completeness over both."""
    keras.utils.set_random_seed(13)
    i = keras.Input((4, 6))
    q, v = L.Dense(6)(i), L.Dense(6, activation="tanh")(i)
    mha = L.MultiHeadAttention(2, 3)
    model = keras.Model(i, L.Dense(2)(L.Flatten()(mha(q, v))))
    rng = np.random.default_rng(13)
    bg, x = rng.normal(size=(5, 4, 6)).astype("float32"), rng.normal(size=(2, 4, 6)).astype("float32")
    sv = DeepExplainer((model, mha), bg).shap_values(x)
    assert isinstance(sv, list) and [s.shape for s in sv] == [(2, 4, 6, 2)] * 2
    assert all(np.abs(s).max() > 1e-3 for s in sv)
    total = sum(s.reshape(2, -1, 2).sum(1) for s in sv)
    np.testing.assert_allclose(total, _target(model, x, bg), rtol=1e-5, atol=1e-5)


# -- bad inputs: a clear error --------------------------------------------------------------------------
@pytest.mark.parametrize("bad,exc,match", [
    (RNG.normal(size=(3, 5)).astype("float32"), ValueError, r"X has rows of shape \(5,\), the background has \(4,\)"),
    (RNG.normal(size=(3, 4, 1)).astype("float32"), ValueError, "rows of shape"),
    (X[0], ValueError, r"X has shape \(4,\): pass a batch \(N, 4\)"),
    (np.float32(1.0), ValueError, "X must have a batch axis, got a scalar"),
    (np.full((3, 4), np.nan, "float32"), ValueError, "X contains NaN or Inf"),
    (np.array([[0, np.inf, 0, 0]], "float32"), ValueError, "X contains NaN or Inf"),
    (np.full((2, 4), 1e300), ValueError, "X contains NaN or Inf after conversion to float32"),
    (np.zeros((3, 4), np.int64), TypeError, "X has dtype int64 but the model input is float32: only floating-point"),
    (np.zeros((3, 4), bool), TypeError, "only floating-point"),
    (np.zeros((3, 4), np.complex64), TypeError, "complex"),
    (np.array([["a"] * 4] * 2), TypeError, "X must hold numbers"),
    ([X, X], ValueError, "this model has one input: pass X as one array, not a list of 2 arrays"),
])
def test_bad_explicands(explainer, bad, exc, match):
    with pytest.raises(exc, match=match):
        explainer.shap_values(bad)


@pytest.mark.parametrize("bad,exc,match", [
    (BG[:0], ValueError, r"the background \(data\) is empty"),
    (np.float32(0), ValueError, "data must have a batch axis"),
    (np.where(np.arange(32).reshape(8, 4) == 5, np.nan, BG).astype("float32"), ValueError, "data contains NaN or Inf"),
    (np.zeros((8, 4), np.int32), TypeError, "data has dtype int32 but the model input is float32"),
    ([], ValueError, "data is an empty list"),
    (RNG.normal(size=(8, 5)).astype("float32"), ValueError, "cannot be called on inputs of shape"),
])
def test_bad_background(model, bad, exc, match):
    with pytest.raises(exc, match=match):
        DeepExplainer(model, bad)


def test_bad_arguments(model, explainer):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DeepExplainer(model, BG, batch_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        DeepExplainer(model, BG, memory_budget=0)
    with pytest.raises(ValueError, match="ranked_outputs"):
        explainer.shap_values(X, ranked_outputs=0)
    with pytest.raises(ValueError, match="output_rank_order"):
        explainer.shap_values(X, ranked_outputs=1, output_rank_order="best")
    with pytest.raises(TypeError, match="model must be a Keras model"):
        DeepExplainer([1, 2], BG)
    with pytest.raises(ValueError, match="is not a layer of model"):
        DeepExplainer((model, L.Dense(2)), BG)
    with pytest.raises(TypeError, match="must be a keras Layer"):
        DeepExplainer((model, "dense"), BG)


def test_multi_input_model_bad_lists():
    keras.utils.set_random_seed(3)
    a, b = keras.Input((3,)), keras.Input((2,))
    model = keras.Model([a, b], L.Dense(2)(L.Concatenate()([a, L.Dense(2, activation="relu")(b)])))
    bg = [np.zeros((4, 3), "float32"), np.ones((4, 2), "float32")]
    with pytest.raises(ValueError, match="same number of rows"):
        DeepExplainer(model, [bg[0], bg[1][:2]])
    e = DeepExplainer(model, bg)
    with pytest.raises(ValueError, match="this model has 2 inputs: pass X as a list of 2 arrays"):
        e.shap_values(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="different numbers of rows"):
        e.shap_values([np.zeros((2, 3), "float32"), np.zeros((3, 2), "float32")])
    with pytest.raises(ValueError, match=r"X\[1\] has rows of shape \(3,\)"):
        e.shap_values([np.zeros((2, 3), "float32"), np.zeros((2, 3), "float32")])


class TupleOut(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = L.Dense(2)

    def call(self, x):
        return self.d(x), self.d(x) * 2


class DictOut(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = L.Dense(2)

    def call(self, x):
        return {"a": self.d(x), "b": tf.nn.relu(self.d(x))}


class Cube(keras.Model):
    def call(self, x):
        return tf.reshape(x, (-1, 2, 2))


class BatchMean(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = L.Dense(2)

    def call(self, x):
        return self.d(x - tf.reduce_mean(x, 0, keepdims=True))      # mixes the rows of the batch


def test_model_that_mixes_the_batch_is_refused():
    with pytest.raises(ValueError,
                       match=r"op batch_mean.*/Mean \(Mean\) gives shape \(1, 4\) from the batch: it mixes"):
        DeepExplainer(BatchMean(), BG)


def test_model_output_must_be_one_tensor_n_by_k():
    with pytest.raises(TypeError, match="the model returned a tuple of 2 values; DeepExplainer needs a single tensor"):
        DeepExplainer(TupleOut(), BG)
    with pytest.raises(TypeError, match="returned a dict of 2 values"):
        DeepExplainer(DictOut(), BG)
    with pytest.raises(ValueError, match=r"must be \(batch, outputs\) or \(batch,\), got shape \(None, 2, 2\)"):
        DeepExplainer(Cube(), BG)
    i = keras.Input((4,))
    two = keras.Model(i, [L.Dense(2)(i), L.Dense(3)(i)])
    with pytest.raises(TypeError, match="returned a list of 2 values"):
        DeepExplainer(two, BG)
    with pytest.raises(TypeError, match=r"2 output tensors given; DeepExplainer explains one output tensor"):
        DeepExplainer((two.inputs, two.outputs), BG)
    assert DeepExplainer((two.inputs, two.outputs[1]), BG).shap_values(X).shape == (3, 4, 3)


class RandomInside(keras.Model):
    def __init__(self):
        super().__init__()
        self.d, self.drop, self.o = L.Dense(4), L.Dropout(0.5, name="always_drop"), L.Dense(2)

    def call(self, x):
        return self.o(self.drop(self.d(x), training=True))


class CumProd(keras.Model):
    def __init__(self):
        super().__init__()
        self.d, self.o = L.Dense(4, name="proj"), L.Dense(2)

    def call(self, x):
        return self.o(tf.math.cumprod(self.d(x), axis=1))


def test_unsupported_and_random_ops_name_op_and_layer():
    with pytest.raises(deepshap_opt.UnsupportedOperatorError, match=r"no DeepSHAP rule for op 'Cumprod' \(called "
                       r"in cum_prod"):
        DeepExplainer(CumProd(), BG)
    with pytest.raises(deepshap_opt.UnsupportedOperatorError, match=r"StatelessRandom.*always_drop.*training=True"):
        DeepExplainer(RandomInside(), BG)


# -- what must work ---------------------------------------------------------------------------------------
def test_zero_length_X_gives_empty_results(explainer):
    assert explainer.shap_values(X[:0]).shape == (0, 4, 3)
    v, idx = explainer.shap_values(X[:0], ranked_outputs=2)
    assert v.shape == (0, 4, 2) and idx.shape == (0, 2)


def test_single_row_background(model):
    phi = DeepExplainer(model, BG[:1]).shap_values(X)
    np.testing.assert_allclose(phi.sum(1), _target(model, X, BG[:1]), rtol=1e-5, atol=1e-5)


def test_float64_and_tensor_inputs_are_converted(model, explainer):
    ref = explainer.shap_values(X)
    np.testing.assert_array_equal(explainer.shap_values(X.astype(np.float64)), ref)
    np.testing.assert_array_equal(explainer.shap_values(tf.constant(X)), ref)
    np.testing.assert_array_equal(DeepExplainer(model, BG.astype(np.float64)).shap_values(X), ref)


def test_non_contiguous_and_transposed_arrays_work():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((6, 5, 2)), L.Conv2D(3, 3, activation="relu"), L.MaxPooling2D(),
                              L.Flatten(), L.Dense(2)])
    rng = np.random.default_rng(4)
    bg, x = rng.normal(size=(5, 6, 5, 2)).astype("float32"), rng.normal(size=(3, 6, 5, 2)).astype("float32")
    ref = DeepExplainer(model, bg).shap_values(x)
    xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)        # same values, transposed strides
    xr = np.ascontiguousarray(x[::-1])[::-1]                                         # negative strides
    xf = np.asfortranarray(x)
    bgs = np.repeat(bg, 2, axis=3)[..., ::2]                                         # a strided view
    assert not xt.flags.c_contiguous and not xr.flags.c_contiguous and not bgs.flags.c_contiguous
    for xv in (xt, xr, xf):
        np.testing.assert_array_equal(DeepExplainer(model, bg).shap_values(xv), ref)
    np.testing.assert_allclose(DeepExplainer(model, bgs).shap_values(x), ref, rtol=1e-6, atol=1e-7)


def test_enormous_background_is_chunked():
    model = mlp(1)
    bg = np.random.default_rng(2).normal(size=(20000, 4)).astype("float32")
    e = DeepExplainer(model, bg, memory_budget=2**16)            # 64 KiB per backward: many reference chunks
    assert e._mc < 20000 and len(e._ref_chunks) == -(-20000 // e._mc)
    phi = e.shap_values(X)
    np.testing.assert_allclose(phi.sum(1), _target(model, X, bg), rtol=1e-4, atol=1e-4)
    assert e.cache_nbytes == 20000 * 4 * (4 + 6)          # per row: the input and the ReLU's input


def test_cache_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    from deepshap_opt.tf import deep

    monkeypatch.setattr(deep, "_available_memory", lambda: 10**6)
    model = keras.Sequential([keras.Input((300, 300)), L.Dense(300, activation="relu"), L.Flatten(), L.Dense(1)])
    with pytest.raises(ValueError, match=r"the reference cache would need 5.5 MiB for M=8 background rows \(0.7 MiB "
                       r"per row\) and 1.0 MiB are available: pass fewer background rows"):
        DeepExplainer(model, np.zeros((8, 300, 300), "float32"))


# -- state safety --------------------------------------------------------------------------------------------
def _state(model):
    return ([v.numpy().copy() for v in model.variables], [v.trainable for v in model.variables],
            [layer.trainable for layer in model._flatten_layers()], len(model.losses),
            {k: v for k, v in vars(model).items() if k == "call"})


def test_model_and_user_arrays_untouched_after_success_and_error():
    model = mlp(5)
    model.layers[-1].trainable = False
    bg, x = BG.copy(), X.copy()
    before = _state(model)
    e = DeepExplainer(model, bg)
    e.shap_values(x)
    with pytest.raises(ValueError):
        e.shap_values(np.zeros((2, 7), "float32"))
    with pytest.raises(ValueError):
        e.shap_values(np.full((2, 4), np.nan, "float32"))
    with pytest.raises(deepshap_opt.UnsupportedOperatorError):
        DeepExplainer(CumProd(), bg)
    e2 = DeepExplainer((model, model.layers[3]), bg)
    e2.shap_values(x)
    with pytest.raises(ValueError):
        e2.shap_values(np.zeros((2, 7), "float32"))
    after = _state(model)
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1:] == after[1:]
    assert not any("call" in vars(layer) for layer in model._flatten_layers())
    np.testing.assert_array_equal(bg, BG)
    np.testing.assert_array_equal(x, X)


def test_results_are_deterministic(model):
    a = DeepExplainer(model, BG).shap_values(X)
    e = DeepExplainer(model, BG)
    np.testing.assert_array_equal(e.shap_values(X), a)
    np.testing.assert_array_equal(e.shap_values(X), a)


def test_threads_share_an_explainer_and_get_the_serial_result(model):
    e = DeepExplainer(model, BG)
    other = DeepExplainer(mlp(7), BG)
    expected, expected_other = e.shap_values(X), other.shap_values(X)
    results = run_in_threads(lambda i: (e if i % 3 else other).shap_values(X))
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, expected if i % 3 else expected_other)


def _every_hook_kind_model():
    """Rescale (tanh, relu), max-like (MaxPooling1D), softmax and a two-input product: every rule hook."""
    keras.utils.set_random_seed(21)
    inp = keras.Input((6,))
    a = L.Dense(6, activation="tanh")(inp)
    b = L.Dense(6, activation="relu")(inp)
    h = L.Multiply()([a, b])
    h = L.Flatten()(L.MaxPooling1D(2)(L.Reshape((6, 1))(h)))
    return keras.Model(inp, L.Dense(3, activation="softmax")(h))


def test_explainer_is_freed_and_leaves_no_gradient_registrations():
    # tf.custom_gradient registers every rule's gradient function in TF's process-global registry; those
    # closures hold the explainer, so before the fix an explainer (with its model and traced graphs) lived
    # as long as the process (docs/reliability.md, "Memory")
    import gc
    import weakref

    from tensorflow.python.framework import ops as tf_ops

    registry = tf_ops._gradient_registry._registry
    model = _every_hook_kind_model()
    rng = np.random.default_rng(22)
    bg, x = rng.normal(size=(5, 6)).astype("float32"), rng.normal(size=(2, 6)).astype("float32")
    before = {k for k in registry if k.startswith("CustomGradient-")}
    e = DeepExplainer(model, bg)
    sv = e.shap_values(x)                                   # traces the backward (all four hook kinds)
    e.shap_values(x[:1], ranked_outputs=1)                  # another chunk shape: a second trace
    total = np.sum(sv, axis=1)
    np.testing.assert_allclose(total, _target(model, x, bg), atol=1e-5)
    assert {k for k in registry if k.startswith("CustomGradient-")} == before
    ref = weakref.ref(e)
    del e
    gc.collect()
    assert ref() is None
