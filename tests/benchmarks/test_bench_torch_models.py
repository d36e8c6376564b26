"""The benchmark models match torchvision's parameter counts and run forward at a small size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.torch_models import MODELS, calibrate_batchnorm

TORCHVISION_PARAMS = {
    "resnet50": 25_557_032,
    "vgg19": 143_667_240,
    "densenet201": 20_013_928,
    "efficientnet_b0": 5_288_548,
}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = MODELS[name](num_classes=1000)
        safe = MODELS[name](num_classes=1000, hook_safe=True)
    assert _count(model) == TORCHVISION_PARAMS[name]
    assert _count(safe) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_forward_small_input_and_hook_safe_variant_agrees(name):
    torch.manual_seed(0)
    model = MODELS[name](num_classes=10).eval()
    with torch.device("meta"):
        safe = MODELS[name](num_classes=10, hook_safe=True)
    safe.load_state_dict(model.state_dict(), assign=True)  # same weights: the state dicts must line up
    safe.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        y_safe = safe(x)
    assert y.shape == (1, 10)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_safe, rtol=0, atol=0)


def test_torchvision_idioms_are_present():
    """The point of these models: in-place ops and a reused module, as in torchvision."""
    resnet = MODELS["resnet50"](num_classes=10)
    block = resnet.layer1[0]
    assert block.relu.inplace and block.relu2 is block.relu and block.relu3 is block.relu
    safe_block = MODELS["resnet50"](num_classes=10, hook_safe=True).layer1[0]
    assert not safe_block.relu.inplace and safe_block.relu2 is not safe_block.relu
    effnet = MODELS["efficientnet_b0"](num_classes=10)
    silus = [m for m in effnet.modules() if isinstance(m, torch.nn.SiLU)]
    assert silus and all(m.inplace for m in silus)


def test_calibrate_batchnorm_gives_effnet_unit_scale_outputs():
    torch.manual_seed(0)
    model = MODELS["efficientnet_b0"](num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).abs().max().item()
        calibrate_batchnorm(model, torch.randn(4, 3, 32, 32))
        after = model(x).abs().max().item()
    assert not model.training
    assert before < 1e-6
    assert after > 1e-2
