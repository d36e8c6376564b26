"""Hostile inputs for the ONNX backend (issue #7): every case gives a specific, readable error or a correct
answer, never a protobuf DecodeError / IndexError / onnxruntime error from deep inside, never a wrong answer;
the user's arrays and ModelProto are left as they were. The table in docs/reliability.md lists these cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import deepshap_opt.onnx as dso
from deepshap_opt import UnsupportedOperatorError

from ._onnx_util import completeness_error, run

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(4, 6)).astype(np.float32)
W2 = RNG.normal(size=(6, 3)).astype(np.float32)
BG = RNG.normal(size=(5, 4)).astype(np.float32)
X = RNG.normal(size=(3, 4)).astype(np.float32)


def mlp(extra_nodes=(), first="x", in_type=TensorProto.FLOAT, in_shape=("N", 4), outputs=("y",), inits=()):
    nodes = [*extra_nodes,
             helper.make_node("MatMul", [first, "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          initializer=[numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"),
                                       *[numpy_helper.from_array(np.asarray(v), k) for k, v in inits]])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


@pytest.fixture(scope="module")
def explainer():
    return dso.DeepExplainer(mlp(), BG)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "mlp.onnx"
    onnx.save(mlp(), str(path))
    return path


# ------------------------------------------------------------------ files
def test_corrupted_file(model_file, tmp_path):
    data = bytearray(model_file.read_bytes())
    data[:16] = b"\xff" * 16
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(bytes(data))
    for fn in (lambda: dso.build(str(bad), BG), lambda: dso.DeepExplainer(bad, BG)):
        with pytest.raises(ValueError, match=r"is not a valid ONNX file \(corrupted or truncated\?\)"):
            fn()
    with pytest.raises(ValueError, match="not a serialized ONNX model"):
        dso.build(bytes(data), BG)


def test_every_truncation_of_a_file_is_refused(model_file, tmp_path):
    data = model_file.read_bytes()
    bad = tmp_path / "cut.onnx"
    for cut in range(len(data)):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"ONNX|empty|opset"):
            dso.build(str(bad), BG)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        dso.build(str(tmp_path / "nope.onnx"), BG)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        dso.DeepExplainer(tmp_path / "nope.onnx", BG)
    with pytest.raises(ValueError, match="is a directory"):
        dso.build(str(tmp_path), BG)


def test_serialized_bytes_are_a_model():
    phi = run(dso.build(mlp().SerializeToString(), BG, outputs=0), {"x": X})["shap_values"]
    assert phi.shape == (3, 4, 1)


def test_dangling_tensor_reference():
    m = mlp()
    m.graph.node[1].input[0] = "gone"
    with pytest.raises(ValueError, match="reads 'gone', which no node, input or initializer defines"):
        dso.build(m, BG)


# ------------------------------------------------------------------ ops
def test_unsupported_op_on_the_input_path():
    m = mlp([helper.make_node("CumSum", ["x", "ax"], ["c"], name="my_cumsum")], first="c",
            inits=[("ax", np.array(1, np.int64))])
    with pytest.raises(UnsupportedOperatorError, match=r"'CumSum' \(called in my_cumsum\)") as info:
        dso.build(m, BG)
    assert (info.value.op, info.value.where) == ("CumSum", "my_cumsum")
    with pytest.raises(UnsupportedOperatorError, match="my_cumsum"):
        dso.DeepExplainer(m, BG)


def test_custom_domain_and_unknown_ops():
    m = mlp([helper.make_node("Fancy", ["x"], ["c"], name="fancy", domain="com.example")], first="c")
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOperatorError, match=r"'com.example::Fancy' \(called in fancy\)"):
        dso.build(m, BG)
    m = mlp([helper.make_node("NoSuchOp", ["x"], ["c"], name="typo")], first="c")
    with pytest.raises(UnsupportedOperatorError, match=r"'NoSuchOp' \(called in typo\)"):
        dso.build(m, BG)


# ------------------------------------------------------------------ X
@pytest.mark.parametrize("bad, err, msg", [
    (X[0], ValueError, r"X has per-sample shape \(\) but the background has \(4,\)"),
    (X[:, :, None], ValueError, r"X has per-sample shape \(4, 1\) but the background has \(4,\)"),
    (np.ones((3, 5), np.float32), ValueError, r"X has per-sample shape \(5,\) but the background has \(4,\)"),
    (np.float32(1.0), ValueError, "X must have a batch axis, got a scalar"),
    (X.astype(np.int64), TypeError, "X has dtype int64: only floating-point inputs can be attributed"),
    (X > 0, TypeError, "X has dtype bool"),
    (np.full((3, 4), "a"), TypeError, "X has dtype <U1"),
    (np.where(X > 0.5, np.nan, X), ValueError, "X contains NaN or Inf"),
    (np.where(X > 0.5, np.inf, X), ValueError, "X contains NaN or Inf"),
    ([X], TypeError, "expected a single input, not a list"),
])
def test_bad_X(explainer, bad, err, msg):
    with pytest.raises(err, match=msg):
        explainer.shap_values(bad)


def test_X_of_another_float_dtype_is_converted(explainer):
    a = explainer.shap_values(X)
    b = explainer.shap_values(X.astype(np.float64))
    np.testing.assert_array_equal(a, b)


def test_zero_length_X(explainer):
    v = explainer.shap_values(X[:0])
    assert v.shape == (0, 4, 3) and v.dtype == np.float64
    v, idx = explainer.shap_values(X[:0], ranked_outputs=2)
    assert v.shape == (0, 4, 2) and idx.shape == (0, 2)


def test_zero_length_X_in_the_exported_file():
    for mode in ("top1", "all", 1):
        out = run(dso.build(mlp(), BG, outputs=mode), {"x": X[:0]})
        S = {"top1": 1, "all": 3, 1: 1}[mode]
        assert out["shap_values"].shape == (0, 4, S)


# ------------------------------------------------------------------ background
@pytest.mark.parametrize("bad, err, msg", [
    (BG[:0], ValueError, r"the background \(data\) is empty: pass at least one reference row"),
    (np.where(BG > 0.5, np.nan, BG), ValueError, "the background contains NaN or Inf"),
    (np.where(BG > 0.5, -np.inf, BG), ValueError, "the background contains NaN or Inf"),
    (BG.astype(np.int32), TypeError, "the background has dtype int32: only floating-point"),
    (np.ones((5, 6), np.float32), ValueError, r"per-sample shape \(6,\) but the model's input 'x' takes \(4,\)"),
    (np.ones((5, 4, 1), np.float32), ValueError, r"per-sample shape \(4, 1\) but the model's input 'x' takes"),
    (np.ones(4, np.float32), ValueError, r"per-sample shape \(\) but the model's input 'x' takes \(4,\)"),
    ([BG, BG], ValueError, r"the model has 1 inputs \['x'\] but 2 background arrays were given"),
])
def test_bad_background(bad, err, msg):
    with pytest.raises(err, match=msg):
        dso.build(mlp(), bad)
    with pytest.raises(err, match=msg):
        dso.DeepExplainer(mlp(), bad)


def test_single_row_background_is_complete():
    e = dso.DeepExplainer(mlp(), BG[:1])
    v = e.shap_values(X)                                     # check_additivity=True raises otherwise
    y = e.predict(X)
    np.testing.assert_allclose(v.sum(1), y - e.expected_value, atol=1e-5)
    np.testing.assert_allclose(e.expected_value, e.predict(BG[:1])[0], atol=1e-6)


def test_integer_model_input():
    m = mlp([helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)], first="xf", in_type=TensorProto.INT64)
    with pytest.raises(TypeError, match="the model's input 'x' has type int64: only floating-point inputs"):
        dso.build(m, BG)


def test_float64_background_for_a_float32_model_is_converted():
    a = run(dso.build(mlp(), BG, outputs="all"), {"x": X})["shap_values"]
    b = run(dso.build(mlp(), BG.astype(np.float64), outputs="all"), {"x": X})["shap_values"]
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ enormous M
def test_enormous_background_is_complete():
    bg = np.random.default_rng(1).normal(size=(20_000, 4)).astype(np.float32)
    e = dso.DeepExplainer(mlp(), bg)
    v = e.shap_values(X)
    np.testing.assert_allclose(v.sum(1), e.predict(X) - e.expected_value, atol=1e-4)


def test_memory_budget_chunks_rows_outputs_and_references():
    bg = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
    Xs = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)
    whole = dso.DeepExplainer(mlp(), bg)
    assert len(whole._groups) == 1
    # a budget of 3 pair rows of the largest activation: 50 references split into groups of 3, one
    # explicand and one output per run
    tiny = dso.DeepExplainer(mlp(), bg, memory_budget=3 * whole.row_bytes)
    assert len(tiny._groups) == 17
    np.testing.assert_allclose(tiny.expected_value, whole.expected_value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tiny.shap_values(Xs), whole.shap_values(Xs), rtol=1e-5, atol=1e-6)
    # rows and outputs chunked, references whole
    mid = dso.DeepExplainer(mlp(), bg, memory_budget=100 * whole.row_bytes)
    assert len(mid._groups) == 1
    a, ia = mid.shap_values(Xs, ranked_outputs=2)
    b, ib = whole.shap_values(Xs, ranked_outputs=2)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        dso.DeepExplainer(mlp(), bg, memory_budget=0)


# ------------------------------------------------------------------ several outputs
def test_model_with_several_outputs():
    m = mlp(outputs=("y", "h"))
    out = run(dso.build(m, BG, outputs="all"), {"x": X})
    assert out["shap_values"].shape == (3, 4, 3)                 # the first output, y (3 classes)
    err, scale = completeness_error(dso.build(m, BG, outputs="all"), out)
    assert err <= 1e-4 * scale
    e = dso.DeepExplainer(m, BG, output_name="h")
    assert e.shap_values(X).shape == (3, 4, 6)
    with pytest.raises(ValueError, match=r"output_name 'zz' is not an output of the model \(its outputs: "
                                         r"\['y', 'h'\]\)"):
        dso.build(m, BG, output_name="zz")


# ------------------------------------------------------------------ the exported file, fed badly
def test_exported_file_refuses_another_shape_at_the_door():
    """onnxruntime checks the file's declared input (N, *in): rank, per-sample dims and dtype (documented)."""
    m = mlp(in_shape=("N", "F"))                          # a free feature axis: the file fixes it to the background's
    proto = dso.build(m, BG)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 4]
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=r"(?s)Got invalid dimensions for input: x .*index: 1 Got: 5 Expected: 4"):
        sess.run(None, {"x": np.ones((2, 5), np.float32)})
    with pytest.raises(Exception, match="Invalid rank for input: x Got: 1 Expected: 2"):
        sess.run(None, {"x": X[0]})
    with pytest.raises(Exception, match=r"Unexpected input data type. Actual: \(tensor\(double\)\)"):
        sess.run(None, {"x": X.astype(np.float64)})
    # NaN in X is not checked by the file: NaN values out (the DeepExplainer refuses it instead)
    phi = sess.run(["shap_values"], {"x": np.full((1, 4), np.nan, np.float32)})[0]
    assert np.isnan(phi).all()


