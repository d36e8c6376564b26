"""The exported file is self-contained: it passes the full checker, runs where torch, tensorflow and
deepshap_opt cannot be imported, equals the torch backend, and gives the same in onnx.reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import deepshap_opt.onnx as dso  # noqa: E402

from ._onnx_util import completeness_error, expected_value, run, torch_backend  # noqa: E402

BLOCKER = textwrap.dedent("""
    import sys
    class _Block:
        BLOCKED = ("torch", "tensorflow", "keras", "deepshap_opt", "tf2onnx", "shap")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError("blocked in this test: " + name)
            return None
    sys.meta_path.insert(0, _Block())
""")

RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    for mod in ("torch", "tensorflow", "deepshap_opt"):
        try:
            __import__(mod)
            raise SystemExit(mod + " could be imported")
        except ImportError:
            pass
    path, xin, out = sys.argv[1:4]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    res = sess.run(None, {"input": np.load(xin)})
    np.savez(out, **{o.name: r for o, r in zip(sess.get_outputs(), res)})
    meta = sess.get_modelmeta().custom_metadata_map
    print(json.dumps({"expected_value": meta["deepshap_opt.expected_value"], "modules": sorted(
        m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow", "deepshap_opt"))}))
""")


class Net(nn.Module):
    """Conv / BN / ReLU / MaxPool (overlapping) / residual add / concat / SE gate / softmax."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.se = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.c1(x))))
        h = torch.relu(self.c2(h)) + h
        h = self.c3(torch.cat([h, torch.sigmoid(h)], 1))
        h = h * torch.sigmoid(self.se(h.mean((2, 3), keepdim=True)))
        return torch.softmax(self.fc(h.mean((2, 3))), -1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    model.bn.running_mean.uniform_(-0.3, 0.3)
    model.bn.running_var.uniform_(0.5, 1.5)
    bg = torch.randn(8, 3, 16, 16)
    X = torch.randn(3, 3, 16, 16)
    d = tmp_path_factory.mktemp("onnx")
    path = str(d / "net.onnx")
    dso.export(model, bg, path, outputs="topk:2")
    return model, bg, X, path, d


def test_full_check_and_standalone_process(exported):
    model, bg, X, path, d = exported
    onnx.checker.check_model(path, full_check=True)
    np.save(d / "x.npy", X.numpy())
    script = d / "runner.py"
    script.write_text(BLOCKER + RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run([sys.executable, "-I", str(script), path, str(d / "x.npy"), str(d / "out.npz")],
                          capture_output=True, text=True, env=env, cwd=str(d), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["modules"] == []
    res = dict(np.load(d / "out.npz"))
    assert set(res) == {"output", "shap_values", "shap_indexes"}
    assert res["shap_values"].shape == (3, 3, 16, 16, 2)
    ev = np.array([float(v) for v in info["expected_value"].split(",")])
    y = res["output"]
    rows = np.arange(3)[:, None]
    total = res["shap_values"].astype(np.float64).sum((1, 2, 3))
    scale = max(np.abs(y).max(), np.abs(ev).max())
    err = np.abs(total - (y[rows, res["shap_indexes"]] - ev[res["shap_indexes"]])).max()
    assert err <= 1e-4 * scale, err
    TDE = torch_backend()
    if TDE is None:
        pytest.skip("torch backend not importable yet")
    tv, tidx = TDE(model, bg).shap_values(X, ranked_outputs=2)
    np.testing.assert_array_equal(np.asarray(tidx), res["shap_indexes"])
    diff = np.abs(np.asarray(tv) - res["shap_values"]).max()
    assert diff <= 1e-4 * scale, diff


def test_reference_evaluator_agrees(exported):
    from onnx.reference import ReferenceEvaluator

    _model, _bg, X, path, _d = exported
    proto = onnx.load(path)
    ort_out = run(proto, {"input": X.numpy()})
    ref = ReferenceEvaluator(proto)
    names = [o.name for o in proto.graph.output]
    ref_out = dict(zip(names, ref.run(None, {"input": X.numpy()})))
    np.testing.assert_array_equal(ref_out["shap_indexes"], ort_out["shap_indexes"])
    scale = np.abs(ort_out["output"]).max()
    assert np.abs(ref_out["shap_values"] - ort_out["shap_values"]).max() <= 1e-5 * scale
    err, sc = completeness_error(proto, ref_out)
    assert err <= 1e-4 * sc


@pytest.mark.parametrize("cache", ["embed", "recompute", "runtime"])
def test_cache_modes_agree(exported, cache):
    model, bg, X, path, _d = exported
    base = run(onnx.load(path), {"input": X.numpy()})
    proto = dso.build(model, bg, outputs="topk:2", cache=cache)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["deepshap_opt.cache"] == cache
    out = run(proto, {"input": X.numpy()})
    np.testing.assert_allclose(out["shap_values"], base["shap_values"], atol=1e-6)
    np.testing.assert_allclose(expected_value(proto), expected_value(onnx.load(path)), atol=1e-6)


def _optimized_initializer_bytes(proto, d, name) -> int:
    """Bytes of the initializers of the model onnxruntime holds after loading ``proto`` (its optimized graph,
    constant folding included, written out by ``optimized_model_filepath``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(d / name)
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(d / name))
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in opt.graph.initializer)


