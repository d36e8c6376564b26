"""The rules of :mod:`deepshap_opt.rules.spec` as ``torch.autograd.Function``s.

Each Function's forward is the op's ordinary forward on the explicands, shape (n, ...). Its backward
runs inside ``torch.func.vmap`` over the references: ``site.refs()`` returns that site's cached
reference tensors, each a batch-1 activation (1, ...) per reference, so the multiplier is formed by
broadcasting the explicand's activation (n, ...) against the reference's — the (N,1,...) × (1,M,...)
pairing of the cached-reference algorithm — and linear ops between sites keep their ordinary VJP.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ..rules.secant import closed_form_secants
from ..rules.spec import MAXPOOL_EPS, RESCALE_EPS, pair_eps


class Site:
    """One rule site of the explicand pass: its index into the reference cache and the shared state."""

    __slots__ = ("index", "state")

    def __init__(self, index: int, state):
        self.index, self.state = index, state

    def refs(self) -> tuple[torch.Tensor, ...]:
        return self.state.refs[self.index]


def _safe_div(num: torch.Tensor, den: torch.Tensor, eps: float, fallback) -> torch.Tensor:
    """num / den, with ``fallback`` (a tensor or a number) where |den| < eps."""
    small = den.abs() < eps
    return torch.where(small, fallback, num / torch.where(small, torch.ones_like(den), den))


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the axes along which ``shape`` was broadcast to t's shape."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


#: closed-form f' of parameter-free activations (saves a nested VJP per site on the hot path). ReLU and the
#: closed-form secants (CLOSED_FORM_SECANT: sigmoid, tanh, ...) read no f', so only SiLU is left here
CLOSED_FORM_DERIVATIVE = {
    "silu": lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
}


def derivative(fn, x: torch.Tensor, op: str | None = None) -> torch.Tensor:
    """f'(x) of an element-wise ``fn`` at the explicand: closed form when ``op`` has one, else a VJP with
    ones over the n explicand rows."""
    x = x.detach()
    if op in CLOSED_FORM_DERIVATIVE:
        return CLOSED_FORM_DERIVATIVE[op](x)
    y, vjp = torch.func.vjp(fn, x)
    (d,) = vjp(torch.ones_like(y))
    return d


def _rescale_times(g, x, y, dfx, r_in, r_out):
    """g · m with m = (y − r_out) / (x − r_in), or f'(x) = dfx where |x − r_in| < RESCALE_EPS (broadcasting)."""
    d = x - r_in
    small = d.abs() < RESCALE_EPS
    return g * torch.where(small, dfx, (y - r_out) / torch.where(small, torch.ones_like(d), d))


def _relu_times(g, x, r_in):
    """:func:`_rescale_times` for ReLU from the inputs alone: f(x), f(r), f'(x) are cheap to redo in the
    fused pass over the n·M rows, so the site keeps only x and the cache only r."""
    return _rescale_times(g, x, torch.relu(x), (x > 0).to(g.dtype), r_in, torch.relu(r_in))


#: activations whose f(r) the rule kernel recomputes itself from r (fused: inside its one pass over the
#: n·M rows, no (M, ...) temporary per site and chunk)
IN_KERNEL_ACTIVATION = {"silu": torch.nn.functional.silu}


#: rescale multipliers in closed form, m(x, r) without the difference f(x) − f(r) (see ``rules.secant``)
CLOSED_FORM_SECANT = closed_form_secants(SimpleNamespace(
    sigmoid=torch.sigmoid, tanh=torch.tanh, sqrt=torch.sqrt, rsqrt=torch.rsqrt, where=torch.where,
    ones_like=torch.ones_like))


def _secant_times(m):
    def kernel(g, x, r_in):
        return g * m(x, r_in)
    return kernel


def _activation_times(f):
    def kernel(g, x, y, dfx, r_in):
        return _rescale_times(g, x, y, dfx, r_in, f(r_in))
    return kernel


