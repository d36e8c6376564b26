"""The documentation site builds (mkdocs --strict) and its deployment snippet runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    # the rule table page is rendered from the spec at build time
    from deepshap_opt.rules import spec

    rules_html = (site / "rules" / "index.html").read_text()
    for op in list(spec.OPS)[:5] + list(spec.OPS)[-5:]:
        assert f"<code>{op}</code>" in rules_html
    for page in ("migrating", "deployment"):
        assert (site / page / "index.html").exists()
    assert not (site / "hooks.py").exists()


def test_index_images_exist():
    text = (ROOT / "docs" / "index.md").read_text()
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / "docs" / img).exists(), img


def _python_block(md: str, heading: str) -> str:
    section = md.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_deployment_python_snippet_runs(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import deepshap_opt.onnx as dso

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10)).eval()
    rng = np.random.default_rng(0)
    dso.export(model, rng.random((8, 1, 8, 8), dtype=np.float32), str(tmp_path / "explained.onnx"), outputs="top1")
    np.save(tmp_path / "x.npy", rng.random((3, 1, 8, 8), dtype=np.float32))
    code = _python_block((ROOT / "docs" / "deployment.md").read_text(), "## Python (onnxruntime)")
    script = tmp_path / "snippet.py"
    script.write_text(code + "\nprint('snippet ok', heat.shape)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "snippet ok (3, 1, 8, 8)" in proc.stdout


def test_deployment_javascript_snippet_runs(tmp_path):
    """Runs only where Node.js can require onnxruntime-node (e.g. NODE_PATH=/path/to/node_modules)."""
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    probe = subprocess.run([node, "-e", "require('onnxruntime-node')"], capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        pytest.skip("onnxruntime-node is not installed for node")
    torch = pytest.importorskip("torch")
    import deepshap_opt.onnx as dso

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10)).eval()
    bg = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    dso.export(model, bg, str(tmp_path / "digits_explained.onnx"), outputs="top1")
    md = (ROOT / "docs" / "deployment.md").read_text()
    (tmp_path / "snippet.js").write_text(re.search(r"```javascript\n(.*?)```", md, re.DOTALL).group(1))
    proc = subprocess.run([node, "snippet.js"], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base = float(proc.stdout.split("base value")[1].split()[0])
    with torch.no_grad():
        f0 = model(torch.zeros(1, 1, 8, 8))[0]
        ev = model(torch.from_numpy(bg)).mean(0)
    k = int(f0.argmax())
    assert abs(base - float(ev[k])) < 1e-4
