"""Property: completeness holds on random networks of supported ops (hypothesis).

``DEEPSHAP_FUZZ_EXAMPLES`` sets the number of examples (CI: 200; ``tox -e fuzz``: 5000). A failing example
found by the fuzzer is added below as an explicit ``@example`` so that it stays a regression test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings

from deepshap_opt.torch import DeepExplainer

from .random_nets import SETTINGS, TorchCNN, TorchNet, cnn_specs, n_examples, net_specs, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def completeness(spec, dtype):
    net = TorchNet(spec).to(dtype).eval()
    g = torch.Generator().manual_seed(spec[3])
    bg = torch.randn(5, spec[0], generator=g, dtype=dtype)
    X = torch.randn(3, spec[0], generator=g, dtype=dtype)
    phi = DeepExplainer(net, bg).shap_values(X, check_additivity=False)
    with torch.no_grad():
        fx, fr = net(X).double().numpy(), net(bg).double().numpy()
    scale = max(np.abs(fx).max(), np.abs(fr).max(), 1e-12)
    return np.abs(phi.sum(1) - (fx - fr.mean(0))).max() / scale


@SETTINGS
@given(net_specs())
@example((3, [("softmix", 0, 0, "relu", 2)], 1, 0))
def test_completeness_float64(spec):
    assert completeness(spec, torch.float64) <= 1e-8


@settings(SETTINGS, max_examples=n_examples(1 / 4))
@given(net_specs())
def test_completeness_float32(spec):
    assert completeness(spec, torch.float32) <= 1e-4


def cnn_completeness(spec, dtype):
    net = TorchCNN(spec).to(dtype).eval()
    g = torch.Generator().manual_seed(spec[3])
    bg = torch.randn(4, spec[0], 8, 8, generator=g, dtype=dtype)
    X = torch.randn(2, spec[0], 8, 8, generator=g, dtype=dtype)
    phi = DeepExplainer(net, bg).shap_values(X, check_additivity=False)
    with torch.no_grad():
        fx, fr = net(X).double().numpy(), net(bg).double().numpy()
    scale = max(np.abs(fx).max(), np.abs(fr).max(), 1e-12)
    return np.abs(phi.reshape(2, -1, phi.shape[-1]).sum(1) - (fx - fr.mean(0))).max() / scale


@settings(SETTINGS, max_examples=n_examples(1 / 4))
@given(cnn_specs())
def test_cnn_completeness_float64(spec):
    assert cnn_completeness(spec, torch.float64) <= 1e-8


# found by the fuzzer (DEEPSHAP_FUZZ_EXAMPLES=5000, after 4,026 passing examples): a LayerNorm over 2 features
# (outputs ±γ + β up to eps/var, so rows differ there by ~1e-7) feeding max(u, relu(v)) of two projections of it
MAX_TIE_SPEC = (5, [("act", 0, 0, "relu", 4), ("layernorm", 0, 1, "relu", 2), ("act", 0, 0, "relu", 4),
                    ("act", 0, 0, "relu", 2), ("max", 2, 2, "relu", 3)], 1, 193)


def test_max_pair_small_delta_float64_completeness():
    """The max pair rule's multiplier was 0 where |Δa| < 1e-7 in float64 too (4.2e-6 of the output scale);
    float64 now uses spec.PAIR_EPS_FLOAT64 = 1e-14."""
    assert completeness(MAX_TIE_SPEC, torch.float64) <= 1e-8


def test_max_pair_small_delta_float32_completeness():
    assert completeness(MAX_TIE_SPEC, torch.float32) <= 1e-4
