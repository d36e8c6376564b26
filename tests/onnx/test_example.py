"""examples/onnx_digits.py trains a digits CNN, exports it with its explanation, and explains in a process
that can import only numpy + onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_digits_example(tmp_path):
    out = tmp_path / "digits.onnx"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "onnx_digits.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK" in p.stdout.splitlines()[-1]
    assert out.exists()
    acc = float(p.stdout.split("test accuracy ")[1].split()[0])
    assert acc > 0.85
