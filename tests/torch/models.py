"""Small PyTorch models, one (or a few) per supported op, for the completeness tests."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """torchvision's ResNet pattern: reused in-place ReLU and ``out += identity``."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Head(nn.Module):
    """Flatten then Linear to 3 outputs (lazy so any body works)."""

    def __init__(self, body, k=3):
        super().__init__()
        self.body, self.fc = body, nn.LazyLinear(k)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


class FunctionalCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class HandAttention(nn.Module):
    """q @ k.T, softmax, @ v: two varying operands at both products."""

    def __init__(self, e=6):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, 3)

    def forward(self, x):                       # (N, L, E)
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
        return self.o(a @ v).mean(1)


class BmmEinsum(nn.Module):
    def __init__(self, e=6):
        super().__init__()
        self.a, self.b = nn.Linear(e, e), nn.Linear(e, e)

    def forward(self, x):                       # (N, L, E)
        a, b = self.a(x), torch.tanh(self.b(x))
        s = torch.bmm(a, b.transpose(1, 2))                         # (N, L, L)
        t = torch.einsum("nij,njk->nik", s, b)                      # (N, L, E)
        u = torch.baddbmm(t, a, torch.ones(x.shape[0], x.shape[2], x.shape[2], dtype=x.dtype))
        return u.sum(1)[:, :3]


class Gates(nn.Module):
    """Products, quotients, max/min of two varying branches (SE / GLU-style gates)."""

    def __init__(self, f=6):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(f, 8), nn.Linear(f, 8), nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        g = a * torch.sigmoid(b) + a / (1 + b * b) + torch.maximum(a, b) - torch.minimum(a, 0.5 * b)
        return self.c(g + torch.max(torch.stack([a, b], 1), dim=1).values)


class Elementwise(nn.Module):
    """exp/log/sqrt/rsqrt/pow/square/abs/neg/clamp on a positive branch."""

    def __init__(self, f=6):
        super().__init__()
        self.a, self.c = nn.Linear(f, 8), nn.Linear(8 * 9, 3)

    def forward(self, x):
        a = self.a(x)
        p = torch.sigmoid(a) + 0.5
        parts = [torch.exp(a * 0.3), torch.log(p), torch.sqrt(p), torch.rsqrt(p), p.pow(1.7), a.square(),
                 a.abs(), -a, a.clamp(-0.5, 0.5)]
        h = torch.cat(parts, 1)
        w = torch.ones(h.shape[1], 3, dtype=h.dtype) / h.shape[1]
        return torch.addmm(self.c.bias, h, self.c.weight.T) + h.sum(1, keepdim=True) * 0.1 - h.mean(1, keepdim=True) \
            + torch.addmm(torch.zeros(3, dtype=h.dtype), h, w)