class RuleKernels:
    """The element-wise rule kernels, eager or fused by ``torch.compile`` (one pass over the n·M rows
    instead of ~8; the first compile takes a minute, later processes reuse inductor's on-disk cache)."""

    EAGER = {"rescale_times": _rescale_times, "relu_times": _relu_times,
             **{f"{op}_times": _activation_times(f) for op, f in IN_KERNEL_ACTIVATION.items()},
             **{f"{op}_secant_times": _secant_times(m) for op, m in CLOSED_FORM_SECANT.items()}}
    FUSED: dict = {}

    @classmethod
    def get(cls, name: str, fuse: bool):
        if not fuse:
            return cls.EAGER[name]
        if name not in cls.FUSED:
            cls.FUSED[name] = torch.compile(cls.EAGER[name], dynamic=True)
        return cls.FUSED[name]


def _coalesce(args: tuple[torch.Tensor, ...]) -> tuple[torch.Size, list[torch.Tensor]]:
    """The broadcast shape of ``args`` and views of them with as few dimensions as possible.

    Adjacent dimensions merge when every argument is either full-size in both or broadcast (size 1) in
    both, so that an element-wise kernel sees a handful of canonical broadcast patterns (e.g. (M, n, L)
    against (1, n, L) and (M, 1, L)) instead of one per site shape: the compiled kernel specialises on
    sizes 0 and 1, and every new pattern would otherwise cost a recompile.
    """
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    sizes = [(1,) * (len(shape) - a.dim()) + tuple(a.shape) for a in args]
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    groups: list[list[int]] = []
    for d in dims:
        if groups and all((s[d] == 1) == (s[groups[-1][-1]] == 1) for s in sizes):
            groups[-1].append(d)
        else:
            groups.append([d])
    flat = []
    for a, s in zip(args, sizes):
        new = [math.prod(s[d] for d in g) for g in groups]
        flat.append(a.reshape(new))
    return shape, flat