# ------------------------------------------------------------------ nothing the user passes is modified
def test_user_arrays_and_model_unmodified():
    m = mlp()
    before = m.SerializeToString()
    bg, Xc = BG.copy(), X.copy()
    bg.flags.writeable = False                       # a write anywhere would raise
    Xc.flags.writeable = False
    dso.build(m, bg, outputs="all")
    e = dso.DeepExplainer(m, bg)
    e.shap_values(Xc)
    e.shap_values(Xc, ranked_outputs=1)
    for bad in (Xc[:, :2], Xc.astype(np.int64)):
        with pytest.raises((ValueError, TypeError)):
            e.shap_values(bad)
    with pytest.raises(ValueError):
        dso.build(m, bg[:, :2])
    np.testing.assert_array_equal(bg, BG)
    np.testing.assert_array_equal(Xc, X)
    assert m.SerializeToString() == before
    # an old-opset model is converted on a copy
    old = mlp()
    old.opset_import[0].version = 13
    before = old.SerializeToString()
    dso.build(old, bg)
    assert old.SerializeToString() == before


def test_model_onnxruntime_cannot_load():
    nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
             helper.make_node("Sigmoid", ["i"], ["s"], name="sig"),           # no int64 Sigmoid
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(ValueError, match=r"onnxruntime cannot load the model: .*INVALID_GRAPH.*\(sig\)"):
        dso.build(m, BG)
