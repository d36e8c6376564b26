"""API forms, shapes, shap parity, bad inputs, state safety, caching (deepshap_opt.tf.DeepExplainer)."""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import deepshap_opt
from deepshap_opt.rules import reference
from deepshap_opt.tf import DeepExplainer


def relu_cnn(k=3):
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((10, 10, 2)), L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(),
                             L.Conv2D(5, 3, activation="relu"), L.Flatten(), L.Dense(8, activation="relu"),
                             L.Dense(k)])


def two_input():
    keras.utils.set_random_seed(2)
    a, b = keras.Input((6,)), keras.Input((4, 4, 1))
    h = L.Concatenate()([L.Dense(5, activation="relu")(a), L.Flatten()(L.Conv2D(2, 2, activation="relu")(b))])
    return keras.Model([a, b], L.Dense(3)(h))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 10, 10, 2)).astype("float32"), rng.normal(size=(4, 10, 10, 2)).astype("float32")


def _shap():
    shap = pytest.importorskip("shap")
    warnings.filterwarnings("ignore")
    return shap


def test_equal_to_shap_relu_cnn(data):
    shap = _shap()
    bg, X = data
    model = relu_cnn()
    ours = DeepExplainer(model, bg)
    theirs = shap.DeepExplainer(model, bg)
    a, b = ours.shap_values(X), np.asarray(theirs.shap_values(X))
    assert a.shape == b.shape == (4, 10, 10, 2, 3) and a.dtype == np.float64
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert isinstance(ours.expected_value, np.ndarray) and ours.expected_value.shape == (3,)
    np.testing.assert_allclose(ours.expected_value, np.asarray(theirs.expected_value), rtol=1e-5, atol=1e-6)
    # ranked outputs: same layout and values (shap's own additivity check is wrong with ranked outputs)
    (va, ia) = ours.shap_values(X, ranked_outputs=2)
    (vb, ib) = theirs.shap_values(X, ranked_outputs=2, check_additivity=False)
    assert va.shape == np.asarray(vb).shape == (4, 10, 10, 2, 2) and ia.shape == np.asarray(ib).shape == (4, 2)
    np.testing.assert_array_equal(ia, np.asarray(ib))
    assert np.abs(va - np.asarray(vb)).max() <= 1e-5 * np.abs(vb).max()


def test_single_output_keeps_axis_and_explanation(data):
    bg, X = data
    model = relu_cnn(k=1)
    e = DeepExplainer(model, bg)
    sv = e.shap_values(X)
    assert sv.shape == (4, 10, 10, 2, 1)
    ex = e(X)
    assert ex.values.shape == sv.shape and ex.base_values.shape == (4, 1)


def test_multi_input_matches_shap_layout():
    shap = _shap()
    rng = np.random.default_rng(3)
    model = two_input()
    bg = [rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 4, 4, 1)).astype("float32")]
    X = [rng.normal(size=(3, 6)).astype("float32"), rng.normal(size=(3, 4, 4, 1)).astype("float32")]
    ours = DeepExplainer(model, bg).shap_values(X)
    theirs = shap.DeepExplainer(model, bg).shap_values(X)
    assert isinstance(ours, list) and len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.shape == np.asarray(b).shape
        assert np.abs(a - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()


def test_model_forms_give_identical_values(data):
    bg, X = data
    model = relu_cnn()
    ref = DeepExplainer(model, bg).shap_values(X)
    pair = DeepExplainer((model.inputs, model.outputs[0]), bg).shap_values(X)
    np.testing.assert_allclose(DeepExplainer((model.inputs[0], model.outputs), bg).shap_values(X), pair)
    np.testing.assert_allclose(pair, ref, rtol=1e-6, atol=1e-7)
    # data as tf tensor, as list of one array
    np.testing.assert_allclose(DeepExplainer(model, tf.constant(bg)).shap_values(tf.constant(X)), ref, rtol=1e-6,
                               atol=1e-7)

    class Sub(keras.Model):                  # the same weights in a subclassed model with functional calls
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x):
            h = x
            for layer in self.inner.layers:
                h = layer(h)
            return h

    np.testing.assert_allclose(DeepExplainer(Sub(model), bg).shap_values(X), ref, rtol=1e-6, atol=1e-7)


