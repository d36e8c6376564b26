"""The main example runs end to end and writes its picture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torch_digits_example(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "torch_digits.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "completeness" in proc.stdout
    png = tmp_path / "torch_digits.png"
    assert png.exists() and png.stat().st_size > 10_000
    err = float(proc.stdout.split("completeness: max |sum(phi) - (f(x) - E f)| = ")[1].split()[0])
    assert err < 1e-4