class _Multiplier(torch.autograd.Function):
    """An op of the rules' backward pass: it runs under ``vmap`` (its subclass gives the vmap rule) and is
    never differentiated itself."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - multipliers are never differentiated
        raise RuntimeError("rule multipliers are not differentiable")


class Kernel(_Multiplier):
    """One element-wise rule kernel as an op with its own vmap rule: under ``torch.func.vmap`` it receives
    the physical batched tensors, so the (fused) kernel runs once over all references and outputs."""

    @staticmethod
    def forward(name, fuse, *args):
        kernel = RuleKernels.get(name, fuse)
        if not fuse:
            return kernel(*args)
        try:
            shape, flat = _coalesce(args)
            # each broadcast pattern is one specialisation of the compiled kernel; allow more than dynamo's
            # default of 8 before it silently falls back to eager
            with torch._dynamo.config.patch(recompile_limit=64):
                return kernel(*flat).reshape(shape)
        except Exception as e:   # no compiler, unsupported platform...: the eager kernel, same numbers
            import warnings

            warnings.warn(f"fuse_rules: torch.compile failed ({type(e).__name__}: {e}); using eager rule kernels",
                          RuntimeWarning, stacklevel=2)
            RuleKernels.FUSED[name] = RuleKernels.EAGER[name]
            return RuleKernels.EAGER[name](*args)

    @staticmethod
    def vmap(info, in_dims, name, fuse, *args):
        # element-wise with broadcasting: batched args get the batch axis first, the others a broadcast axis
        moved = [a.unsqueeze(0) if d is None else a.movedim(d, 0) for a, d in zip(args, in_dims[2:])]
        return Kernel.apply(name, fuse, *moved), 0


class ConvInputGrad(_Multiplier):
    """The input gradient of a convolution, with a vmap rule that folds the mapped axes into the batch.

    functorch's own batching rule for ``convolution_backward`` materialises the (never read) input at
    the batched size and takes a slower kernel path; here the (M·n)-row cotangent goes to the kernel
    directly, with an uninitialised input of the right shape (only its shape is used for input grads).
    """

    @staticmethod
    def forward(g, weight, in_shape, stride, padding, dilation, groups):
        inp = g.new_empty(in_shape)
        zeros = [0] * len(stride)
        return torch.ops.aten.convolution_backward(g, inp, weight, None, stride, padding, dilation, False, zeros,
                                                   groups, [True, False, False])[0]

    @staticmethod
    def vmap(info, in_dims, g, weight, in_shape, stride, padding, dilation, groups):
        if in_dims[1] is not None:   # pragma: no cover - the tracer refuses a varying conv weight
            raise RuntimeError("ConvInputGrad: the weight cannot be mapped")
        g = g.movedim(in_dims[0], 0)
        B, n = g.shape[:2]
        out = ConvInputGrad.apply(g.reshape(B * n, *g.shape[2:]), weight, (B * n, *in_shape[1:]), stride,
                                  padding, dilation, groups)
        return out.reshape(B, n, *out.shape[1:]), 0


class Conv(torch.autograd.Function):
    """A batched convolution of a varying input with a constant weight (linear rule), whose backward is
    :class:`ConvInputGrad`: it saves nothing of x, and its VJP over the (M·n)-row cotangents runs as one
    folded kernel call. ``conv(x)`` is the op itself; the remaining arguments are normalised ints."""

    @staticmethod
    def forward(x, conv, weight, stride, padding, dilation, groups):
        return conv(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, stride, padding, dilation, groups = inputs
        ctx.args = (weight, tuple(x.shape), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        weight, in_shape, stride, padding, dilation, groups = ctx.args
        return ConvInputGrad.apply(g.contiguous(), weight, in_shape, stride, padding, dilation, groups), \
            None, None, None, None, None, None


class Rescale(torch.autograd.Function):
    """Rescale rule: m = (f(x) − f(r)) / (x − r); f'(x) where |x − r| < RESCALE_EPS.

    The reference cache holds r only: f(r) is recomputed per chunk over the M reference rows (inside the
    fused pass for ReLU), which halves the cache of every rescale site. f(x) and f'(x) are computed once
    over the n explicand rows, so no transcendental function runs over the n·M rows.
    """

    @staticmethod
    def forward(x, fn, site, op=None):
        return fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fn, site, op = inputs
        # clone: the model may modify x in place after this op (ReLU(inplace=True), ``out += ...``)
        Rescale._save(ctx, x.detach().clone(), output, fn, site, op)

    @staticmethod
    def _save(ctx, x, y, fn, site, op):
        ctx.x, ctx.site, ctx.op, ctx.fn = x, site, op, fn
        if op != "relu" and op not in CLOSED_FORM_SECANT:   # those two need x and r alone
            ctx.y, ctx.dfx = y.detach().clone(), derivative(fn, x, op)

    @staticmethod
    def backward(ctx, g, *_):
        (r_in,) = ctx.site.refs()
        fuse = ctx.site.state.fuse
        if ctx.op == "relu":
            grad = Kernel.apply("relu_times", fuse, g, ctx.x, r_in)
        elif ctx.op in IN_KERNEL_ACTIVATION:
            grad = Kernel.apply(f"{ctx.op}_times", fuse, g, ctx.x, ctx.y, ctx.dfx, r_in)
        elif ctx.op in CLOSED_FORM_SECANT:
            grad = Kernel.apply(f"{ctx.op}_secant_times", fuse, g, ctx.x, r_in)
        else:
            grad = Kernel.apply("rescale_times", fuse, g, ctx.x, ctx.y, ctx.dfx, r_in, ctx.fn(r_in))
        return grad, None, None, None


class RescaleInPlace(Rescale):
    """:class:`Rescale` of an in-place call (``ReLU(inplace=True)``, ``x.relu_()``): x is overwritten with
    f(x) and marked dirty, so autograd puts the rule's backward on x's own history. (An out-of-place rule
    followed by ``x.copy_(y)`` would add a zero-filled gradient for the overwritten x and a sum over the
    n·M rows at every in-place site.) The second output is x's value before the call, for the rule."""

    @staticmethod
    def forward(x, fn, site, op=None):
        before = x.clone()
        return x.copy_(fn(before)), before

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fn, site, op = inputs
        ctx.mark_dirty(x)
        ctx.mark_non_differentiable(output[1])
        Rescale._save(ctx, output[1].detach(), output[0], fn, site, op)


class MaxPool(torch.autograd.Function):
    """Max-pool rule (shap's cross-max split, summed through the ordinary max-pool backward).

    ``pool(x) -> (y, indices)`` with flat indices over the last ``spatial`` dims (torch's convention).
    """

    @staticmethod
    def forward(x, pool, spatial, site):
        y, _ = pool(x)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, pool, spatial, site = inputs
        with torch.no_grad():
            _, idx = pool(x.detach())
        ctx.x, ctx.y, ctx.idx, ctx.spatial, ctx.site = x.detach().clone(), output.detach().clone(), idx, spatial, site
        ctx.pool = pool

    @staticmethod
    def backward(ctx, g):
        (r_in,) = ctx.site.refs()
        r_out, r_idx = ctx.pool(r_in)   # M rows per chunk: cheaper to redo than to cache (idx is int64)
        start = ctx.x.dim() - ctx.spatial
        vals, idx = _maxpool_routes(*(t.flatten(start) for t in (g, ctx.x, ctx.y, ctx.idx, r_in, r_out, r_idx)))
        zeros = ctx.x.new_zeros(vals.shape[:-1] + (ctx.x.shape[start:].numel(),))
        return zeros.scatter_add(-1, idx, vals).view(vals.shape[:-1] + ctx.x.shape[start:]), None, None, None


