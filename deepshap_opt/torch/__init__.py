"""PyTorch backend: ``DeepExplainer`` (op-level DeepSHAP with cached references) and ``MFABA``.

Imported lazily so that ``import deepshap_opt.torch`` costs nothing until a name is used.
"""

from __future__ import annotations

__all__ = ["DeepExplainer", "ReferenceCache", "MFABA", "AttributionLogger"]

_LAZY = {"DeepExplainer": ".explainer", "ReferenceCache": ".explainer", "MFABA": ".mfaba",
         "AttributionLogger": ".logger"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