def test_runtime_cache_is_not_folded(exported):
    """cache="runtime": onnxruntime's optimized graph holds the weights and the background, not the references'
    activations (which "recompute" folds into constants at load), and the values are the same."""
    model, bg, X, _path, d = exported
    protos = {c: dso.build(model, bg, outputs="topk:2", cache=c) for c in ("embed", "recompute", "runtime")}
    nbytes = {c: _optimized_initializer_bytes(pr, d, f"opt_{c}.onnx") for c, pr in protos.items()}
    weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    cache = _cache_bytes_of(model, bg)
    assert cache > 2 * (weights + bg.numel() * 4)               # the cache dominates: the test can tell them apart
    assert nbytes["recompute"] >= cache and nbytes["embed"] >= cache
    assert nbytes["runtime"] < weights * 3 + bg.numel() * 4 + 4096 < cache
    ref = run(protos["embed"], {"input": X.numpy()})
    for c in ("recompute", "runtime"):
        out = run(protos[c], {"input": X.numpy()})
        np.testing.assert_allclose(out["shap_values"], ref["shap_values"], atol=1e-6)
        np.testing.assert_array_equal(out["shap_indexes"], ref["shap_indexes"])
    # N = 0 and another N run through the same file
    out0 = run(protos["runtime"], {"input": X.numpy()[:0]})
    assert out0["shap_values"].shape == (0, 3, 16, 16, 2)
    out1 = run(protos["runtime"], {"input": X.numpy()[1:2]})
    np.testing.assert_allclose(out1["shap_values"], ref["shap_values"][1:2], atol=1e-6)


def _cache_bytes_of(model, bg) -> int:
    from deepshap_opt.onnx._convert import load_model
    from deepshap_opt.onnx._graph import ExplanationBuilder, prepare_model

    b = ExplanationBuilder(prepare_model(load_model(model, [bg.numpy()], None), None), [bg.numpy()],
                           outputs="topk:2", cache="runtime")
    proto = b.build()
    assert {p.key: p.value for p in proto.metadata_props}["deepshap_opt.cache"] == "runtime"
    return b._cache_bytes()


