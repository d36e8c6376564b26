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


def test_fuzz_run_plan():
    """``tox -e fuzz`` (tests/fuzz_run.py): every property gets its CI count x 25, the Keras ones in slices of
    at most 250 examples (125 CNNs), every process its own hypothesis seed, and the DEEPSHAP_FUZZ_EXAMPLES it
    is given yields its slice's count under random_nets' scaling."""
    from .fuzz_run import PROPERTIES, plan

    jobs = plan(5000, 250, 1, None, True)
    want = {"mlp_three": 5000, "cnn_three": 1250, "mlp_keras64": 500, "mlp_onnx64": 500, "torch_mlp64": 5000,
            "torch_mlp32": 1250, "torch_cnn64": 1250}
    most = {"mlp_three": 250, "cnn_three": 125, "mlp_keras64": 250}
    for name, _, _, fraction, _ in PROPERTIES:
        js = [j for j in jobs if j.name == name]
        assert sum(j.target for j in js) == want[name]
        assert max(j.target for j in js) <= most.get(name, want[name])
        # SETTINGS' max_examples (fraction 1) or random_nets.n_examples(fraction)
        assert all(j.target == (j.env_examples if fraction == 1 else max(int(j.env_examples * fraction), 10))
                   for j in js)
    assert len({j.seed for j in jobs}) == len(jobs)
    # the torch/ONNX properties and the regression tests first, then the Keras slices
    names = [j.name for j in jobs]
    assert names.index("regressions") < names.index("mlp_three") < names.index("cnn_three")
    assert set(names[:names.index("mlp_three")]) == {"torch_mlp64", "torch_mlp32", "torch_cnn64", "mlp_onnx64",
                                                     "regressions"}
