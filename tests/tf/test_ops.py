"""Completeness (Σφ = f(x) − E f within 1e-4 of the output scale, float32) on a small model per op.

The activations run together in one model by default; one model per activation is marked slow.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

from deepshap_opt.tf import DeepExplainer

TOL = 1e-4


def seq(shape, *ls):
    return keras.Sequential([keras.Input(shape), *ls])


def head(k=3):
    return [L.Flatten(), L.Dense(k)]


ACTIVATIONS = ["relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "mish", "sigmoid",
               "hard_sigmoid", "hard_silu", "tanh", "softplus", "softsign", "softmax", "log_softmax", "exponential",
               "linear", "celu", "hard_tanh", "squareplus", "tanh_shrink"]


def _act(name):
    return lambda: seq((6,), L.Dense(5), L.Activation(name), L.Dense(3))


class GeluTanh(L.Layer):
    def call(self, x):
        return keras.activations.gelu(x, approximate=True)


class MHAModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.mha = L.MultiHeadAttention(num_heads=2, key_dim=3)
        self.out = L.Dense(2)

    def call(self, x):
        return self.out(L.Flatten()(self.mha(x, x)))


def _global_pools(i):
    return keras.Model(i, L.Dense(3)(L.Concatenate()([L.GlobalMaxPooling2D()(L.Conv2D(3, 3)(i)),
                                                      L.GlobalAveragePooling2D()(L.Conv2D(3, 3)(i))])))


def _merges(i):
    return keras.Model(i, L.Dense(3)(L.Concatenate()([
        L.Add()([L.Dense(4, activation="relu")(i), L.Dense(4)(i)]),
        L.Subtract()([L.Dense(4)(i), L.Dense(4, activation="tanh")(i)]),
        L.Multiply()([L.Dense(4, activation="sigmoid")(i), L.Dense(4)(i)]),
        L.Average()([L.Dense(4)(i), L.Dense(4, activation="relu")(i)])])))


def _built(model, shape):
    model(np.zeros(shape, "float32"))
    return model


MODELS = {
    **{f"act_{a}": _act(a) for a in ACTIVATIONS},
    "gelu_tanh": lambda: seq((6,), L.Dense(5), GeluTanh(), L.Dense(3)),
    "dense": lambda: seq((6,), L.Dense(4, activation="relu"), L.Dense(3)),
    "conv1d": lambda: seq((10, 2), L.Conv1D(3, 3, activation="relu"), *head()),
    "conv2d": lambda: seq((8, 8, 2), L.Conv2D(3, 3, strides=2, padding="same", activation="relu"), *head()),
    "conv3d": lambda: seq((5, 5, 5, 1), L.Conv3D(2, 3, activation="relu"), *head()),
    "depthwise": lambda: seq((8, 8, 2), L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu"), *head()),
    "separable": lambda: seq((8, 8, 2), L.SeparableConv2D(3, 3, activation="relu"), *head()),
    "conv2d_transpose": lambda: seq((4, 4, 2), L.Conv2DTranspose(3, 3, strides=2, activation="relu"), *head()),
    "batchnorm": lambda: seq((8, 8, 2), L.Conv2D(3, 3), L.BatchNormalization(), L.ReLU(), *head()),
    "layernorm": lambda: seq((5, 4), L.Dense(4), L.LayerNormalization(), L.ReLU(), *head()),
    "groupnorm": lambda: seq((6, 6, 4), L.Conv2D(4, 3), L.GroupNormalization(groups=2), L.ReLU(), *head()),
    "maxpool2d": lambda: seq((8, 8, 2), L.Conv2D(3, 3, padding="same"), L.MaxPooling2D(3, strides=2), *head()),
    "maxpool1d": lambda: seq((10, 2), L.Conv1D(3, 3), L.MaxPooling1D(2), *head()),
    "maxpool3d": lambda: seq((6, 6, 6, 1), L.Conv3D(2, 3), L.MaxPooling3D(2), *head()),
    "avgpool": lambda: seq((8, 8, 2), L.Conv2D(3, 3), L.ReLU(), L.AveragePooling2D(2), *head()),
    "global_pools": lambda: _global_pools(keras.Input((7, 7, 2))),
    "upsampling": lambda: seq((4, 4, 2), L.UpSampling2D(2), L.Conv2D(2, 3, activation="relu"), *head()),
    "upsampling_bilinear": lambda: seq((4, 4, 2), L.UpSampling2D(2, interpolation="bilinear"), L.ReLU(), *head()),
    "pad_crop_reshape_permute": lambda: seq((6, 6, 2), L.ZeroPadding2D(2), L.Cropping2D(1), L.Conv2D(2, 3),
                                            L.ReLU(), L.Permute((3, 1, 2)), L.Reshape((-1, 4)), *head()),
    "merges": lambda: _merges(keras.Input((5,))),
    "dropout": lambda: seq((6,), L.Dense(5, activation="relu"), L.Dropout(0.5), L.Dense(3)),
    "prelu": lambda: seq((6,), L.Dense(5), L.PReLU(), L.Dense(3)),
    "leaky_relu_layer": lambda: seq((6,), L.Dense(5), L.LeakyReLU(0.2), L.Dense(3)),
    "relu_layer_params": lambda: seq((6,), L.Dense(5), L.ReLU(max_value=1.0, negative_slope=0.1, threshold=0.2),
                                     L.Dense(3)),
    "elu_layer": lambda: seq((6,), L.Dense(5), L.ELU(0.5), L.Dense(3)),
    "softmax_layer_axis": lambda: seq((3, 4), L.Dense(4), L.Softmax(axis=1), *head()),
    "mha": lambda: _built(MHAModel(), (1, 4, 5)),
}


def _input_for(model):
    if isinstance(model, MHAModel):
        return (4, 5)
    return tuple(model.inputs[0].shape[1:])


def _all_activations(i):
    """One branch per Keras activation, so that a single trace covers them all."""
    branches = [L.Activation(a)(L.Dense(3)(i)) for a in ACTIVATIONS] + [GeluTanh()(L.Dense(3)(i))]
    return keras.Model(i, L.Dense(3)(L.Concatenate()(branches)))


def test_completeness_all_activations_in_one_model(rng, check):
    model = _all_activations(keras.Input((6,)))
    bg = rng.normal(size=(6, 6)).astype("float32")
    X = rng.normal(size=(3, 6)).astype("float32")
    e = DeepExplainer(model, bg)
    err, sv = check(e, lambda x: model(x, training=False).numpy(), X)
    assert sv.shape == (3, 6, 3)
    assert err < TOL, f"completeness error {err:.3g}"


FAST = sorted(n for n in MODELS if not n.startswith("act_"))
SLOW = [pytest.param(n, marks=pytest.mark.slow) for n in sorted(MODELS) if n.startswith("act_")]


@pytest.mark.parametrize("name", FAST + SLOW)
def test_completeness(name, rng, check):
    model = MODELS[name]()
    shape = _input_for(model)
    bg = rng.normal(size=(6,) + shape).astype("float32")
    X = rng.normal(size=(3,) + shape).astype("float32")
    e = DeepExplainer(model, bg)
    err, sv = check(e, lambda x: model(x, training=False).numpy(), X)
    assert sv.shape == (3,) + shape + (e.num_outputs,)
    assert err < TOL, f"{name}: completeness error {err:.3g}"
