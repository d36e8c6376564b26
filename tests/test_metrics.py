"""deepshap_opt.metrics: insertion / deletion curves on hand-checkable toy "models"."""

from __future__ import annotations

import numpy as np
import pytest

from deepshap_opt.metrics import (
    auc,
    deletion_auc,
    deletion_curve,
    gaussian_blur,
    insertion_auc,
    insertion_curve,
)


def mean_model(x):
    """Two classes: p0 = mean pixel value (x in [0, 1]), p1 = 1 − p0."""
    s = x.reshape(x.shape[0], -1).mean(1)
    return np.stack([s, 1 - s], 1)


def sum_model(x):
    """Two classes: p0 = pixel sum (for images summing to at most 1), p1 = 1 − p0."""
    s = x.reshape(x.shape[0], -1).sum(1)
    return np.stack([s, 1 - s], 1)


def weighted_model(w):
    def predict(x):
        z = (x * w).reshape(x.shape[0], -1).sum(1)
        p = 1 / (1 + np.exp(-z))
        return np.stack([p, 1 - p], 1)
    return predict


def test_hand_computed_deletion_and_insertion():
    x = np.array([[[[0.1, 0.4], [0.2, 0.3]]]])          # (1, 1, 2, 2), sum 1
    sal = x.copy()                                      # delete 0.4, 0.3, 0.2, 0.1 in that order
    d = deletion_curve(sum_model, x, sal, target=0, step=1)
    np.testing.assert_allclose(d.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(d.scores[0], [1.0, 0.6, 0.3, 0.1, 0.0])
    np.testing.assert_allclose(d.auc, [auc([1.0, 0.6, 0.3, 0.1, 0.0])])
    np.testing.assert_allclose(d.auc, [0.25 * (0.5 + 0.6 + 0.3 + 0.1)])
    i = insertion_curve(sum_model, x, sal, target=0, step=1, substrate="zeros")
    np.testing.assert_allclose(i.scores[0], [0.0, 0.4, 0.7, 0.9, 1.0])
    # 2 pixels per step: 0, 2, 4 pixels moved
    d2 = deletion_curve(sum_model, x, sal, target=0, step=2)
    np.testing.assert_allclose(d2.fractions, [0, 0.5, 1])
    np.testing.assert_allclose(d2.scores[0], [1.0, 0.3, 0.0])
    # a step that does not divide H·W still ends at every pixel moved
    d3 = deletion_curve(sum_model, x, sal, target=0, step=3)
    np.testing.assert_allclose(d3.fractions, [0, 0.75, 1])


def test_faithful_map_beats_reversed_map():
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 6, 6))
    w = rng.normal(size=(1, 3, 6, 6))
    predict = weighted_model(w)
    good = x * w                      # exact contribution of each element to the logit of class 0
    kw = dict(target=0, substrate="zeros", step=2)
    assert (deletion_auc(predict, x, good, **kw) < deletion_auc(predict, x, -good, **kw)).all()
    assert (insertion_auc(predict, x, good, **kw) > insertion_auc(predict, x, -good, **kw)).all()


def test_layouts_and_2d_saliency_agree():
    rng = np.random.default_rng(1)
    x = rng.random((3, 2, 5, 4))
    sal = rng.normal(size=x.shape)
    predict = weighted_model(rng.normal(size=(1, 2, 5, 4)))
    nchw = deletion_curve(predict, x, sal, substrate="blur", step=3)
    two_d = deletion_curve(predict, x, sal.sum(1), substrate="blur", step=3)
    nhwc = deletion_curve(lambda z: predict(z.transpose(0, 3, 1, 2)), x.transpose(0, 2, 3, 1),
                          sal.transpose(0, 2, 3, 1), channel_axis=-1, substrate="blur", step=3)
    np.testing.assert_allclose(nchw.scores, two_d.scores)
    np.testing.assert_allclose(nchw.scores, nhwc.scores)
    # no channel axis
    g = deletion_curve(lambda z: mean_model(z[:, None]), x[:, 0], sal[:, 0], channel_axis=None, target=1)
    assert g.scores.shape == (3, 21) and g.fractions[-1] == 1.0


def test_default_target_is_prediction_and_batching():
    rng = np.random.default_rng(2)
    x = rng.random((4, 1, 4, 4))
    sal = rng.normal(size=x.shape)
    calls = []

    def predict(z):
        calls.append(len(z))
        return mean_model(z)

    c = insertion_curve(predict, x, sal, step=1, batch_size=8)
    pred = mean_model(x).argmax(1)
    ref = insertion_curve(mean_model, x, sal, target=pred, step=1)
    np.testing.assert_allclose(c.scores, ref.scores)
    assert max(calls[1:]) <= 8 and sum(calls[1:]) == 4 * 17


def test_substrates():
    x = np.random.default_rng(3).random((2, 1, 4, 4))
    sal = np.arange(32.0).reshape(x.shape)
    for sub in ["zeros", "blur", "mean", 0.5, np.full_like(x, 0.5), lambda z: z * 0]:
        c = deletion_curve(mean_model, x, sal, target=0, substrate=sub, step=4)
        np.testing.assert_allclose(c.scores[:, 0], mean_model(x)[:, 0])
    full = deletion_curve(mean_model, x, sal, target=0, substrate=0.5, step=4)
    np.testing.assert_allclose(full.scores[:, -1], 0.5)
    with pytest.raises(ValueError, match="substrate"):
        deletion_curve(mean_model, x, sal, substrate="noise")
    with pytest.raises(ValueError, match="saliency"):
        deletion_curve(mean_model, x, sal[:, :, :2])
    with pytest.raises(ValueError, match="step"):
        deletion_curve(mean_model, x, sal, step=0)
    with pytest.raises(TypeError, match="floating"):
        deletion_curve(mean_model, x.astype(np.int64), sal)


def test_gaussian_blur():
    const = np.full((1, 1, 6, 6), 0.7)
    np.testing.assert_allclose(gaussian_blur(const, 1.5), const)
    x = np.random.default_rng(4).random((2, 3, 9, 7))
    try:
        from scipy.ndimage import gaussian_filter
    except ImportError:  # pragma: no cover
        pytest.skip("scipy not installed")
    ref = gaussian_filter(x, sigma=(0, 0, 1.0, 1.0), mode="reflect", truncate=3.0)
    np.testing.assert_allclose(gaussian_blur(x, 1.0), ref, atol=1e-12)
    nhwc = gaussian_blur(x.transpose(0, 2, 3, 1), 1.0, spatial_axes=(1, 2))
    np.testing.assert_allclose(nhwc, ref.transpose(0, 2, 3, 1), atol=1e-12)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).random((2, 1, 3, 3))
    ref = deletion_curve(mean_model, x, -x, target=0, step=1)
    got = deletion_curve(mean_model, torch.from_numpy(x), torch.from_numpy(-x), target=0, step=1)
    np.testing.assert_allclose(got.scores, ref.scores)