class Shapes(nn.Module):
    """cat/stack/split/chunk/view/reshape/flatten/permute/transpose/squeeze/unsqueeze/index/slice/expand/pad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(72, 3)

    def forward(self, x):                       # (N, 2, 3, 4)
        a, b = x.split(1, dim=1)
        c, d = x.chunk(2, dim=3)
        y = torch.cat([a, b], 1).permute(0, 2, 3, 1).transpose(1, 2).reshape(x.shape[0], -1)
        z = torch.stack([c, d], 1).flatten(1).unsqueeze(1).squeeze(1)
        w = F.pad(x[:, :, 1:, ::2], (1, 0, 0, 1)).view(x.shape[0], -1)
        e = x[:, 0, 0, :1].expand(-1, 4)
        return self.fc(torch.cat([y, z, w[:, :16], e, F.relu(y[:, :4])], 1)[:, :72])


class MultiInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x, y):
        return self.c(F.relu(self.a(x)) * torch.tanh(self.b(y)))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4 * 5, 2)

    def forward(self, ids):
        return self.fc(F.gelu(self.emb(ids)).flatten(1))


ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.PReLU(8), nn.ELU(), nn.SELU(), nn.CELU(0.7), nn.GELU(),
               nn.GELU("tanh"), nn.SiLU(), nn.Mish(), nn.Hardswish(), nn.Hardsigmoid(), nn.Hardtanh(-0.5, 0.7),
               nn.Sigmoid(), nn.Tanh(), nn.Softplus(), nn.Softsign(), nn.LogSigmoid(), nn.ReLU(inplace=True),
               nn.SiLU(inplace=True)]


def tabular(act):
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 3))


def cnn(dim, conv, pool, norm=None):
    """conv (or transposed conv) → norm → ReLU → pool, in ``dim`` spatial dims."""
    layers = [conv(2, 4, 3)]
    if norm is not None:
        layers.append(norm(4))
    layers += [nn.ReLU(), pool]
    return Head(nn.Sequential(*layers))


def zoo():
    """name → (model factory, per-sample input shape). Models are in eval mode."""
    # a fresh copy per model: .to(dtype) must not leak from one test into the next through a shared module
    Z = {f"act_{type(a).__name__}_{i}": ((lambda a=a: tabular(copy.deepcopy(a))), (6,))
         for i, a in enumerate(ACTIVATIONS)}
    C = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveMaxPool1d),
         2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveMaxPool2d),
         3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool3d)}
    for d, (conv, convt, bn, mp, ap, aap, amp) in C.items():
        shape = (2,) + (7,) * d
        Z[f"conv{d}d_bn_maxpool"] = (lambda conv=conv, bn=bn, mp=mp: cnn(d, conv, mp(2), bn), shape)
        Z[f"convT{d}d_avgpool"] = (lambda convt=convt, ap=ap: cnn(d, convt, ap(2)), shape)
        Z[f"conv{d}d_adaptive_avg"] = (lambda conv=conv, aap=aap: cnn(d, conv, aap(2)), shape)
        Z[f"conv{d}d_adaptive_max"] = (lambda conv=conv, amp=amp: cnn(d, conv, amp(2)), shape)
    Z.update({
        "maxpool_overlapping": (lambda: cnn(2, nn.Conv2d, nn.MaxPool2d(3, 2, padding=1)), (2, 9, 9)),
        "residual_inplace": (lambda: Head(nn.Sequential(nn.Conv2d(2, 4, 3), Residual(4), nn.AdaptiveAvgPool2d(1))),
                             (2, 6, 6)),
        "reused_relu": (lambda: (lambda r: nn.Sequential(nn.Linear(6, 8), r, nn.Linear(8, 8), r, nn.Linear(8, 3)))(
            nn.ReLU()), (6,)),
        "functional_cnn": (FunctionalCNN, (2, 8, 8)),
        "conv_variants": (ConvVariants, (4, 9, 9)),
        "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)), (6,)),
        "groupnorm": (lambda: cnn(2, nn.Conv2d, nn.AvgPool2d(2), lambda c: nn.GroupNorm(2, c)), (2, 6, 6)),
        "instancenorm": (lambda: cnn(2, nn.Conv2d, nn.AvgPool2d(2), lambda c: nn.InstanceNorm2d(c, affine=True)),
                         (2, 6, 6)),
        "instancenorm_running_stats": (lambda: cnn(2, nn.Conv2d, nn.AvgPool2d(2), lambda c: _running(
            nn.InstanceNorm2d(c, affine=True, track_running_stats=True))), (2, 6, 6)),
        "rmsnorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.SiLU(), nn.Linear(8, 3)), (6,)),
        "upsample_nearest": (lambda: cnn(2, nn.Conv2d, nn.Upsample(scale_factor=2)), (2, 5, 5)),
        "upsample_bilinear": (lambda: cnn(2, nn.Conv2d, nn.Upsample(scale_factor=2, mode="bilinear")), (2, 5, 5)),
        "dropout_eval": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)), (6,)),
        "softmax_out": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Softmax(dim=1)), (6,)),
        "log_softmax_out": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(1)),
                            (6,)),
        "hand_attention": (HandAttention, (4, 6)),
        "bmm_einsum_baddbmm": (BmmEinsum, (4, 6)),
        "gates": (Gates, (6,)),
        "elementwise": (Elementwise, (6,)),
        "shapes": (Shapes, (2, 3, 4)),
        "mha_batch_first": (lambda: _MHA(True), (4, 6)),
        "mha_seq_first": (lambda: _MHA(False), (4, 6)),
        "transformer_encoder": (_Encoder, (4, 8)),
    })
    return Z


def _running(norm):
    """``norm`` with non-trivial running statistics (eval mode then uses them instead of the input's)."""
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return norm


class ConvVariants(nn.Module):
    """Strided, dilated, grouped, depthwise, 'same'-padded and functional convolutions (own VJP path)."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(6, 6, 3, dilation=2, padding=2, groups=2)
        self.depthwise = nn.Conv2d(6, 6, 3, padding="same", groups=6)
        self.w1d = nn.Parameter(torch.randn(3, 6, 2) * 0.3)
        self.fc = nn.Linear(3 * 4, 3)

    def forward(self, x):
        h = F.silu(self.strided(x))
        h = torch.relu(self.dilated(h)) + self.depthwise(h)
        h = F.conv1d(h.flatten(2), self.w1d, stride=5)        # (N, 3, 5·5 → 5)
        return self.fc(torch.tanh(h[..., :4]).flatten(1))


class _MHA(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.bf = batch_first
        self.att, self.fc = nn.MultiheadAttention(6, 2, batch_first=batch_first), nn.Linear(6, 3)

    def forward(self, x):                       # (N, L, E)
        q = x if self.bf else x.transpose(0, 1)
        out, _ = self.att(q, q, q)
        out = out if self.bf else out.transpose(0, 1)
        return self.fc(out.mean(1))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.enc(x).mean(1))
