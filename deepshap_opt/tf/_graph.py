"""Trace a Keras model once into a TF graph and map every op the explained inputs flow through to a rule.

The model is traced with ``tf.function`` to a concrete function; its graph's ops are then *re-executed*
by :class:`GraphProgram` (each op cloned into the caller's ``tf.function`` with ``Graph.create_op``), so
that every op is seen, wherever it was created: ``tf.nn.relu`` in a custom layer, a reused layer, the
inner ops of a ``tf.custom_gradient`` function (silu: its ``IdentityN`` is an alias here and the
region ``x * sigmoid(x)`` takes the rescale rule as one element-wise function). Nothing is registered
with TensorFlow and the model is not modified.

Op → rule classes follow ``deepshap_opt.rules.spec.OPS`` (canonical names in ``CANONICAL``):
linear ops run as themselves and take their ordinary gradient; each nonlinear op becomes a *site*
(rescale, maxpool, bilinear, pair, softmax, log_softmax) whose rule the explainer applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tensorflow as tf

from ..errors import UnsupportedOperatorError
from ..rules import spec

#: ops that pass input i to output i unchanged (StopGradient included: DeepLIFT needs the full change)
ALIAS = {"Identity", "IdentityN", "StopGradient", "PreventGradient", "Snapshot", "EnsureShape", "CheckNumerics"}
#: ops whose integer output depends only on the static part of a shape (the batch is the same for all rows)
SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank"}
#: linear in their varying operand(s) (position-checked below): ordinary gradient
LINEAR_OPS = {
    "AddV2": "add", "Add": "add", "AddN": "add", "Sub": "sub", "BiasAdd": "add", "Neg": "neg",
    "Reshape": "reshape", "Transpose": "transpose", "Squeeze": "squeeze", "ExpandDims": "unsqueeze",
    "Pad": "pad", "PadV2": "pad", "MirrorPad": "pad", "ConcatV2": "concat", "Pack": "stack", "Unpack": "split",
    "Split": "split", "SplitV": "split", "Slice": "slice", "StridedSlice": "slice", "Tile": "tile",
    "BroadcastTo": "expand", "ResizeNearestNeighbor": "upsample", "ResizeBilinear": "upsample",
    "AvgPool": "avg_pool", "AvgPool3D": "avg_pool", "Mean": "mean", "Sum": "sum", "Cast": "cast",
    "Cumsum": "cumsum", "ReverseV2": "flip", "Roll": "roll", "DepthToSpace": "pixel_shuffle",
    "SpaceToDepth": "pixel_shuffle", "SpaceToBatchND": "reshape", "BatchToSpaceND": "reshape",
    "Conv2D": "conv", "Conv3D": "conv", "DepthwiseConv2dNative": "conv", "Conv2DBackpropInput": "conv_transpose",
    "Conv2DBackpropInputV2": "conv_transpose", "Conv3DBackpropInputV2": "conv_transpose",
    "FusedBatchNorm": "batch_norm_eval", "FusedBatchNormV2": "batch_norm_eval", "FusedBatchNormV3": "batch_norm_eval",
    "GatherV2": "gather", "SelectV2": "where_const", "Select": "where_const", "MatrixBandPart": "select",
}
#: which input positions may vary for a linear op (None: any)
LINEAR_POSITIONS = {
    "Conv2D": {0}, "Conv3D": {0}, "DepthwiseConv2dNative": {0}, "Conv2DBackpropInput": {2},
    "Conv2DBackpropInputV2": {2}, "Conv3DBackpropInputV2": {2}, "FusedBatchNorm": {0}, "FusedBatchNormV2": {0},
    "FusedBatchNormV3": {0}, "GatherV2": {0}, "SelectV2": {1, 2}, "Select": {1, 2}, "BiasAdd": {0, 1},
}
#: element-wise one-argument nonlinear TF ops → canonical name in spec.ELEMENTWISE_OPS (rescale rule)
UNARY = {
    "Relu": "relu", "Relu6": "relu6", "LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus", "Softsign": "softsign", "Exp": "exp",
    "Log": "log", "Log1p": "log1p", "Expm1": "expm1", "Sqrt": "sqrt", "Rsqrt": "rsqrt", "Reciprocal": "reciprocal",
    "Inv": "reciprocal", "Square": "square", "Abs": "abs", "Erf": "erf", "Erfc": "erf", "Sin": "sin", "Cos": "cos",
    "ClipByValue": "clip", "Floor": "clip", "Ceil": "clip", "Round": "clip", "Sign": "clip", "Atan": "tanh",
}
#: element-wise two-argument ops: linear, bilinear or the Shapley pair rule depending on which operands vary
BINARY = {"AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum", "Pow",
          "SquaredDifference", "BiasAdd"}
PAIR_OPS = {"RealDiv": "div", "Div": "div", "DivNoNan": "div", "Maximum": "maximum", "Minimum": "minimum",
            "Pow": "pow_pair", "SquaredDifference": "pow_pair"}
BILINEAR_OPS = {"Mul": "mul", "MatMul": "matmul", "BatchMatMul": "bmm", "BatchMatMulV2": "bmm",
                "BatchMatMulV3": "bmm", "Einsum": "einsum"}
MAXLIKE = {"MaxPool": "max_pool", "MaxPoolV2": "max_pool", "MaxPool3D": "max_pool", "Max": "reduce_max",
           "Min": "reduce_min"}
SOFTMAX = {"Softmax": "softmax", "LogSoftmax": "log_softmax"}
#: boolean element-wise ops, allowed only inside a fused element-wise region (e.g. tf.where(x > 0, x, a*x))
PREDICATES = {"Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr",
              "LogicalNot", "IsNan", "IsInf", "IsFinite"}
ELEMENTWISE = set(UNARY) | BINARY | PREDICATES | {"Neg", "Cast", "SelectV2", "Select"}
#: random ops that are not named *Random* (a model output that depends on any random op is refused)
RANDOM_OPS = {"Multinomial", "TruncatedNormal", "ParameterizedTruncatedNormal", "StatelessMultinomial"}


def _is_random(op) -> bool:
    return "Random" in op.type or op.type in RANDOM_OPS


def _scope(op) -> str:
    return op.name.rsplit("/", 1)[0] if "/" in op.name else op.name


def _has_func_attr(op) -> bool:
    return any(v.HasField("func") or (v.HasField("list") and len(v.list.func)) for v in op.node_def.attr.values())


@dataclass
class Site:
    """A nonlinear op (or fused element-wise region) whose rule replaces its gradient."""

    kind: str                  # 'rescale' | 'maxlike' | 'bilinear' | 'pair' | 'softmax' | 'log_softmax'
    op: object                 # the TF op (for a region: the op producing the exit)
    canonical: str             # canonical op name (rules.spec)
    inputs: list               # varying input tensors (graph tensors, alias-resolved)
    output: object             # output tensor (alias-resolved)
    region: list = field(default_factory=list)   # ops of a fused element-wise region
    positions: tuple = ()      # input positions of `inputs` in op (bilinear / pair)

    @property
    def rule(self):
        """The spec rule (a fused element-wise region is a rescale whatever its name)."""
        return spec.RESCALE if self.kind == "rescale" else spec.rule_for(self.canonical)


class GraphProgram:
    """The traced graph of a model, its varying ops, rule sites, and an interpreter that re-runs it."""

    def __init__(self, cf, num_inputs: int, explained_names: list[str] | None, layer_desc: str = ""):
        self.cf = cf
        g = cf.graph
        self.graph = g
        self.model_inputs = list(g.inputs[:num_inputs])
        self.captures = {id(internal): external for external, internal in g.captures}
        structured = cf.structured_outputs
        outs = [t for t in tf.nest.flatten(structured)]
        if len(outs) != 1 or not isinstance(outs[0], tf.Tensor):
            kind = type(structured).__name__
            raise TypeError(f"the model returned a {kind} of {len(outs)} values; DeepExplainer needs a single "
                            "tensor (N, K) or (N,): explain one output, e.g. DeepExplainer((model.inputs, "
                            "model.outputs[0]), data) or a wrapper model returning that tensor")
        self._ops = [op for op in g.get_operations()]
        self._alias = {}
        for op in self._ops:
            if op.type in ALIAS:
                for i, o in enumerate(op.outputs):
                    self._alias[o.ref()] = self.resolve(op.inputs[i])
        self.output = self.resolve(outs[0])
        if explained_names is None:
            self.explained = list(self.model_inputs)
        else:
            self.explained = [self.resolve(g.get_tensor_by_name(n)) for n in explained_names]
        self.layer_desc = layer_desc
        self.rewritten = self._rewrite_centering()
        if self.rewritten:            # a rewritten sum may be the output (or an explained tensor): re-resolve
            self.output = self.resolve(self.output)
            self.explained = [self.resolve(t) for t in self.explained]
        self._analyse()

    # -- graph helpers ---------------------------------------------------------------------------------
    def resolve(self, t):
        while t.ref() in self._alias:
            t = self._alias[t.ref()]
        return t

    def _inputs(self, op):
        return [self.resolve(t) for t in op.inputs]

    def _needed(self, targets, stop=()):
        stop = {t.ref() for t in stop}
        seen, stack = set(), [self.resolve(t).op for t in targets if self.resolve(t).ref() not in stop]
        while stack:
            op = stack.pop()
            if op in seen:
                continue
            seen.add(op)
            for t in self._inputs(op):
                if t.ref() not in stop:
                    stack.append(t.op)
        return [op for op in self._ops if op in seen and op.type not in ALIAS and op.type != "NoOp"]

    # -- rewrite: normalization centring --------------------------------------------------------------
    def _rewrite_centering(self) -> int:
        """Rewrite normalization into the spec's decomposition where x and its mean μ both vary:
        ``SquaredDifference(x, μ)`` → ``Square(x − μ)`` and ``x·s + (β − μ·s)`` → ``(x − μ)·s + β``.

        Keras' LayerNormalization and GroupNormalization (and ``tf.nn.batch_normalization`` of moments) compute
        ``x * inv + (beta - mean * inv)`` with the variance from ``SquaredDifference(x, mean)``: a Shapley pair
        site on (x, μ) and two bilinear sites sharing ``inv`` whose multipliers for ``inv`` (x̄ and −μ̄) cancel
        in the backward sum. With nearly equal features ``inv`` is large and, in float32, that cost up to 4e-4
        of the output scale (LayerNormalization of width 2). ``rules.spec.Normalization`` is c = x − μ
        (linear), rescale on c², n = c·s (bilinear): the same function and, in exact arithmetic, the same
        multipliers, with c computed once in the forward (one op shared by both rewrites). The new ops are
        added to this program's own traced graph (the model is untouched) and the replaced outputs are
        aliased to them. Returns the number of rewrites.
        """
        explained = {t.ref() for t in self.explained}
        dep = set(explained)
        for op in self._ops:
            if op.type in SHAPE_OPS:
                continue
            if any(self.resolve(t).ref() in dep for t in op.inputs):
                dep.update(o.ref() for o in op.outputs)

        def is_dep(t):
            return self.resolve(t).ref() in dep

        def producer(t, *types):
            op = self.resolve(t).op
            return op if op.type in types and len(op.outputs) == 1 else None

        def same(a, b):
            return self.resolve(a).ref() == self.resolve(b).ref()

        def coef(t, s):
            """(μ, k) with t = k·μ·s (k = ±1; negations on either factor), or None."""
            neg = producer(t, "Neg")
            if neg is not None:
                inner = coef(neg.inputs[0], s)
                return None if inner is None else (inner[0], -inner[1])
            mul = producer(t, "Mul")
            if mul is None:
                return None
            a, b = mul.inputs
            other = b if same(a, s) else a if same(b, s) else None
            if other is None:
                return None
            neg = producer(other, "Neg")
            return (self.resolve(neg.inputs[0]), -1) if neg is not None else (self.resolve(other), 1)

        def offset_part(r, s):
            """(μ, β) if r = −μ·s, −μ·s + β, β + (−μ·s) or β − μ·s with β not depending on the input."""
            c = coef(r, s)
            if c is not None:
                return (c[0], None) if c[1] == -1 else None
            op = producer(r, "AddV2", "Add", "Sub")
            if op is None:
                return None
            a, b = op.inputs
            # (β, the term, the term's k that makes the sum −μ·s + β)
            cands = [(a, b, 1)] if op.type == "Sub" else [(a, b, -1), (b, a, -1)]
            for beta, term, want in cands:
                if is_dep(beta):
                    continue
                c = coef(term, s)
                if c is not None and c[1] == want:
                    return c[0], self.resolve(beta)
            return None

        count = 0
        self._centred = {}
        for op in list(self._ops):
            if op.type != "SquaredDifference" or not all(is_dep(t) for t in op.inputs):
                continue
            a, b = (self.resolve(t) for t in op.inputs)
            if a.dtype != b.dtype:
                continue
            with self.graph.as_default(), tf.name_scope(_scope(op) + "/deepshap_centred/"):
                d = self._centred_tensor(a, b)
                sq = tf.raw_ops.Square(x=d, name="square")
            if sq.shape.rank != op.outputs[0].shape.rank or not sq.shape.is_compatible_with(op.outputs[0].shape):
                continue
            at = self._ops.index(op)
            self._ops[at:at] = [t.op for t in (d, sq) if t.op not in self._ops]
            self._alias[op.outputs[0].ref()] = sq
            count += 1
        for op in list(self._ops):
            if op.type not in ("AddV2", "Add") or len(op.outputs) != 1 or not op.outputs[0].dtype.is_floating:
                continue
            done = False
            for p, r in ((op.inputs[0], op.inputs[1]), (op.inputs[1], op.inputs[0])):
                mul = producer(p, "Mul")
                if mul is None or done:
                    continue
                for x, s in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
                    if not (is_dep(x) and is_dep(s)):
                        continue
                    found = offset_part(r, s)
                    if found is None or not is_dep(found[0]):
                        continue
                    mu, beta = found
                    x, s = self.resolve(x), self.resolve(s)
                    if mu.dtype != x.dtype:
                        continue
                    new_ops = self._build_centred(op, x, mu, s, beta)
                    if new_ops is None:
                        continue
                    at = self._ops.index(op)
                    self._ops[at:at] = new_ops
                    self._alias[op.outputs[0].ref()] = new_ops[-1].outputs[0]
                    count += 1
                    done = True
                    break
        return count

    def _centred_tensor(self, x, mu):
        """x − μ in the traced graph (one op per (x, μ) pair, shared by the variance and the product)."""
        key = (x.ref(), mu.ref())
        if key not in self._centred:
            self._centred[key] = tf.raw_ops.Sub(x=x, y=mu, name="centred")
        return self._centred[key]

    def _build_centred(self, op, x, mu, s, beta):
        """Ops (x − μ)·s (+ β) in the traced graph, named in op's scope; None if the shapes do not match."""
        with self.graph.as_default(), tf.name_scope(_scope(op) + "/deepshap_centred/"):
            d = self._centred_tensor(x, mu)
            y = tf.raw_ops.Mul(x=d, y=s, name="scaled")
            out = tf.raw_ops.AddV2(x=y, y=beta, name="shifted") if beta is not None else y
        if not out.shape.is_compatible_with(op.outputs[0].shape) or out.dtype != op.outputs[0].dtype \
                or out.shape.rank != op.outputs[0].shape.rank:
            return None
        return [t.op for t in ((d, y, out) if beta is not None else (d, y)) if t.op not in self._ops]

    # -- analysis -------------------------------------------------------------------------------------
    def _analyse(self):
        needed = self._needed([self.output])
        self.needed = needed
        for op in needed:
            if _is_random(op):
                raise UnsupportedOperatorError(
                    op.type, _scope(op), hint="the model output is random (dropout or noise called with "
                    "training=True?); DeepSHAP explains a deterministic model: call such layers with training=False")
        explained = {t.ref() for t in self.explained}
        for t in self.explained:
            if not t.dtype.is_floating:
                raise TypeError(f"the explained input {t.name} has dtype {t.dtype.name}: DeepSHAP needs float inputs "
                                "(for an Embedding, explain its output: pass (model, layer_after_embedding))")
        # dependent: a tensor whose value depends on an explained tensor
        dep = set(explained)
        model_in = {t.ref() for t in self.model_inputs}
        indep_input = set(model_in) - explained          # depends on a model input but not via the explained ones
        for op in needed:
            ins = self._inputs(op)
            if any(t.ref() in dep for t in ins) and op.type not in SHAPE_OPS:
                dep.update(o.ref() for o in op.outputs)
            elif any(t.ref() in indep_input for t in ins) and op.type not in SHAPE_OPS:
                indep_input.update(o.ref() for o in op.outputs)
        indep_input -= explained
        self.dep = dep
        # the model was traced with an unknown batch size: a dependent tensor whose shape is fully known
        # has lost the batch axis (a mean or sum over the batch, a fold into a fixed shape)
        for op in needed:
            for o in op.outputs:
                if o.ref() in dep and o.dtype.is_floating and op.type not in ALIAS and o.shape.rank is not None \
                        and all(d is not None for d in o.shape.as_list()):
                    raise ValueError(
                        f"op {op.name} ({op.type}) gives shape {o.shape} from the batch: it mixes or folds the rows "
                        "of the batch; DeepSHAP needs every activation to keep one row per input row, batch axis first")
        if self.output.ref() not in dep:
            raise ValueError("the model's output does not depend on the explained input(s)")
        consumers: dict = {}
        for op in needed:
            for t in self._inputs(op):
                consumers.setdefault(t.ref(), []).append(op)
        self.consumers = consumers
        dep_ops = [op for op in needed if any(o.ref() in dep for o in op.outputs)
                   and any(t.ref() in dep for t in self._inputs(op))]
        # a dependent op must not also read a per-row tensor that bypasses the explained tensors
        for op in dep_ops:
            for t in self._inputs(op):
                if t.ref() in indep_input and t.dtype != tf.resource and op.type not in SHAPE_OPS:
                    raise ValueError(
                        f"op {op.name} ({op.type}) reads {t.name}, which depends on the model input without passing "
                        f"through the explained tensor{(' ' + self.layer_desc) if self.layer_desc else ''}: the "
                        "explained layer input does not separate the model")
        regions = self._regions(dep_ops)
        in_region = {id(op) for r in regions for op in r["ops"]}
        sites = []
        self.region_ops = {}
        for r in regions:
            sites.append(Site("rescale", r["exit"].op, r["canonical"], [r["src"]], r["exit"], region=r["ops"]))
            for op in r["ops"]:
                self.region_ops[id(op)] = r
        for op in dep_ops:
            if id(op) in in_region:
                continue
            site = self._classify(op)
            if site is not None:
                sites.append(site)
        self.sites = sites
        self.site_of_op = {id(s.op): s for s in sites if not s.region}
        for op in dep_ops:
            for t in self._inputs(op):
                if t.ref() in dep and not t.dtype.is_floating and id(op) not in in_region and op.type not in SHAPE_OPS:
                    raise UnsupportedOperatorError(
                        t.op.type, _scope(t.op), hint=f"its non-float output {t.name} depends on the input and steers "
                        f"{op.type} ({op.name})")

    def _dep_inputs(self, op):
        return [(i, t) for i, t in enumerate(self._inputs(op)) if t.ref() in self.dep]

    def _classify(self, op) -> Site | None:
        """The site of one (non-region) dependent op, None for linear ops; raises for unsupported ops."""
        t = op.type
        where = _scope(op)
        dins = self._dep_inputs(op)
        outs = [o for o in op.outputs if o.ref() in self.dep]
        if _has_func_attr(op):
            raise UnsupportedOperatorError(t, where, hint="control flow / function calls (e.g. RNN loops) have no rule")
        if (not outs or not all(o.dtype.is_floating for o in outs)) and \
                all(not o.dtype.is_floating for o in op.outputs):
            # a dependent non-float output: allowed only if nobody but shape ops uses it (checked later)
            return None
        pos = {i for i, _ in dins}
        if t in MAXLIKE:
            if pos != {0}:
                raise UnsupportedOperatorError(t, where, hint="only the pooled tensor may vary")
            return Site("maxlike", op, MAXLIKE[t], [dins[0][1]], op.outputs[0])
        if t in SOFTMAX:
            return Site(SOFTMAX[t], op, SOFTMAX[t], [dins[0][1]], op.outputs[0])
        if t in BILINEAR_OPS:
            if len(dins) == 1:
                return None
            return Site("bilinear", op, BILINEAR_OPS[t], [d[1] for d in dins], op.outputs[0],
                        positions=tuple(d[0] for d in dins))
        if t in PAIR_OPS:
            if t in ("RealDiv", "Div", "DivNoNan") and pos == {0}:
                return None                              # division by a constant: linear
            if len(dins) == 2:
                return Site("pair", op, PAIR_OPS[t], [d[1] for d in dins], op.outputs[0],
                            positions=tuple(d[0] for d in dins))
            return self._unary_site(op, dins[0][1], {"RealDiv": "reciprocal", "Div": "reciprocal",
                                                     "DivNoNan": "reciprocal", "Maximum": "relu", "Minimum": "relu",
                                                     "Pow": "pow", "SquaredDifference": "square"}[t])
        if t in UNARY:
            return self._unary_site(op, dins[0][1], UNARY[t])
        if t in LINEAR_OPS:
            allowed = LINEAR_POSITIONS.get(t)
            if allowed is not None and not pos <= allowed:
                raise UnsupportedOperatorError(t, where, hint=f"input(s) {sorted(pos - allowed)} vary; only "
                                               f"{sorted(allowed)} may (e.g. a convolution with a varying kernel)")
            if t.startswith("FusedBatchNorm") and op.get_attr("is_training"):
                raise UnsupportedOperatorError(t, where, hint="batch normalization in training mode")
            if t in ("Cast",) and not op.outputs[0].dtype.is_floating:
                return None
            return None
        raise UnsupportedOperatorError(t, where)

    def _unary_site(self, op, x, canonical):
        y = op.outputs[0]
        if x.shape.as_list() != y.shape.as_list() and x.shape.rank is not None:
            try:
                tf.broadcast_static_shape(x.shape, y.shape)
            except ValueError:
                pass
            if x.shape.num_elements() is None or y.shape.rank != x.shape.rank or \
                    any(a != b for a, b in zip(x.shape.as_list()[1:], y.shape.as_list()[1:])):
                raise UnsupportedOperatorError(op.type, _scope(op), hint="an element-wise nonlinearity that "
                                               "broadcasts its varying input to a larger shape")
        return Site("rescale", op, canonical, [x], y)

    def _regions(self, dep_ops):
        """Maximal single-source element-wise regions with a branch (x used twice, e.g. x*sigmoid(x))."""
        region_of: dict = {}         # tensor ref -> region dict
        regions: list = []
        for op in dep_ops:
            if op.type not in ELEMENTWISE or len(op.outputs) != 1:
                continue
            out = op.outputs[0]
            dins = self._dep_inputs(op)
            srcs, regs = set(), []
            for _, t in dins:
                r = region_of.get(t.ref())
                if r is not None:
                    if not any(r is q for q in regs):
                        regs.append(r)
                    srcs.add(r["src"].ref())
                else:
                    srcs.add(t.ref())
            if len(srcs) != 1:
                continue
            src = regs[0]["src"] if regs else dins[0][1]
            if not src.dtype.is_floating or src.shape.as_list() != out.shape.as_list() or src.shape.rank is None:
                continue
            if regs:
                base = regs[0]
                for r in regs[1:]:
                    base["ops"].extend(r["ops"])
                    for o in r["ops"]:
                        region_of[o.outputs[0].ref()] = base
                    regions[:] = [q for q in regions if q is not r]
            else:
                base = {"src": src, "ops": []}
                regions.append(base)
            base["ops"].append(op)
            region_of[out.ref()] = base
        kept = []
        for r in regions:
            r = self._trim(r)
            if r is not None:
                kept.append(r)
        return kept

    def _trim(self, r):
        ops = sorted(r["ops"], key=self._ops.index)
        src = r["src"]
        # drop leading single-consumer chains: the region starts where its source is used twice
        while True:
            inner = [op for op in ops if any(t.ref() == src.ref() for t in self._inputs(op))]
            if len(inner) != 1:
                break
            op = inner[0]
            n_uses = sum(1 for t in self._inputs(op) if t.ref() == src.ref())
            if n_uses > 1 or len(self._dep_inputs(op)) > 1 or not op.outputs[0].dtype.is_floating:
                break
            ops.remove(op)
            src = op.outputs[0]
            if not ops:
                return None
        ids = {id(op) for op in ops}
        exits = []
        for op in ops:
            o = op.outputs[0]
            outside = [c for c in self.consumers.get(o.ref(), []) if id(c) not in ids]
            if outside or o.ref() == self.output.ref():
                exits.append(o)
        branched = any(len({t.ref() for _, t in self._dep_inputs(op)}) > 1 for op in ops)
        if len(exits) != 1 or not branched or not exits[0].dtype.is_floating:
            return None
        # every op must be reachable from src inside the region (no foreign dependent inputs)
        reach = {src.ref()}
        for op in ops:
            for _, t in self._dep_inputs(op):
                if t.ref() not in reach:
                    return None
            reach.add(op.outputs[0].ref())
        types = {op.type for op in ops}
        name = "silu" if types <= {"Mul", "Sigmoid"} else "gelu" if types & {"Erf", "Erfc"} else \
            "mish" if "Softplus" in types else "prelu" if "Relu" in types else "elementwise"
        if "Tanh" in types and "Pow" in types:
            name = "gelu_tanh"
        return {"src": src, "ops": ops, "exit": exits[0], "canonical": name}

    # -- interpreter ------------------------------------------------------------------------------------
    def run(self, feeds: dict, ops=None, hooks: dict | None = None, env: dict | None = None) -> dict:
        """Re-run the graph's ops in the current (tf.function) graph.

        feeds: tensor ref → value (model inputs or explained tensors). hooks: id(op) → fn(env) that computes
        the op's outputs instead (rule sites). Inputs missing from env (constants, weights) are computed on
        demand. Returns env: tensor ref → value.
        """
        env = dict(feeds) if env is None else env
        hooks = hooks or {}
        for op in (self.needed if ops is None else ops):
            if op.outputs and all(self.resolve(o).ref() in env for o in op.outputs):
                continue
            if id(op) in hooks:
                hooks[id(op)](env)
                continue
            self.exec_op(op, env)
        return env

    def exec_op(self, op, env, override: dict | None = None):
        """Clone one op into the current graph (inputs from env / override, missing ones computed)."""
        if op.type == "Placeholder":
            t = op.outputs[0]
            if id(t) in self.captures:
                env[t.ref()] = self.captures[id(t)]
                return [env[t.ref()]]
            raise KeyError(f"no value for graph input {t.name}")
        override = override or {}
        ins = []
        for i, t in enumerate(self._inputs(op)):
            if i in override:
                ins.append(override[i])
            else:
                ins.append(self.ensure(env, t))
        attrs = {k: v for k, v in op.node_def.attr.items() if not k.startswith("_")}
        g = tf.compat.v1.get_default_graph()
        new = g.create_op(op.type, ins, [o.dtype for o in op.outputs], attrs=attrs, name=op.name.rsplit("/", 1)[-1])
        if not override:
            for o, n in zip(op.outputs, new.outputs):
                env[o.ref()] = n
        return list(new.outputs)

    def ensure(self, env, t):
        """The value of graph tensor t, computing its (constant) producers if needed."""
        t = self.resolve(t)
        if t.ref() not in env:
            todo = [op for op in self._needed([t]) if not (op.outputs and all(
                self.resolve(o).ref() in env for o in op.outputs))]
            for op in todo:
                self.exec_op(op, env)
        return env[t.ref()]

    def value(self, env, t):
        return env[self.resolve(t).ref()]
