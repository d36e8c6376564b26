import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def completeness_error(explainer, model_fn, X, multi=False):
    """max |Σφ − (f(x) − E f)| / output scale, over rows and outputs."""
    sv = explainer.shap_values(X, check_additivity=False)
    phis = sv if multi else [sv]
    total = sum(p.reshape(p.shape[0], -1, p.shape[-1]).sum(axis=1) for p in phis)
    out = np.asarray(model_fn(X), np.float64).reshape(total.shape[0], -1)
    target = out - explainer.expected_value[None, :]
    scale = max(np.abs(out).max(), np.abs(explainer.expected_value).max())
    return float(np.abs(total - target).max() / scale), sv


@pytest.fixture
def rng():
    keras.utils.set_random_seed(0)
    return np.random.default_rng(0)


@pytest.fixture
def check():
    return completeness_error
