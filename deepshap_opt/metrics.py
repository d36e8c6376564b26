"""Faithfulness metrics for attribution maps: insertion and deletion curves and their AUC.

Deletion (Petsiuk et al., "RISE", BMVC 2018) replaces the most salient pixels of an image by a substrate,
a growing fraction at a time, and records the target class's probability: a faithful map makes it fall
fast (low AUC is better). Insertion starts from the substrate and puts the most salient pixels back: a
faithful map makes the probability rise fast (high AUC is better).

Pixels are ranked by a 2-D saliency map; an attribution with channels is summed over them first, so a pixel
is moved with all its channels. Everything here is NumPy; the model is reached only through a
``predict(x) -> probabilities`` callable, so the metrics work for any framework.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["Curve", "auc", "deletion_auc", "deletion_curve", "gaussian_blur", "insertion_auc",
           "insertion_curve"]


class Curve(NamedTuple):
    """fractions: (S+1,) share of pixels moved, 0 … 1; scores: (N, S+1) target probability at each
    fraction; auc: (N,) area under each image's curve (trapezoid rule over ``fractions``)."""

    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray


def auc(scores, fractions=None) -> np.ndarray:
    """Trapezoid-rule area under ``scores`` (..., S+1) over ``fractions`` (S+1,) (evenly spaced in [0, 1]
    when None)."""
    s = np.asarray(scores, dtype=np.float64)
    f = np.linspace(0.0, 1.0, s.shape[-1]) if fractions is None else np.asarray(fractions, dtype=np.float64)
    return ((s[..., 1:] + s[..., :-1]) * 0.5 * np.diff(f)).sum(-1)


def gaussian_blur(x, sigma: float, spatial_axes=(-2, -1)) -> np.ndarray:
    """Separable Gaussian blur of x over its two spatial axes (reflect padding, kernel radius ceil(3σ))."""
    x = np.asarray(x)
    out = x.astype(np.float64)
    if sigma <= 0:
        return out.astype(x.dtype)
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for ax in spatial_axes:
        ax = ax % x.ndim
        n = out.shape[ax]
        pad = [(0, 0)] * out.ndim
        pad[ax] = (r, r)
        # "symmetric" repeats the edge pixel; fine for any radius, unlike "reflect" on tiny images
        p = np.pad(out, pad, mode="symmetric") if r <= n else np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * np.take(p, np.arange(i, i + n), axis=ax)
        out = acc
    return out.astype(x.dtype)


def _numpy(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):
        return a.numpy()
    return np.asarray(a)


def _layout(x: np.ndarray, channel_axis):
    """The spatial axes (h, w) of x (N, ...) and the channel axis (or None)."""
    if channel_axis is None:
        if x.ndim != 3:
            raise ValueError(f"with channel_axis=None, x must be (N, H, W), got shape {x.shape}")
        return (1, 2), None
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W) or (N, H, W, C) with channel_axis set, got shape {x.shape}")
    ch = channel_axis % 4
    if ch == 0:
        raise ValueError("channel_axis cannot be the batch axis 0")
    return tuple(a for a in (1, 2, 3) if a != ch), ch


def _saliency_2d(saliency, x: np.ndarray, spatial, ch) -> np.ndarray:
    s = _numpy(saliency).astype(np.float64)
    hw = tuple(x.shape[a] for a in spatial)
    if s.shape == x.shape and ch is not None:
        s = s.sum(axis=ch)
    if s.shape != (x.shape[0],) + hw:
        raise ValueError(f"saliency must have x's shape {x.shape} or be (N, H, W) = {(x.shape[0],) + hw}, "
                         f"got {s.shape}")
    return s


def _substrate(substrate, x: np.ndarray, spatial, blur_sigma) -> np.ndarray:
    if isinstance(substrate, str):
        if substrate == "zeros":
            return np.zeros_like(x)
        if substrate == "blur":
            if blur_sigma is None:
                # RISE blurs 224x224 images with σ = 5; keep that share of the image size, at least one pixel
                blur_sigma = max(1.0, 5.0 * max(x.shape[a] for a in spatial) / 224)
            return gaussian_blur(x, blur_sigma, spatial)
        if substrate == "mean":
            return np.broadcast_to(x.mean(axis=spatial, keepdims=True), x.shape).astype(x.dtype)
        raise ValueError(f"substrate must be 'zeros', 'blur', 'mean', a number, an array or a callable, got "
                         f"{substrate!r}")
    if callable(substrate):
        s = _numpy(substrate(x))
    else:
        s = np.broadcast_to(_numpy(substrate), x.shape)
    if s.shape != x.shape:
        raise ValueError(f"the substrate must have x's shape {x.shape}, got {s.shape}")
    return s.astype(x.dtype)