def _maxpool_routes(g, x, y, idx, r_in, r_out, r_idx):
    """Each pooled output's share of the max-pool rule, already divided by Δx at the input it routes to.

    With c = max(y_x, y_r), the rule credits (c − y_r) at the explicand's argmax and (y_x − c) at the
    reference's: exactly one of them is nonzero, g·(y_x − y_r) at the argmax of whichever is larger.
    The final division by Δx acts per input position, so it distributes over the windows that route
    there: each route is divided by Δx at its target (gathered) and one scatter-add finishes.

    Shapes, spatial axes flattened: g, y, idx (n, C, L) / r_out, r_idx (1, C, L) pooled; x (n, C, L_in),
    r_in (1, C, L_in). Returns (vals, target), both (n, C, L): the scatter's values and input positions.
    """
    take_x = y >= r_out
    target = torch.where(take_x, idx, r_idx)
    lead = target.shape[:-1]
    x_at = torch.where(take_x, y, torch.gather(x.expand(*lead, x.shape[-1]), -1, target))
    r_at = torch.where(take_x, torch.gather(r_in.expand(*lead, r_in.shape[-1]), -1, target), r_out)
    d = x_at - r_at
    small = d.abs() < MAXPOOL_EPS
    vals = torch.where(small, torch.zeros_like(d), g * (y - r_out) / torch.where(small, torch.ones_like(d), d))
    return vals, target


