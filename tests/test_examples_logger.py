"""examples/train_with_logger.py runs end to end (shortened) and writes its TensorBoard log and drift plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_with_logger_example(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_with_logger.py"), "--out", str(tmp_path),
                           "--epochs", "2", "--every", "4",
                           "--train-size", "512"], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = tmp_path / "train_with_logger_drift.png"
    assert png.exists() and png.stat().st_size > 10_000
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 1000
    lines = (tmp_path / "records" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4                          # 2 epochs x 8 steps, one log every 4
    err = float(proc.stdout.split("max completeness error ")[1].split()[0])
    assert err < 1e-4
