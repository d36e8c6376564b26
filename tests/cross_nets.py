"""The random networks of ``random_nets`` rebuilt in Keras 3 with the torch network's weights.

``keras_net(spec, torch_net, dtype)`` and ``keras_cnn(spec, torch_cnn, dtype)`` return a functional Keras
model computing the same function as the torch one (``TorchNet`` / ``TorchCNN``): Dense kernels are the
transposed torch weights, Conv2D kernels are OIHW → HWIO, the CNN's input and activations are NHWC, and
channel concatenation is on the last axis (same channel order as torch's ``cat(dim=1)``).

Only the ops that the three backends (torch, TF, ONNX export of the torch net) decompose into the same
DeepLIFT rules are used by the cross-backend strategies (``CROSS_ACTS``, ``CROSS_KINDS``,
``CROSS_POOLS``); the others are complete in each backend but split Δ differently, so their SHAP values
are not expected to agree (see ``tests/test_properties_cross.py``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers as L
from keras import ops

KERAS_ACT = {
    "relu": ops.relu, "relu6": ops.relu6, "leaky_relu": lambda t: ops.leaky_relu(t, negative_slope=0.2),
    "elu": ops.elu, "selu": ops.selu, "celu": ops.celu, "gelu": lambda t: ops.gelu(t, approximate=False),
    "gelu_tanh": lambda t: ops.gelu(t, approximate=True), "silu": ops.silu,
    "mish": lambda t: L.Activation(keras.activations.mish, dtype=t.dtype)(t),
    "hardswish": ops.hard_silu, "hardsigmoid": ops.hard_sigmoid, "hardtanh": ops.hard_tanh,
    "sigmoid": ops.sigmoid, "tanh": ops.tanh, "softplus": ops.softplus, "softsign": ops.softsign,
    "logsigmoid": ops.log_sigmoid,
}


def _np(t):
    return t.detach().cpu().double().numpy()


def _dense(lin, dtype):
    layer = L.Dense(lin.out_features, dtype=dtype)
    layer.build((None, lin.in_features))
    layer.set_weights([_np(lin.weight).T.astype(dtype), _np(lin.bias).astype(dtype)])
    return layer


def keras_net(spec, net, dtype="float32"):
    """The Keras twin of ``TorchNet(spec)`` (``net``), input ``(N, f_in)``."""
    f_in, nodes, _, _ = spec
    x = keras.Input((f_in,), dtype=dtype)
    vals = [x]
    for (kind, a, b, act, _), (pa, pb), norm in zip(nodes, net.proj, net.norms):
        u, v = _dense(pa, dtype)(vals[a]), _dense(pb, dtype)(vals[b])
        f = KERAS_ACT[act]
        if kind == "act":
            y = f(u)
        elif kind == "add":
            y = f(u) + v
        elif kind == "cat":
            y = ops.concatenate([f(u), v], axis=-1)
        elif kind == "mul":
            y = u * ops.sigmoid(v)
        elif kind == "div":
            y = u / (1 + v * v)
        elif kind == "max":
            y = ops.maximum(u, f(v))
        elif kind == "layernorm":
            ln = L.LayerNormalization(epsilon=norm.eps, dtype=dtype)
            ln.build((None, norm.normalized_shape[0]))
            ln.set_weights([_np(norm.weight).astype(dtype), _np(norm.bias).astype(dtype)])
            y = ln(u + v)
        elif kind == "rmsnorm":
            y = u * ops.rsqrt(ops.mean(u * u, axis=-1, keepdims=True) + 1e-5)
        else:   # softmix
            y = ops.softmax(u, axis=-1) * v
        vals.append(y)
    return keras.Model(x, _dense(net.head, dtype)(vals[-1]))


def keras_cnn(spec, net, dtype="float32"):
    """The Keras twin of ``TorchCNN(spec)`` (``net``), input ``(N, 8, 8, C)`` (NHWC)."""
    c, blocks, _, _ = spec
    x = inp = keras.Input((8, 8, c), dtype=dtype)
    size = 8
    for (act, pool, join), conv, bn in zip(blocks, net.convs, net.bns):
        k = L.Conv2D(conv.out_channels, 3, padding="same", dtype=dtype)
        k.build((None, size, size, conv.in_channels))
        k.set_weights([_np(conv.weight).transpose(2, 3, 1, 0).astype(dtype), _np(conv.bias).astype(dtype)])
        norm = L.BatchNormalization(epsilon=bn.eps, dtype=dtype)
        norm.build((None, size, size, conv.out_channels))
        norm.set_weights([_np(t).astype(dtype) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)])
        y = KERAS_ACT[act](norm(k(x)))
        if join == "add" and x.shape[-1] == y.shape[-1]:
            y = y + x
        elif join == "cat":
            y = ops.concatenate([y, x], axis=-1)
        if pool == "max2" and size >= 2:
            y, size = L.MaxPooling2D(2, dtype=dtype)(y), size // 2
        elif pool == "max3s2" and size >= 3:
            # torch pads with -inf on both sides; Keras' "same" pads after only: pad explicitly with a value
            # far below any activation (a padded cell is never a window's maximum, and Δ = 0 there)
            y = ops.pad(y, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-1e4)
            y, size = L.MaxPooling2D(3, 2, dtype=dtype)(y), (size - 1) // 2 + 1
        elif pool == "avg2" and size >= 2:
            y, size = L.AveragePooling2D(2, dtype=dtype)(y), size // 2
        x = y
    return keras.Model(inp, _dense(net.head, dtype)(L.GlobalAveragePooling2D(dtype=dtype)(x)))


def nhwc(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W[, K]) → (N, H, W, C[, K])."""
    return a.transpose(0, 2, 3, 1, *range(4, a.ndim))
