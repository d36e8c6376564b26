"""The op-level tracer: a ``TorchFunctionMode`` that sees every torch call of a forward pass — functional
calls, reused modules, in-place ops and tensor methods alike — and routes each op whose input varies with
the explained input to its rule (table in :mod:`._ops`, rules in :mod:`._functions`).

Two phases share one code path:
- ``reference``: one reference (batch 1) at a time, no grad; each rule site records the reference
  activations its rule needs (:class:`~deepshap_opt.torch.explainer.ReferenceCache` stacks them).
- ``explain``: the explicands' forward under ``torch.func.vjp``; each rule site applies its
  ``autograd.Function`` bound to the matching cached site.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedOperatorError
from . import _functions as R
from . import _ops as T


class FoldedBatchError(RuntimeError):
    """A rule site whose explicand activation cannot broadcast against the reference's (the batch axis was
    folded into another axis): the explainer retries with one explicand per chunk."""


class ControlFlowError(RuntimeError):
    pass


class _TensorSet:
    """Tensors identified by object, held weakly (an id reused after a tensor dies is not confused)."""

    def __init__(self):
        self._d: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.info: dict[int, Any] = {}

    def add(self, t: torch.Tensor, info: Any = None):
        self._d[id(t)] = t
        if info is not None:
            self.info[id(t)] = info

    def __contains__(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._d.get(id(t)) is t


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # property access: x.T, x.shape, x.data ...
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _display(func) -> str:
    mod = getattr(func, "__module__", None) or "torch.Tensor"
    return f"{mod}.{_op_name(func)}"


_INPLACE_DUNDER = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__imatmul__"}


def _base_name(name: str) -> str:
    """The out-of-place name of an in-place tensor method (``sigmoid_`` → ``sigmoid``); other names as they are."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _is_inplace(name: str, kwargs: dict) -> bool:
    return _base_name(name) != name or name in _INPLACE_DUNDER or bool(kwargs.get("inplace"))


def _out_of_place(func, name: str, args: tuple, kwargs: dict):
    """(func, args, kwargs) of the out-of-place twin of an in-place call."""
    kwargs = dict(kwargs)
    if "inplace" in kwargs:
        kwargs["inplace"] = False
        return func, args, kwargs
    if name in _INPLACE_DUNDER:
        return getattr(torch.Tensor, "__" + name[3:]), args, kwargs
    base = _base_name(name)
    if base != name:
        twin = getattr(torch.Tensor, base, None) or getattr(torch, base, None) or getattr(F, base)
        return twin, args, kwargs
    try:  # F.relu(x, True): inplace passed positionally
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return func, args, kwargs
    if bound.arguments.get("inplace"):
        bound.arguments["inplace"] = False
        return func, bound.args, bound.kwargs
    return func, args, kwargs


