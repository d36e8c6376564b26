"""The explanation inside a Loop over explicand chunks (export's ``memory_budget``): same values as one run
over all rows, complete, dynamic batch (0, 1, odd N with padding), onnx.reference agrees, every mode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import deepshap_opt.onnx as dso

from ._onnx_util import all_nodes, all_ops, completeness_error, run


def _cnn(extra_output: bool = False) -> onnx.ModelProto:
    """Conv → Relu → MaxPool (indices read by the backward) → residual Add → Gemm; optionally a second,
    batch-free graph output (the outer graph then keeps its own forward)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32) * 0.5, "w"),
             numpy_helper.from_array(rng.normal(size=(16, 5)).astype(np.float32) * 0.3, "fc"),
             numpy_helper.from_array(np.array([0, 16], np.int64), "shp"),
             numpy_helper.from_array(np.ones((1, 4, 2, 2), np.float32) * 0.1, "bias")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Add", ["p", "bias"], ["q"]),
             helper.make_node("Sigmoid", ["q"], ["s"]),
             helper.make_node("Mul", ["q", "s"], ["u"]),                                   # SiLU
             helper.make_node("Add", ["u", "p"], ["v"]),                                   # fan-out
             helper.make_node("Reshape", ["v", "shp"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if extra_output:
        nodes.append(helper.make_node("Shape", ["x"], ["xs"]))
        outs.append(helper.make_tensor_value_info("xs", TensorProto.INT64, [4]))
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                          outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _data(n=7, m=6):
    rng = np.random.default_rng(1)
    return rng.normal(size=(m, 2, 4, 4)).astype(np.float32), rng.normal(size=(n, 2, 4, 4)).astype(np.float32)


#: budgets giving 1 explicand per iteration (the smallest), 2 per iteration (7 rows → 4 iterations of 2,
#: one padding row), and all rows in one iteration
ROW = 16 * 4 * 4 * 4 * 4                 # LIVE_FACTOR x the largest activation (4x4x4 floats) x 4 bytes


@pytest.mark.parametrize("outputs", ["top1", "topk:2", "all", 3, "target"])
def test_loop_equals_one_run_and_is_complete(outputs):
    bg, X = _data()
    feeds = {"x": X}
    if outputs == "target":
        feeds["target"] = np.random.default_rng(2).integers(0, 5, size=(len(X), 2)).astype(np.int64)
    S = {"top1": 1, "topk:2": 2, "all": 5, 3: 1, "target": 2}[outputs]
    one = run(dso.build(_cnn(), bg, outputs=outputs, memory_budget=None), feeds)
    for per_iter in (1, 2, 100):
        proto = dso.build(_cnn(), bg, outputs=outputs, memory_budget=per_iter * S * len(bg) * ROW)
        onnx.checker.check_model(proto, full_check=True)
        assert "Loop" in {n.op_type for n in proto.graph.node}
        out = run(proto, feeds)
        for k, v in one.items():
            assert out[k].shape == v.shape, k
            np.testing.assert_allclose(out[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{k}, {per_iter} per iteration")
        if outputs not in (3, "target"):
            err, scale = completeness_error(proto, out)
            assert err <= 1e-5 * scale


def test_loop_dynamic_batch_and_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    bg, X = _data(n=5)
    proto = dso.build(_cnn(), bg, outputs="topk:2", memory_budget=2 * 2 * len(bg) * ROW)   # 2 per iteration
    full = run(proto, {"x": X})
    for n in (0, 1, 2, 3):                                       # 0 rows; one partial chunk; padding
        part = run(proto, {"x": X[:n]})
        for k, v in part.items():
            assert v.shape == (n, *full[k].shape[1:]), k
            np.testing.assert_allclose(v, full[k][:n], rtol=1e-5, atol=1e-6)
    ref = ReferenceEvaluator(proto)
    names = [o.name for o in proto.graph.output]
    for n in (1, 5):                      # (onnx.reference's own Flatten cannot reshape 0 rows)
        got = dict(zip(names, ref.run(None, {"x": X[:n]})))
        scale = max(np.abs(full["y"]).max(), 1e-6)
        assert got["shap_values"].shape == full["shap_values"][:n].shape
        assert np.abs(got["shap_values"] - full["shap_values"][:n]).max() <= 1e-5 * scale
        np.testing.assert_array_equal(got["shap_indexes"], full["shap_indexes"][:n])


def test_loop_keeps_the_forward_outside_for_a_batch_free_output():
    bg, X = _data()
    proto = dso.build(_cnn(extra_output=True), bg, outputs="top1", memory_budget=len(bg) * ROW)
    onnx.checker.check_model(proto, full_check=True)
    outer = {n.op_type for n in proto.graph.node}
    assert {"Conv", "MaxPool", "Loop"} <= outer                 # the model's own forward, outside the Loop
    out = run(proto, {"x": X})
    np.testing.assert_array_equal(out["xs"], np.array(X.shape))
    one = run(dso.build(_cnn(extra_output=True), bg, outputs="top1", memory_budget=None), {"x": X})
    np.testing.assert_allclose(out["shap_values"], one["shap_values"], rtol=1e-5, atol=1e-6)
    err, scale = completeness_error(proto, out)
    assert err <= 1e-5 * scale


def test_loop_layout_and_options():
    bg, _X = _data()
    proto = dso.build(_cnn(), bg, outputs="top1")                         # default budget: one Loop
    loops = [n for n in proto.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    body_ops = {n.op_type for n in all_nodes(loops[0].attribute[0].g)}
    assert {"Conv", "MaxPool", "MaxUnpool"} <= body_ops        # forward copy + backward
    # the model's forward runs once: inside the Loop only, when every output has the batch axis
    # (the outer graph keeps what reads constants only: the references' side, folded once at load time)
    assert not {"Conv", "MaxPool"} & {n.op_type for n in proto.graph.node if not n.name.startswith("ds")}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert int(meta["deepshap_opt.rows_per_run"]) >= 1
    plain = dso.build(_cnn(), bg, outputs="top1", memory_budget=None)
    assert "Loop" not in all_ops(plain)
    assert {p.key: p.value for p in plain.metadata_props}["deepshap_opt.rows_per_run"] == "all"
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="memory_budget"):
            dso.build(_cnn(), bg, memory_budget=bad)


def test_loop_body_owns_its_conv_kernels():
    """Every Conv in the Loop body (the forward copy and the backward's rearranged kernels) reads a kernel that is
    an initializer of the body itself: onnxruntime's NCHWc layout only takes such a Conv (not one whose kernel
    lives in the enclosing graph). The rearranged kernels are not kept in the outer graph as well."""
    bg, X = _data()
    proto = dso.build(_cnn(), bg, outputs="top1", memory_budget=ROW)
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    local = {t.name for t in body.initializer}
    convs = [n for n in body.node if n.op_type == "Conv"]
    assert len(convs) == 2                                    # the forward copy and the VJP
    assert all(n.input[1] in local for n in convs)
    outer = {t.name for t in proto.graph.initializer}
    assert not any("kernel_t" in name for name in outer)
    one = run(dso.build(_cnn(), bg, outputs="top1", memory_budget=None), {"x": X})
    out = run(proto, {"x": X})
    np.testing.assert_allclose(out["shap_values"], one["shap_values"], rtol=1e-5, atol=1e-6)
