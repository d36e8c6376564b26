"""TF MFABA's walk is a ``tf.function`` (AutoGraph-converted ``tf.while_loop``); run eagerly — as
``tf.config.run_functions_eagerly(True)`` does when a user debugs — it must give the same attributions and path."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from deepshap_opt.tf import MFABA


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    L = keras.layers
    return keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(4, 3, padding="same", activation="relu"),
                             L.GlobalAveragePooling2D(), L.Dense(5, activation="tanh"), L.Dense(3)])


@pytest.fixture
def eager():
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


@pytest.mark.parametrize("variant", ["sharp", "smooth"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_eager_walk_equals_traced_walk(model, variant, early_stop, request):
    x = np.random.default_rng(1).random((3, 6, 6, 2)).astype(np.float32)
    kw = {"variant": variant, "steps": 6, "early_stop": early_stop}
    traced, tpath = MFABA(model, **kw).attribute(x, target=[0, 1, 2], return_path=True)
    request.getfixturevalue("eager")
    eager, epath = MFABA(model, **kw).attribute(x, target=[0, 1, 2], return_path=True)
    np.testing.assert_allclose(eager, traced, rtol=1e-5, atol=1e-6)
    for a, b in zip(epath, tpath):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    no_path = MFABA(model, **kw).attribute(x, target=[0, 1, 2])
    np.testing.assert_allclose(no_path, traced, rtol=1e-5, atol=1e-6)
