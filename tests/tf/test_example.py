"""examples/keras_digits.py trains, explains and saves its PNG."""

import importlib.util
import os

import pytest


def test_keras_digits_example(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "keras_digits.py")
    spec = importlib.util.spec_from_file_location("keras_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png, err, acc = mod.main(["--out", str(tmp_path), "--epochs", "4"])
    assert os.path.getsize(png) > 1000 and png.endswith(".png")
    assert err < 1e-4 and acc > 0.8