def test_dataframe_data():
    pd = pytest.importorskip("pandas")
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), L.Dense(4, activation="relu"), L.Dense(2)])
    rng = np.random.default_rng(4)
    bg = pd.DataFrame(rng.normal(size=(10, 5)), columns=list("abcde"))
    X = pd.DataFrame(rng.normal(size=(3, 5)), columns=list("abcde"))
    sv = DeepExplainer(model, bg).shap_values(X)
    assert sv.shape == (3, 5, 2)


def test_layer_input_and_embedding_output():
    keras.utils.set_random_seed(5)
    emb = L.Embedding(20, 4)
    pool = L.GlobalAveragePooling1D()
    model = keras.Sequential([keras.Input((6,), dtype="int32"), emb, L.Dense(5, activation="relu"), pool, L.Dense(2)])
    rng = np.random.default_rng(5)
    bg, X = rng.integers(0, 20, size=(8, 6)), rng.integers(0, 20, size=(3, 6))
    with pytest.raises(TypeError, match="Embedding"):
        DeepExplainer(model, bg)
    e = DeepExplainer((model, model.layers[1]), bg)       # the input of the Dense after the embedding
    sv = e.shap_values(X, check_additivity=False)
    assert sv.shape == (3, 6, 4, 2)
    total = sv.sum(axis=(1, 2))
    np.testing.assert_allclose(total, model(X).numpy() - e.expected_value, atol=1e-5)
    # explaining the input of the first dense layer of the CNN equals explaining the model after it
    assert "call" not in vars(model.layers[1])


def test_custom_layer_reused_layer_and_custom_gradient():
    """tf.nn.relu inside a custom layer, a layer used twice and a tf.custom_gradient op all get their rule."""
    keras.utils.set_random_seed(6)

    @tf.custom_gradient
    def my_silu(x):
        y = x * tf.sigmoid(x)
        return y, lambda g: g * 0.0                      # a deliberately wrong gradient: must not be used

    class Block(L.Layer):
        def __init__(self):
            super().__init__()
            self.d1, self.d2 = L.Dense(4), L.Dense(2)

        def call(self, x):
            return self.d2(my_silu(self.d1(x)))

    inp = keras.Input((3,))
    model = keras.Model(inp, Block()(inp))
    rng = np.random.default_rng(6)
    bg, X = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(2, 3)).astype("float32")
    sv = DeepExplainer(model, bg).shap_values(X)
    blk = model.layers[1]
    W1, b1 = (v.numpy().astype(np.float64) for v in blk.d1.weights)
    W2 = blk.d2.weights[0].numpy().astype(np.float64)
    hx, hr = X @ W1 + b1, bg @ W1 + b1
    expect = np.zeros((2, 3, 2))
    for i in range(2):
        for j in range(5):
            mult = reference.rescale_multiplier("silu", hx[i], hr[j])          # (4,)
            expect[i] += (W1 * mult[None, :]) @ W2 * (X[i] - bg[j])[:, None] / 5
    np.testing.assert_allclose(sv, expect, rtol=1e-4, atol=1e-6)

    shared = L.Dense(3, activation="relu")

    class Twice(keras.Model):
        def __init__(self):
            super().__init__()
            self.shared, self.out = shared, L.Dense(2)

        def call(self, x):
            return self.out(tf.nn.relu(self.shared(self.shared(x)) - 0.1))

    m2 = Twice()
    bg3, X3 = rng.normal(size=(6, 3)).astype("float32"), rng.normal(size=(2, 3)).astype("float32")
    e = DeepExplainer(m2, bg3)
    assert sum(s.op.type == "Relu" for s in e.prog.sites) == 3
    e.shap_values(X3)                                       # additivity checked


