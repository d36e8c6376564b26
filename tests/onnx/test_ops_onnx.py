"""Ops written directly in ONNX (the ones torch does not emit as such), checked against the shared rule spec's
NumPy references (deepshap_opt.rules.reference), for completeness, and the unsupported-op error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import deepshap_opt.onnx as dso
from deepshap_opt import UnsupportedOperatorError
from deepshap_opt.rules import reference as ref

from ._onnx_util import all_ops, completeness_error, run

OPSET = 20


def model_of(nodes, in_shape, inits=(), out="y", opset=OPSET):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def elementwise_model(op, attrs=None, extra_inputs=(), inits=()):
    nodes = [helper.make_node(op, ["x", *extra_inputs], ["h"], name="site", **(attrs or {})),
             helper.make_node("ReduceSum", ["h", "ax"], ["y"], keepdims=1)]
    return model_of(nodes, [8], inits=[("ax", np.array([1], np.int64)), *inits])


# ONNX op -> (attrs, extra inputs, initializers, reference name, reference params, positive inputs)
ELEMENTWISE = {
    "Relu": ({}, (), (), "relu", {}, False),
    "LeakyRelu": ({"alpha": 0.1}, (), (), "leaky_relu", {"alpha": 0.1}, False),
    "PRelu": ({}, ("s",), (("s", np.full(8, 0.3, np.float32)),), "prelu", {"alpha": 0.3}, False),
    "Elu": ({"alpha": 0.7}, (), (), "elu", {"alpha": 0.7}, False),
    "Selu": ({}, (), (), "selu", {}, False),
    "Celu": ({"alpha": 1.3}, (), (), "celu", {"alpha": 1.3}, False),
    "Sigmoid": ({}, (), (), "sigmoid", {}, False),
    "HardSigmoid": ({"alpha": 1 / 6, "beta": 0.5}, (), (), "hardsigmoid", {}, False),
    "HardSwish": ({}, (), (), "hardswish", {}, False),
    "Tanh": ({}, (), (), "tanh", {}, False),
    "Softplus": ({}, (), (), "softplus", {}, False),
    "Softsign": ({}, (), (), "softsign", {}, False),
    "Erf": ({}, (), (), "erf", {}, False),
    "Gelu": ({}, (), (), "gelu", {}, False),
    "Gelu_tanh": ({"approximate": "tanh"}, (), (), "gelu_tanh", {}, False),
    "Mish": ({}, (), (), "mish", {}, False),
    "Exp": ({}, (), (), "exp", {}, False),
    "Log": ({}, (), (), "log", {}, True),
    "Sqrt": ({}, (), (), "sqrt", {}, True),
    "Reciprocal": ({}, (), (), "reciprocal", {}, True),
    "Abs": ({}, (), (), "abs", {}, False),
    "Clip": ({}, ("lo", "hi"), (("lo", np.float32(-0.5)), ("hi", np.float32(0.8))), "clip", {"lo": -0.5, "hi": 0.8},
             False),
    "Pow": ({}, ("p",), (("p", np.float32(3.0)),), "pow", {"p": 3.0}, False),
    "Max": ({}, ("z",), (("z", np.float32(0.0)),), "relu", {}, False),
    "ThresholdedRelu": ({"alpha": 0.4}, (), (), "thresholded_relu", {"theta": 0.4}, False),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_matches_rule_reference(name):
    attrs, extra, inits, rname, params, positive = ELEMENTWISE[name]
    op = name.split("_")[0]
    rng = np.random.default_rng(0)
    bg = rng.normal(size=(6, 8)).astype(np.float32)
    X = rng.normal(size=(4, 8)).astype(np.float32)
    if positive:
        bg, X = np.abs(bg) + 0.2, np.abs(X) + 0.2
    X[0] = bg[1]                                          # Δ = 0 everywhere: the f'(x) branch
    X[1, :4] = bg[2, :4] + 1e-7                           # |Δ| below the threshold
    proto = dso.build(elementwise_model(op, attrs, extra, inits), bg, outputs=0)
    onnx.checker.check_model(proto, full_check=True)
    phi = run(proto, {"x": X})["shap_values"][..., 0].astype(np.float64)
    x64, r64 = X.astype(np.float64), bg.astype(np.float64)
    m = ref.rescale_multiplier(rname, x64[:, None, :], r64[None, :, :], **params)       # (N, M, 8)
    want = np.mean(m * (x64[:, None, :] - r64[None, :, :]), axis=1)
    scale = np.abs(want).max()
    assert np.abs(phi - want).max() <= 1e-5 * max(scale, 1.0), (name, np.abs(phi - want).max())


def _complete(proto_in, bg, X, outputs="all", tol=1e-4):
    proto = dso.build(proto_in, bg, outputs=outputs)
    onnx.checker.check_model(proto, full_check=True)
    out = run(proto, {"x": X})
    err, scale = completeness_error(proto, out)
    assert err <= tol * scale, (err, scale)
    return proto, out


def _img(n, c=4, h=5, w=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32)


def _head(nodes, feat, k=3, seed=0):
    """... → Flatten → Gemm (k outputs)."""
    w = np.random.default_rng(seed).normal(size=(feat, k)).astype(np.float32)
    return nodes + [helper.make_node("Flatten", ["f"], ["ff"], axis=1), helper.make_node("Gemm", ["ff", "W"], ["y"])], w


def test_global_maxpool_groupnorm_identity_dropout_constant_cast_sum():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Dropout", ["a"], ["b"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(1.5))),
        helper.make_node("Mul", ["b", "k"], ["c"]),
        helper.make_node("GroupNormalization", ["c", "gs", "gb"], ["d"], num_groups=2, epsilon=1e-5),
        helper.make_node("Cast", ["d"], ["d64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["d64"], ["e"], to=TensorProto.FLOAT),
        helper.make_node("Sum", ["e", "c", "b"], ["s"]),
        helper.make_node("GlobalMaxPool", ["s"], ["f"]),
    ]
    nodes, w = _head(nodes, 4)
    inits = [("gs", np.array([0.5, 2.0, 1.0, 0.7], np.float32)), ("gb", np.array([0.1, -0.2, 0.0, 0.3], np.float32)),
             ("W", w)]
    proto, _out = _complete(model_of(nodes, [4, 5, 5], inits, opset=21), _img(5), _img(3, seed=1))
    ops = all_ops(proto)
    assert {"GlobalMaxPool", "GroupNormalization", "Identity", "Dropout", "Constant", "Cast", "Sum"} <= ops


def test_two_operand_rules_pow_max_min_and_edge_pad():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"]),
        helper.make_node("Add", ["a", "half"], ["a2"]),
        helper.make_node("Pow", ["a2", "x"], ["p"]),                    # both operands vary
        helper.make_node("Max", ["p", "x"], ["q"]),
        helper.make_node("Min", ["q", "a"], ["r"]),
        helper.make_node("Pad", ["r", "pads"], ["f"], mode="edge"),
    ]
    nodes, w = _head(nodes, 4 * 7 * 6)
    inits = [("half", np.float32(0.5)), ("pads", np.array([0, 0, 1, 0, 0, 0, 1, 1], np.int64)), ("W", w)]
    _complete(model_of(nodes, [4, 5, 5], inits), _img(5), _img(3, seed=1))


def test_output_selection_modes_agree():
    nodes = [helper.make_node("Relu", ["x"], ["f"])]
    nodes, w = _head(nodes, 100, k=4)
    m = model_of(nodes, [4, 5, 5], [("W", w)])
    bg, X = _img(5), _img(3, seed=2)
    allv = run(dso.build(m, bg, outputs="all"), {"x": X})
    y = allv["y"]
    top2 = run(dso.build(m, bg, outputs="topk:2"), {"x": X})
    order = np.argsort(-y, axis=1)[:, :2]
    np.testing.assert_array_equal(top2["shap_indexes"], order)
    rows = np.arange(3)[:, None]
    want = np.moveaxis(np.moveaxis(allv["shap_values"], -1, 0)[order.T, rows.T], 0, -1)
    np.testing.assert_allclose(top2["shap_values"], want, atol=1e-6)
    top1 = run(dso.build(m, bg, outputs="top1"), {"x": X})
    np.testing.assert_allclose(top1["shap_values"][..., 0], want[..., 0], atol=1e-6)
    one = run(dso.build(m, bg, outputs=2), {"x": X})
    np.testing.assert_allclose(one["shap_values"][..., 0], allv["shap_values"][..., 2], atol=1e-6)
    tgt = np.array([[3, 1], [0, 0], [2, 3]], np.int64)
    t = run(dso.build(m, bg, outputs="target"), {"x": X, "target": tgt})
    want_t = np.moveaxis(np.moveaxis(allv["shap_values"], -1, 0)[tgt.T, rows.T], 0, -1)
    np.testing.assert_allclose(t["shap_values"], want_t, atol=1e-6)


def test_dynamic_batch():
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["f"], kernel_shape=[2, 2], strides=[2, 2])]
    nodes, w = _head(nodes, 4 * 2 * 2)
    cw = np.random.default_rng(3).normal(size=(4, 4, 3, 3)).astype(np.float32)
    m = model_of(nodes, [4, 5, 5], [("cw", cw), ("W", w)])
    proto = dso.build(m, _img(6), outputs="all")
    X = _img(7, seed=5)
    full = run(proto, {"x": X})["shap_values"]
    for n in (1, 2, 7):
        part = run(proto, {"x": X[:n]})["shap_values"]
        assert part.shape == (n, 4, 5, 5, 3)
        np.testing.assert_allclose(part, full[:n], atol=1e-6)


def test_unsupported_op_names_op_and_node():
    nodes = [helper.make_node("Floor", ["x"], ["h"], name="my_floor"),
             helper.make_node("ReduceSum", ["h", "ax"], ["y"], keepdims=1)]
    m = model_of(nodes, [8], [("ax", np.array([1], np.int64))])
    with pytest.raises(UnsupportedOperatorError) as e:
        dso.build(m, np.zeros((2, 8), np.float32))
    assert e.value.op == "Floor" and e.value.where == "my_floor"
    assert "Floor" in str(e.value) and "my_floor" in str(e.value)


def test_batch_moving_transpose_is_refused():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="swap"),
             helper.make_node("Transpose", ["t"], ["h"], perm=[1, 0]),
             helper.make_node("ReduceSum", ["h", "ax"], ["y"], keepdims=1)]
    m = model_of(nodes, [8], [("ax", np.array([1], np.int64))])
    with pytest.raises(UnsupportedOperatorError):
        dso.build(m, np.zeros((3, 8), np.float32))


def test_shape_driven_subgraph_is_not_differentiated():
    # reshape target computed from Shape(x): depends on the input's shape, not its values
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "zax"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["tshape"], axis=0),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "tshape"], ["f"])]
    nodes, w = _head(nodes, 100)
    inits = [("zero", np.array(0, np.int64)), ("zax", np.array([0], np.int64)), ("minus1", np.array([-1], np.int64)),
             ("W", w)]
    _complete(model_of(nodes, [4, 5, 5], inits), _img(4), _img(2, seed=1))


def test_reduce_max_min():
    nodes = [helper.make_node("ReduceMax", ["x", "a2"], ["m1"], keepdims=0),          # (N, 4, 5)
             helper.make_node("ReduceMin", ["x", "a13"], ["m2"], keepdims=1),         # (N, 1, 5, 1)
             helper.make_node("Flatten", ["m1"], ["f1"], axis=1),
             helper.make_node("Flatten", ["m2"], ["f2"], axis=1),
             helper.make_node("Concat", ["f1", "f2"], ["f"], axis=1)]
    nodes, w = _head(nodes, 25)
    inits = [("a2", np.array([2], np.int64)), ("a13", np.array([1, 3], np.int64)), ("W", w)]
    X = _img(3, seed=1)
    X[0] = _img(5)[0]
    proto, _ = _complete(model_of(nodes, [4, 5, 5], inits), _img(5), X)
    assert {"ReduceMax", "ReduceMin"} <= all_ops(proto)


def test_layernorm_float64_equal_variance_branch_matches_reference():
    """LayerNormalization where explicand and reference have (almost) the same variance: the rsqrt rescale takes
    its f'(v) branch. That derivative was −½v⁻² instead of −½v^(−3/2) (invisible at v ≈ 1); the fuzzer's stacked
    width-2 LayerNorms (float64 completeness 3e-5) found it. Checked against the spec's NumPy reference at v ≈ 0.025."""
    F = 4
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", F])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                          initializer=[numpy_helper.from_array(np.ones(F), "g"),
                                       numpy_helper.from_array(np.zeros(F), "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    r = 0.1 * np.array([1.0, -1.0, 2.0, -2.0])                        # v = 0.025 (+ eps)
    X = np.stack([0.1 * np.array([-1.0, 1.0, -2.0, 2.0]),              # same mean and variance: Δv = 0
                  0.1 * np.array([-1.0, 1.0, 2.0, -2.0]) + 1e-9,       # |Δv| < 1e-6
                  np.array([0.05, -0.4, 0.1, 0.3])])                  # the secant branch
    proto = dso.build(model, r[None], outputs="all")
    phi = run(proto, {"x": X})["shap_values"]                          # (N, F_in, F_out)
    for n in range(len(X)):
        want = ref.layer_norm_attribution(X[n], r)                   # (F_out, F_in)
        np.testing.assert_allclose(phi[n].T, want, rtol=0, atol=1e-9 * np.abs(want).max())
    err, scale = completeness_error(proto, run(proto, {"x": X}))
    assert err <= 1e-10 * scale
