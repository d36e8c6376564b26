"""TensorFlow / Keras 3 backend: ``DeepExplainer`` (cached-reference DeepSHAP) and ``MFABA``.

``import deepshap_opt.tf`` does not import TensorFlow; the classes are loaded on first access.
"""

from __future__ import annotations

__all__ = ["MFABA", "DeepExplainer"]


def __getattr__(name):
    if name == "DeepExplainer":
        from .deep import DeepExplainer

        return DeepExplainer
    if name == "MFABA":
        from .mfaba import MFABA

        return MFABA
    raise AttributeError(f"module 'deepshap_opt.tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
