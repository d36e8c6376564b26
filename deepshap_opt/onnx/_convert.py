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
    """The user's model as an ``onnx.ModelProto``, never the user's own object (so it is never modified)."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        check_structure(proto, "the ModelProto")
        return proto
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError (and whatever a parser raises)
            raise ValueError("the bytes given are not a serialized ONNX model (corrupted or truncated?): "
                             f"{_one_line(exc)}") from None
        check_structure(proto, "the serialized model")
        return proto
    if isinstance(model, (str, os.PathLike)):
        return load_path(os.fspath(model))
    if _is_torch_module(model):
        return torch_to_onnx(model, background, opset)
    if _is_keras_model(model):
        return keras_to_onnx(model, background, opset)
    raise TypeError(f"cannot export a {type(model).__name__}: pass an onnx.ModelProto, a path to an .onnx file, "
                    "a torch.nn.Module or a Keras model")


def _one_line(exc) -> str:
    msg = str(exc).strip().splitlines()
    return (msg[0] if msg else type(exc).__name__)[:300]


def load_path(path: str) -> onnx.ModelProto:
    """Load an .onnx file; a missing, corrupted or truncated file gives a readable error, not a protobuf one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such ONNX file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an .onnx file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes): not an ONNX model")
    try:
        proto = onnx.load(path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError (and whatever a parser raises)
        raise ValueError(f"{path!r} is not a valid ONNX file (corrupted or truncated?): protobuf could not parse "
                         f"it ({_one_line(exc)})") from None
    check_structure(proto, repr(path))
    return proto


def check_structure(proto: onnx.ModelProto, what: str) -> None:
    """Reject a ModelProto that parses but is not a usable model (e.g. a file truncated between two fields:
    protobuf then reads what is left without complaint). Lighter than onnx.checker, which also refuses
    valid models that onnxruntime runs (graph outputs without a shape, ...)."""
    from ..errors import UnsupportedOperatorError

    bad = f"{what} is not a valid ONNX model (corrupted or truncated?)"
    g = proto.graph
    if not proto.HasField("graph") or not len(g.output) or not len(g.input):
        raise ValueError(f"{bad}: it has no graph, inputs or outputs")
    if not any(imp.domain in ("", "ai.onnx") for imp in proto.opset_import):
        raise ValueError(f"{bad}: it imports no ONNX opset")
    defined = {t.name for t in g.initializer} | {v.name for v in g.input} | {""}
    defined |= {t.values.name for t in g.sparse_initializer}
    for node in g.node:
        defined.update(node.output)
    for node in g.node:
        where = node.name or (node.output[0] if node.output else node.op_type)
        missing = [t for t in node.input if t not in defined]
        if missing:
            raise ValueError(f"{bad}: node {where!r} ({node.op_type}) reads {missing[0]!r}, which no node, input "
                             "or initializer defines")
        if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type, ""):
            raise UnsupportedOperatorError(f"{node.domain + '::' if node.domain else ''}{node.op_type}", where,
                                           "not an op of the standard ONNX domain")
    for o in g.output:
        if o.name not in defined:
            raise ValueError(f"{bad}: its output {o.name!r} is computed by no node")


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
    except Exception:  # noqa: BLE001 - tf2onnx raises many kinds; the fallback reports its own error
        # Keras 3 models: go through a tf.function
        fn = tf.function(lambda *a: model(*a, training=False) if len(a) > 1 else model(a[0], training=False))
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=opset or KERAS_OPSET)
    return proto


# ---------------------------------------------------------------------------------------------- array checks
_FLOAT_ELEM = {1: np.float32, 11: np.float64, 10: np.float16}


def check_array(a: np.ndarray, name: str) -> None:
    """A readable error for what cannot be attributed: non-float dtypes, scalars, NaN/Inf."""
    if a.dtype.kind != "f":
        raise TypeError(f"{name} has dtype {a.dtype}: only floating-point inputs can be attributed (integer "
                        "inputs such as token ids have no DeepSHAP attribution; explain a float input instead)")
    if a.ndim < 1:
        raise ValueError(f"{name} must have a batch axis, got a scalar")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")


def model_inputs(proto: onnx.ModelProto) -> list:
    inits = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def check_background_arrays(background: list[np.ndarray]) -> None:
    """What can be said of the background before the model is looked at."""
    for i, b in enumerate(background):
        name = "the background" if len(background) == 1 else f"background array {i}"
        check_array(b, name)
        if b.shape[0] == 0:
            raise ValueError(f"{name} (data) is empty: pass at least one reference row")
    if any(b.shape[0] != background[0].shape[0] for b in background):
        raise ValueError("every background array needs the same number of rows")


def check_background(proto: onnx.ModelProto, background: list[np.ndarray]) -> list[np.ndarray]:
    """Check the background against the model's inputs; returns it in the inputs' float dtypes (copies only
    where a cast is needed: the user's arrays are never written to)."""
    ins = model_inputs(proto)
    if len(background) != len(ins):
        raise ValueError(f"the model has {len(ins)} inputs {[v.name for v in ins]} but {len(background)} "
                         "background arrays were given")
    out = []
    for v, b in zip(ins, background):
        name = "the background" if len(ins) == 1 else f"the background of input {v.name!r}"
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.elem_type not in _FLOAT_ELEM:
            raise TypeError(f"the model's input {v.name!r} has type "
                            f"{onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)}: only floating-point inputs "
                            "can be attributed")
        check_array(b, name)
        if b.shape[0] == 0:
            raise ValueError(f"{name} (data) is empty: pass at least one reference row")
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            want = tuple(dims[1:])
            if len(dims) != b.ndim or any(w is not None and w != s for w, s in zip(want, b.shape[1:])):
                shown = tuple("?" if w is None else w for w in want)
                raise ValueError(f"{name} has per-sample shape {tuple(b.shape[1:])} but the model's input "
                                 f"{v.name!r} takes {shown}")
        dt = _FLOAT_ELEM.get(tt.elem_type, b.dtype)
        out.append(b if b.dtype == dt else b.astype(dt))
    if any(b.shape[0] != out[0].shape[0] for b in out):
        raise ValueError("every background array needs the same number of rows")
    return out


def check_X(X, background: list[np.ndarray], multi_input: bool) -> list[np.ndarray]:
    """The explicands as arrays of the background's dtypes, with readable errors for what does not fit."""
    if multi_input != isinstance(X, (list, tuple)):
        raise TypeError("expected a list of inputs (the background was a list)" if multi_input
                        else "expected a single input, not a list (the background was a single array)")
    xs = to_numpy_list(X)
    if len(xs) != len(background):
        raise ValueError(f"expected {len(background)} inputs, got {len(xs)}")
    out = []
    for x, b in zip(xs, background):
        check_array(x, "X")
        if x.shape[1:] != b.shape[1:]:
            raise ValueError(f"X has per-sample shape {tuple(x.shape[1:])} but the background has "
                             f"{tuple(b.shape[1:])}")
        out.append(np.ascontiguousarray(x, dtype=b.dtype))
    if any(x.shape[0] != out[0].shape[0] for x in out):
        raise ValueError("every input must have the same number of rows")
    return out
