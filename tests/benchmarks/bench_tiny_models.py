"""A tiny model zoo with the interface of benchmarks/torch_models.py, for the benchmark smoke tests."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 10, hook_safe: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=not hook_safe)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=not hook_safe)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu2(self.conv2(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny(num_classes: int = 10, hook_safe: bool = False) -> Tiny:
    return Tiny(num_classes, hook_safe)


def calibrate_batchnorm(model: nn.Module, data: torch.Tensor) -> nn.Module:
    return model.eval()


MODELS = {"tiny": tiny}