class RuleMode(TorchFunctionMode):
    """Routes each op on a varying tensor to its rule. One instance per forward pass."""

    def __init__(self, phase: str, *, sites=None, state=None, where=None, expected=None):
        super().__init__()
        self.phase = phase                 # "reference" | "explain"
        self.varying, self.tainted = _TensorSet(), _TensorSet()
        self.sites = [] if sites is None else sites   # reference: recorded [(kind, tensors)]
        self.expected = expected           # explain: [(kind, shapes)] recorded by the reference pass
        self.state = state                 # explain: the state whose .refs the backward reads
        self.where = where or (lambda: "")
        self.count = 0

    # ---- bookkeeping -------------------------------------------------------------------------------
    def mark(self, out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t.is_floating_point() or t.is_complex():
                    self.varying.add(t)
                else:  # an integer/bool result of varying data (e.g. x.long()) has no gradient
                    self.tainted.add(t, ("cast to " + str(t.dtype), self.where()))
        return out

    def taint(self, out, op: str):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.tainted.add(t, (op, self.where()))
        return out

    def site(self, kind: str, tensors: tuple[torch.Tensor, ...], op: str):
        """Reference phase: record ``tensors`` (batch-1 activations); explain phase: the matching Site."""
        k, self.count = self.count, self.count + 1
        if self.phase == "reference":
            # clone: an in-place op (ReLU(inplace=True)) overwrites its input right after this
            self.sites.append((kind, op, tuple(t.detach().clone() for t in tensors)))
            return None
        if k >= len(self.expected) or self.expected[k][0] != kind:
            raise ControlFlowError(
                f"the model took a different path for the explicands than for the references at op '{op}' "
                f"({self.where()}): data-dependent control flow cannot be explained with cached references")
        for t, ref_shape in zip(tensors, self.expected[k][2]):
            if t.dim() != len(ref_shape) or any(r not in (1, s) for r, s in zip(ref_shape, t.shape)):
                raise FoldedBatchError(op)
        return R.Site(k, self.state)

    # ---- dispatch ----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        flat = tree_flatten((args, kwargs))[0]
        vary = any(t in self.varying for t in flat)
        taint = [t for t in flat if t in self.tainted]
        if not vary and not taint:
            return func(*args, **kwargs)
        if name in T.PASSTHROUGH:
            return func(*args, **kwargs)
        if name in T.TAINT:
            return self.taint(func(*args, **kwargs), _display(func))
        if taint:
            if not vary:   # data-dependent constants combined among themselves stay constants
                return self.taint(func(*args, **kwargs), _display(func))
            op, where = self.tainted.info.get(id(taint[0]), ("?", ""))
            raise UnsupportedOperatorError(
                _display(func), self.where(),
                f"it combines the explained input with a value that has no gradient, computed by '{op}' "
                f"({where}); such data-dependent branches (masks, detach, comparisons) cannot be attributed")
        handler = _HANDLERS.get(name)
        if handler is None:
            if name in T.LINEAR:
                handler = RuleMode._linear
            elif _base_name(name) in T.RESCALE:
                handler = RuleMode._rescale   # x.sigmoid_(), torch.relu_(x): in place, the same rule
            else:
                raise UnsupportedOperatorError(_display(func), self.where())
        return handler(self, func, name, args, kwargs)

    # ---- handlers ----------------------------------------------------------------------------------
    def _linear(self, func, name, args, kwargs):
        out = func(*args, **kwargs)
        if _is_inplace(name, kwargs) or name == "__setitem__":
            self.mark(args[0])
        return self.mark(out)

    #: torch op names (out of place; in-place twins via _base_name) whose rescale needs no parameters beyond
    #: the tensor (closed-form f' or closed-form secant applies)
    _PARAMETER_FREE = frozenset({"relu", "sigmoid", "tanh", "silu", "rsqrt", "sqrt", "reciprocal", "square"})

    def _rescale(self, func, name, args, kwargs, canon=None):
        inplace = _is_inplace(name, kwargs)
        f, fargs, fkwargs = _out_of_place(func, name, args, kwargs) if inplace else (func, args, kwargs)
        pos = [i for i, a in enumerate(fargs) if a in self.varying]
        kpos = [k for k, v in fkwargs.items() if v in self.varying]
        if len(pos) + len(kpos) != 1:
            raise UnsupportedOperatorError(_display(func), self.where(), "more than one varying operand")
        if pos:
            i = pos[0]
            x = fargs[i]

            def fn(t, f=f, fargs=fargs, fkwargs=fkwargs, i=i):
                return f(*fargs[:i], t, *fargs[i + 1:], **fkwargs)
        else:
            key = kpos[0]
            x = fkwargs[key]

            def fn(t, f=f, fargs=fargs, fkwargs=fkwargs, key=key):
                return f(*fargs, **{**fkwargs, key: t})
        base = _base_name(name)
        closed = base if base in self._PARAMETER_FREE and len(fargs) + len(fkwargs) - ("inplace" in fkwargs) == 1 \
            else None
        canon = canon or T.RESCALE.get(base, name)
        return self._apply_rescale(x, fn, canon, inplace, target=args[0], closed=closed)

    def _apply_rescale(self, x, fn, op, inplace=False, target=None, closed=None):
        if self.phase == "reference":
            y = fn(x)
            self.site("rescale", (x,), op)
        else:
            site = self.site("rescale", (x,), op)
            # the rule itself writes x: no copy_ on the tape (autograd allows a view written in place
            # by a Function only when that Function returns one tensor: views keep the copy_)
            if inplace and target is x and not x._is_view():
                return self.mark(R.RescaleInPlace.apply(x, fn, site, closed)[0])
            # no clone for in-place ops: Rescale keeps its own copies of the values it needs, so the
            # copy_ below may overwrite x (a clone here would add a copy over n·M rows to the backward)
            y = R.Rescale.apply(x, fn, site, closed)
        if inplace:
            target.copy_(y)
            return self.mark(target)
        return self.mark(y)

    def _binary(self, func, name, args, kwargs):
        """mul/matmul/einsum/div/maximum/...: linear or rescale with one varying operand, a rule with two."""
        if name == "einsum":
            listed = len(args) == 2 and isinstance(args[1], (list, tuple))
            eq, ops = args[0], (list(args[1]) if listed else list(args[1:]))
            vary = [i for i, o in enumerate(ops) if o in self.varying]
            if len(vary) <= 1:
                return self._linear(func, name, args, kwargs)
            if len(ops) != 2:
                raise UnsupportedOperatorError("torch.einsum", self.where(), "more than two varying operands")
            return self._pair("bilinear", lambda a, b: torch.einsum(eq, a, b), ops[0], ops[1], "einsum")
        inplace = _is_inplace(name, kwargs)
        f, fargs, fkwargs = _out_of_place(func, name, args, kwargs) if inplace else (func, args, kwargs)
        if name == "linear":
            x, w = fargs[0], fargs[1] if len(fargs) > 1 else fkwargs["weight"]
            bias = fargs[2] if len(fargs) > 2 else fkwargs.get("bias")
            if w not in self.varying:
                return self._linear(func, name, args, kwargs)
            out = self._pair("bilinear", F.linear, x, w, "linear")
            return self.mark(out + bias) if bias is not None else out
        if len(fargs) >= 2:
            a, b = fargs[:2]
        else:
            a, b = fargs[0], fkwargs.get("other", fkwargs.get("exponent"))
        av, bv = a in self.varying, b in self.varying
        canon = T.BILINEAR.get(name) or T.PAIR[name]
        if av and bv:
            kind = "bilinear" if name in T.BILINEAR else "pair"
            if canon == "div" and not fkwargs and len(fargs) == 2:   # closed-form Shapley split of a / b
                num, den = (b, a) if name.startswith("__r") else (a, b)
                out = self._pair(kind, torch.div, num, den, canon)
            else:
                out = self._pair(kind, torch.mul if canon == "mul" and name != "outer" else (lambda p, q: f(p, q)),
                                 a, b, canon)
        elif name in T.BILINEAR or (canon == "div" and av and not name.startswith("__r")):
            return self._linear(func, name, args, kwargs)        # product with / division by a constant
        else:
            out = self._rescale(f, name.rstrip("_") if inplace else name, fargs, fkwargs, canon=canon)
            if inplace:
                args[0].copy_(out)
                return self.mark(args[0])
            return out
        if inplace:
            args[0].copy_(out)
            return self.mark(args[0])
        return out

    def _pair(self, kind, fn, a, b, op):
        if self.phase == "reference":
            out = fn(a, b)
            self.site(kind, (a, b), op)
            return self.mark(out)
        site = self.site(kind, (a, b), op)
        cls = R.Bilinear if kind == "bilinear" else R.ShapleyPair
        return self.mark(cls.apply(a, b, fn, site))

    def _conv(self, func, name, args, kwargs):
        """conv1d/2d/3d of a varying input with a constant weight: linear (the :class:`R.Conv` VJP in the
        explain phase; string padding and unbatched inputs keep the ordinary VJP)."""
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = {**dict(zip(names, args)), **kwargs}
        if len(args) > len(names) or set(bound) - set(names) or "weight" not in bound:
            return self._linear(func, name, args, kwargs)
        x, w, bias = bound["input"], bound["weight"], bound.get("bias")
        stride, padding = bound.get("stride", 1), bound.get("padding", 0)
        dilation, groups = bound.get("dilation", 1), bound.get("groups", 1)
        if w in self.varying or bias in self.varying:   # its weight is computed from the batch's samples
            raise UnsupportedOperatorError(_display(func), self.where(), "the convolution's weight or bias depends "
                                           "on the explained input (mixes the samples of a batch)")
        spatial = int(name[-2])
        if self.phase == "reference" or x.dim() != spatial + 2 or isinstance(padding, str):
            return self._linear(func, name, args, kwargs)

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial

        out = R.Conv.apply(x, lambda t: func(t, w, bias, stride, padding, dilation, groups), w, tup(stride),
                           tup(padding), tup(dilation), groups)
        return self.mark(out)

    def _maxpool(self, func, name, args, kwargs):
        spatial = T.MAXPOOL[name]
        want_idx = name.endswith("_with_indices") or kwargs.get("return_indices", False)
        kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
        sig_args = list(args)
        if not name.endswith("_with_indices") and not name.startswith("adaptive") and len(sig_args) > 6:
            want_idx = want_idx or bool(sig_args[6])
            sig_args = sig_args[:6]
        base = getattr(F, name if name.endswith("_with_indices") else name + "_with_indices")
        x = sig_args[0]

        def pool(t, rest=tuple(sig_args[1:]), kw=kwargs):
            return base(t, *rest, **kw)

        if self.phase == "reference":
            y, idx = pool(x)
            self.site("maxpool", (x,), "max_pool")   # y and idx are recomputed from x in the backward
        else:
            site = self.site("maxpool", (x,), "max_pool")
            y = R.MaxPool.apply(x, pool, spatial, site)
            with torch.no_grad():
                idx = pool(x.detach())[1]
        self.mark(y)
        return (y, self.taint(idx, _display(func))) if want_idx else y

    def _reduce_max(self, func, name, args, kwargs):
        """max/min/amax/amin over axes of a varying tensor: the max-pool rule per reduced row."""
        x = args[0]
        sign = -1.0 if name in ("min", "amin") else 1.0
        dims = _is_reduce_with_indices(args, kwargs)
        keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
        with self:   # rewrite in primitives: movedim/reshape are linear and need their own handling
            if dims is None:
                raise UnsupportedOperatorError(_display(func), self.where(),
                                               "a max over all axes mixes the samples of a batch")
            dims = sorted(d % x.dim() for d in dims)
            z = x * sign if sign < 0 else x
            moved = z.movedim(dims, list(range(x.dim() - len(dims), x.dim())))
            flat = moved.reshape(*moved.shape[: x.dim() - len(dims)], -1)
        if self.phase == "reference":
            y = flat.amax(-1, keepdim=True)
            self.site("reduce_max", (flat, y, flat.argmax(-1, keepdim=True)), "reduce_max")
        else:
            site = self.site("reduce_max", (flat,), "reduce_max")
            y = R.ReduceMax.apply(flat, -1, site)
        self.mark(y)
        with self:
            y = y.squeeze(-1)
            for d in dims:
                if keepdim:
                    y = y.unsqueeze(d)
            y = y * sign if sign < 0 else y
        return y

    def _softmax(self, func, name, args, kwargs):
        z = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None:
            raise UnsupportedOperatorError(_display(func), self.where(), "pass dim= explicitly")
        dtype = kwargs.get("dtype", args[3] if len(args) > 3 else None)
        with self:
            if dtype is not None:
                z = z.to(dtype)
            if name == "softmin":
                z = -z
        canon = T.SOFTMAX[name]
        if self.phase == "reference":
            y = torch.softmax(z, dim) if canon == "softmax" else torch.log_softmax(z, dim)
            self.site(canon, (z,), canon)
        else:
            site = self.site(canon, (z,), canon)
            y = (R.Softmax if canon == "softmax" else R.LogSoftmax).apply(z, dim, site)
        return self.mark(y)

    def _decompose(self, func, name, args, kwargs):
        from ._decompositions import DECOMPOSITIONS, LINEAR_IF

        if name in LINEAR_IF:
            LINEAR_IF[name](self, func, *args, **kwargs)   # raises when the op is not linear here
            return self._linear(func, name, args, kwargs)
        with self:
            return DECOMPOSITIONS[name](self, func, *args, **kwargs)


def _is_reduce_with_indices(args, kwargs):
    """The reduced axes of a max/min/amax call on a tensor, or None when it is elementwise/global."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if isinstance(dim, torch.Tensor) or dim is None:
        return None
    return (dim,) if isinstance(dim, int) else tuple(dim)


def _max_handler(self, func, name, args, kwargs):
    """torch.max/min: element-wise with a second tensor, a reduction (values, indices) with a dim."""
    second = kwargs.get("other", args[1] if len(args) > 1 else None)
    if isinstance(second, torch.Tensor):
        return self._binary(func, name, args, kwargs)
    dims = _is_reduce_with_indices(args, kwargs)
    if dims is None:
        raise UnsupportedOperatorError(_display(func), self.where(), "a max over all axes mixes the samples of a batch")
    y = self._reduce_max(func, name, args, kwargs)
    keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
    with torch.no_grad():
        x = args[0].detach()
        idx = (x if name == "max" else -x).argmax(dims[0], keepdim=keepdim)
    return torch.return_types.max((y, self.taint(idx, _display(func))))


_HANDLERS = {
    **dict.fromkeys(T.BILINEAR, RuleMode._binary),
    **dict.fromkeys(T.PAIR, RuleMode._binary),
    **dict.fromkeys(T.MAXPOOL, RuleMode._maxpool),
    **dict.fromkeys(("conv1d", "conv2d", "conv3d"), RuleMode._conv),
    **dict.fromkeys(T.REDUCE_MAX, RuleMode._reduce_max),
    **dict.fromkeys(T.SOFTMAX, RuleMode._softmax),
    **dict.fromkeys(T.DECOMPOSE, RuleMode._decompose),
    "max": _max_handler, "min": _max_handler,
}