def test_auto_cache_rule(monkeypatch, exported):
    """auto: embed while small, fold ("recompute") while at most FOLD_MAX_BYTES, else embed for a file and
    "runtime" for DeepExplainer's in-memory sessions."""
    from deepshap_opt.onnx import _graph

    model, bg, _X, _path, _d = exported
    def meta(pr):
        return {p.key: p.value for p in pr.metadata_props}["deepshap_opt.cache"]

    assert meta(dso.build(model, bg, cache="auto")) == "embed"
    monkeypatch.setattr(_graph, "EMBED_MAX_BYTES", 0)
    monkeypatch.setattr(_graph, "EMBED_MAX_FRACTION", 0.0)
    assert meta(dso.build(model, bg, cache="auto")) == "recompute"
    monkeypatch.setattr(_graph, "FOLD_MAX_BYTES", 0)
    assert meta(dso.build(model, bg, cache="auto")) == "embed"
    assert dso.DeepExplainer(model, bg).cache == "runtime"
    with pytest.raises(ValueError, match="cache must be"):
        dso.build(model, bg, cache="fold")


def test_deep_explainer_drop_in(exported):
    model, bg, X, _path, d = exported
    e = dso.DeepExplainer(model, bg)
    v = e.shap_values(X)
    assert v.shape == (3, 3, 16, 16, 5) and v.dtype == np.float64
    assert e.expected_value.shape == (5,)
    v2, idx = e.shap_values(X, ranked_outputs=2)
    assert idx.shape == (3, 2)
    rows = np.arange(3)[:, None]
    np.testing.assert_allclose(v2, np.moveaxis(np.moveaxis(v, -1, 0)[idx.T, rows.T], 0, -1), atol=1e-7)
    # a plain .onnx path works too
    plain = str(d / "plain.onnx")
    torch.onnx.export(model, (bg[:2],), plain, dynamo=False, opset_version=18, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    e3 = dso.DeepExplainer(plain, bg.numpy())
    import deepshap_opt

    assert type(deepshap_opt.DeepExplainer(plain, bg.numpy())).__name__ == "ONNXDeepExplainer"
    np.testing.assert_allclose(e3.shap_values(X.numpy()), v, atol=1e-6)
    expl = e(X[:2])
    assert expl.values.shape == (2, 3, 16, 16, 5) and expl.base_values.shape == (2, 5)
    # its default session options turn onnxruntime's memory pattern off (the second run's doubled peak with
    # cache="runtime"); options the user gives are used as they are
    import onnxruntime as ort

    assert e._so.enable_mem_pattern is False
    so = ort.SessionOptions()
    assert dso.DeepExplainer(model, bg, session_options=so)._so.enable_mem_pattern is True


def test_import_does_not_pull_frameworks():
    code = ("import sys, deepshap_opt.onnx; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
            "raise SystemExit(repr(bad) if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stdout + proc.stderr


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(8 + 4, 3)

    def forward(self, v, img):
        h = torch.relu(self.a(v))
        g = torch.relu(self.b(img)).amax((2, 3))
        return self.fc(torch.cat([h * g.sum(1, keepdim=True), g], 1))


def test_multi_input(tmp_path):
    torch.manual_seed(1)
    model = TwoInputs().eval()
    bg = [torch.randn(5, 6), torch.randn(5, 2, 5, 5)]
    X = [torch.randn(3, 6), torch.randn(3, 2, 5, 5)]
    path = tmp_path / "two.onnx"
    dso.export(model, bg, path, outputs="all")
    proto = onnx.load(path)
    assert [o.name for o in proto.graph.output][-2:] == ["shap_values_input_0", "shap_values_input_1"]
    out = run(proto, {"input_0": X[0].numpy(), "input_1": X[1].numpy()})
    assert out["shap_values_input_0"].shape == (3, 6, 3) and out["shap_values_input_1"].shape == (3, 2, 5, 5, 3)
    err, scale = completeness_error(proto, out)
    assert err <= 1e-4 * scale
    e = dso.DeepExplainer(model, bg)
    vals = e.shap_values(X)
    assert isinstance(vals, list) and len(vals) == 2
    np.testing.assert_allclose(vals[1], out["shap_values_input_1"], atol=1e-6)
    TDE = torch_backend()
    if TDE is not None:
        try:
            tv = TDE(model, bg).shap_values(X, check_additivity=False)
        except Exception as ex:  # noqa: BLE001 - pragma: no cover
            pytest.skip(f"torch backend: {ex}")
        for a, b in zip(tv, vals):
            assert np.abs(np.asarray(a) - b).max() <= 1e-4 * scale


def test_external_data_above_the_protobuf_limit(tmp_path, monkeypatch):
    # the 2 GB switch, exercised with a tiny limit
    monkeypatch.setattr(dso, "_PROTO_LIMIT", 1000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    bg, X = torch.randn(4, 16), torch.randn(2, 16)
    path = tmp_path / "big.onnx"
    dso.export(model, bg, path)
    assert (tmp_path / "big.onnx.data").exists()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": X.numpy()})))
    assert out["shap_values"].shape == (2, 16, 1)


class _VGGish(nn.Module):
    """Conv → ReLU → Conv → ReLU → MaxPool → Linear: ReLU outputs read by the ReLU rule and by a max-pool."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))))
        r = torch.relu(h)
        return self.fc(torch.flatten(self.pool2(r) + 0.5 * r[:, :, ::2, ::2], 1))


def test_relu_outputs_are_not_cached(tmp_path):
    """The references' value of a ReLU's output is derived from its input's (Max(r, 0), computed in the run):
    only the ReLU inputs are cached, "recompute" folds no ReLU output (nor a max-pool of the references) into a
    constant at load, and the values equal the torch backend in every cache mode and with or without the Loop."""
    from deepshap_opt.onnx._convert import load_model
    from deepshap_opt.onnx._graph import ExplanationBuilder, prepare_model

    torch.manual_seed(0)
    model = _VGGish().eval()
    bg = torch.randn(16, 3, 16, 16)
    X = torch.randn(3, 3, 16, 16)
    proto = prepare_model(load_model(model, [bg.numpy()], None), None)
    b = ExplanationBuilder(proto, [bg.numpy()], outputs="topk:2", cache="recompute")
    built = b.build()
    relu_out = {n.output[0] for n in proto.graph.node if n.op_type == "Relu"}
    relu_in = {n.input[0] for n in proto.graph.node if n.op_type == "Relu"}
    assert len(relu_out) == 3 and set(b._r4d) == relu_out
    assert not set(b._r4) & relu_out and set(b._r4) <= relu_in | {"input"}
    weights = sum(p.numel() * 4 for p in model.parameters())
    folded = _optimized_initializer_bytes(built, tmp_path, "opt.onnx")
    # besides the cache: the weights (the Loop body's own copies of the Conv kernels too), the background, and
    # the references' pooled values (float32) and indexes (int64); the ReLU outputs would add 164 KB
    pooled = 16 * (8 * 8 * 8 + 8 * 4 * 4) * (4 + 8)
    relu_bytes = 16 * (2 * 8 * 16 * 16 + 8 * 8 * 8) * 4
    assert b._cache_bytes() <= folded <= b._cache_bytes() + 3 * weights + bg.numel() * 4 + pooled + 32768
    assert 3 * weights + 32768 < relu_bytes                    # the bound tells a cached ReLU output apart
    TDE = torch_backend()
    tv = np.asarray(TDE(model, bg).shap_values(X, ranked_outputs=2)[0]) if TDE is not None else None
    for cache in ("embed", "recompute", "runtime"):
        for budget in (None, 1):
            out = run(dso.build(model, bg, outputs="topk:2", cache=cache, memory_budget=budget),
                      {"input": X.numpy()})
            err, sc = completeness_error(built, out)
            assert err <= 1e-4 * sc, (cache, budget, err)
            if tv is not None:
                assert np.abs(out["shap_values"] - tv).max() <= 1e-4 * sc, (cache, budget)
