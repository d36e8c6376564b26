"""deepshap_opt.tf.mfaba: against a per-sample transcription of the formula, and against the torch backend
on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from deepshap_opt.tf.mfaba import MFABA, MFABAPath


def keras_cnn(dtype="float64", seed=0):
    """The torch tests' CNN in NHWC: conv3x3(pad 1) -> ReLU -> conv3x3(stride 2, pad 1) -> ReLU -> dense.

    Padding is explicit: Keras' "same" pads a stride-2 conv asymmetrically, torch pads both sides.
    """
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((8, 8, 1), dtype=dtype)
    h = L.Conv2D(4, 3, padding="same", activation="relu", dtype=dtype)(inp)
    h = L.ZeroPadding2D(1, dtype=dtype)(h)
    h = L.Conv2D(8, 3, strides=2, activation="relu", dtype=dtype)(h)
    out = L.Dense(10, dtype=dtype)(L.Flatten(dtype=dtype)(h))
    return keras.Model(inp, out)


def images(n=6, dtype=np.float64, seed=1):
    return np.random.default_rng(seed).random((n, 8, 8, 1)).astype(dtype)


def reference_mfaba(model, x, target, variant, steps, alpha, epsilon, lo=0.0, hi=1.0, early_stop=True):
    """The formula one sample at a time, every path point kept, a separate forward for the early stop."""
    out = []
    for i in range(x.shape[0]):
        x0, c = tf.constant(x[i:i + 1]), int(target[i])
        points, grads, xt = [x0], [], x0
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(xt)
                f = tf.nn.softmax(model(xt, training=False), axis=1)[0, c]
            g = tape.gradient(f, xt)
            if variant == "sharp":
                xt = tf.clip_by_value(xt - 100 * alpha * g / tf.norm(g), lo, hi)
            else:
                moved = tf.clip_by_value(xt - alpha * tf.sign(g) - x0, -epsilon, epsilon)
                xt = tf.clip_by_value(x0 + moved, lo, hi)
            points.append(xt)
            grads.append(g)
            if early_stop and int(tf.argmax(model(xt, training=False), 1)[0]) != c:
                break
        out.append(-sum((points[t + 1] - points[t]) * grads[t] for t in range(len(grads))).numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def model():
    return keras_cnn()


@pytest.mark.parametrize("variant,alpha,early_stop", [("sharp", 0.002, True), ("smooth", 0.01, True),
                                                      ("smooth", 0.01, False)])
def test_matches_per_sample_reference(model, variant, alpha, early_stop):
    x = images()
    target = np.argmax(model(x), 1)
    A, p = MFABA(model, variant=variant, steps=20, alpha=alpha, epsilon=0.05,
                 early_stop=early_stop).attribute(x, return_path=True)
    R = reference_mfaba(model, x, target, variant, 20, alpha, 0.05, early_stop=early_stop)
    assert isinstance(A, np.ndarray) and A.shape == x.shape and A.dtype == x.dtype
    np.testing.assert_allclose(A, R, rtol=1e-5, atol=1e-5 * np.abs(R).max())
    if early_stop:  # the cases must exercise early stopping
        assert p.lengths.min() < 20


def test_path_and_batch_independence(model):
    x = images()
    mf = MFABA(model, steps=20, alpha=0.002)
    A, p = mf.attribute(x, return_path=True)
    assert isinstance(p, MFABAPath)
    L = p.gradients.shape[0]
    assert p.points.shape == (L + 1,) + x.shape and L == p.lengths.max()
    np.testing.assert_allclose(-((p.points[1:] - p.points[:-1]) * p.gradients).sum(0), A, atol=1e-15)
    alone = np.concatenate([mf.attribute(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(A, alone, rtol=1e-10, atol=1e-12)


def test_tensor_in_tensor_out_and_targets(model):
    x = images(3)
    mf = MFABA(model, steps=5, alpha=0.002)
    A = mf.attribute(tf.constant(x))
    assert tf.is_tensor(A) and tuple(A.shape) == x.shape
    np.testing.assert_allclose(A.numpy(), mf.attribute(x, target=np.argmax(model(x), 1)))
    np.testing.assert_allclose(mf.attribute(x, target=4), mf.attribute(x, target=[4, 4, 4]))
    v, idx = mf.shap_values(x, ranked_outputs=1)
    assert v.shape == (3, 8, 8, 1, 1) and idx.shape == (3, 1)
    np.testing.assert_allclose(v[..., 0], A.numpy())


def test_changed_settings_take_effect(model):
    x = images(2)
    mf = MFABA(model, steps=3, alpha=0.002, early_stop=False)
    first = mf.attribute(x)
    mf.steps = 6
    _, p = mf.attribute(x, return_path=True)
    assert p.lengths.tolist() == [6, 6]
    mf.steps = 3
    np.testing.assert_allclose(mf.attribute(x), first)


def test_errors(model):
    x = images()
    mf = MFABA(model)
    with pytest.raises(ValueError, match="target out of range"):
        mf.attribute(x, target=10)
    with pytest.raises(ValueError, match="one entry per sample"):
        mf.attribute(x, target=[1, 2])
    with pytest.raises(TypeError, match="integer class"):
        mf.attribute(x, target=0.5)
    with pytest.raises(ValueError, match=r"\[data_min, data_max\]"):
        mf.attribute(x * 2 + 0.1)
    with pytest.raises(ValueError, match="do not broadcast"):
        MFABA(model, data_max=np.ones((1, 1, 3))).attribute(x)
    with pytest.raises(TypeError, match="floating-point"):
        mf.attribute((x * 255).astype(np.uint8))
    with pytest.raises(TypeError, match="floating-point"):
        mf.attribute(tf.constant((x * 255).astype(np.int32)))
    with pytest.raises(ValueError, match="class dimension"):
        MFABA(lambda z, training=False: tf.reduce_sum(z, [1, 2, 3])).attribute(x)
    with pytest.raises(ValueError, match="variant"):
        MFABA(model, variant="blunt")


# --------------------------------------------------------------------------------------- torch == tf
torch = None


def torch_twin(kmodel):
    """The same CNN in torch (NCHW), with the Keras weights copied over."""
    global torch
    torch = pytest.importorskip("torch")
    convs = [layer for layer in kmodel.layers if isinstance(layer, keras.layers.Conv2D)]
    dense = next(layer for layer in kmodel.layers if isinstance(layer, keras.layers.Dense))
    t = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 16, 10)).double()
    with torch.no_grad():
        for tc, kc in zip([t[0], t[2]], convs):
            w, b = kc.get_weights()
            # (kh, kw, in, out) -> (out, in, kh, kw)
            tc.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1)))
            tc.bias.copy_(torch.from_numpy(b))
        w, b = dense.get_weights()
        # Keras flattens (h, w, c), torch (c, h, w): reorder the dense rows to match
        w = w.reshape(4, 4, 8, 10).transpose(2, 0, 1, 3).reshape(128, 10)
        t[5].weight.copy_(torch.from_numpy(w.T))
        t[5].bias.copy_(torch.from_numpy(b))
    return t.eval()


@pytest.mark.parametrize("variant,alpha", [("sharp", 0.002), ("smooth", 0.01)])
def test_torch_and_tf_agree_on_the_same_weights(model, variant, alpha):
    tmodel = torch_twin(model)
    from deepshap_opt.torch.mfaba import MFABA as TorchMFABA

    x = images()
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(tmodel(torch.from_numpy(x_nchw)).detach().numpy(), model(x).numpy(),
                               rtol=1e-10)
    kw = {"variant": variant, "steps": 30, "alpha": alpha, "epsilon": 0.05}
    A_tf, p_tf = MFABA(model, **kw).attribute(x, return_path=True)
    A_t, p_t = TorchMFABA(tmodel, **kw).attribute(x_nchw, return_path=True)
    np.testing.assert_array_equal(p_tf.lengths, p_t.lengths)
    A_t = A_t.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(A_tf, A_t, rtol=1e-5, atol=1e-5 * np.abs(A_t).max())
