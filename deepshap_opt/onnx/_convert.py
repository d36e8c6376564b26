"""Getting an onnx.ModelProto from what the user passes: a ModelProto, a path, a torch module or a Keras model.

torch and tensorflow are imported only when such a model is passed.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import onnx

#: opset used when a torch / Keras model is converted and no opset is asked for (20 has Gelu as one op)
TORCH_OPSET = 20
KERAS_OPSET = 18


def _is_torch_module(model) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, torch.nn.Module)


def _is_keras_model(model) -> bool:
    mod = type(model).__module__
    return mod.startswith(("keras", "tensorflow", "tf_keras"))


def to_numpy_list(data) -> list[np.ndarray]:
    """Background / explicands as a list of numpy arrays (one per model input)."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    out = []
    for d in items:
        if hasattr(d, "detach"):
            d = d.detach().cpu().numpy()
        elif hasattr(d, "numpy") and not isinstance(d, np.ndarray):
            d = d.numpy()
        out.append(np.asarray(d))
    return out


def load_model(model, background: list[np.ndarray], opset: int | None) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, bytes, os.PathLike)):
        return onnx.load(os.fspath(model))
    if _is_torch_module(model):
        return torch_to_onnx(model, background, opset)
    if _is_keras_model(model):
        return keras_to_onnx(model, background, opset)
    raise TypeError(f"cannot export a {type(model).__name__}: pass an onnx.ModelProto, a path to an .onnx file, "
                    "a torch.nn.Module or a Keras model")


def torch_to_onnx(module, background: list[np.ndarray], opset: int | None) -> onnx.ModelProto:
    import torch

    was_training = module.training
    module.eval()
    try:
        params = list(module.parameters())
        dev = params[0].device if params else torch.device("cpu")
        example = tuple(torch.as_tensor(b[: min(2, len(b))], device=dev) for b in background)
        names = ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
        with torch.no_grad():
            out = module(*example)
        n_out = len(out) if isinstance(out, (tuple, list)) else 1
        out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        dyn = {n: {0: "N"} for n in names + out_names}
        buf = io.BytesIO()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, buf, dynamo=False, opset_version=opset or TORCH_OPSET,
                              input_names=names, output_names=out_names, dynamic_axes=dyn,
                              do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())
    finally:
        module.train(was_training)


def keras_to_onnx(model, background: list[np.ndarray], opset: int | None) -> onnx.ModelProto:
    import tensorflow as tf
    import tf2onnx

    sig = [tf.TensorSpec((None,) + tuple(b.shape[1:]), tf.as_dtype(b.dtype), name=f"input_{i}" if len(background) > 1
                         else "input") for i, b in enumerate(background)]
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=sig, opset=opset or KERAS_OPSET)
    except Exception:
        # Keras 3 models: go through a tf.function
        fn = tf.function(lambda *a: model(*a, training=False) if len(a) > 1 else model(a[0], training=False))
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=opset or KERAS_OPSET)
    return proto
