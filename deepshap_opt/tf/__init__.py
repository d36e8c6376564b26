"""TensorFlow / Keras 3 backend: ``DeepExplainer`` (cached-reference DeepSHAP), ``MFABA`` and the
``AttributionCallback`` training hook.

``import deepshap_opt.tf`` does not import TensorFlow; the classes are loaded on first access.
"""

from __future__ import annotations

__all__ = ["MFABA", "AttributionCallback", "DeepExplainer"]

_LAZY = {"DeepExplainer": ".deep", "MFABA": ".mfaba", "AttributionCallback": ".logger"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'deepshap_opt.tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
