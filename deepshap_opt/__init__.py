"""deepshap_opt: fast, exact DeepSHAP (cached references) and MFABA for PyTorch, TensorFlow and ONNX.

``import deepshap_opt`` needs only NumPy; each backend (``deepshap_opt.torch``, ``.tf``, ``.onnx``) is
imported when first used.
"""

from __future__ import annotations

import sys

from . import rules
from .errors import AdditivityError, UnsupportedOperatorError

__version__ = "0.1.0"
__all__ = ["DeepExplainer", "UnsupportedOperatorError", "AdditivityError", "rules", "__version__"]


def _framework_of(model) -> str:
    """'torch', 'tf' or 'onnx' for a model object (or a (model, layer) / (inputs, outputs) pair)."""
    inner = model[0] if isinstance(model, tuple) and len(model) == 2 else model
    if isinstance(inner, (str, bytes)) or type(inner).__name__ == "PosixPath" or type(inner).__name__ == "ModelProto":
        return "onnx"
    if "torch" in sys.modules:
        import torch

        if isinstance(inner, torch.nn.Module):
            return "torch"
    if "keras" in sys.modules or "tensorflow" in sys.modules:
        return "tf"
    raise TypeError(
        f"cannot tell the framework of a {type(inner).__name__}: pass a torch.nn.Module, a Keras model, an "
        "onnx.ModelProto or a path to an .onnx file")


def DeepExplainer(model, data, **kwargs):
    """Drop-in for ``shap.DeepExplainer``: dispatches on the model's type to the right backend."""
    fw = _framework_of(model)
    if fw == "torch":
        from .torch import DeepExplainer as cls
    elif fw == "tf":
        from .tf import DeepExplainer as cls
    else:
        from .onnx import DeepExplainer as cls
    return cls(model, data, **kwargs)