class ReduceMax(torch.autograd.Function):
    """Max over one axis (``torch.max(x, dim)``, ``amax``): the max-pool rule with one window per row."""

    @staticmethod
    def forward(x, dim, site):
        return x.amax(dim=dim, keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim, site = inputs
        ctx.x, ctx.y, ctx.dim, ctx.site = x.detach().clone(), output.detach().clone(), dim, site
        ctx.idx = x.detach().argmax(dim=dim, keepdim=True)

    @staticmethod
    def backward(ctx, g):
        r_in, r_out, r_idx = ctx.site.refs()
        c = torch.maximum(ctx.y, r_out)
        d = ctx.x - r_in
        gx, gr = g * (c - r_out), g * (ctx.y - c)
        routed = torch.zeros_like(d).scatter_add(ctx.dim, ctx.idx.expand_as(gx), gx)
        routed = routed.scatter_add(ctx.dim, r_idx.expand_as(gr), gr)
        return _safe_div(routed, d, MAXPOOL_EPS, 0.0), None, None


class _TwoOperand(torch.autograd.Function):
    """z = fn(a, b) with both operands varying; keeps copies of both for the rule's backward."""

    @staticmethod
    def forward(a, b, fn, site):
        return fn(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, fn, site = inputs
        ctx.a, ctx.b, ctx.fn, ctx.site = a.detach().clone(), b.detach().clone(), fn, site


class Bilinear(_TwoOperand):
    """Two varying operands of a bilinear ``fn`` (mul, matmul, bmm, einsum): the VJP at the operand means.

    grad_a = VJP_a(fn)(ā, b̄)·g with b̄ = ½(b_x + b_r) — the exact Shapley split, no division.
    """

    @staticmethod
    def backward(ctx, g):
        a_r, b_r = ctx.site.refs()
        a_bar, b_bar = 0.5 * (ctx.a + a_r), 0.5 * (ctx.b + b_r)
        if ctx.fn is torch.mul:   # element-wise product (gates): its VJP directly, without re-running fn
            ga, gb = g * b_bar, g * a_bar
        else:
            _, vjp = torch.func.vjp(ctx.fn, a_bar, b_bar)
            ga, gb = vjp(g)
        return sum_to(ga, ctx.a.shape), sum_to(gb, ctx.b.shape), None, None


class ShapleyPair(_TwoOperand):
    """Two varying operands of a general element-wise ``fn`` (div, maximum, minimum, pow):

    m_a = ½[(f(a_x,b_x) − f(a_r,b_x)) + (f(a_x,b_r) − f(a_r,b_r))] / Δa, symmetric for b; 0 where |Δ| < eps.
    """

    @staticmethod
    def backward(ctx, g):
        a_r, b_r = ctx.site.refs()
        a, b, fn = ctx.a, ctx.b, ctx.fn
        if fn is torch.div:   # a / b: the same split in closed form, without differences divided by Δ
            ma, mb = 0.5 * (1 / b + 1 / b_r), -0.5 * (a + a_r) / (b * b_r)
            return sum_to(g * ma, a.shape), sum_to(g * mb, b.shape), None, None
        fxx, frr, frx, fxr = fn(a, b), fn(a_r, b_r), fn(a_r, b), fn(a, b_r)
        eps = pair_eps(a.element_size())
        ma = _safe_div(0.5 * ((fxx - frx) + (fxr - frr)), a - a_r, eps, 0.0)
        mb = _safe_div(0.5 * ((fxx - fxr) + (frx - frr)), b - b_r, eps, 0.0)
        return sum_to(g * ma, a.shape), sum_to(g * mb, b.shape), None, None


def _softmax_parts(z, z_r, dim):
    """u = m_exp/s_x and v = m_exp/s_r of the softmax decomposition, computed through logsumexp.

    Callers pass float64: the decomposition's terms grow like exp(L_r − L_x) and cancel, so float32
    would overflow once explicand and reference logits differ by ~88.
    """
    lx, lr = torch.logsumexp(z, dim, keepdim=True), torch.logsumexp(z_r, dim, keepdim=True)
    # a masked logit (−inf in both, an attention mask) has Δ = 0, not inf − inf = NaN: it contributes 0
    d = torch.where(torch.isinf(z) & (z == z_r), torch.zeros_like(z), z - z_r)
    u = _safe_div(torch.exp(z - lx) - torch.exp(z_r - lx), d, RESCALE_EPS, torch.exp(z - lx))
    v = _safe_div(torch.exp(z - lr) - torch.exp(z_r - lr), d, RESCALE_EPS, torch.exp(z - lr))
    return u, v, lx, lr


class _OfLogits(torch.autograd.Function):
    """A rule on logits z along ``dim``; keeps a copy of z for the backward."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, dim, site = inputs
        ctx.z, ctx.dim, ctx.site = z.detach().clone(), dim, site


class Softmax(_OfLogits):
    """Softmax decomposed exactly (exp → Σ → e/s), see :class:`deepshap_opt.rules.spec.Softmax`."""

    @staticmethod
    def forward(z, dim, site):
        return torch.softmax(z, dim)

    @staticmethod
    def backward(ctx, g):
        (z_r,) = ctx.site.refs()
        dt, g = g.dtype, g.double()
        z, z_r = ctx.z.double(), z_r.double()
        u, v, _, _ = _softmax_parts(z, z_r, ctx.dim)
        p_x, p_r = torch.softmax(z, ctx.dim), torch.softmax(z_r, ctx.dim)
        px, pr = (g * p_x).sum(ctx.dim, keepdim=True), (g * p_r).sum(ctx.dim, keepdim=True)
        return (0.5 * g * (u + v) - 0.5 * (v * px + u * pr)).to(dt), None, None


class LogSoftmax(_OfLogits):
    """Log-softmax decomposed exactly (z − log Σ exp z), see :class:`deepshap_opt.rules.spec.LogSoftmax`."""

    @staticmethod
    def forward(z, dim, site):
        return torch.log_softmax(z, dim)

    @staticmethod
    def backward(ctx, g):
        (z_r,) = ctx.site.refs()
        dt, g = g.dtype, g.double()
        u, _, lx, lr = _softmax_parts(ctx.z.double(), z_r.double(), ctx.dim)
        dl = lx - lr
        w = torch.where(dl.abs() < RESCALE_EPS, u, u * dl / torch.where(dl.abs() < RESCALE_EPS,
                                                                        torch.ones_like(dl), -torch.expm1(-dl)))
        return (g - g.sum(ctx.dim, keepdim=True) * w).to(dt), None, None
