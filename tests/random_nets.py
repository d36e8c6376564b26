"""Random networks built from the supported op set, as a hypothesis strategy (shared by the property tests).

A network is a spec: a list of nodes, each reading one or two earlier nodes — element-wise activations
after a projection, residual adds, concatenations, products and quotients of two branches (gates),
maximum of two branches, normalisations, a softmax-weighted mix (attention-like), and for images
convolution and max/avg pooling. ``TorchNet(spec)`` builds it in PyTorch; ``tests/cross_nets.py`` builds
the same network in Keras 3 with the same weights.

``SETTINGS`` is the one hypothesis settings object of the property tests: ``DEEPSHAP_FUZZ_EXAMPLES``
examples (200 by default, 5000 under ``tox -e fuzz``), no deadline, derandomized (the same examples on
every run, so CI is reproducible) unless ``DEEPSHAP_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import nn

ACTS = ["relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "gelu_tanh", "silu", "mish", "hardswish",
        "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "logsigmoid"]
TORCH_ACT = {
    "relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "elu": F.elu, "selu": F.selu,
    "celu": F.celu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
    "mish": F.mish, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "hardtanh": F.hardtanh,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "softplus": F.softplus, "softsign": F.softsign,
    "logsigmoid": F.logsigmoid,
}
KINDS = ["act", "add", "cat", "mul", "div", "max", "layernorm", "rmsnorm", "softmix"]
POOLS = ["none", "max2", "max3s2", "avg2"]
JOINS = ["none", "add", "cat"]

EXAMPLES = int(os.environ.get("DEEPSHAP_FUZZ_EXAMPLES", "200"))
# DEEPSHAP_FUZZ_RANDOM=1: fresh random examples on every run (a failure prints its reproduction blob), so that
# a long fuzz run can be split over several processes, or repeated, without replaying the same examples
RANDOM = os.environ.get("DEEPSHAP_FUZZ_RANDOM", "") not in ("", "0")
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread while a property module runs (restored afterwards): on these tiny networks a second
    OpenMP worker only spins, at 3-10x the CPU time of the single-threaded run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_examples(fraction: float, floor: int = 10) -> int:
    """``fraction`` of ``EXAMPLES`` (at least ``floor``): the expensive properties run fewer examples."""
    return max(int(EXAMPLES * fraction), floor)


@st.composite
def net_specs(draw, max_nodes=6, kinds=KINDS, acts=ACTS):
    """(input width, [node, ...], outputs K, seed); node = (kind, src_a, src_b, act, width)."""
    f_in = draw(st.integers(2, 6))
    n = draw(st.integers(1, max_nodes))
    nodes = []
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        a = draw(st.integers(0, i))                 # 0 is the input, j+1 is node j
        b = draw(st.integers(0, i))
        nodes.append((kind, a, b, draw(st.sampled_from(acts)), draw(st.integers(2, 6))))
    return f_in, nodes, draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


class TorchNet(nn.Module):
    """The network of a spec; every node projects its sources to its own width with a Linear."""

    def __init__(self, spec):
        super().__init__()
        f_in, nodes, k, seed = spec
        torch.manual_seed(seed)
        self.nodes = nodes
        widths = [f_in]
        self.proj = nn.ModuleList()
        for kind, a, b, _, w in nodes:
            self.proj.append(nn.ModuleList([nn.Linear(widths[a], w), nn.Linear(widths[b], w)]))
            widths.append(2 * w if kind == "cat" else w)
        self.norms = nn.ModuleList([nn.LayerNorm(w) for *_, w in nodes])
        self.head = nn.Linear(widths[-1], k)

    def forward(self, x):
        vals = [x]
        for (kind, a, b, act, _), (pa, pb), norm in zip(self.nodes, self.proj, self.norms):
            u, v = pa(vals[a]), pb(vals[b])
            if kind == "act":
                y = TORCH_ACT[act](u)
            elif kind == "add":
                y = TORCH_ACT[act](u) + v
            elif kind == "cat":
                y = torch.cat([TORCH_ACT[act](u), v], 1)
            elif kind == "mul":
                y = u * torch.sigmoid(v)
            elif kind == "div":
                y = u / (1 + v * v)
            elif kind == "max":
                y = torch.maximum(u, TORCH_ACT[act](v))
            elif kind == "layernorm":
                y = norm(u + v)
            elif kind == "rmsnorm":
                y = F.rms_norm(u, (u.shape[1],), eps=1e-5)
            else:   # softmix: softmax weights times values, an attention-like product of two varying tensors
                y = torch.softmax(u, 1) * v
            vals.append(y)
        return self.head(vals[-1])


@st.composite
def cnn_specs(draw, max_blocks=3):
    """(channels, [block, ...], K, seed); block = (act, pool, join) with pool in none/max2/max3s2/avg2 and
    join in none/add/cat (with the block's input)."""
    blocks = [(draw(st.sampled_from(ACTS)), draw(st.sampled_from(POOLS)), draw(st.sampled_from(JOINS)))
              for _ in range(draw(st.integers(1, max_blocks)))]
    return draw(st.integers(1, 3)), blocks, draw(st.integers(1, 3)), draw(st.integers(0, 2**16))


class TorchCNN(nn.Module):
    """conv(3x3, same) → batch-norm → act [→ join with the block input] [→ pool] per block, then global
    average pooling and a Linear head. Input (N, C, 8, 8)."""

    def __init__(self, spec):
        super().__init__()
        c, blocks, k, seed = spec
        torch.manual_seed(seed)
        self.blocks = blocks
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        for act, pool, join in blocks:
            self.convs.append(nn.Conv2d(c, 4, 3, padding=1))
            bn = nn.BatchNorm2d(4)
            with torch.no_grad():
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)
            self.bns.append(bn)
            c = 4 + c if join == "cat" else 4
        self.head = nn.Linear(c, k)

    def forward(self, x):
        for (act, pool, join), conv, bn in zip(self.blocks, self.convs, self.bns):
            y = TORCH_ACT[act](bn(conv(x)))
            if join == "add" and x.shape[1] == y.shape[1]:
                y = y + x
            elif join == "cat":
                y = torch.cat([y, x], 1)
            if pool == "max2" and y.shape[-1] >= 2:
                y = F.max_pool2d(y, 2)
            elif pool == "max3s2" and y.shape[-1] >= 3:
                y = F.max_pool2d(y, 3, 2, padding=1)
            elif pool == "avg2" and y.shape[-1] >= 2:
                y = F.avg_pool2d(y, 2)
            x = y
        return self.head(x.mean((2, 3)))
