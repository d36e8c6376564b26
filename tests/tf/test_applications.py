"""Completeness on the keras.applications models of the issue (weights=None, small inputs, raw logits).

Untrained, these models' activations shrink to 1e-4…1e-12 through depth (MobileNetV2's logits are ~1e-12),
which is where absolute thresholds broke completeness (8.5e-2 on MobileNetV2, 3.9e-4 on VGG19 before the
thresholds scaled with the values); the logits (no softmax to flatten the scale) are the hard case.

Marked slow (tracing a DenseNet201 takes a while on 2 cores): run with ``pytest -m slow tests/tf``.
"""

import keras
import numpy as np
import pytest

from deepshap_opt.tf import DeepExplainer

APPS = {"VGG19": 32, "ResNet50": 32, "DenseNet201": 32, "EfficientNetB0": 32, "MobileNetV2": 32}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPS))
def test_application_completeness(name, check):
    keras.utils.set_random_seed(0)
    size = APPS[name]
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=5,
                                                classifier_activation=None)
    rng = np.random.default_rng(0)
    bg = rng.uniform(0, 255 if name == "EfficientNetB0" else 1, size=(4, size, size, 3)).astype("float32")
    X = rng.uniform(0, 255 if name == "EfficientNetB0" else 1, size=(2, size, size, 3)).astype("float32")
    e = DeepExplainer(model, bg)
    err, sv = check(e, lambda x: model(x, training=False).numpy(), X)
    assert sv.shape == (2, size, size, 3, 5)
    assert err < 1e-4, f"{name}: completeness error {err:.3g}"
