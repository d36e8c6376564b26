"""The short forms of the ReLU and max-pool rules (few passes over the explicand x reference pairs; see
docs/onnx.md) against the shared NumPy references, on the inputs that could break them: ties inside pooling
windows, Δ = 0 (an explicand equal to a reference, and equal elements), values at the ReLU kink, float64."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import deepshap_opt.onnx as dso
from deepshap_opt.rules import reference as ref

from ._onnx_util import all_ops, completeness_error, run


def _model(nodes, shape, inits, dtype=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", dtype, ["N", *shape])],
                          [helper.make_tensor_value_info("y", dtype, None)],
                          initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _tied(n, shape, seed):
    """Coarsely quantised values: many ties inside windows, many exact zeros after a ReLU."""
    rng = np.random.default_rng(seed)
    return (np.round(rng.normal(size=(n, *shape)) * 2) / 2).astype(np.float32)


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 3), (3, 2)])        # tiling (MaxUnpool) and overlapping
def test_maxpool_with_ties_matches_the_reference(kernel, stride):
    C, H = 3, 6
    Ho = (H - kernel) // stride + 1
    w = np.random.default_rng(5).normal(size=(1, C, Ho, Ho)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[kernel, kernel], strides=[stride, stride]),
             helper.make_node("Mul", ["p", "w"], ["q"]),
             helper.make_node("ReduceSum", ["q", "ax"], ["y"], keepdims=0)]
    proto = dso.build(_model(nodes, [C, H, H], [("w", w), ("ax", np.array([1, 2, 3], np.int64))]),
                      _tied(4, (C, H, H), 1), outputs=0)
    bg = _tied(4, (C, H, H), 1)
    X = _tied(3, (C, H, H), 2)
    X[0] = bg[2]                                                         # Δ = 0 everywhere for one pair
    ops = all_ops(proto)
    assert ("MaxUnpool" in ops) == (kernel == stride)
    out = run(proto, {"x": X})
    err, scale = completeness_error(proto, {"y": out["y"].reshape(-1, 1), "shap_values": out["shap_values"]})
    assert err <= 1e-5 * scale
    ax, ar = np.maximum(X, 0).astype(np.float64), np.maximum(bg, 0).astype(np.float64)
    want = np.zeros(X.shape)
    for n in range(len(X)):
        for m in range(len(bg)):
            mp = ref.maxpool_backward(ax[n], ar[m], w[0], kernel, stride)
            relu = ref.rescale_multiplier("relu", X[n].astype(np.float64), bg[m].astype(np.float64))
            want[n] += mp * relu * (X[n] - bg[m].astype(np.float64))
    want /= len(bg)
    got = out["shap_values"][..., 0]
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0)
    assert run(proto, {"x": X[:0]})["shap_values"].shape == (0, C, H, H, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_at_the_kink_and_equal_pairs(dtype):
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    w = np.random.default_rng(3).normal(size=(6, 6)).astype(dtype)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("ReduceSum", ["a", "ax"], ["y"], keepdims=0)]
    bg = _tied(5, (6,), 3).astype(dtype)
    bg[0] = 0.0                                                          # references on the kink
    X = _tied(4, (6,), 4).astype(dtype)
    X[0] = bg[1]
    X[1] = 0.0
    X[2, :3] = bg[2, :3]                                                 # equal pre-activations in part
    proto = dso.build(_model(nodes, [6], [("w", w), ("ax", np.array([1], np.int64))], elem), bg, outputs=0)
    phi = run(proto, {"x": X})["shap_values"][..., 0].astype(np.float64)
    hx, hr = X.astype(np.float64) @ w, bg.astype(np.float64) @ w
    m = ref.rescale_multiplier("relu", hx[:, None], hr[None])            # (N, M, 6), f'(x) where |Δ| < eps
    want = np.einsum("nmj,ij,nmi->ni", m, w.astype(np.float64), X[:, None].astype(np.float64) - bg[None]) / len(bg)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.isfinite(phi).all()
    assert np.abs(phi - want).max() <= tol * max(np.abs(want).max(), 1.0)
