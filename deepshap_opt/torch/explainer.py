"""``DeepExplainer`` for PyTorch: op-level DeepSHAP with cached references, a drop-in for
``shap.DeepExplainer`` (shap 0.51).

The algorithm (ONNXExplainer, arXiv 2309.16916, in PyTorch):
1. At construction the M references run forward once (one row at a time, so that every cached
   activation has the batch-1 shape of one sample wherever its batch axis sits) under :class:`RuleMode`,
   which records at every rule site what the rule needs: :class:`ReferenceCache`.
2. Per call, the N explicands run forward once under ``torch.func.vjp`` (this is also the prediction);
   each nonlinear op is an ``autograd.Function`` bound to its cached site.
3. The backward is ``torch.func.vmap``-ed over the references and over the requested outputs: linear ops
   keep their ordinary VJP, applied to (k·M·n)-row cotangents, and each rule broadcasts the explicand's
   activation (n, ...) against the reference's (1, ...).
4. φ = mean over references of multiplier × (x − r).
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .._explainer import ExplainerBase
from ..errors import UnsupportedOperatorError
from ._allocator import MIN_HOLD_BYTES, hold_freed_memory
from ._tracer import ControlFlowError, FoldedBatchError, RuleMode

#: transient memory the backward may use when batch_size is not given (bytes)
DEFAULT_MEMORY_BUDGET = 2**30
#: with ``fuse_rules=None`` the rule kernels are fused once a chunk's largest site spans this many
#: elements (n·M·k rows × site size): below it the one-time compile costs more than it saves
AUTO_FUSE_ELEMENTS = 2**24
#: explanations run one at a time per process: the tracer's module-path hooks are process-global and an
#: explanation switches the model to eval mode for its duration. Threads may share explainers safely.
_LOCK = threading.RLock()


@dataclass
class ReferenceCache:
    """What the rules need of the M references, computed once.

    sites: per rule site, (kind, op, tensors) with each tensor (M, *batch-1 shape of the activation).
    roots: per explained input, the references' values (M, 1, *in).
    outputs: the model's outputs on the references, (M, K).
    """

    sites: list = field(default_factory=list)
    roots: list = field(default_factory=list)
    outputs: torch.Tensor | None = None
    fingerprint: tuple = ()

    @property
    def expected(self):
        return [(kind, op, [t.shape[1:] for t in ts]) for kind, op, ts in self.sites]

    def largest_site_nbytes(self) -> int:
        """Bytes of the largest rule site's activations for one reference (what one backward row holds
        at its peak, give or take a few temporaries)."""
        return max((sum(t[0].numel() * t.element_size() for t in ts) for _, _, ts in self.sites), default=1)

    def row_nbytes(self) -> int:
        """Bytes of all rule sites' activations for one reference: about what one explicand's forward
        keeps for the rules (its x, and f(x) and f'(x) where the rule needs them) is a small multiple."""
        return sum(t[0].numel() * t.element_size() for _, _, ts in self.sites for t in ts)

    def largest_site_numel(self) -> int:
        """Elements of the largest rule-site activation of one reference."""
        return max((t[0].numel() for _, _, ts in self.sites for t in ts), default=0)


class _BackwardState:
    """Read by the rule Functions' backward: ``refs[k]`` are site k's reference tensors (vmapped)."""

    def __init__(self, fuse: bool = False):
        self.refs: list = []
        self.fuse = fuse


def _fingerprint(model: nn.Module) -> tuple:
    """Identity and version of every parameter and buffer: any in-place update (optimizer step,
    load_state_dict) or reassignment changes it, so the cache is rebuilt instead of going stale."""
    return tuple((id(t), t._version, t.data_ptr()) for t in (*model.parameters(), *model.buffers()))


def _as_tensor(x, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if hasattr(x, "values") and hasattr(x, "columns"):       # pandas DataFrame
        x = x.values
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
        if like is not None and x.is_floating_point():
            x = x.to(like.dtype)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _batch_leading(sites1, sitesM, M) -> bool:
    """Whether every site of the batched reference pass has the batch on axis 0 (shape (M, *rest) where
    the single-row pass has (1, *rest)) and both passes took the same path."""
    if len(sites1) != len(sitesM):
        return False
    for (k1, _, t1), (kM, _, tM) in zip(sites1, sitesM):
        if k1 != kM or len(t1) != len(tM):
            return False
        for a, b in zip(t1, tM):
            if a.dim() == 0 or a.shape[0] != 1 or b.shape != (M, *a.shape[1:]):
                return False
    return True


def _check_same_path(site_lists):
    shapes = [[(k, [t.shape for t in ts]) for k, _, ts in sites] for sites in site_lists]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ControlFlowError("the references take different paths through the model (data-dependent "
                               "control flow); DeepSHAP with cached references needs one path")


class DeepExplainer(ExplainerBase):
    """DeepSHAP for a ``torch.nn.Module`` with op-level rules and cached references.

    Args:
        model: an ``nn.Module`` taking the input(s) to explain and returning (N, K) or (N,), or
            ``(model, layer)`` to explain the input of ``layer`` (of an ``nn.Embedding``: its output).
        data: the background (references), a tensor (M, *in) or a list of tensors for multi-input models;
            numpy arrays and DataFrames are converted.
        batch_size: most (explicand, reference, output) rows per backward pass; None picks it from a
            memory budget of ``memory_budget`` bytes.
        fuse_rules: fuse each rule's element-wise work into one kernel with ``torch.compile`` (several
            times faster rules on large models; the first compile in a fresh environment takes about a
            minute, later runs reuse inductor's on-disk cache). ``None`` (default): fused when a chunk's
            largest rule site spans at least ``AUTO_FUSE_ELEMENTS`` elements, eager below. Where
            ``torch.compile`` is unavailable the eager kernels run, with a warning; numbers are the same.
        keep_freed_memory: during a call, have glibc keep freed CPU memory for reuse instead of returning each
            large tensor to the system (on a VM every page of a fresh tensor costs a fault: up to half an
            explanation's CPU time); given back when the call ends. ``None`` (default): on for CPU calls
            whose temporaries exceed 32 MiB; a no-op off glibc, with another allocator preloaded, or with
            glibc's ``MALLOC_*_`` settings in the environment (see :mod:`deepshap_opt.torch._allocator`).
    """

    _wrap_indexes = staticmethod(torch.as_tensor)

    def __init__(self, model, data, batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 fuse_rules: bool | None = None, keep_freed_memory: bool | None = None):
        self.layer = None
        if isinstance(model, tuple):
            if len(model) != 2:
                raise TypeError("model must be an nn.Module or a (model, layer) pair")
            model, self.layer = model
            if not isinstance(self.layer, nn.Module):
                raise TypeError(f"layer must be an nn.Module, got {type(self.layer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self.layer is not None and not any(m is self.layer for m in model.modules()):
            raise ValueError("layer is not a submodule of model")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        self.model, self.batch_size, self.memory_budget, self.fuse_rules = model, batch_size, memory_budget, fuse_rules
        self.keep_freed_memory = keep_freed_memory
        self.multi_input = isinstance(data, (list, tuple))
        params = next(iter(model.parameters()), None)
        self.data = [self._check_input(d, "data", params) for d in (data if self.multi_input else [data])]
        if self.data[0].shape[0] < 1:
            raise ValueError("the background (data) is empty: pass at least one reference row")
        if any(d.shape[0] != self.data[0].shape[0] for d in self.data):
            raise ValueError("every background tensor must have the same number of rows")
        self._single_rows = False
        self._names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
        self._cache = ReferenceCache()
        self._build_cache()

    # ---- validation --------------------------------------------------------------------------------
    def _check_input(self, x, name, like=None) -> torch.Tensor:
        x = _as_tensor(x, name, like)
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch axis, got a scalar")
        if like is not None and x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but the model's parameters are on {like.device}")
        if self.layer is None and not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}: only floating-point inputs can be attributed "
                            "(for token ids, explain the embedding's output: DeepExplainer((model, embedding), data))")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        return x.detach()

    def _check_X(self, X) -> list[torch.Tensor]:
        if self.multi_input != isinstance(X, (list, tuple)):
            raise TypeError("expected a list of inputs (the background was a list)" if self.multi_input
                            else "expected a single input, not a list (the background was a single tensor)")
        xs = [self._check_input(x, "X", d) for x, d in zip(X if self.multi_input else [X], self.data)]
        if len(xs) != len(self.data):
            raise ValueError(f"expected {len(self.data)} inputs, got {len(xs)}")
        for x, d in zip(xs, self.data):
            if x.shape[1:] != d.shape[1:]:
                raise ValueError(f"X has per-sample shape {tuple(x.shape[1:])} but the background has "
                                 f"{tuple(d.shape[1:])}")
            if x.dtype != d.dtype:
                raise TypeError(f"X has dtype {x.dtype} but the background has {d.dtype}")
        if any(x.shape[0] != xs[0].shape[0] for x in xs):
            raise ValueError("every input must have the same number of rows")
        return xs

    # ---- one forward pass under the rule mode -------------------------------------------------------
    @contextmanager
    def _session(self):
        """Eval semantics, module-path tracking; the model's modes are restored and no hook is left."""
        with _LOCK:
            with self._session_unlocked() as where:
                yield where

    @contextmanager
    def _session_unlocked(self):
        modes = [(m, m.training) for m in self.model.modules()]
        if self.model.training and not getattr(self, "_warned_training", False):
            self._warned_training = True
            warnings.warn("the model is in training mode: explaining it in eval mode (restored afterwards)",
                          stacklevel=4)
        self.model.eval()
        stack: list[str] = []

        def pre(module, args):
            name = self._names.get(id(module))
            if name is not None:
                stack.append(f"{name} ({type(module).__name__})")

        def post(module, args, out):
            if id(module) in self._names and stack:
                stack.pop()

        hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
                 nn.modules.module.register_module_forward_hook(post)]
        try:
            yield lambda: stack[-1] if stack else "the model's forward"
        finally:
            for h in hooks:
                h.remove()
            for m, t in modes:
                m.training = t

    def _run(self, mode: RuleMode, xs, roots=None):
        """Forward of ``xs`` under ``mode``; the explained roots are the inputs or the layer's input(s).

        With ``roots`` given they replace the explained tensors (for torch.func.vjp); returns
        (output, roots used).
        """
        used: list = []

        def substitute(values):
            new = [r.clone() for r in (roots if roots is not None else values)]
            mode.mark(new)
            used.extend(t.detach().clone() for t in new)   # before the model's in-place ops touch them
            return new

        if self.layer is None:
            with mode:
                out = self.model(*substitute(xs))
            return out, used
        embedding = isinstance(self.layer, nn.Embedding)
        calls = []

        def pre(module, args):
            calls.append(1)
            if len(calls) > 1:
                raise ValueError("the explained layer is called more than once in the forward pass")
            return tuple(substitute(list(args)))

        def post(module, args, out):
            calls.append(1)
            return substitute([out])[0]

        handle = self.layer.register_forward_hook(post) if embedding else self.layer.register_forward_pre_hook(pre)
        try:
            with mode:
                out = self.model(*xs)
        finally:
            handle.remove()
        return out, used

    def _check_output(self, out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned a {type(out).__name__}; DeepExplainer needs a single tensor "
                            "(N, K) or (N,): wrap the model to select the output to explain")
        if out.dim() not in (1, 2):
            raise ValueError(f"the model's output has shape {tuple(out.shape)}; expected (N, K) or (N,)")
        return out

    # ---- the reference cache ------------------------------------------------------------------------
    def _reference_pass(self, rows: slice, where):
        """One forward of the references ``rows`` recording every site: (sites, roots, outputs (m, K))."""
        mode = RuleMode("reference", where=where)
        out, used = self._run(mode, [d[rows] for d in self.data])
        return mode.sites, [u.detach() for u in used], self._check_output(out)

    def _build_cache(self):
        """Run the references forward and keep each rule site's activations as (M, *batch-1 shape).

        The references run as one batch, and once more the first reference alone to learn each site's
        batch-1 shape; where a site's batch axis is not axis 0 (folded into another axis, or moved), the
        references run one row at a time instead.
        """
        M = self.data[0].shape[0]
        with self._session() as where, torch.no_grad():
            sites1, roots1, out1 = self._reference_pass(slice(0, 1), where)
            batched = None
            if M > 1:
                sitesM, rootsM, outM = self._reference_pass(slice(0, M), where)
                if _batch_leading(sites1, sitesM, M) and torch.allclose(outM[:1], out1, rtol=1e-4, atol=1e-5):
                    batched = ([(k, op, tuple(t.unsqueeze(1) for t in ts)) for k, op, ts in sitesM],
                               [r.unsqueeze(1) for r in rootsM], outM)
            if batched is None:
                passes = [(sites1, roots1, out1)] + [self._reference_pass(slice(j, j + 1), where) for j in range(1, M)]
                _check_same_path([p[0] for p in passes])
                batched = ([(kind, op, tuple(torch.stack([p[0][i][2][t] for p in passes])
                                             for t in range(len(ts)))) for i, (kind, op, ts) in enumerate(sites1)],
                           [torch.stack([p[1][i] for p in passes]) for i in range(len(roots1))],
                           torch.cat([p[2] for p in passes]))
        sites, roots, outputs = batched
        self._output_1d = outputs.dim() == 1
        outputs = outputs.reshape(M, -1)
        self._cache = ReferenceCache(sites=sites, roots=roots, outputs=outputs, fingerprint=_fingerprint(self.model))
        self.num_outputs = outputs.shape[1]
        self.expected_value = outputs.mean(0).cpu().numpy()

    def _current_cache(self) -> ReferenceCache:
        if self._cache.fingerprint != _fingerprint(self.model):
            self._build_cache()   # weights changed since construction: never return a stale explanation
        return self._cache

    # ---- explanation ----------------------------------------------------------------------------------
    def _chunks(self, n: int, k: int, M: int) -> tuple[int, int]:
        """(explicands per chunk, references per chunk) so that n·k·M rows fit batch_size.

        Explicands first: each explicand chunk is one forward pass (a forward of a few rows costs about
        as much as of one, in tracing and per-op overhead), and its references are taken in near-equal
        slices so that every backward runs about the same number of rows.
        """
        rows, n_max = self.batch_size, n
        if rows is None:   # a backward row holds a few temporaries the size of the largest site
            rows = max(1, self.memory_budget // (6 * self._cache.largest_site_nbytes()))
            # an explicand's forward keeps up to three tensors per rule site: half the budget at most
            n_max = max(1, self.memory_budget // (6 * max(1, self._cache.row_nbytes())))
        if self._single_rows:
            return 1, max(1, min(M, rows // k))
        n_chunk = max(1, min(n, n_max, rows // k))
        m_max = max(1, min(M, rows // (k * n_chunk)))
        passes = -(-M // m_max)
        return n_chunk, -(-M // passes)

    def _explain(self, X, select: Callable[[np.ndarray], np.ndarray]):
        with _LOCK:   # the cache check, a rebuild and the explanation happen as one step
            return self._explain_locked(X, select)

    def _explain_locked(self, X, select):
        xs = self._check_X(X)
        cache = self._current_cache()
        N, M = xs[0].shape[0], cache.roots[0].shape[0]
        k = select(np.zeros((1, self.num_outputs))).shape[1]
        if N == 0:   # nothing to explain: empty results of the right shapes
            empty = [np.zeros((0, *r.shape[2:], k)) for r in cache.roots]
            return (empty, np.zeros((0, self.num_outputs)), np.zeros((0, k), dtype=np.int64),
                    torch.empty(0, dtype=xs[0].dtype).numpy().dtype)
        while True:
            try:
                n_chunk, m_chunk = self._chunks(N, k, M)
                with hold_freed_memory(self._holds_memory(xs[0], n_chunk * m_chunk * k)):
                    parts = [self._explain_chunk([x[i:i + n_chunk] for x in xs], select, cache, m_chunk, k)
                             for i in range(0, N, n_chunk)]
                break
            except FoldedBatchError:
                if self._single_rows:
                    raise
                self._single_rows = True   # the batch axis is folded somewhere: one explicand at a time
        phis = [np.concatenate([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
        outputs = np.concatenate([p[1] for p in parts])
        indexes = np.concatenate([p[2] for p in parts])
        return phis, outputs, indexes, outputs.dtype

    def _holds_memory(self, x: torch.Tensor, rows: int) -> bool:
        """Whether this call keeps freed memory in the heap (``keep_freed_memory``; ``None``: on CPU when a
        backward's temporaries, ``rows`` × the largest site, pass glibc's own mmap ceiling)."""
        if x.device.type != "cpu":
            return False
        if self.keep_freed_memory is not None:
            return bool(self.keep_freed_memory)
        return rows * self._cache.largest_site_nbytes() >= MIN_HOLD_BYTES

    def _explain_chunk(self, xs, select, cache: ReferenceCache, m_chunk: int, k: int):
        fuse = self.fuse_rules
        if fuse is None:
            fuse = xs[0].shape[0] * m_chunk * k * cache.largest_site_numel() >= AUTO_FUSE_ELEMENTS
        state = _BackwardState(fuse)
        expected = cache.expected
        with self._session() as where, torch.no_grad():
            if self.layer is None:
                roots_x = xs
            else:   # the layer's input(s) for these explicands
                _, roots_x = self._run(RuleMode("reference", where=where), xs)
                roots_x = [r.detach() for r in roots_x]

            def forward(*roots):
                mode = RuleMode("explain", state=state, expected=expected, where=where)
                out, _ = self._run(mode, xs, roots=roots)
                if mode.count != len(expected):
                    raise ControlFlowError("the model took a different path for the explicands than for the "
                                           "references (data-dependent control flow)")
                return self._check_output(out)

            out, vjp_fn = torch.func.vjp(forward, *roots_x)
            outputs = out.detach().reshape(out.shape[0], -1)
            idx = select(outputs.cpu().numpy())                       # (n, k)
            n, k = idx.shape
            seeds = torch.zeros(k, n, outputs.shape[1], dtype=out.dtype, device=out.device)
            seeds[torch.arange(k)[:, None], torch.arange(n)[None, :], torch.as_tensor(idx.T)] = 1
            seeds = seeds.reshape(k, *out.shape)

            def per_reference(site_refs, root_refs):
                state.refs = site_refs
                if k == 1:   # one output: no inner vmap level (cheaper batching rules)
                    grads = tuple(g.unsqueeze(0) for g in vjp_fn(seeds[0]))
                else:
                    grads = torch.func.vmap(vjp_fn)(seeds)             # per root (k, n, *in)
                return tuple(g * (x - r) for g, x, r in zip(grads, roots_x, root_refs))

            totals = [torch.zeros(k, *r.shape, dtype=r.dtype, device=r.device) for r in roots_x]
            for m0 in range(0, cache.roots[0].shape[0], m_chunk):
                sl = slice(m0, m0 + m_chunk)
                site_refs = [tuple(t[sl] for t in ts) for _, _, ts in cache.sites]
                contrib = torch.func.vmap(per_reference)(site_refs, [r[sl] for r in cache.roots])
                for tot, c in zip(totals, contrib):
                    tot += c.sum(0)
            state.refs = []
        M = cache.roots[0].shape[0]
        phis = [np.moveaxis((t / M).cpu().double().numpy(), 0, -1) for t in totals]
        return phis, outputs.cpu().numpy(), idx


__all__ = ["DeepExplainer", "ReferenceCache", "UnsupportedOperatorError"]
