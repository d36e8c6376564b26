"""Behaviour shared by every backend's DeepExplainer: output ranking, shap-compatible formatting,
the additivity (completeness) check and ``explainer(X) -> shap.Explanation``.

Backends subclass :class:`ExplainerBase` and implement ``_explain``; nothing here imports a framework.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import AdditivityError

#: Relative tolerance of the additivity check, by the dtype the model computes in.
ADDITIVITY_RTOL = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-6}
RANK_ORDERS = ("max", "min", "max_abs")


def output_selector(ranked_outputs: int | None, output_rank_order: str, num_outputs: int
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """A function taking the model outputs (n, K) to the output indexes to explain per row, (n, k)."""
    if output_rank_order not in RANK_ORDERS:
        raise ValueError(f"output_rank_order must be one of {RANK_ORDERS}, got {output_rank_order!r}")
    if ranked_outputs is None:
        return lambda out: np.broadcast_to(np.arange(num_outputs), (out.shape[0], num_outputs)).copy()
    if isinstance(ranked_outputs, bool) or not isinstance(ranked_outputs, (int, np.integer)) or ranked_outputs < 1:
        raise ValueError(f"ranked_outputs must be a positive integer or None, got {ranked_outputs!r}")
    k = min(int(ranked_outputs), num_outputs)

    def select(out: np.ndarray) -> np.ndarray:
        key = {"max": -out, "min": out, "max_abs": -np.abs(out)}[output_rank_order]
        return np.argsort(key, axis=1, kind="stable")[:, :k]

    return select


def format_values(phis: Sequence[np.ndarray], multi_input: bool):
    """shap 0.51's layout: ``(N, *in, k)`` float64, a list of those for multi-input models."""
    phis = [np.asarray(p, dtype=np.float64) for p in phis]
    return phis if multi_input else phis[0]


def assert_additivity(phis: Sequence[np.ndarray], outputs: np.ndarray, expected_value: np.ndarray,
                     indexes: np.ndarray, dtype) -> None:
    """Raise :class:`AdditivityError` unless Σφ = f(x) − E f for every row and explained output.

    phis: per input (N, *in, k); outputs: (N, K); expected_value: (K,); indexes: (N, k).
    The tolerance is relative to the output scale (max |f| over the explained outputs and E f).
    """
    if outputs.shape[0] == 0:
        return
    total = sum(p.reshape(p.shape[0], -1, p.shape[-1]).sum(axis=1) for p in phis)      # (N, k)
    rows = np.arange(outputs.shape[0])[:, None]
    target = outputs[rows, indexes] - expected_value[indexes]                          # (N, k)
    scale = max(float(np.abs(outputs).max(initial=0.0)), float(np.abs(expected_value).max(initial=0.0)), 1e-12)
    rtol = ADDITIVITY_RTOL.get(np.dtype(dtype), 1e-3)
    err = np.abs(total - target)
    err = np.where(np.isfinite(err), err, np.inf)     # NaN never passes (NaN > tol is False)
    if err.size and err.max() > rtol * scale:
        n, j = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AdditivityError(
            f"SHAP values do not sum to f(x) - E[f]: row {n}, output {int(indexes[n, j])}: sum {total[n, j]:.6g} vs "
            f"{target[n, j]:.6g} (error {err[n, j]:.3g} > {rtol:g} x output scale {scale:.3g}). This means an op "
            "broke its rule; please report it with the model. Pass check_additivity=False to skip this check.")


class ExplainerBase:
    """The drop-in surface of ``shap.DeepExplainer``; backends implement :meth:`_explain`.

    Attributes set by the backend: ``expected_value`` (K,) numpy, ``multi_input``, ``num_outputs``.
    """

    expected_value: np.ndarray
    multi_input: bool = False
    num_outputs: int = 1
    #: what ``shap_values`` returns as indexes with ranked outputs (backends may wrap it, e.g. torch tensor)
    _wrap_indexes = staticmethod(lambda idx: idx)

    def _explain(self, X, select: Callable[[np.ndarray], np.ndarray]):
        """Return (phis per input (N, *in, k) float64, outputs (N, K), indexes (N, k), compute dtype)."""
        raise NotImplementedError

    def shap_values(self, X, ranked_outputs=None, output_rank_order="max", check_additivity=True):
        """SHAP values of X, laid out as shap 0.51 lays them out.

        Returns ``(N, *in, K)`` float64 (a list per input for multi-input models); with
        ``ranked_outputs=k``, ``(values, indexes)`` with values ``(N, *in, k)`` and indexes ``(N, k)``.
        """
        select = output_selector(ranked_outputs, output_rank_order, self.num_outputs)
        phis, outputs, indexes, dtype = self._explain(X, select)
        if check_additivity:
            assert_additivity(phis, outputs, self.expected_value, indexes, dtype)
        values = format_values(phis, self.multi_input)
        if ranked_outputs is not None:
            return values, self._wrap_indexes(indexes)
        return values

    def __call__(self, X):
        """``shap.Explanation`` of X with ``base_values`` filled (shap leaves them None)."""
        try:
            from shap import Explanation
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("explainer(X) returns a shap.Explanation: pip install shap") from e
        values = self.shap_values(X)
        data = [np.asarray(_to_numpy(x)) for x in X] if self.multi_input else np.asarray(_to_numpy(X))
        n = (data[0] if self.multi_input else data).shape[0]
        base = np.broadcast_to(np.asarray(self.expected_value, np.float64), (n, self.num_outputs)).copy()
        if self.multi_input:
            return [Explanation(values=v, base_values=base, data=d) for v, d in zip(values, data)]
        return Explanation(values=values, base_values=base, data=data)



def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return x.numpy()
    return x