def test_unsupported_op_names_op_and_layer():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4, 3)), L.LSTM(2, name="my_lstm"), L.Dense(1)])
    bg = np.zeros((3, 4, 3), "float32")
    with pytest.raises(deepshap_opt.UnsupportedOperatorError) as ei:
        DeepExplainer(model, bg)
    assert "my_lstm" in str(ei.value) and ei.value.op

    class Sorter(L.Layer):
        def call(self, x):
            return tf.sort(x, axis=-1)

    m2 = keras.Sequential([keras.Input((4,)), Sorter(name="sorter"), L.Dense(1)])
    with pytest.raises(deepshap_opt.UnsupportedOperatorError, match="sorter"):
        DeepExplainer(m2, np.zeros((2, 4), "float32"))


def test_bad_inputs_leave_model_untouched(data):
    bg, X = data
    model = relu_cnn()
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(TypeError):
        DeepExplainer("not a model", bg)
    with pytest.raises(ValueError):
        DeepExplainer(model, bg, batch_size=0)
    with pytest.raises(ValueError):
        DeepExplainer(model, bg[:0])
    with pytest.raises(TypeError):
        DeepExplainer(model, np.array([["a"] * 3] * 2))
    with pytest.raises(ValueError):
        DeepExplainer(model, bg[:, :5])                  # wrong row shape for the model
    e = DeepExplainer(model, bg)
    with pytest.raises(ValueError):
        e.shap_values(X[:, :5])
    with pytest.raises(ValueError):
        e.shap_values(X[0])
    with pytest.raises(ValueError):
        e.shap_values([X, X])
    with pytest.raises(ValueError):
        e.shap_values(X, ranked_outputs=0)
    with pytest.raises(ValueError):
        e.shap_values(X, output_rank_order="best")
    with pytest.raises(TypeError):
        e.shap_values(np.array([["a"] * 3] * 2))
    with pytest.raises(ValueError):
        DeepExplainer((model, L.Dense(2)), bg)           # a layer not in the model
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    assert e.shap_values(X).shape == (4, 10, 10, 2, 3)   # still usable after the errors


def test_batch_size_invariance_and_cache_rebuild(data):
    bg, X = data
    model = relu_cnn()
    full = DeepExplainer(model, bg, batch_size=1000).shap_values(X)
    for bs in (1, 5, 24):
        np.testing.assert_allclose(DeepExplainer(model, bg, batch_size=bs).shap_values(X), full, rtol=1e-5,
                                   atol=1e-6)
    e = DeepExplainer(model, bg, batch_size=24)
    e.shap_values(X)
    w = model.layers[0].kernel
    w.assign(w * 1.5)
    after = e.shap_values(X)                             # the cache is rebuilt: additivity holds, values fresh
    np.testing.assert_allclose(after, DeepExplainer(model, bg).shap_values(X), rtol=1e-5, atol=1e-6)
    assert not np.allclose(after, full)


def test_no_retracing_per_call(data):
    bg, X = data
    e = DeepExplainer(relu_cnn(), bg, batch_size=12)
    e.shap_values(X)
    n_fwd, n_bwd = e._fwd.experimental_get_tracing_count(), e._bwd.experimental_get_tracing_count()
    e.shap_values(X[::-1].copy())
    e.shap_values(X, ranked_outputs=1)
    assert e._fwd.experimental_get_tracing_count() == n_fwd and e._bwd.experimental_get_tracing_count() == n_bwd


def test_import_is_lazy():
    code = ("import sys, deepshap_opt.tf as t; assert 'tensorflow' not in sys.modules; "
            "assert hasattr(t, '__getattr__')")
    subprocess.run([sys.executable, "-c", code], check=True)
