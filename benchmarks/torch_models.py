"""Plain-PyTorch versions of four torchvision classification architectures, for the benchmarks.

torchvision cannot be imported on the project's machines, so the architectures are re-declared here with
the same layer structure, parameter counts and -- on purpose -- the same code idioms as torchvision:
in-place ``ReLU``/``SiLU``, one ``ReLU`` module reused several times inside a ResNet bottleneck,
``out += identity`` residuals, functional calls (``F.relu(..., inplace=True)``,
``F.adaptive_avg_pool2d``, ``torch.flatten``, ``torch.cat``) and element-wise gating in squeeze-excitation.
An explainer that only hooks leaf modules, or that cannot cope with in-place ops, is exercised the same way
it would be by the real torchvision models.

Parameter counts at ``num_classes=1000`` (checked in tests/benchmarks/test_torch_models.py):

============== ===========
resnet50        25,557,032
vgg19          143,667,240
densenet201     20,013,928
efficientnet_b0  5,288,548
============== ===========

Weights use the same initialisation schemes as torchvision (random init; no pretrained weights).

Every factory takes ``hook_safe=False``: the default is the torchvision code path. ``hook_safe=True`` builds
the same network with the same parameters (and, from the same seed, the same weights and outputs) rewritten
the way module-hook explainers need it: every in-place op made out-of-place (``ReLU(inplace=False)``,
``out = out + identity``, ``F.relu(x)``, ...) and no module called twice (ResNet's bottleneck gets one ReLU
module per use). shap 0.51 and captum 0.9 crash on the default version -- their backward hooks wrap module
outputs in views that the in-place ops then modify, and a reused module's hooks see only one of its calls --
so the hook-safe version is what a user would have to rewrite the model into before running them, and it is
what the benchmarks time them on.

:func:`calibrate_batchnorm` re-estimates the BatchNorm running statistics from one batch of data. At
torchvision's random initialisation EfficientNet-B0's outputs are ~1e-13 (its activations vanish), which
would make any attribution comparison meaningless; the benchmarks calibrate all four models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "VGG",
    "DenseNet",
    "EfficientNet",
    "ResNet",
    "calibrate_batchnorm",
    "densenet201",
    "efficientnet_b0",
    "resnet50",
    "vgg19",
]


# --------------------------------------------------------------------------------------------- ResNet50
def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv; one ReLU module used three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64, groups: int = 1, inplace: bool = True, share_relu: bool = True):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=inplace)
        # torchvision calls self.relu three times; the hook-safe variant gives each call its own module
        self.relu2 = self.relu3 = self.relu
        if not share_relu:
            self.relu2 = nn.ReLU(inplace=inplace)
            self.relu3 = nn.ReLU(inplace=inplace)
        self.downsample = downsample
        self.stride = stride
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu2(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        if self.inplace:
            out += identity
        else:
            out = out + identity
        out = self.relu3(out)
        return out


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000,
                 block: type[Bottleneck] = Bottleneck, inplace: bool = True):
        super().__init__()
        self.inplanes = 64
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=inplace)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[Bottleneck], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        kw = {"inplace": self.inplace, "share_relu": self.inplace}
        layers = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes, **kw) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet50(num_classes: int = 1000, hook_safe: bool = False) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes=num_classes, inplace=not hook_safe)


# ------------------------------------------------------------------------------------------------ VGG19
_VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                               512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, dropout: float = 0.5, inplace: bool = True):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def _vgg_features(cfg: list[int | str], batch_norm: bool = False, inplace: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1)
        if batch_norm:
            layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=inplace)]
        else:
            layers += [conv, nn.ReLU(inplace=inplace)]
        in_channels = int(v)
    return nn.Sequential(*layers)


def vgg19(num_classes: int = 1000, hook_safe: bool = False) -> VGG:
    return VGG(_vgg_features(_VGG19_CFG, inplace=not hook_safe), num_classes=num_classes, inplace=not hook_safe)


# ------------------------------------------------------------------------------------------ DenseNet201
class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck) then BN-ReLU-Conv3x3, applied to the concatenation of all inputs."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 inplace: bool = True):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, inplace: bool = True):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate, inplace=inplace)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int, inplace: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3,
                                                    bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=inplace))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                                growth_rate=growth_rate, drop_rate=drop_rate, inplace=inplace)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2,
                                    inplace=inplace)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2

        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=self.inplace)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def densenet201(num_classes: int = 1000, hook_safe: bool = False) -> DenseNet:
    return DenseNet(32, (6, 12, 48, 32), 64, num_classes=num_classes, inplace=not hook_safe)


# --------------------------------------------------------------------------------------- EfficientNetB0
def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10%
        new_v += divisor
    return new_v


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation(inplace=True), like torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation_layer: Callable[..., nn.Module] | None = nn.SiLU, inplace: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=inplace))
        super().__init__(*layers)
        self.out_channels = cout


class SqueezeExcitation(nn.Module):
    """Global-average-pool -> 1x1 conv -> SiLU -> 1x1 conv -> Sigmoid, then ``scale * input``."""

    def __init__(self, input_channels: int, squeeze_channels: int, inplace: bool = True):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU(inplace=inplace)
        self.scale_activation = nn.Sigmoid()

    def _scale(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self._scale(input)
        return scale * input


class StochasticDepth(nn.Module):
    """Row-wise stochastic depth; the identity in eval mode (as torchvision.ops.StochasticDepth)."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        survival_rate = 1.0 - self.p
        size = [input.shape[0]] + [1] * (input.ndim - 1) if self.mode == "row" else [1] * input.ndim
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return input * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class MBConv(nn.Module):
    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int,
                 stochastic_depth_prob: float, inplace: bool = True):
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        self.inplace = inplace
        layers: list[nn.Module] = []
        expanded_channels = _make_divisible(input_channels * expand_ratio)
        if expanded_channels != input_channels:
            layers.append(ConvNormActivation(input_channels, expanded_channels, kernel_size=1, inplace=inplace))
        layers.append(ConvNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                         groups=expanded_channels, inplace=inplace))
        layers.append(SqueezeExcitation(expanded_channels, max(1, input_channels // 4), inplace=inplace))
        layers.append(ConvNormActivation(expanded_channels, out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            if self.inplace:
                result += input
            else:
                result = result + input
        return result


# (expand_ratio, kernel, stride, input_channels, out_channels, num_layers) per stage, EfficientNet-B0.
_B0_STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class EfficientNet(nn.Module):
    def __init__(self, stages=_B0_STAGES, dropout: float = 0.2, stochastic_depth_prob: float = 0.2,
                 num_classes: int = 1000, inplace: bool = True):
        super().__init__()
        layers: list[nn.Module] = [ConvNormActivation(3, stages[0][3], kernel_size=3, stride=2, inplace=inplace)]
        total_blocks = sum(s[5] for s in stages)
        block_id = 0
        for expand, kernel, stride, cin, cout, n in stages:
            stage: list[nn.Module] = []
            for i in range(n):
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                stage.append(MBConv(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout, sd_prob,
                                    inplace=inplace))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = stages[-1][4]
        last_out = 4 * last_in
        layers.append(ConvNormActivation(last_in, last_out, kernel_size=1, inplace=inplace))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=inplace), nn.Linear(last_out, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def efficientnet_b0(num_classes: int = 1000, hook_safe: bool = False) -> EfficientNet:
    return EfficientNet(_B0_STAGES, dropout=0.2, num_classes=num_classes, inplace=not hook_safe)


def calibrate_batchnorm(model: nn.Module, data: torch.Tensor) -> nn.Module:
    """Replace every BatchNorm's running statistics by those of ``data`` (one no-grad forward in train mode);
    returns the model in eval mode. Weights are untouched."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(data)
    return model.eval()


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "vgg19": vgg19,
    "densenet201": densenet201,
    "efficientnet_b0": efficientnet_b0,
}
