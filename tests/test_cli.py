"""The deepshap-opt command line: export → explain (→ .npy, PNG), check, bench, errors; and its example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def cli(*args, timeout=300, env_extra=None, prelude=""):
    """Run the CLI in a fresh interpreter (as the console script does); returns the CompletedProcess."""
    code = prelude + "import sys; from deepshap_opt.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, check=False)


def digits_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    bg = rng.random((8, 1, 8, 8), dtype=np.float32)
    X = rng.random((5, 1, 8, 8), dtype=np.float32)
    np.save(d / "bg.npy", bg)
    np.save(d / "x.npy", X)
    model = digits_cnn()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(bg[:2]),), str(d / "cnn.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
        ep = torch.export.export(model, (torch.from_numpy(bg[:2]),),
                                 dynamic_shapes=({0: torch.export.Dim("N")},))
        torch.export.save(ep, str(d / "cnn.pt2"))
        torch.jit.save(torch.jit.trace(model, torch.from_numpy(bg[:2])), str(d / "cnn_ts.pt"))
    with torch.no_grad():
        f = model(torch.from_numpy(X)).numpy().astype(np.float64)
        ef = model(torch.from_numpy(bg)).numpy().astype(np.float64).mean(0)
    return {"dir": d, "X": X, "f": f, "ef": ef}


def _completeness(out: Path, f, ef, indexes=None):
    phi = np.load(out / "shap_values.npy").astype(np.float64)
    idx = np.load(out / "shap_indexes.npy") if indexes is None else indexes
    s = phi.reshape(len(phi), -1, phi.shape[-1]).sum(1)
    want = np.take_along_axis(f, idx, 1) - ef[idx]
    return np.abs(s - want).max()


def test_export_explain_onnx_npy_and_png(files):
    d = files["dir"]
    r = cli("export", d / "cnn.onnx", "--background", d / "bg.npy", "-o", d / "e.onnx")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (d / "e.onnx").exists()
    # explain with torch, tensorflow and onnx made unimportable: only numpy + onnxruntime (+ matplotlib)
    block = "import sys\nfor _m in ('torch', 'tensorflow', 'keras', 'onnx', 'tf2onnx'): sys.modules[_m] = None\n"
    r = cli("explain", d / "e.onnx", "--input", d / "x.npy", "-o", d / "out", "--png", "--batch-size", "2",
            prelude=block)
    assert r.returncode == 0, r.stderr
    out = d / "out"
    phi = np.load(out / "shap_values.npy")
    assert phi.shape == (5, 1, 8, 8, 1)
    assert np.load(out / "predictions.npy").shape == (5, 10)
    assert (np.load(out / "shap_indexes.npy")[:, 0] == files["f"].argmax(1)).all()
    assert _completeness(out, files["f"], files["ef"]) < 1e-4
    pngs = sorted((out / "png").glob("*.png"))
    assert len(pngs) == 5 and all(p.stat().st_size > 2000 for p in pngs)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["cnn.pt2", "cnn_ts.pt"])
def test_export_torch_files(files, name):
    d = files["dir"]
    out = d / f"e_{name}.onnx"
    r = cli("export", d / name, "-b", d / "bg.npy", "-o", out, "--outputs", "all")
    assert r.returncode == 0, r.stderr
    r = cli("explain", out, "-i", d / "x.npy", "-o", d / f"out_{name}", "-q")
    assert r.returncode == 0, r.stderr
    idx = np.tile(np.arange(10), (5, 1))
    assert _completeness(d / f"out_{name}", files["f"], files["ef"], idx) < 1e-4


def test_explain_directory_of_images(files):
    PIL = pytest.importorskip("PIL.Image")
    d = files["dir"]
    imgs = d / "imgs"
    imgs.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for k in range(3):
        PIL.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(imgs / f"img{k}.png")
    if not (d / "e.onnx").exists():
        assert cli("export", d / "cnn.onnx", "-b", d / "bg.npy", "-o", d / "e.onnx").returncode == 0
    r = cli("explain", d / "e.onnx", "-i", imgs, "-o", d / "out_imgs", "--png")
    assert r.returncode == 0, r.stderr
    assert np.load(d / "out_imgs" / "shap_values.npy").shape == (3, 1, 8, 8, 1)
    assert (d / "out_imgs" / "files.txt").read_text().split() == ["img0.png", "img1.png", "img2.png"]
    assert sorted(p.name for p in (d / "out_imgs" / "png").iterdir()) == ["img0.png", "img1.png", "img2.png"]


def test_check_lists_ops(files):
    d = files["dir"]
    r = cli("check", d / "cnn.onnx")
    assert r.returncode == 0, r.stdout + r.stderr
    for op, rule in (("Conv", "linear"), ("Relu", "rescale"), ("MaxPool", "maxpool"), ("Gemm", "linear")):
        assert any(line.split()[:1] == [op] and rule in line.split() for line in r.stdout.splitlines()), r.stdout
    assert "dry run: the explanation graph builds" in r.stdout
    for name in ("cnn.pt2", "cnn_ts.pt"):
        r = cli("check", d / name)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "relu" in r.stdout and "rescale" in r.stdout and "max_pool2d" in r.stdout


def test_check_unsupported_op_exits_1(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="relu0"),
                           helper.make_node("Round", ["h"], ["y"], name="round0")], "g", [X], [Y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "round.onnx"))
    r = cli("check", tmp_path / "round.onnx")
    assert r.returncode == 1
    assert "Round" in r.stdout and "unsupported" in r.stdout and "round0" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    # the torch listing finds it too
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(torch.relu(x))

    ep = torch.export.export(M(), (torch.randn(2, 4),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    r = cli("check", tmp_path / "m.pt2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "special_bessel_j0" in r.stdout and "unsupported" in r.stdout


@pytest.mark.parametrize("argv", [
    ["export", "/no/such/model.onnx", "-b", "/no/such/bg.npy", "-o", "x.onnx"],
    ["explain", "/no/such/e.onnx", "-i", "/no/such/x.npy", "-o", "out"],
    ["check", "/no/such/model.onnx"],
    ["check", "README.md"],
    ["export", "model.onnx"],                 # usage error: missing required options
    ["frobnicate"],
])
def test_bad_path_one_line_error(argv):
    r = cli(*argv)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("deepshap-opt") and ": error: " in lines[0] and "Traceback" not in r.stderr


def test_bad_input_shape_and_debug(files):
    d = files["dir"]
    if not (d / "e.onnx").exists():
        assert cli("export", d / "cnn.onnx", "-b", d / "bg.npy", "-o", d / "e.onnx").returncode == 0
    np.save(d / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    r = cli("explain", d / "e.onnx", "-i", d / "wrong.npy", "-o", d / "o2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not match" in r.stderr
    r = cli("check", "/no/such/model.onnx", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_python_m_and_help():
    r = subprocess.run([sys.executable, "-m", "deepshap_opt", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, check=False)
    assert r.returncode == 0 and "export" in r.stdout and "explain" in r.stdout and "bench" in r.stdout


def test_bench_quick(tmp_path):
    if not (ROOT / "benchmarks" / "bench_torch.py").exists():
        pytest.skip("benchmarks/bench_torch.py not present")
    pytest.importorskip("shap")
    pytest.importorskip("captum")
    r = cli("bench", "--quick", "--", "--methods", "ours", "--cache-dir", tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "small_cnn" in r.stdout and "|" in r.stdout


def test_cli_roundtrip_example(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "cli_roundtrip.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"), check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "completeness" in proc.stdout
    err = float(proc.stdout.split("completeness: max |sum(phi) - (f(x) - E f)| = ")[1].split()[0])
    assert err < 1e-4
    pngs = list((tmp_path / "explained" / "png").glob("*.png"))
    assert pngs and all(p.stat().st_size > 2000 for p in pngs)


def test_export_keras_file(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    code = ("import os, numpy as np, keras\n"
            "keras.utils.set_random_seed(0)\n"
            "m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, padding='same', "
            "activation='relu'), keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)])\n"
            f"d = {str(tmp_path)!r}\n"
            "m.save(os.path.join(d, 'k.keras'))\n"
            "rng = np.random.default_rng(0)\n"
            "bg, x = rng.random((6, 8, 8, 1), dtype=np.float32), rng.random((3, 8, 8, 1), dtype=np.float32)\n"
            "np.save(os.path.join(d, 'bg.npy'), bg); np.save(os.path.join(d, 'x.npy'), x)\n"
            "np.save(os.path.join(d, 'f.npy'), m(x).numpy()); np.save(os.path.join(d, 'ef.npy'), m(bg).numpy().mean(0))\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = cli("export", tmp_path / "k.keras", "-b", tmp_path / "bg.npy", "-o", tmp_path / "k.onnx", "--outputs", "all")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("explain", tmp_path / "k.onnx", "-i", tmp_path / "x.npy", "-o", tmp_path / "out", "--png")
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.load(tmp_path / "out" / "shap_values.npy").shape == (3, 8, 8, 1, 10)
    idx = np.tile(np.arange(10), (3, 1))
    f, ef = np.load(tmp_path / "f.npy").astype(np.float64), np.load(tmp_path / "ef.npy").astype(np.float64)
    assert _completeness(tmp_path / "out", f, ef, idx) < 1e-4
    assert len(list((tmp_path / "out" / "png").glob("*.png"))) == 3
    r = cli("check", tmp_path / "k.keras")          # converted to ONNX, input shape from the model
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Conv" in r.stdout and "dry run: the explanation graph builds" in r.stdout


def test_onnx_op_table_covers_the_backend():
    """Every op type that deepshap_opt.onnx's backward dispatch handles is in the CLI's listing table, and
    every entry of the table names a canonical op of the rule specification."""
    import inspect
    import re

    from deepshap_opt.cli import _onnx_op_table
    from deepshap_opt.onnx import _graph
    from deepshap_opt.rules import spec

    src = inspect.getsource(_graph.ExplanationBuilder.vjp)
    handled = set()
    for m in re.finditer(r"op (?:==|in) ([^:]+):", src):
        handled |= set(re.findall(r'"([A-Z][A-Za-z]*)"', m.group(1)))
    handled |= set(_graph._ELEMENTWISE) | set(_graph._PASS)
    table = _onnx_op_table()
    assert handled <= set(table), sorted(handled - set(table))
    assert set(table) <= handled, sorted(set(table) - handled)
    assert all(canon in spec.OPS for canon in table.values()), [c for c in table.values() if c not in spec.OPS]


def test_target_mode_and_reexport_error(files):
    d = files["dir"]
    r = cli("export", d / "cnn.onnx", "-b", d / "bg.npy", "-o", d / "t.onnx", "--outputs", "target")
    assert r.returncode == 0, r.stderr
    r = cli("explain", d / "t.onnx", "-i", d / "x.npy", "-o", d / "out_t")
    assert r.returncode == 2 and "--target" in r.stderr
    r = cli("explain", d / "t.onnx", "-i", d / "x.npy", "-o", d / "out_t", "--target", "3")
    assert r.returncode == 0, r.stderr
    assert _completeness(d / "out_t", files["f"], files["ef"], np.full((5, 1), 3)) < 1e-4
    # an exported file is not a model to export again
    r = cli("export", d / "t.onnx", "-b", d / "bg.npy", "-o", d / "t2.onnx")
    assert r.returncode == 2 and "already has shap_values" in r.stderr and not (d / "t2.onnx").exists()


def test_explain_turns_onnxruntime_memory_pattern_off(files):
    # the pattern cost explanation files up to 13 % of the time (docs/deployment.md, "Session options")
    d = files["dir"]
    if not (d / "e.onnx").exists():
        assert cli("export", d / "cnn.onnx", "--background", d / "bg.npy", "-o", d / "e.onnx").returncode == 0
    spy = ("import onnxruntime as _ort\n_Real = _ort.InferenceSession\n"
           "class _Spy(_Real):\n"
           "    def __init__(self, path, so=None, *a, **k):\n"
           "        print('MEM_PATTERN', so.enable_mem_pattern)\n"
           "        super().__init__(path, so, *a, **k)\n"
           "_ort.InferenceSession = _Spy\n")
    r = cli("explain", d / "e.onnx", "--input", d / "x.npy", "-o", d / "out_mp", "-q", prelude=spy)
    assert r.returncode == 0, r.stderr
    assert "MEM_PATTERN False" in r.stdout
