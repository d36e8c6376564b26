"""The ``deepshap-opt`` command's input handling and error messages, called in-process (``main(argv)``).

``tests/test_cli.py`` runs the command end to end in fresh interpreters; this file checks the many small
branches: every bad input gives one readable ``deepshap-opt: error: ...`` line and exit code 2 (1 for
``check`` with unsupported ops), the ``--outputs`` spellings, image layouts, the ``.npz`` reader, the
``check`` listings, ``--version``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from deepshap_opt import cli


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, match, code=2):
    rc, out, err = run(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("deepshap-opt: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def _export_onnx(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("clicov")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.SiLU(), torch.nn.Linear(6, 3)).eval()
    _export_onnx(mlp, torch.zeros(2, 5), d / "mlp.onnx")
    np.save(d / "bg.npy", rng.normal(size=(6, 5)).astype(np.float32))
    np.save(d / "x.npy", rng.normal(size=(4, 5)).astype(np.float32))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    _export_onnx(cnn, torch.zeros(2, 3, 6, 6), d / "cnn.onnx")
    np.save(d / "bg_img.npy", rng.random((4, 3, 6, 6), dtype=np.float32))
    return d


def test_version_and_no_command(capsys):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("deepshap-opt ")
    rc, out, _ = run(capsys)
    assert rc == 2 and "export" in out and "explain" in out


@pytest.mark.parametrize("value,expected", [
    ("top1", "top1"), ("all", "all"), ("target", "target"), ("topk:3", "topk:3"), ("top2", "topk:2"), ("1", 1)])
def test_outputs_spellings(value, expected):
    assert cli._parse_outputs(value) == expected


def test_outputs_bad_spelling(capsys, d):
    one_line_error(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npy", "-o", d / "o.onnx", "--outputs", "best",
                   match="--outputs must be top1, topK")


@pytest.mark.parametrize("outputs,k", [("top2", 2), ("1", 1), ("all", 3)])
def test_export_then_explain_with_output_modes(capsys, d, outputs, k):
    out_file = d / f"e_{outputs}.onnx"
    rc, _, err = run(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npy", "-o", out_file, "--outputs", outputs)
    assert rc == 0, err
    rc, _, err = run(capsys, "explain", out_file, "-i", d / "x.npy", "-o", d / f"out_{outputs}", "-q",
                       "--threads", "1", "--batch-size", "3")
    assert rc == 0, err
    phi = np.load(d / f"out_{outputs}" / "shap_values.npy")
    assert phi.shape == (4, 5, k)


def test_export_npz_background_and_float64(capsys, d):
    bg = np.load(d / "bg.npy").astype(np.float64)
    np.savez(d / "bg.npz", bg=bg)
    rc, _, err = run(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npz", "-o", d / "npz.onnx")
    assert rc == 0, err
    np.savez(d / "two.npz", a=bg, b=bg)
    one_line_error(capsys, "export", d / "mlp.onnx", "-b", d / "two.npz", "-o", d / "n2.onnx",
                   match="must hold exactly one array")
    (d / "junk.npy").write_bytes(b"not an array")
    one_line_error(capsys, "export", d / "mlp.onnx", "-b", d / "junk.npy", "-o", d / "n3.onnx",
                   match="cannot read background")
    np.save(d / "scalar.npy", np.float32(1.0))
    one_line_error(capsys, "export", d / "mlp.onnx", "-b", d / "scalar.npy", "-o", d / "n4.onnx",
                   match="needs a leading axis of rows")
    np.save(d / "ints.npy", np.ones((3, 5), np.int64))
    rc, _, err = run(capsys, "export", d / "mlp.onnx", "-b", d / "ints.npy", "-o", d / "ints.onnx")
    assert rc == 0, err          # integer backgrounds are converted to float32


def test_model_path_errors(capsys, d, tmp_path):
    one_line_error(capsys, "export", tmp_path, "-b", d / "bg.npy", "-o", d / "x.onnx", match="is a directory")
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    one_line_error(capsys, "export", tmp_path / "sm", "-b", d / "bg.npy", "-o", d / "x.onnx",
                   match="SavedModel directory")
    one_line_error(capsys, "export", d / "mlp.onnx", "-b", d / "nope.npy", "-o", d / "x.onnx", match="no such file")
    one_line_error(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npy", "-o", tmp_path / "no" / "dir" / "x.onnx",
                   match="output directory does not exist")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    one_line_error(capsys, "export", tmp_path / "bad.onnx", "-b", d / "bg.npy", "-o", d / "x.onnx", match="bad.onnx")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    one_line_error(capsys, "export", tmp_path / "bad.pt", "-b", d / "bg.npy", "-o", d / "x.onnx",
                   match="cannot load TorchScript file")
    (tmp_path / "bad.pt2").write_bytes(b"garbage")
    one_line_error(capsys, "export", tmp_path / "bad.pt2", "-b", d / "bg.npy", "-o", d / "x.onnx",
                   match="cannot load torch.export program")


def test_explain_errors(capsys, d, tmp_path):
    one_line_error(capsys, "explain", d / "mlp.onnx", "-i", d / "x.npy", "-o", tmp_path / "o",
                   match="has no shap_values output")
    assert run(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npy", "-o", d / "e.onnx")[0] == 0
    one_line_error(capsys, "explain", d / "e.onnx", "-i", tmp_path / "none.npy", "-o", tmp_path / "o",
                   match="no such file or directory")
    one_line_error(capsys, "explain", d / "e.onnx", "-i", d / "x.npy", "-o", tmp_path / "o", "--target", "1",
                   match="--target applies to files exported with --outputs target")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    one_line_error(capsys, "explain", tmp_path / "bad.onnx", "-i", d / "x.npy", "-o", tmp_path / "o",
                   match="onnxruntime cannot load")


def test_explain_png_of_vector_inputs(capsys, d, tmp_path):
    pytest.importorskip("matplotlib")
    assert run(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npy", "-o", d / "e_png.onnx", "--outputs", "0")[0] == 0
    rc, _, err = run(capsys, "explain", d / "e_png.onnx", "-i", d / "x.npy", "-o", tmp_path / "o", "--png", "-q")
    assert rc == 0, err
    pngs = sorted((tmp_path / "o" / "png").glob("*.png"))
    assert len(pngs) == 4 and all(p.stat().st_size > 0 for p in pngs)


@pytest.mark.parametrize("layout,shape", [("nhwc", (2, 6, 6, 3)), ("nhw", (2, 6, 6)), ("nchw", (2, 3, 6, 6))])
def test_image_layouts(layout, shape):
    assert cli._image_layout(shape, "auto") == layout
    assert cli._image_layout(shape, "nchw") == "nchw"        # an explicit layout wins


def test_image_layout_undecidable():
    with pytest.raises(cli.CLIError, match="cannot tell the image layout"):
        cli._image_layout((2, 5, 6, 7), "auto")


def test_images_nhwc_and_grey(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for i in range(2):
        Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    arr, names, lay = cli._load_images(tmp_path, (None, 6, 6, 3), "auto", 1 / 255, np.float32)
    assert arr.shape == (2, 6, 6, 3) and lay == "nhwc" and names == ["im0.png", "im1.png"]
    assert np.allclose(arr[1], 40 / 255, atol=1e-6)
    arr, _, lay = cli._load_images(tmp_path, (None, 6, 6), "auto", 1.0, np.float64)
    assert arr.shape == (2, 6, 6) and lay == "nhw" and arr.dtype == np.float64
    with pytest.raises(cli.CLIError, match="not static"):
        cli._load_images(tmp_path, (None, 3, "h", "w"), "nchw", 1.0, np.float32)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(cli.CLIError, match="cannot read image"):
        cli._load_images(tmp_path, (None, 6, 6, 3), "auto", 1.0, np.float32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(cli.CLIError, match="no images"):
        cli._load_images(empty, (None, 6, 6, 3), "auto", 1.0, np.float32)


def test_check_onnx_verbose_and_static(capsys, d):
    rc, out, err = run(capsys, "check", d / "mlp.onnx", "-v")
    assert rc == 0, err
    assert out.splitlines()[0].split()[:3] == ["op", "node", "status"]
    assert "Sigmoid" in out and "rescale" in out          # SiLU is recognised as one fused rule site
    rc, out, _ = run(capsys, "check", d / "mlp.onnx", "--static")
    assert rc == 0 and "Gemm" in out


def test_check_onnx_file_that_is_not_onnx(capsys, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    one_line_error(capsys, "check", tmp_path / "bad.onnx", match="cannot read ONNX file")


def test_check_torch_through_onnx_needs_background(capsys, d, tmp_path):
    ts = tmp_path / "m.pt"
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, 5)), str(ts))
    one_line_error(capsys, "check", ts, "--onnx", match="needs --background")
    rc, out, err = run(capsys, "check", ts, "--onnx", "-b", d / "bg.npy")
    assert rc == 0, err
    assert "Tanh" in out
    rc, out, err = run(capsys, "check", ts, "-v")          # TorchScript listing
    assert rc == 0, err
    assert "aten::tanh" in out


def test_check_torchscript_with_control_flow_and_constants(capsys, tmp_path):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            scale = torch.ones(1) * 2.0              # does not depend on the input
            if bool(x.sum() > 0):
                x = torch.relu(x)
            return self.fc(x) * scale

    path = tmp_path / "b.pt"
    torch.jit.save(torch.jit.script(Branchy()), str(path))
    rc, out, err = run(capsys, "check", path, "-v")
    assert rc in (0, 1), err
    assert "structural" in out and "control flow" in out


def test_bench_unknown_location(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_repo_root", lambda: None)
    one_line_error(capsys, "bench", "--quick", match="the benchmark suite (benchmarks/) is not here")


def test_bench_missing_script(capsys, monkeypatch, tmp_path):
    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    rc, out, err = run(capsys, "bench", "--suite", "onnx")
    assert rc == 2 and "not present, skipped" in out and "no benchmark script found" in err


def test_debug_shows_the_traceback(d):
    with pytest.raises(cli.CLIError):
        cli.main(["--debug", "export", str(d / "mlp.onnx"), "-b", str(d / "nope.npy"), "-o", str(d / "x.onnx")])


def _onnx_graph(tmp_path):
    """A hand-written ONNX graph with the ops whose canonical rule depends on what varies."""
    from onnx import TensorProto, helper

    c = helper.make_tensor("c", TensorProto.FLOAT, [4], [0.5, 1.5, 2.0, 3.0])
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["m"]),                       # one varying operand
        helper.make_node("Div", ["m", "c"], ["d1"]),                      # x / const
        helper.make_node("Div", ["c", "d1"], ["d2"]),                     # const / x: reciprocal
        helper.make_node("Max", ["d2", "c"], ["mx"]),                     # max with a constant: clip
        helper.make_node("Pow", ["mx", "d1"], ["p"]),                     # two varying operands
        helper.make_node("Softplus", ["p"], ["sp"]),
        helper.make_node("Tanh", ["sp"], ["th"]),
        helper.make_node("Mul", ["p", "th"], ["mish"]),                   # x·tanh(softplus(x)): mish, fused
        helper.make_node("Relu", ["c"], ["const_only"]),                  # does not depend on the input
        helper.make_node("Relu", ["x"], ["side"]),                        # does not feed the output
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("mish", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 4])], [c])
    path = tmp_path / "ops.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_check_onnx_names_the_rule_of_each_op(capsys, tmp_path):
    rc, out, err = run(capsys, "check", _onnx_graph(tmp_path), "-v", "--static")
    assert rc == 0, out + err
    rows = {ln.split()[1]: ln.split(None, 4) for ln in out.splitlines()[1:] if not ln.startswith(("#", "all "))}
    want = {"m": ("linear", "mul_const"), "d1": ("linear", "div_const"), "d2": ("rescale", "reciprocal"),
            "mx": ("rescale", "clip"), "p": ("shapley_pair", "pow_pair"), "sp": ("rescale", "mish (fused)"),
            "th": ("rescale", "mish (fused)"), "mish": ("rescale", "mish (fused)")}
    for node, (rule, canon) in want.items():
        assert rows[node][2:] == ["ok", rule, canon], rows[node]
    assert rows["const_only"][2] == "constant" and rows["side"][2] == "off-path"


def test_check_pt2_lists_rules_by_what_varies(capsys, tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(4)

        def forward(self, x):
            a = torch.softmax(x, 1)
            b = torch.maximum(x, a) + torch.minimum(x, torch.tensor(0.5))
            c = torch.bmm(x.unsqueeze(2), a.unsqueeze(1)).sum(2)                # two varying operands
            return self.ln(b * c + torch.arange(4.0))

    ep = torch.export.export(M().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("N")},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    rc, out, err = run(capsys, "check", tmp_path / "m.pt2", "-v")
    assert rc == 0, out + err
    assert "softmax" in out and "bilinear" in out and "shapley_pair" in out and "normalization" in out
    assert "constant" in out                    # arange does not depend on the input


def test_explain_progress_without_tqdm(capsys, d, monkeypatch):
    import sys

    assert run(capsys, "export", d / "mlp.onnx", "-b", d / "bg.npy", "-o", d / "e_prog.onnx")[0] == 0
    monkeypatch.setitem(sys.modules, "tqdm", None)                   # as if tqdm were not installed
    rc, _, err = run(capsys, "explain", d / "e_prog.onnx", "-i", d / "x.npy", "-o", d / "o_prog", "--batch-size",
                     "2")
    assert rc == 0, err
    assert "4/4 rows" in err


def test_bad_keras_file_and_interrupt(capsys, d, tmp_path, monkeypatch):
    pytest.importorskip("keras")
    (tmp_path / "m.keras").write_bytes(b"not a zip")
    one_line_error(capsys, "export", tmp_path / "m.keras", "-b", d / "bg.npy", "-o", tmp_path / "x.onnx",
                   match="cannot load Keras model")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_check", interrupted)
    rc, _, err = run(capsys, "check", d / "mlp.onnx")
    assert rc == 130 and "interrupted" in err


def test_bench_failing_suite_exits_1(capsys, monkeypatch, tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_onnx.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    rc, _, err = run(capsys, "bench", "--suite", "onnx")
    assert rc == 1 and "exited with code 3" in err