def _curve(predict: Callable, x, saliency, target, channel_axis, substrate, step, blur_sigma, batch_size,
           insertion: bool) -> Curve:
    x = _numpy(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    spatial, ch = _layout(x, channel_axis)
    n = x.shape[0]
    sal = _saliency_2d(saliency, x, spatial, ch)
    hw = sal.shape[1] * sal.shape[2]
    if step is None:
        step = max(1, math.ceil(hw / 100))
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a positive number of pixels, got {step!r}")
    base = _substrate(substrate, x, spatial, blur_sigma)
    if target is None:
        target = np.asarray(predict(x)).argmax(1)
    target = np.broadcast_to(np.asarray(target, dtype=np.int64), (n,))

    # rank[i, p] = position of pixel p in image i's descending saliency order (stable: ties by index)
    order = np.argsort(-sal.reshape(n, hw), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(hw)[None].repeat(n, 0), axis=1)
    mask_shape = [n, 1, 1, 1] if ch is not None else [n, 1, 1]
    for a, size in zip(spatial, sal.shape[1:]):
        mask_shape[a] = size
    rank = rank.reshape(mask_shape)

    counts = np.minimum(np.arange(0, math.ceil(hw / step) + 1) * step, hw)   # pixels moved at each point
    scores = np.empty((n, counts.size))
    first, second = (base, x) if insertion else (x, base)    # moved pixels come from `second`
    per_call = max(1, batch_size // n)                        # curve points per predict call
    rows = np.arange(n)
    for j0 in range(0, counts.size, per_call):
        js = counts[j0:j0 + per_call]
        batch = np.concatenate([np.where(rank < k, second, first) for k in js])
        p = np.asarray(_numpy(predict(batch)), dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != batch.shape[0]:
            raise ValueError(f"predict must return probabilities (B, K), got shape {p.shape}")
        scores[:, j0:j0 + len(js)] = p.reshape(len(js), n, -1)[:, rows, target].T
    fractions = counts / hw
    return Curve(fractions, scores, auc(scores, fractions))


def deletion_curve(predict: Callable, x, saliency, target=None, *, channel_axis: int | None = 1,
                   substrate="zeros", step: int | None = None, blur_sigma: float | None = None,
                   batch_size: int = 256) -> Curve:
    """Target probability as the most salient pixels are replaced by the substrate (lower AUC = better).

    Parameters
    ----------
    predict : callable
        ``predict(x) -> probabilities``: (B, *x.shape[1:]) NumPy array in, (B, K) probabilities out.
    x : (N, C, H, W), (N, H, W, C) or (N, H, W) array (NumPy, or a torch / TF tensor)
    saliency : x's shape (summed over channels) or (N, H, W); larger = more important
    target : None (the predicted class), int, or (N,) ints
    channel_axis : 1 for NCHW, -1 for NHWC, None when x has no channel axis
    substrate : "zeros" (default here), "blur" (Gaussian, σ = ``blur_sigma``, default 5·max(H, W)/224 and
        at least 1), "mean" (per-image channel mean), a number, an array of x's shape, or ``f(x) -> array``
    step : pixels moved per curve point (default ceil(H·W/100), so at most 101 points)
    batch_size : images per ``predict`` call (at least N)
    """
    return _curve(predict, x, saliency, target, channel_axis, substrate, step, blur_sigma, batch_size, False)


def insertion_curve(predict: Callable, x, saliency, target=None, *, channel_axis: int | None = 1,
                    substrate="blur", step: int | None = None, blur_sigma: float | None = None,
                    batch_size: int = 256) -> Curve:
    """Target probability as the most salient pixels are put back onto the substrate (higher AUC = better).

    Same arguments as :func:`deletion_curve`; the substrate defaults to "blur" (RISE's choice: a zero
    image is often itself classified confidently, which flattens the insertion curve).
    """
    return _curve(predict, x, saliency, target, channel_axis, substrate, step, blur_sigma, batch_size, True)


def deletion_auc(predict: Callable, x, saliency, target=None, **kwargs) -> np.ndarray:
    """(N,) deletion AUC per image; keyword arguments as for :func:`deletion_curve`."""
    return deletion_curve(predict, x, saliency, target, **kwargs).auc


def insertion_auc(predict: Callable, x, saliency, target=None, **kwargs) -> np.ndarray:
    """(N,) insertion AUC per image; keyword arguments as for :func:`insertion_curve`."""
    return insertion_curve(predict, x, saliency, target, **kwargs).auc
