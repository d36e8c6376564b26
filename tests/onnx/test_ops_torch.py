"""Every op of the issue's list, exported from torch: the file passes the checker, is complete (Σφ = f(x) − E f)
and equals the torch backend's values (≤ 1e-4 of the output scale)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import deepshap_opt.onnx as dso

from ._onnx_util import completeness_error, forward_ops, run, torch_backend

IMG, VEC, SEQ = (3, 6, 6), (8,), (4, 6)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def head(*layers, n_in=None):
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3))


def L(fn):
    return Lambda(fn)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x)) + x


class DenseCat(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return torch.cat([x, F.relu(self.conv(x))], 1)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return bn


# name -> (factory, input shape, ONNX ops that must appear in the exported graph)
CASES = {
    "conv": (lambda: head(nn.Conv2d(3, 4, 3, padding=1)), IMG, {"Conv"}),
    "conv_stride_group_dil": (lambda: head(nn.Conv2d(3, 6, 3, stride=2, groups=3, dilation=2, padding=2)), IMG,
                              {"Conv"}),
    "conv_transpose": (lambda: head(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)), IMG,
                       {"ConvTranspose"}),
    "gemm": (lambda: nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3)), VEC, {"Gemm"}),
    "matmul_const": (lambda: head(nn.Linear(6, 5)), SEQ, {"MatMul"}),
    "matmul_pair": (lambda: head(L(lambda x: x @ x.transpose(1, 2))), SEQ, {"MatMul", "Transpose"}),
    "add_sub_const": (lambda: head(L(lambda x: (x + 1.5) - 0.25 - x * 0.5)), VEC, {"Add", "Sub", "Mul"}),
    "mul_div_const": (lambda: head(L(lambda x: x * 3.0 / 7.0)), VEC, {"Mul", "Div"}),
    "mul_pair": (lambda: head(L(lambda x: x * torch.tanh(x[:, :4].repeat(1, 2)))), VEC, {"Mul"}),
    "div_pair": (lambda: head(L(lambda x: x / (1.0 + x * x))), VEC, {"Div"}),
    "se_gate": (lambda: head(nn.Conv2d(3, 4, 1), SE(4)), IMG, {"Mul", "ReduceMean", "Sigmoid"}),
    "residual": (lambda: head(nn.Conv2d(3, 4, 1), Residual(4)), IMG, {"Add", "Relu"}),
    "dense_concat": (lambda: head(nn.Conv2d(3, 4, 1), DenseCat(4), DenseCat(6)), IMG, {"Concat"}),
    "relu": (lambda: head(nn.ReLU()), VEC, {"Relu"}),
    "leaky_relu": (lambda: head(nn.LeakyReLU(0.1)), VEC, {"LeakyRelu"}),
    "prelu": (lambda: head(nn.Conv2d(3, 4, 1), nn.PReLU(4)), IMG, {"PRelu"}),
    "elu": (lambda: head(nn.ELU(0.7)), VEC, {"Elu"}),
    "selu": (lambda: head(nn.SELU()), VEC, {"Selu"}),
    "celu": (lambda: head(nn.CELU(1.3)), VEC, {"Celu"}),
    "sigmoid": (lambda: head(nn.Sigmoid()), VEC, {"Sigmoid"}),
    "hardsigmoid": (lambda: head(nn.Hardsigmoid()), VEC, {"HardSigmoid"}),
    "hardswish": (lambda: head(nn.Hardswish()), VEC, {"HardSwish"}),
    "tanh": (lambda: head(nn.Tanh()), VEC, {"Tanh"}),
    "softplus": (lambda: head(nn.Softplus()), VEC, {"Softplus"}),
    "softsign": (lambda: head(nn.Softsign()), VEC, {"Div", "Abs"}),   # torch writes x / (1 + |x|)
    "erf": (lambda: head(L(torch.erf)), VEC, {"Erf"}),
    "gelu": (lambda: head(nn.GELU()), VEC, {"Gelu"}),
    "gelu_tanh": (lambda: head(nn.GELU(approximate="tanh")), VEC, {"Gelu"}),
    "silu": (lambda: head(nn.SiLU()), VEC, {"Sigmoid", "Mul"}),
    "mish": (lambda: head(nn.Mish()), VEC, {"Softplus", "Tanh"}),
    "exp": (lambda: head(L(lambda x: torch.exp(0.5 * x))), VEC, {"Exp"}),
    "log": (lambda: head(L(lambda x: torch.log(torch.exp(x) + 1.0))), VEC, {"Log"}),
    "sqrt": (lambda: head(L(lambda x: torch.sqrt(torch.exp(x)))), VEC, {"Sqrt"}),
    "reciprocal": (lambda: head(L(lambda x: torch.reciprocal(torch.exp(x) + 1.0))), VEC, {"Reciprocal"}),
    "pow": (lambda: head(L(lambda x: x ** 3)), VEC, {"Pow"}),
    "neg_abs": (lambda: head(L(lambda x: -torch.abs(x))), VEC, {"Neg", "Abs"}),
    "clip": (lambda: head(L(lambda x: torch.clamp(x, -0.5, 0.7))), VEC, {"Clip"}),
    "max_min_pair": (lambda: head(L(lambda x: torch.maximum(x, 0.5 * x.flip(1)) + torch.minimum(x, torch.tanh(x)))),
                     VEC, {"Max", "Min"}),
    "maxpool": (lambda: head(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2)), IMG, {"MaxPool"}),
    "maxpool_overlap": (lambda: head(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, 1)), IMG, {"MaxPool"}),
    "avgpool": (lambda: head(nn.AvgPool2d(3, 2, 1)), IMG, {"AveragePool"}),
    "avgpool_nopad_ceil": (lambda: head(nn.AvgPool2d(3, 2, 1, ceil_mode=False, count_include_pad=False)), IMG,
                           {"AveragePool"}),
    "global_avgpool": (lambda: head(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)), IMG, {"GlobalAveragePool"}),
    "global_maxpool": (lambda: head(nn.Conv2d(3, 4, 1), nn.AdaptiveMaxPool2d(1)), IMG, {"MaxPool"}),
    "batchnorm": (lambda: head(nn.Conv2d(3, 4, 1), nn.ReLU(), _bn(4)), IMG, {"BatchNormalization"}),
    "layernorm": (lambda: head(nn.Linear(6, 6), nn.LayerNorm(6)), SEQ, {"LayerNormalization"}),
    "instancenorm": (lambda: head(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, affine=True)), IMG,
                     {"InstanceNormalization"}),
    "groupnorm": (lambda: head(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)), IMG, set()),
    "reduce_mean_sum": (lambda: head(L(lambda x: torch.cat([x.mean(2), x.sum(1)], 1))), SEQ,
                        {"ReduceMean", "ReduceSum"}),
    "softmax": (lambda: nn.Sequential(nn.Linear(8, 5), nn.Softmax(-1)), VEC, {"Softmax"}),
    "log_softmax": (lambda: nn.Sequential(nn.Linear(8, 5), nn.LogSoftmax(-1)), VEC, {"LogSoftmax"}),
    "softmax_inner": (lambda: head(L(lambda x: torch.softmax(x, 1))), SEQ, {"Softmax"}),
    "reshape_transpose": (lambda: head(L(lambda x: x.reshape(x.shape[0], 3, 2, 4).permute(0, 3, 1, 2).relu())),
                          SEQ, {"Reshape", "Transpose"}),
    "squeeze_unsqueeze": (lambda: head(L(lambda x: x.unsqueeze(1).relu().squeeze(1))), SEQ,
                          {"Squeeze", "Unsqueeze"}),
    "split": (lambda: head(L(lambda x: torch.cat([a.relu() * (i + 1) for i, a in enumerate(torch.split(x, [2, 2, 4], 1))],
                                                 1))), VEC, {"Split"}),
    "slice": (lambda: head(L(lambda x: x[:, 1:5].relu() + x[:, ::2].relu() * 2)), VEC, {"Slice"}),
    "gather": (lambda: head(L(lambda x: x[:, [0, 2, 2, 5]].relu() + x[:, 3:4])), VEC, {"Gather"}),
    "pad_constant": (lambda: head(L(lambda x: F.pad(x, (1, 2, 0, 1)).relu())), IMG, {"Pad"}),
    "pad_reflect": (lambda: head(L(lambda x: F.pad(x, (1, 1, 2, 0), mode="reflect").relu())), IMG, {"Pad"}),
    "resize_nearest": (lambda: head(L(lambda x: F.interpolate(x, scale_factor=2, mode="nearest").relu())), IMG,
                       {"Resize"}),
    "resize_bilinear": (lambda: head(L(lambda x: F.interpolate(x, size=(9, 8), mode="bilinear",
                                                                align_corners=False).relu())), IMG, {"Resize"}),
    "expand": (lambda: head(L(lambda x: x[:, :1].expand(-1, 3, -1, -1).relu() * x)), IMG, {"Expand"}),
    "tile": (lambda: head(L(lambda x: x.repeat(1, 2, 1, 3).relu())), IMG, {"Tile"}),
    "dropout_cast": (lambda: head(nn.Dropout(0.5), L(lambda x: x.double().relu().float())), VEC, {"Cast"}),
}


def _check(name, factory, shape, ops, outputs="all", tol=1e-4):
    torch.manual_seed(hash(name) % 1000)
    model = factory().eval()
    bg = torch.randn(5, *shape)
    X = torch.randn(3, *shape)
    X[0] = bg[0]                                   # an explicand equal to a reference: the |Δ| < eps branches
    with torch.no_grad():
        model(bg)
    proto = dso.build(model, bg, outputs=outputs)
    onnx.checker.check_model(proto, full_check=True)
    fwd_ops = forward_ops(proto)
    assert ops <= fwd_ops, f"{name}: expected {ops} in the exported graph, got {sorted(fwd_ops)}"
    out = run(proto, {"input": X.numpy()})
    err, scale = completeness_error(proto, out)
    assert err <= tol * scale, f"{name}: completeness error {err:.3g} (scale {scale:.3g})"
    return model, bg, X, out, proto


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_exported_from_torch(name):
    factory, shape, ops = CASES[name]
    model, bg, X, out, _proto = _check(name, factory, shape, ops)
    TDE = torch_backend()
    if TDE is None:
        pytest.skip("torch backend not importable")
    try:
        tv = np.asarray(TDE(model, bg).shap_values(X, check_additivity=False))
    except Exception as e:  # noqa: BLE001 - the other backend may not cover this op
        pytest.skip(f"torch backend failed: {type(e).__name__}: {e}")
    ov = out["shap_values"]
    scale = max(np.abs(out["output"]).max(), 1e-6)
    assert tv.shape == ov.shape
    assert np.abs(tv - ov).max() <= 1e-4 * scale, f"{name}: max |torch − onnx| {np.abs(tv - ov).max():.3g}"
