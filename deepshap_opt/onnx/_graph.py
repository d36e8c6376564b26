"""Build the DeepSHAP explanation graph of an ONNX model: own reverse-mode differentiation with DeepLIFT rules.

The forward nodes are kept as they are (they compute the explicands' activations, batch ``N``). The
references' activations (``M`` rows) are either embedded as initializers or recomputed in-graph from the
embedded background (a copy of the forward nodes fed by a constant; onnxruntime folds it at load time).
The backward pass walks the nodes in reverse topological order and writes, for every op the input flows
through, its rule from :mod:`deepshap_opt.rules.spec` as standard ONNX ops:

* cotangents are kept "flat": ``(P, *rest)`` with ``P = N·S·M`` rows (explicand, seed, reference), so
  every linear op uses its ordinary transposed op on ``P`` rows (ConvTranspose for Conv, MatMul by Wᵀ, ...);
* at a rule site the cotangent is viewed as ``(N, S, M, *rest)`` and multiplied by the multiplier
  evaluated on the pair ``x (N,1,1,*rest)`` against ``r (1,1,M,*rest)``;
* φ = mean over M of multiplier ⊙ (x − r), laid out ``(N, *in, S)`` like shap.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedOperatorError
from ..rules import spec
from ._builder import Builder
from ._secant import BOUNDED_SECANT, bounded_secant
from ._loop import subgraph_refs

MIN_OPSET = 17
#: auto cache: embed the references' activations while they add at most this many bytes ...
EMBED_MAX_BYTES = 64 << 20
#: ... or at most this fraction of the model's own weights
EMBED_MAX_FRACTION = 0.5
#: auto cache, above the embedding limits: "recompute" (onnxruntime folds the references' branch into
#: constants at session load) while the cached activations are at most this many bytes. Folding holds every
#: activation of the references' forward at once, 3-6x the cache at the load's peak (with the ReLU outputs
#: derived, not cached, 224x224, M=32: EfficientNet-B0 1.5 GiB of cache, 4.4 GB after load; ResNet50 1.1 GiB,
#: 5.5 GB; VGG19 1.8 GiB, 10.4 GB; DenseNet201 2.9 GiB, 12.6 GB, where "embed" loads in 0.5 GB and peaks at
#: 4.5 GB in the call). Above it: the ``big_cache`` mode, "embed" for a file (the activations computed at export, stored
#: as external data that onnxruntime maps from disk) or "runtime" for an in-memory session (the branch runs in
#: every call; the session holds only the weights and the background)
FOLD_MAX_BYTES = 2 << 30
_CACHE_MODES = ("auto", "embed", "recompute", "runtime")
#: the references are run through the model in chunks of this many rows when their activations are cached
REF_CHUNK = 64
#: ... and in chunks holding at most this many bytes of the activations asked for (embed: bounded export memory)
REF_CHUNK_BYTES = 256 << 20
#: export default: one run of the explanation (one Loop iteration) holds at most this many bytes (estimated)
DEFAULT_MEMORY_BUDGET = 1 << 30
#: live tensors of the largest activation's size assumed per (explicand, output, reference) row
LIVE_FACTOR = 16

_SHAPE_OPS = {"Shape", "Size"}
_ELEMENTWISE = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "HardSwish": "hardswish", "Tanh": "tanh",
    "Softplus": "softplus", "Softsign": "softsign", "Erf": "erf", "Gelu": "gelu", "Mish": "mish", "Exp": "exp",
    "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal", "Abs": "abs", "Clip": "clip",
    "ThresholdedRelu": "thresholded_relu", "Sin": "sin", "Cos": "cos",
}
_MERGED_OK = {"Reshape", "MatMul", "Add", "Sub", "Mul", "Div", "Identity", "Cast", "Neg", "Dropout",
              "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
              "Softsign", "Erf", "Gelu", "Mish", "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Clip", "Pow"}
#: rescale ops whose Δy is recomputed in a stable form (see ExplanationBuilder._expm1_delta)
_EXPM1_KINDS = {"elu", "selu", "celu"}
_PASS = {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
#: a normal float far below any activation difference (see the ReLU and max-pool rules); also for float64
#: not smaller: onnxruntime's optimizer drops an Add of a double constant that is 0 once cast to float32
_TINY = {np.dtype(np.float32): 2.0 ** -100, np.dtype(np.float64): 2.0 ** -100}
_ELEM_TO_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _where(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def prepare_model(model: onnx.ModelProto, opset: int | None) -> onnx.ModelProto:
    """Copy, convert to the target opset (≥ 17) and make the batch axis of inputs and outputs dynamic."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOperatorError(f"{node.domain}::{node.op_type}", _where(node),
                                           "only the standard ONNX domain is supported")
    cur = opset_of(model)
    target = max(cur, MIN_OPSET) if opset is None else int(opset)
    if target < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}")
    if target != cur:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, target)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ValidationError/...
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ValueError(f"could not convert the model from opset {cur} to {target}: {msg}") from None
    for v in list(model.graph.input) + list(model.graph.output):
        if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim):
            d = v.type.tensor_type.shape.dim[0]
            d.ClearField("dim_value")
            d.dim_param = "N"
    # drop stale value_info (batch sizes may be fixed in it)
    del model.graph.value_info[:]
    return model


class _Plan:
    """Analysis of the forward graph: constants, which tensors depend on the inputs, shapes per tensor."""

    def __init__(self, model: onnx.ModelProto, background: list[np.ndarray]):
        import onnxruntime as ort

        g = model.graph
        self.model = model
        self.inits = {t.name: t for t in g.initializer}
        init_names = set(self.inits)
        self.inputs = [v.name for v in g.input if v.name not in init_names]
        if len(self.inputs) != len(background):
            raise ValueError(f"the model has {len(self.inputs)} inputs {self.inputs} but {len(background)} "
                             "background arrays were given")
        self.nodes = list(g.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for t in n.input:
                if t:
                    self.consumers[t].append(i)
        self.graph_outputs = [o.name for o in g.output]
        # taint: dep = depends on an input at all (values or shape); var = depends on the input's values
        dep, var = set(self.inputs), set(self.inputs)
        for n in self.nodes:
            ins = [t for t in n.input if t]
            if any(t in dep for t in ins):
                dep.update(o for o in n.output if o)
            if n.op_type not in _SHAPE_OPS and any(t in var for t in ins):
                var.update(o for o in n.output if o)
        self.dep, self.var = dep, var
        # run the model on 1 and 2 rows with every intermediate tensor exposed: shapes, dtypes, constants
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        known_out = set(self.graph_outputs)
        for n in probe.graph.node:
            for o in n.output:
                if o and o not in known_out:
                    probe.graph.output.append(onnx.ValueInfoProto(name=o))
                    known_out.add(o)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail/InvalidGraph/... have no common base
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            raise ValueError(f"onnxruntime cannot load the model: {msg}") from None
        names = [o.name for o in sess.get_outputs()]

        def rows(k):
            out = []
            for b in background:
                idx = np.arange(k) % b.shape[0]
                out.append(b[idx])
            return dict(zip(self.inputs, out))

        v1 = dict(zip(names, sess.run(names, rows(1))))
        v2 = dict(zip(names, sess.run(names, rows(2))))
        for name, b in zip(self.inputs, background):
            v1[name], v2[name] = b[:1], b[np.arange(2) % b.shape[0]]
        self.rest: dict[str, tuple] = {}
        self.dtype: dict[str, np.dtype] = {}
        self.batched: dict[str, bool] = {}
        self.values: dict[str, np.ndarray] = {}
        self.merged: set[str] = set()
        for name, a in v1.items():
            b = v2[name]
            a, b = np.asarray(a), np.asarray(b)
            self.dtype[name] = a.dtype
            self.batched[name] = (a.ndim >= 1 and b.ndim == a.ndim and a.shape[0] == 1 and b.shape[0] == 2
                                  and a.shape[1:] == b.shape[1:])
            self.rest[name] = tuple(a.shape[1:]) if self.batched[name] else tuple(a.shape)
            # batch merged into axis 0 (e.g. tf2onnx's Dense on sequences: (N, T, F) -> (N*T, F)): seen as
            # (N, T, F) by the backward pass, which only lets it through an allow-list of ops
            if (not self.batched[name] and a.ndim >= 1 and b.ndim == a.ndim and a.shape[0] > 1
                    and b.shape[0] == 2 * a.shape[0] and a.shape[1:] == b.shape[1:]):
                self.merged.add(name)
                self.batched[name] = True
                self.rest[name] = (a.shape[0],) + tuple(a.shape[1:])
            if name not in dep:
                self.values[name] = a

    def const(self, name: str) -> np.ndarray:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.values:
            return self.values[name]
        raise KeyError(name)

    def is_const(self, name: str) -> bool:
        return bool(name) and name not in self.dep

    def weight_bytes(self) -> int:
        return sum(int(np.prod(t.dims)) * 4 for t in self.inits.values())


def _pads_for(attrs, in_sp, out_sp, k_sp, strides, dil):
    """Explicit (begin, end) pads of a conv/pool, resolving auto_pad."""
    nd = len(in_sp)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for i in range(nd):
            total = max((out_sp[i] - 1) * strides[i] + (k_sp[i] - 1) * dil[i] + 1 - in_sp[i], 0)
            small, big = total // 2, total - total // 2
            pb.append(small if auto == "SAME_UPPER" else big)
            pe.append(big if auto == "SAME_UPPER" else small)
        return pb, pe
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


class ExplanationBuilder:
    """Writes the explanation graph. See the module docstring for the layout."""

    def __init__(self, model: onnx.ModelProto, background: list[np.ndarray], outputs="top1", cache="auto",
                 output_name: str | None = None, memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
                 big_cache: str = "embed"):
        if big_cache not in ("embed", "runtime"):
            raise ValueError(f"big_cache must be 'embed' or 'runtime', got {big_cache!r}")
        self.big_cache = big_cache
        if memory_budget is not None and (isinstance(memory_budget, bool) or
                                          not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        self.memory_budget = memory_budget
        self.model = model
        self.opset = opset_of(model)
        self.bg = [np.ascontiguousarray(b) for b in background]
        self.M = int(self.bg[0].shape[0])
        if any(int(b.shape[0]) != self.M for b in self.bg):
            raise ValueError("every background array needs the same number of rows")
        self.plan = _Plan(model, self.bg)
        p = self.plan
        for name in p.inputs:
            if p.dtype[name] not in (np.float32, np.float64, np.float16):
                raise TypeError(f"input {name!r} is {p.dtype[name]}: only floating-point inputs can be explained")
        self.y = output_name or p.graph_outputs[0]
        if self.y not in p.graph_outputs:
            raise ValueError(f"output_name {self.y!r} is not an output of the model (its outputs: "
                             f"{p.graph_outputs})")
        if self.y not in p.var or not p.batched.get(self.y, False):
            raise ValueError(f"output {self.y!r} does not depend on the inputs with a batch axis")
        self.K = int(np.prod(p.rest[self.y], dtype=np.int64))
        self.mode, self.S, self.k = self._parse_outputs(outputs)
        self.cache = cache
        taken = {t for n in p.nodes for t in list(n.input) + list(n.output)} | set(p.inits) | set(p.inputs)
        self.b = Builder(self.opset, prefix="dsx", taken=taken)
        self._x4: dict[str, str] = {}
        self._r4: dict[str, str] = {}      # tensor -> placeholder name of its (1,1,M,*rest) reference value
        self._r4d: dict[str, str] = {}     # tensor -> its reference value derived in the run (_derived_ref)
        self._kernels: dict[str, np.ndarray] = {}   # the backward's rearranged Conv kernels (Loop body)
        self._rt_zero: dict[np.dtype, str] = {}
        self._r4d_const: dict[str, str] = {}  # derived tensor -> the ReLU input it is derived from
        self._r4c: dict[str, str] = {}       # derived tensor -> Relu(R4(input)), no run-time operand (R4_const)
        self._to4: dict[tuple, str] = {}
        self.maxpool_idx: dict[int, str] = {}
        self.fused: dict[int, tuple[str, str]] = {}
        self.absorbed: set[int] = set()
        self._detect_fusions()

    # ------------------------------------------------------------------ setup
    def _parse_outputs(self, outputs):
        if isinstance(outputs, str):
            o = outputs.strip().lower()
            if o == "top1":
                return "topk", 1, 1
            if o.startswith("topk:"):
                k = int(o.split(":", 1)[1])
                if not 1 <= k <= self.K:
                    raise ValueError(f"topk:{k} needs 1 <= k <= {self.K}")
                return "topk", k, k
            if o == "all":
                return "all", self.K, None
            if o == "target":
                return "target", None, None
            raise ValueError(f"outputs must be 'top1', 'topk:K', 'all', 'target' or an int, got {outputs!r}")
        if isinstance(outputs, (int, np.integer)) and not isinstance(outputs, bool):
            j = int(outputs)
            if not -self.K <= j < self.K:
                raise ValueError(f"output index {j} out of range for {self.K} outputs")
            return "index", 1, j % self.K
        raise ValueError(f"outputs must be 'top1', 'topk:K', 'all', 'target' or an int, got {outputs!r}")

    def _detect_fusions(self):
        """x·sigmoid(x) → silu, x·tanh(softplus(x)) → mish: element-wise, as the torch/TF backends see them."""
        p = self.plan

        def prod(t, op):
            i = p.producer.get(t)
            return i if i is not None and p.nodes[i].op_type == op else None

        for i, n in enumerate(p.nodes):
            if n.op_type != "Mul" or len(n.input) != 2:
                continue
            for a, b in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
                s = prod(b, "Sigmoid")
                if s is not None and p.nodes[s].input[0] == a and len(p.consumers[b]) == 1:
                    self.fused[i] = ("silu", a)
                    self.absorbed.add(s)
                    break
                t = prod(b, "Tanh")
                if t is not None and len(p.consumers[b]) == 1:
                    sp = prod(p.nodes[t].input[0], "Softplus")
                    if sp is not None and p.nodes[sp].input[0] == a and len(p.consumers[p.nodes[t].input[0]]) == 1:
                        self.fused[i] = ("mish", a)
                        self.absorbed.update((t, sp))
                        break

    # ------------------------------------------------------------------ layout helpers
    def X4(self, t: str) -> str:
        if t not in self._x4:
            self._x4[t] = self.b.reshape(t, [-1, 1, 1, *self.plan.rest[t]])
        return self._x4[t]

    def R4(self, t: str) -> str:
        """The references' value of t, (1, 1, M, *rest): a cached tensor (a placeholder filled by _assemble), or
        for a ReLU's output, Max(R4(its input), 0) computed in the run (see _derived_ref)."""
        d = self._derived_ref(t)
        if d is not None:
            return d
        if t not in self._r4:
            self._r4[t] = self.b.fresh("ref")
        return self._r4[t]

    def _derived_ref(self, t: str) -> str | None:
        """R4 of a ReLU's output, derived from R4 of its input instead of being cached: the rules that read both
        (the ReLU rescale, a max-pool after a ReLU) would otherwise cache two tensors of the same size. The Max
        reads a zero computed from the run's batch size, so that no runtime folds it into a constant at load
        (that would cache it again): it runs on the M reference rows where it is used (per Loop iteration),
        a small cost beside the rules' passes over the (explicand, output, reference) rows."""
        if t in self._r4d:
            return self._r4d[t]
        p = self.plan
        j = p.producer.get(t)
        if j is None or t in self._r4 or p.nodes[j].op_type != "Relu":
            return None
        x = p.nodes[j].input[0]
        if not (x in p.var and p.batched.get(x) and p.batched.get(t) and x not in p.merged and t not in p.merged
                and p.rest[x] == p.rest[t] and p.dtype[x] == p.dtype[t]):
            return None
        dt = np.dtype(p.dtype[t])
        if dt not in self._rt_zero:
            self._rt_zero[dt] = self.b.cast(self.b.op("Min", [self.Nt, self.b.i64([0])]),
                                            helper.np_dtype_to_tensor_dtype(dt))      # (1,): 0 at run time
        self._r4d[t] = self.b.op("Max", [self.R4(x), self._rt_zero[dt]], hint="ref_relu")
        self._r4d_const[t] = x
        return self._r4d[t]

    def R4_const(self, t: str) -> str:
        """R4(t) for a computation on the references alone (the max-pool rule's pooling of the references): a
        derived ReLU output as Relu(R4(input)), which a runtime folds into a constant at load with what reads it
        (in the outer graph, outside the Loop), so that the pooled values and indexes are not recomputed in every
        iteration (a MaxPool with indices is slow in onnxruntime)."""
        r = self.R4(t)
        if t not in self._r4d_const:
            return r
        if t not in self._r4c:
            self._r4c[t] = self.b.op("Relu", [self.R4(self._r4d_const[t])], hint="ref_relu_c")
        return self._r4c[t]

    def rest(self, t):
        return self.plan.rest[t]

    def to4(self, G: str, rest) -> str:
        """(P, *rest) → (N, S, M, *rest)."""
        rest = tuple(int(d) for d in rest)
        if rest not in self._to4:
            self._to4[rest] = self.nsm(*rest)
        return self.b.reshape(G, self._to4[rest])

    def nsm(self, *rest) -> str:
        """The shape (N, S, M, *rest) as a tensor (no -1: N may be 0)."""
        return self.b.op("Concat", [self.Nt, self.St, self.b.i64([self.M, *[int(d) for d in rest]])], axis=0)

    def flat(self, G4: str, rest) -> str:
        return self.b.reshape(G4, [-1, *[int(d) for d in rest]])

    def rows_like(self, G: str, rest) -> str:
        """The shape (P, *rest) as a tensor, P taken from G."""
        P = self.b.op("Shape", [G], start=0, end=1)
        return self.b.op("Concat", [P, self.b.i64(list(rest))], axis=0)

    def zeros_rows(self, G: str, rest, dtype=np.float32) -> str:
        return self.b.op("Expand", [self.b.const(np.zeros((1,) * (1 + len(rest)), dtype)), self.rows_like(G, rest)])

    def reduce_to(self, G: str, out_rest, in_rest) -> str:
        """Sum a flat cotangent (P, *out_rest) over the axes an operand of shape (·, *in_rest) was broadcast on."""
        out_rest, in_rest = tuple(out_rest), tuple(in_rest)
        if out_rest == in_rest:
            return G
        if len(in_rest) != len(out_rest):
            raise ValueError("rank change")
        axes = [i + 1 for i, (a, o) in enumerate(zip(in_rest, out_rest)) if a == 1 and o != 1]
        G = self.b.rsum(G, axes, keepdims=1)
        return G

    def fdt(self, t):
        return self.plan.dtype.get(t, np.dtype(np.float32))

    def fc(self, v, t):
        """A float constant in the dtype of tensor t."""
        return self.b.const(np.asarray(v, self.fdt(t)))

    # ------------------------------------------------------------------ main
    def build(self) -> onnx.ModelProto:
        p, b = self.plan, self.b
        x0 = p.inputs[0]
        self.Nt = b.op("Shape", [x0], start=0, end=1, hint="N")
        y = self.y
        ydt = self.fdt(y)
        # ---- seeds
        yF = b.op("Flatten", [y], axis=1)
        extra_outputs = []
        if self.mode == "topk":
            _, idx = b.op("TopK", [yF, b.i64([self.k])], n_out=2, axis=1, largest=1, sorted=1)
        elif self.mode == "all":
            idx = b.op("Expand", [b.i64(np.arange(self.K)[None, :]),
                                  b.op("Concat", [self.Nt, b.i64([self.K])], axis=0)])
        elif self.mode == "index":
            idx = b.op("Expand", [b.i64([[self.k]]), b.op("Concat", [self.Nt, b.i64([1])], axis=0)])
        else:
            tgt = "target"
            idx = b.cast(tgt, TensorProto.INT64)                   # declared (N, S)
        self.idx = idx
        self.St = b.op("Shape", [idx], start=1, end=2, hint="S")
        # OneHot in float32 (onnxruntime has no double OneHot), cast to the output's dtype
        onehot = b.op("OneHot", [idx, b.i64(self.K), b.const(np.array([0, 1], np.float32))], axis=-1)   # (N,S,K)
        if np.dtype(ydt) != np.float32:
            onehot = b.cast(onehot, helper.np_dtype_to_tensor_dtype(np.dtype(ydt)))
        seed = b.op("Expand", [b.unsqueeze(onehot, [2]), b.i64([1, 1, self.M, 1])])                 # (N,S,M,K)
        seed = self.flat(seed, p.rest[y])
        grads: dict[str, list[str]] = defaultdict(list)
        grads[y].append(seed)
        # ---- backward, reverse topological order
        for i in range(len(p.nodes) - 1, -1, -1):
            node = p.nodes[i]
            if i in self.absorbed:
                continue
            outs = [o for o in node.output]
            if not any(o in p.var for o in outs if o):
                continue
            gouts = [b.sum(grads.pop(o)) if o and grads.get(o) else None for o in outs]
            if all(g is None for g in gouts):
                continue
            for o in outs:
                if o in p.var and not p.batched.get(o, False):
                    raise UnsupportedOperatorError(node.op_type, _where(node),
                                                   f"its output {o!r} does not keep the batch on axis 0")
            if any(t in p.merged for t in list(node.input) + list(node.output)) and not (
                    node.op_type in _MERGED_OK or (node.op_type == "Gemm" and node.input[0] not in p.merged)):
                raise UnsupportedOperatorError(node.op_type, _where(node), "the batch axis is merged into another "
                                               "axis here; only reshapes, MatMul and element-wise ops can handle that")
            res = self.vjp(i, node, gouts)
            for t, g in res.items():
                if g is not None and t in p.var:
                    grads[t].append(g)
        # ---- phi per input
        shap_outs = []
        for name in p.inputs:
            rest = p.rest[name]
            if grads.get(name):
                G = b.sum(grads[name])
                G4 = self.to4(G, rest)
                D = b.sub(self.X4(name), self.R4(name))
                phi = b.reduce("ReduceMean", b.mul(G4, D), [2], keepdims=0)           # (N,S,*rest)
            else:
                zero = b.const(np.zeros((1, 1) + tuple(rest), p.dtype[name]))
                phi = b.op("Expand", [zero, b.op("Concat", [self.Nt, b.op("Shape", [idx], start=1, end=2),
                                                           b.i64(list(rest))], axis=0)])
            r = len(rest)
            oname = "shap_values" if len(p.inputs) == 1 else f"shap_values_{name}"
            b.node("Transpose", [phi], [oname], perm=[0] + list(range(2, 2 + r)) + [1])
            S = self.S if self.S is not None else "S"
            shap_outs.append(helper.make_tensor_value_info(
                oname, helper.np_dtype_to_tensor_dtype(p.dtype[name]), ["N", *rest, S]))
        if self.mode == "topk":
            b.node("Identity", [idx], ["shap_indexes"])
            extra_outputs.append(helper.make_tensor_value_info("shap_indexes", TensorProto.INT64, ["N", self.S]))
        return self._assemble(shap_outs + extra_outputs)

    # ------------------------------------------------------------------ references
    def _cache_bytes(self) -> int:
        p = self.plan
        return sum(self.M * int(np.prod(p.rest[t], dtype=np.int64)) * p.dtype[t].itemsize
                   for t in self._r4 if t not in p.inputs)

    def _assemble(self, new_outputs) -> onnx.ModelProto:
        p, b = self.plan, self.b
        cache = self.cache
        if cache not in _CACHE_MODES:
            raise ValueError(f"cache must be 'auto', 'embed', 'recompute' or 'runtime', got {self.cache!r}")
        if cache == "auto":
            extra = self._cache_bytes()
            cache = ("embed" if (extra <= EMBED_MAX_BYTES or extra <= EMBED_MAX_FRACTION * p.weight_bytes()) else
                     "recompute" if extra <= FOLD_MAX_BYTES else self.big_cache)
        self.cache_used = cache
        ref_nodes, ref_inits = [], []
        bgmap = dict(zip(p.inputs, self.bg))
        if cache == "embed":
            pass            # the activations are computed and attached to the finished model (_attach_references)
        else:
            rb = Builder(self.opset, prefix="dsr", taken=b._taken)
            ren = {}
            if cache == "runtime":
                # the background's rows [0, N + M): always all M rows (Slice clamps its end), but the end
                # depends on the run's batch size, so no runtime can fold the references' branch into
                # constants at load time: it runs in every call and its activations live only during it
                end = rb.add(rb.op("Shape", [p.inputs[0]], start=0, end=1), rb.i64([self.M]))
            for t in p.inputs:
                ren[t] = rb.const(bgmap[t], hint="background")
                if cache == "runtime":
                    ren[t] = rb.op("Slice", [ren[t], rb.i64([0]), end, rb.i64([0])], hint="background_rt")
            for n in p.nodes:
                if not any(t in p.dep for t in n.input if t):
                    continue
                new = onnx.NodeProto()
                new.CopyFrom(n)
                new.name = rb.fresh("n_" + n.op_type)
                for j, t in enumerate(n.input):
                    if t in ren:
                        new.input[j] = ren[t]
                for j, t in enumerate(n.output):
                    if t:
                        ren[t] = rb.fresh("r")
                        new.output[j] = ren[t]
                rb.nodes.append(new)
            for t, ph in self._r4.items():
                rb.node("Reshape", [ren[t], rb.i64([1, 1, self.M, *p.rest[t]])], [ph])
            ref_nodes, ref_inits = rb.nodes, rb.inits
        # the forward graph, with MaxPool Indices outputs where the backward needs them
        fwd = []
        for i, n in enumerate(p.nodes):
            if i in self.maxpool_idx:
                new = onnx.NodeProto()
                new.CopyFrom(n)
                if len(new.output) < 2:
                    new.output.append(self.maxpool_idx[i])
                else:
                    new.output[1] = self.maxpool_idx[i]
                fwd.append(new)
            else:
                fwd.append(n)
        g = p.model.graph
        nodes, loop_inits = fwd + ref_nodes + b.nodes, []
        self.rows_per_run = None
        if self.memory_budget is not None:
            nodes, loop_inits = self._loop_nodes(fwd, ref_nodes, new_outputs)
        outs = []
        for o in g.output:
            tt = o.type.tensor_type
            if (not o.type.HasField("tensor_type") or not tt.HasField("shape")) and o.name in p.dtype:
                dims = ["N", *p.rest[o.name]] if p.batched.get(o.name) else list(p.rest[o.name])
                o = helper.make_tensor_value_info(o.name, helper.np_dtype_to_tensor_dtype(p.dtype[o.name]), dims)
            outs.append(o)
        ins = []
        for v in g.input:
            if v.name in p.inputs and v.name in p.rest and v.type.HasField("tensor_type"):
                # the explanation is built for the background's per-sample shape: say so in the file's
                # signature, so that a runtime refuses another shape at the door, not deep inside the graph
                v = helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, ["N", *p.rest[v.name]])
            ins.append(v)
        graph = helper.make_graph(
            nodes, g.name or "deepshap", ins + (
                [helper.make_tensor_value_info("target", TensorProto.INT64, ["N", "S"])] if self.mode == "target"
                else []),
            outs + list(new_outputs),
            initializer=list(g.initializer) + ref_inits + self._used(b.inits, nodes) + loop_inits)
        # Constant-node / sparse initializers are kept as nodes; keep sparse ones
        graph.sparse_initializer.extend(g.sparse_initializer)
        out = helper.make_model(graph, opset_imports=list(p.model.opset_import), producer_name="deepshap_opt",
                                ir_version=p.model.ir_version)
        out.functions.extend(p.model.functions)
        if cache == "embed":
            self._attach_references(out.graph)
        ev = self.expected_value
        helper.set_model_props(out, {
            "deepshap_opt.expected_value": ",".join(repr(float(v)) for v in ev),
            "deepshap_opt.outputs": str(self.mode if self.mode != "index" else self.k),
            "deepshap_opt.explained_output": self.y,
            "deepshap_opt.references": str(self.M),
            "deepshap_opt.cache": cache,
            "deepshap_opt.rows_per_run": "all" if self.rows_per_run is None else str(self.rows_per_run),
        })
        return _toposort(out)

    @staticmethod
    def _used(inits, nodes) -> list:
        """The backward's initializers that some node of the graph (or of a subgraph) reads: the kernels copied
        into the Loop body are not kept in the outer graph too."""
        read = set()
        for n in nodes:
            read.update(n.input)
            if n.op_type in ("Loop", "If", "Scan"):
                read |= subgraph_refs(n)
        return [t for t in inits if t.name in read]

    def row_bytes(self) -> int:
        """Estimated bytes of one (explicand, output, reference) row of the backward pass."""
        p = self.plan
        itemsize = max(np.dtype(p.dtype[t]).itemsize for t in p.rest)
        biggest = max([int(np.prod(r, dtype=np.int64)) for t, r in p.rest.items() if p.batched.get(t)] or [1])
        return LIVE_FACTOR * biggest * itemsize

    def _loop_nodes(self, fwd, ref_nodes, new_outputs):
        """The explanation inside a Loop over chunks of explicands (see _loop.py)."""
        from ._loop import wrap_in_loop

        p = self.plan
        self.rows_per_run = max(1, int(self.memory_budget) // self.row_bytes())
        inputs = list(p.inputs) + (["target"] if self.mode == "target" else [])

        def spec_of(v):
            tt = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim][1:]
            return v.name, tt.elem_type, dims

        finals = [spec_of(v) for v in new_outputs]
        outs = p.graph_outputs
        from_body = (len(set(outs)) == len(outs) and not set(outs) & set(inputs)
                     and all(o in p.dep and p.batched.get(o) and o not in p.merged for o in outs))
        model_outs = [(o, helper.np_dtype_to_tensor_dtype(p.dtype[o]), list(p.rest[o])) for o in outs] \
            if from_body else []
        taken = set(self.b._taken) | {t for n in ref_nodes for t in n.output}
        nodes, inits = wrap_in_loop(
            opset=self.opset, taken=taken, fwd_nodes=fwd, dep=p.dep, inputs=inputs, back_nodes=self.b.nodes,
            final_outputs=finals, model_outputs=model_outs, model_outputs_from_body=from_body,
            rows_per_run=self.rows_per_run, M=self.M, S=self.S, target="target" if self.mode == "target" else None,
            const_value=self._small_const, weight_value=self._kernel_value)
        outer_fwd = [n for n in fwd if not any(t in p.dep for t in n.input if t)] if from_body else list(p.nodes)
        return outer_fwd + ref_nodes + nodes, inits

    def _kernel_value(self, name: str):
        """The value of a constant Conv kernel: a model weight, or one of the backward's rearranged kernels."""
        if name in self._kernels:
            return self._kernels[name]
        try:
            return self.plan.const(name)
        except KeyError:
            return None

    def _small_const(self, name: str):
        p = self.plan
        try:
            v = p.const(name)
        except KeyError:
            return None
        return v if v.size <= 4096 else None

    def _attach_references(self, graph) -> None:
        """cache="embed": the references' activations as initializers of the finished graph, appended one at a
        time (the export's memory holds the cache about once, not once per copy of a graph under construction)."""
        p = self.plan
        bgmap = dict(zip(p.inputs, self.bg))
        wanted = [t for t in self._r4 if t not in p.inputs]
        vals = self._run_references(wanted) if wanted else {}
        vals.update({t: bgmap[t] for t in self._r4 if t in p.inputs})
        for t, ph in self._r4.items():
            v = np.asarray(vals.pop(t))
            v = v.reshape((1, 1, self.M) + tuple(p.rest[t])) if p.batched.get(t) else v[None, None]
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(v), ph))
            del v

    def _run_references(self, names: list[str]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        p = self.plan
        probe = onnx.ModelProto.FromString(p.model.SerializeToString())
        have = {o.name for o in probe.graph.output}
        for t in names:
            if t not in have:
                probe.graph.output.append(onnx.ValueInfoProto(name=t))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        row = sum(int(np.prod(p.rest[t], dtype=np.int64)) * np.dtype(p.dtype[t]).itemsize
                  for t in names if p.batched.get(t))
        chunk = max(1, min(REF_CHUNK, REF_CHUNK_BYTES // max(row, 1)))
        out: dict[str, np.ndarray] = {}
        for s in range(0, self.M, chunk):
            res = sess.run(names, dict(zip(p.inputs, [b[s:s + chunk] for b in self.bg])))
            for n, r in zip(names, res):
                if not p.batched.get(n):
                    out.setdefault(n, r)
                    continue
                if n not in out:
                    out[n] = np.empty((self.M, *r.shape[1:]), r.dtype)
                out[n][s:s + len(r)] = r
            del res
        return out

    @property
    def expected_value(self) -> np.ndarray:
        if not hasattr(self, "_ev"):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(self.plan.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            y = np.concatenate([sess.run([self.y], dict(zip(self.plan.inputs,
                                                            [b[s:s + REF_CHUNK] for b in self.bg])))[0]
                                for s in range(0, self.M, REF_CHUNK)])
            self._ev = np.asarray(y, np.float64).reshape(y.shape[0], -1).mean(0)
        return self._ev

    # ------------------------------------------------------------------ rules
    def vjp(self, i, node, gouts) -> dict[str, str]:
        p, b = self.plan, self.b
        op = node.op_type
        if i in self.fused:
            kind, x = self.fused[i]
            return {x: self.rescale(node, x, node.output[0], gouts[0], kind)}
        G = gouts[0]
        ins = list(node.input)
        varying = [t for t in ins if t in p.var]
        x = ins[0] if ins else None
        y = node.output[0]
        A = _attrs(node)
        if op in _PASS:
            return {x: b.reshape(G, [-1, *p.rest[x]])}
        if op == "Cast":
            return {x: b.cast(G, helper.np_dtype_to_tensor_dtype(p.dtype[x]))}
        if op == "Neg":
            return {x: b.neg(G)}
        if op in _ELEMENTWISE:
            for t in ins[1:]:
                if t and t in p.var:
                    raise UnsupportedOperatorError(op, _where(node), "a varying parameter input")
            return {x: self.rescale(node, x, y, G, _ELEMENTWISE[op])}
        if op in ("Add", "Sub", "Sum"):
            res = {}
            for j, t in enumerate(ins):
                if t in p.var:
                    g = b.neg(G) if (op == "Sub" and j == 1) else G
                    res[t] = self._acc(res.get(t), self.reduce_to(g, p.rest[y], p.rest[t]))
            return res
        if op == "Mul":
            return self.mul_rule(node, G)
        if op == "Div":
            return self.div_rule(node, G)
        if op in ("Max", "Min"):
            if len(varying) == 1 and len(ins) == 2:
                return {varying[0]: self.rescale(node, varying[0], y, G, op.lower() + "_const")}
            if len(varying) == 2 and len(ins) == 2:
                return self.pair_rule(node, G)
            raise UnsupportedOperatorError(op, _where(node), "Max/Min with more than two operands")
        if op == "Pow":
            if ins[0] in p.var and ins[1] not in p.var:
                return {x: self.rescale(node, x, y, G, "pow")}
            if ins[1] in p.var and ins[0] not in p.var:
                return {ins[1]: self.rescale(node, ins[1], y, G, "exp_base")}
            return self.pair_rule(node, G)
        if op == "Conv":
            return self.conv_rule(node, G)
        if op == "ConvTranspose":
            return self.convT_rule(node, G)
        if op == "Gemm":
            return self.gemm_rule(node, G)
        if op == "MatMul":
            return self.matmul_rule(node, G)
        if op == "BatchNormalization":
            if any(t in p.var for t in ins[1:]):
                raise UnsupportedOperatorError(op, _where(node), "varying parameters")
            scale, var = p.const(ins[1]), p.const(ins[4])
            k = (scale / np.sqrt(var + A.get("epsilon", 1e-5))).astype(p.dtype[x])
            k = k.reshape((-1,) + (1,) * (len(p.rest[x]) - 1))
            return {x: b.mul(G, b.const(k))}
        if op in ("MaxPool",):
            return self.maxpool_rule(i, node, G)
        if op == "GlobalMaxPool":
            return {x: self.global_maxpool_rule(node, G)}
        if op in ("ReduceMax", "ReduceMin"):
            return {x: self.reduce_max_rule(node, G)}
        if op == "AveragePool":
            return {x: self.avgpool_rule(node, G)}
        if op == "GlobalAveragePool":
            rest = p.rest[x]
            n = int(np.prod(rest[1:]))
            return {x: b.op("Expand", [b.mul(G, self.fc(1.0 / n, x)), self.rows_like(G, rest)])}
        if op in ("ReduceMean", "ReduceSum"):
            return {x: self.reduce_rule(node, G)}
        if op == "Softmax":
            return {x: self.softmax_rule(node, G, log=False)}
        if op == "LogSoftmax":
            return {x: self.softmax_rule(node, G, log=True)}
        if op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization"):
            return {x: self.norm_rule(node, G)}
        if op == "Transpose":
            perm = list(A.get("perm", range(len(p.rest[x]) + 1))[::-1] if "perm" not in A else A["perm"])
            if perm[0] != 0:
                raise UnsupportedOperatorError(op, _where(node), "a transpose that moves the batch axis")
            inv = list(np.argsort(perm))
            return {x: b.transpose(G, inv)}
        if op == "Concat":
            ax = A["axis"] % (len(p.rest[y]) + 1)
            if ax == 0:
                raise UnsupportedOperatorError(op, _where(node), "concatenation along the batch axis")
            sizes = [p.rest[t][ax - 1] for t in ins]
            parts = b.op("Split", [G, b.i64(sizes)], n_out=len(ins), axis=ax)
            parts = [parts] if len(ins) == 1 else parts
            res = {}
            for t, g in zip(ins, parts):
                if t in p.var:
                    res[t] = self._acc(res.get(t), g)
            return res
        if op == "Split":
            ax = A.get("axis", 0) % (len(p.rest[x]) + 1)
            if ax == 0:
                raise UnsupportedOperatorError(op, _where(node), "split along the batch axis")
            ref = next(g for g in gouts if g is not None)
            parts = [g if g is not None else self.zeros_rows(ref, p.rest[o], p.dtype[x])
                     for g, o in zip(gouts, node.output)]
            return {x: b.op("Concat", parts, axis=ax)}
        if op == "Slice":
            return {x: self.slice_rule(node, G)}
        if op == "Gather":
            return {x: self.gather_rule(node, G)}
        if op == "Pad":
            return {x: self.pad_rule(node, G)}
        if op == "Resize":
            return {x: self.resize_rule(node, G)}
        if op == "Expand":
            return {x: self.reduce_to(G, p.rest[y], p.rest[x])}
        if op == "Tile":
            reps = [int(r) for r in p.const(ins[1])]
            if reps[0] != 1:
                raise UnsupportedOperatorError(op, _where(node), "tiling along the batch axis")
            rest = p.rest[x]
            shp = [-1]
            for r, d in zip(reps[1:], rest):
                shp += [r, d]
            G = b.reshape(G, shp)
            return {x: b.rsum(G, [1 + 2 * j for j in range(len(rest))], keepdims=0)}
        raise UnsupportedOperatorError(op, _where(node))

    def _acc(self, a, g):
        return g if a is None else self.b.add(a, g)

    # --- element-wise (rescale)
    def rescale(self, node, x, y, G, kind) -> str:
        b, p = self.b, self.plan
        if kind in BOUNDED_SECANT and p.rest[x] == p.rest[y]:
            # sigmoid, tanh: the multiplier in closed form from x and r alone (no f(r) cached; see _secant.py)
            m = bounded_secant(b, kind, self.X4(x), self.R4(x), lambda v: self.fc(v, x),
                               helper.np_dtype_to_tensor_dtype(self.fdt(x)))
            return self.flat(b.mul(self.to4(G, p.rest[y]), m), p.rest[y])
        X4, Y4, R4 = self.X4(x), self.X4(y), self.R4(x)
        FR4 = None if kind in _EXPM1_KINDS else self.R4(y)
        tiny = _TINY.get(np.dtype(self.fdt(x)))
        if kind == "relu" and tiny is not None and p.rest[x] == p.rest[y]:
            # ReLU, with 4 passes over the (N, S, M, *rest) pairs instead of 10: m = Δy / (Δx + tiny).
            # Exact: where x, r > 0 Δy and Δx are the same float (m = 1); where x, r <= 0, Δy = 0 (m = 0);
            # across the kink 0 < m <= 1 (|Δy| <= |Δx|), the rescale rule itself. Adding tiny (far below
            # any float's half-ulp unless |Δx| < 2^-75) changes no other quotient and turns Δx = 0 (where
            # Δy = 0) into m = 0 instead of 0/0; that pair's Δ is 0 so the value sums to nothing there.
            m = b.div(b.sub(Y4, FR4), b.add(b.sub(X4, R4), self.fc(tiny, x)))
            return self.flat(b.mul(self.to4(G, p.rest[y]), m), p.rest[y])
        d = b.sub(X4, R4)
        dy = self._expm1_delta(node, kind, X4, R4, d) if kind in _EXPM1_KINDS else b.sub(Y4, FR4)
        # m = dy/d, or f'(x) where |d| < eps, written without Where (slow in onnxruntime):
        # z = [|d| < eps]; m = (dy + f'(x)·z) / (d + z)  (= f'(x)(1 + O(d)) where z = 1, exactly f'(x) at d = 0)
        z = b.cast(b.op("Less", [b.abs(d), self.fc(spec.RESCALE_EPS, x)]), helper.np_dtype_to_tensor_dtype(self.fdt(x)))
        fp = self.deriv(node, kind, X4, Y4, x)
        m = b.div(b.add(dy, b.mul(fp, z)), b.add(d, z))
        G4 = self.to4(G, p.rest[y])
        g = self.flat(b.mul(G4, m), p.rest[y])
        return self.reduce_to(g, p.rest[y], p.rest[x])

    def _expm1(self, t, x) -> str:
        """expm1(t) for t <= 0 without an Expm1 op (ONNX has none), by Kahan's trick: u = exp(t);
        t where u == 1, else (u − 1)·t / log(u) (the rounding of u cancels between u − 1 and log u). t is
        clamped at −80, where expm1 is −1 to float64 precision (and log(0) would give 0·∞)."""
        b = self.b
        t = b.op("Max", [t, self.fc(-80.0, x)])
        u = b.exp(t)
        one = self.fc(1.0, x)
        is1 = b.op("Equal", [u, one])
        q = b.div(b.mul(b.sub(u, one), t), b.where(is1, one, b.op("Log", [u])))
        return b.where(is1, t, q)

    def _expm1_delta(self, node, kind, X4, R4, d) -> str:
        """f(x) − f(r) for Elu/Selu/Celu, f(v) = s·v (v > 0), s·a·expm1(v/c) (v <= 0), in a stable form.

        onnxruntime's float32 kernels compute a·(exp(v) − 1) (absolute error ~6e-8 near 0; torch uses expm1),
        which the rescale quotient Δy/Δx amplifies where Δx is small. Here: where x, r <= 0,
        Δy = s·a·(e^{x/c} − e^{r/c}) = sign(Δ)·s·a·e^{max(x,r)/c}·(−expm1(−|Δ|/c)), no cancellation; elsewhere
        f(x) − f(r) with f from expm1 (x, r > 0: exactly Δ·s; across 0 a sum of two non-negative terms)."""
        b, A = self.b, _attrs(node)
        x = node.input[0]
        if kind == "elu":
            s_, a_, c_ = 1.0, A.get("alpha", 1.0), 1.0
        elif kind == "selu":
            s_, a_, c_ = (A.get("gamma", 1.05070102214813232421875), A.get("alpha", 1.67326319217681884765625),
                          1.0)
        else:                                          # celu: max(0, v) + min(0, α·(exp(v/α) − 1))
            s_, a_, c_ = 1.0, A.get("alpha", 1.0), A.get("alpha", 1.0)
        zero = self.fc(0.0, x)

        def scaled(v):
            return v if c_ == 1.0 else b.mul(v, self.fc(1.0 / c_, x))

        def f(v):
            neg = b.mul(self._expm1(scaled(b.op("Min", [v, zero])), x), self.fc(s_ * a_, x))
            return b.where(b.op("Greater", [v, zero]), v if s_ == 1.0 else b.mul(v, self.fc(s_, x)), neg)

        top = scaled(b.op("Max", [X4, R4]))
        both_neg = scaled(b.neg(b.abs(d)))
        dneg = b.mul(b.mul(b.op("Sign", [d]), b.exp(top)),
                     b.mul(b.neg(self._expm1(both_neg, x)), self.fc(s_ * a_, x)))
        nonpos = b.op("And", [b.op("LessOrEqual", [X4, zero]), b.op("LessOrEqual", [R4, zero])])
        return b.where(nonpos, dneg, b.sub(f(X4), f(R4)))

    def deriv(self, node, kind, X, Y, x) -> str:
        """f'(x) at the explicand, (N,1,1,*rest), as ONNX ops."""
        b, A = self.b, _attrs(node)
        def c(v):
            return self.fc(v, x)

        one, zero = c(1.0), c(0.0)
        gt0 = b.op("Greater", [X, zero])
        if kind == "relu":
            return b.where(gt0, one, zero)
        if kind == "leaky_relu":
            return b.where(gt0, one, c(A.get("alpha", 0.01)))
        if kind == "prelu":
            return b.where(gt0, one, node.input[1])
        if kind == "elu":
            return b.where(gt0, one, b.add(Y, c(A.get("alpha", 1.0))))
        if kind == "selu":
            al, ga = A.get("alpha", 1.67326319217681884765625), A.get("gamma", 1.05070102214813232421875)
            return b.where(gt0, c(ga), b.add(Y, c(ga * al)))
        if kind == "celu":
            al = A.get("alpha", 1.0)
            return b.where(gt0, one, b.add(b.mul(Y, c(1.0 / al)), one))
        if kind == "sigmoid":
            return b.mul(Y, b.sub(one, Y))
        if kind == "tanh":
            return b.sub(one, b.mul(Y, Y))
        if kind == "hardsigmoid":
            al, be = A.get("alpha", 0.2), A.get("beta", 0.5)
            v = b.add(b.mul(X, c(al)), c(be))
            inside = b.op("And", [b.op("Greater", [v, zero]), b.op("Less", [v, one])])
            return b.where(inside, c(al), zero)
        if kind == "hardswish":
            mid = b.add(b.mul(X, c(1 / 3)), c(0.5))
            return b.where(b.op("Less", [X, c(-3.0)]), zero, b.where(b.op("Greater", [X, c(3.0)]), one, mid))
        if kind == "softplus":
            return b.op("Sigmoid", [X])
        if kind == "softsign":
            t = b.add(one, b.abs(X))
            return b.op("Reciprocal", [b.mul(t, t)])
        if kind == "erf":
            return b.mul(c(2 / math.sqrt(math.pi)), b.exp(b.neg(b.mul(X, X))))
        if kind == "gelu":
            approx = A.get("approximate", b"none")
            approx = approx.decode() if isinstance(approx, bytes) else approx
            if approx == "tanh":
                k = math.sqrt(2 / math.pi)
                inner = b.mul(c(k), b.add(X, b.mul(c(0.044715), b.mul(X, b.mul(X, X)))))
                t = b.op("Tanh", [inner])
                a = b.mul(c(0.5), b.add(one, t))
                dinner = b.mul(c(k), b.add(one, b.mul(c(3 * 0.044715), b.mul(X, X))))
                return b.add(a, b.mul(b.mul(c(0.5), X), b.mul(b.sub(one, b.mul(t, t)), dinner)))
            cdf = b.mul(c(0.5), b.add(one, b.op("Erf", [b.mul(X, c(1 / math.sqrt(2)))])))
            pdf = b.mul(c(1 / math.sqrt(2 * math.pi)), b.exp(b.mul(c(-0.5), b.mul(X, X))))
            return b.add(cdf, b.mul(X, pdf))
        if kind == "silu":
            s = b.op("Sigmoid", [X])
            return b.mul(s, b.add(one, b.mul(X, b.sub(one, s))))
        if kind == "mish":
            t = b.op("Tanh", [b.op("Softplus", [X])])
            return b.add(t, b.mul(b.mul(X, b.sub(one, b.mul(t, t))), b.op("Sigmoid", [X])))
        if kind == "exp":
            return Y
        if kind == "exp_base":   # y = c^x
            base = node.input[0]
            return b.mul(Y, b.op("Log", [base]))
        if kind == "log":
            return b.op("Reciprocal", [X])
        if kind == "sqrt":
            return b.div(c(0.5), Y)
        if kind == "reciprocal":
            return b.neg(b.mul(Y, Y))
        if kind == "abs":
            return b.op("Sign", [X])
        if kind == "sin":
            return b.op("Cos", [X])
        if kind == "cos":
            return b.neg(b.op("Sin", [X]))
        if kind == "thresholded_relu":
            return b.where(b.op("Greater", [X, c(A.get("alpha", 1.0))]), one, zero)
        if kind == "clip":
            conds = []
            ins = list(node.input) + ["", ""]
            lo, hi = ins[1], ins[2]
            if "min" in A:
                lo = c(A["min"])
            if "max" in A:
                hi = c(A["max"])
            if lo:
                conds.append(b.op("GreaterOrEqual", [X, lo]))
            if hi:
                conds.append(b.op("LessOrEqual", [X, hi]))
            if not conds:
                return b.op("Expand", [one, b.op("Shape", [X])])
            cond = conds[0] if len(conds) == 1 else b.op("And", conds)
            return b.where(cond, one, zero)
        if kind in ("max_const", "min_const"):
            other = node.input[1] if node.input[0] == x else node.input[0]
            cmp = b.op("Greater" if kind == "max_const" else "Less", [X, other])
            return b.where(cmp, one, zero)
        if kind == "pow":
            pw = node.input[1]
            pwf = b.cast(pw, helper.np_dtype_to_tensor_dtype(self.fdt(x))) if self.fdt(pw) != self.fdt(x) else pw
            return b.mul(pwf, b.op("Pow", [X, b.sub(pwf, one)]))
        raise UnsupportedOperatorError(node.op_type, _where(node), f"no derivative for {kind}")

    # --- two varying operands
    def mul_rule(self, node, G):
        p, b = self.plan, self.b
        a, c = node.input
        y = node.output[0]
        res = {}
        if a in p.var and c in p.var:
            a_bar = b.mul(b.add(self.X4(a), self.R4(a)), self.fc(0.5, a))
            c_bar = b.mul(b.add(self.X4(c), self.R4(c)), self.fc(0.5, c))
            G4 = self.to4(G, p.rest[y])
            ga = self.reduce_to(self.flat(b.mul(G4, c_bar), p.rest[y]), p.rest[y], p.rest[a])
            gc = self.reduce_to(self.flat(b.mul(G4, a_bar), p.rest[y]), p.rest[y], p.rest[c])
            if a == c:
                return {a: self._acc(ga, gc)}
            return {a: ga, c: gc}
        v, k = (a, c) if a in p.var else (c, a)
        res[v] = self.reduce_to(b.mul(G, k), p.rest[y], p.rest[v])
        return res

    def div_rule(self, node, G):
        p, b = self.plan, self.b
        a, c = node.input
        y = node.output[0]
        if c not in p.var:
            return {a: self.reduce_to(b.div(G, c), p.rest[y], p.rest[a])}
        G4 = self.to4(G, p.rest[y])
        cx, cr = self.X4(c), self.R4(c)
        res = {}
        if a in p.var:
            ma = b.mul(b.add(b.op("Reciprocal", [cx]), b.op("Reciprocal", [cr])), self.fc(0.5, a))
            res[a] = self.reduce_to(self.flat(b.mul(G4, ma), p.rest[y]), p.rest[y], p.rest[a])
            a_bar = b.mul(b.add(self.X4(a), self.R4(a)), self.fc(0.5, a))
        else:
            a_bar = a
        mc = b.neg(b.div(a_bar, b.mul(cx, cr)))
        gc = self.reduce_to(self.flat(b.mul(G4, mc), p.rest[y]), p.rest[y], p.rest[c])
        res[c] = self._acc(res[c], gc) if c in res else gc
        return res

    def pair_rule(self, node, G):
        """Literal ShapleyPair for z = g(a, b) with both operands varying (Max, Min, Pow)."""
        p, b = self.plan, self.b
        a, c = node.input
        y = node.output[0]
        ax, ar, cx, cr = self.X4(a), self.R4(a), self.X4(c), self.R4(c)
        A = _attrs(node)
        yxx, yrr = self.X4(y), self.R4(y)
        yrx = b.op(node.op_type, [ar, cx], **A)
        yxr = b.op(node.op_type, [ax, cr], **A)
        half = self.fc(0.5, y)
        eps = self.fc(spec.pair_eps(np.dtype(self.fdt(a)).itemsize), a)
        G4 = self.to4(G, p.rest[y])
        res = {}
        for t, d, num in ((a, b.sub(ax, ar), b.add(b.sub(yxx, yrx), b.sub(yxr, yrr))),
                          (c, b.sub(cx, cr), b.add(b.sub(yxx, yxr), b.sub(yrx, yrr)))):
            small = b.op("Less", [b.abs(d), eps])
            m = b.where(small, self.fc(0.0, y), b.div(b.mul(num, half), b.where(small, self.fc(1.0, y), d)))
            g = self.reduce_to(self.flat(b.mul(G4, m), p.rest[y]), p.rest[y], p.rest[t])
            res[t] = self._acc(res[t], g) if t in res else g
        return res

    # --- linear ops with weights
    def conv_rule(self, node, G):
        p, b = self.plan, self.b
        x, w = node.input[0], node.input[1]
        if w in p.var or (len(node.input) > 2 and node.input[2] in p.var):
            raise UnsupportedOperatorError("Conv", _where(node), "a weight that depends on the input")
        A = _attrs(node)
        Wv = p.const(w) if w in p.inits or w in p.values else None
        kshape = list(A.get("kernel_shape", Wv.shape[2:] if Wv is not None else []))
        in_sp, out_sp = list(p.rest[x][1:]), list(p.rest[node.output[0]][1:])
        nd = len(in_sp)
        strides = list(A.get("strides", [1] * nd))
        dil = list(A.get("dilations", [1] * nd))
        pb, pe = _pads_for(A, in_sp, out_sp, kshape, strides, dil)
        group = A.get("group", 1)
        if Wv is not None and all(st == 1 for st in strides):
            # stride 1: the VJP is an ordinary Conv with the flipped, in/out-swapped kernel (onnxruntime's Conv
            # kernels are faster than its ConvTranspose); pads d(k-1) - p
            qb = [(kshape[i] - 1) * dil[i] - pb[i] for i in range(nd)]
            qe = [in_sp[i] - out_sp[i] + (kshape[i] - 1) * dil[i] - qb[i] for i in range(nd)]
            if min(qb + qe) >= 0:
                cout, cin_g = Wv.shape[0], Wv.shape[1]
                cout_g = cout // group
                ks = list(Wv.shape[2:])
                if self.memory_budget is not None:
                    # in the Loop body the kernel must be the body's own initializer (see _loop.local_kernel):
                    # rearranged here, stored in the body (the file holds the conv weights twice)
                    k = Wv.reshape([group, cout_g, cin_g, *ks]).transpose([0, 2, 1] + list(range(3, 3 + nd)))
                    k = k.reshape([group * cin_g, cout_g, *ks])[(Ellipsis, *([slice(None, None, -1)] * nd))]
                    wt = b.const(np.ascontiguousarray(k), hint="kernel_t")
                    self._kernels[wt] = k
                    return {x: b.op("Conv", [G, wt], strides=[1] * nd, pads=qb + qe,
                                    dilations=dil, group=group, kernel_shape=kshape)}
                # the kernel is rearranged in-graph from the model's own weight (folded at load time by
                # onnxruntime), so the file does not store the weights twice
                wt = b.reshape(w, [group, cout_g, cin_g, *ks])
                wt = b.transpose(wt, [0, 2, 1] + list(range(3, 3 + nd)))          # (g, cin_g, cout_g, *k)
                wt = b.reshape(wt, [group * cin_g, cout_g, *ks])
                wt = b.op("Slice", [wt, b.i64([-1] * nd), b.i64([-(2 ** 62)] * nd), b.i64(list(range(2, 2 + nd))),
                                    b.i64([-1] * nd)])                           # flip the spatial axes
                return {x: b.op("Conv", [G, wt], strides=[1] * nd, pads=qb + qe,
                                dilations=dil, group=group, kernel_shape=kshape)}
        op_, pe2 = [], []
        for i in range(nd):
            natural = (out_sp[i] - 1) * strides[i] + (kshape[i] - 1) * dil[i] + 1 - pb[i] - pe[i]
            extra = in_sp[i] - natural
            if extra >= 0:
                op_.append(extra)
                pe2.append(pe[i])
            else:
                op_.append(0)
                pe2.append(pe[i] - extra)
        return {x: b.op("ConvTranspose", [G, w], strides=strides, pads=pb + pe2, dilations=dil,
                        group=A.get("group", 1), output_padding=op_, kernel_shape=kshape)}

    def convT_rule(self, node, G):
        p, b = self.plan, self.b
        x, w = node.input[0], node.input[1]
        if w in p.var:
            raise UnsupportedOperatorError("ConvTranspose", _where(node), "a weight that depends on the input")
        A = _attrs(node)
        Wv = p.const(w)
        kshape = list(A.get("kernel_shape", Wv.shape[2:]))
        in_sp, out_sp = list(p.rest[x][1:]), list(p.rest[node.output[0]][1:])
        nd = len(in_sp)
        strides = list(A.get("strides", [1] * nd))
        dil = list(A.get("dilations", [1] * nd))
        opad = list(A.get("output_padding", [0] * nd))
        if "pads" in A and A.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            pads = list(A["pads"])
        else:
            pads_b, pads_e = [], []
            for i in range(nd):
                total = strides[i] * (in_sp[i] - 1) + opad[i] + (kshape[i] - 1) * dil[i] + 1 - out_sp[i]
                auto = A.get("auto_pad", b"NOTSET")
                auto = auto.decode() if isinstance(auto, bytes) else auto
                if auto == "SAME_UPPER":
                    pads_b.append(total // 2)
                else:
                    pads_b.append(total - total // 2)
                pads_e.append(total - pads_b[-1])
            pads = pads_b + pads_e
        res = b.op("Conv", [G, w], strides=strides, pads=pads, dilations=dil, group=A.get("group", 1),
                   kernel_shape=kshape)
        # a conv of the output size may give more than the input size when output_padding was large: crop
        return {x: res}

    def gemm_rule(self, node, G):
        p, b = self.plan, self.b
        A = _attrs(node)
        a, w = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 else ""
        alpha, beta = A.get("alpha", 1.0), A.get("beta", 1.0)
        if w in p.var or A.get("transA", 0):
            raise UnsupportedOperatorError("Gemm", _where(node), "only Gemm with a varying A (no transA) and "
                                           "constant B is supported")
        res = {}
        if a in p.var:
            res[a] = b.op("Gemm", [G, w], alpha=float(alpha), transB=0 if A.get("transB", 0) else 1)
        if c and c in p.var:
            g = b.mul(G, self.fc(beta, c)) if beta != 1.0 else G
            res[c] = self._acc(res[c], self.reduce_to(g, p.rest[node.output[0]], p.rest[c])) if c in res else \
                self.reduce_to(g, p.rest[node.output[0]], p.rest[c])
        return res

    def matmul_rule(self, node, G):
        p, b = self.plan, self.b
        a, c = node.input
        y = node.output[0]
        ra = len(p.rest[a]) + 1 if a in p.var else None

        def swap(t, rank):
            perm = list(range(rank))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            return b.transpose(t, perm)

        if a in p.var and c in p.var:
            a_bar = b.mul(b.add(self.X4(a), self.R4(a)), self.fc(0.5, a))
            c_bar = b.mul(b.add(self.X4(c), self.R4(c)), self.fc(0.5, c))
            G4 = self.to4(G, p.rest[y])
            ga4 = b.op("MatMul", [G4, swap(c_bar, len(p.rest[c]) + 3)])
            gc4 = b.op("MatMul", [swap(a_bar, len(p.rest[a]) + 3), G4])
            ga = self.flat(ga4, self._bshape(p.rest[y][:-2], p.rest[a]))
            gc = self.flat(gc4, self._bshape(p.rest[y][:-2], p.rest[c]))
            ga = self.reduce_to(ga, self._bshape(p.rest[y][:-2], p.rest[a]), p.rest[a])
            gc = self.reduce_to(gc, self._bshape(p.rest[y][:-2], p.rest[c]), p.rest[c])
            return {a: self._acc(ga, gc)} if a == c else {a: ga, c: gc}
        if a in p.var:
            cv = p.const(c)
            if cv.ndim < 2 or ra < 2:
                raise UnsupportedOperatorError("MatMul", _where(node), "1-D operands")
            g = b.op("MatMul", [G, b.const(np.ascontiguousarray(np.swapaxes(cv, -1, -2)))])
            full = self._bshape(p.rest[y][:-2], p.rest[a])
            return {a: self.reduce_to(g, full, p.rest[a])}
        av = p.const(a)
        if av.ndim != 2:
            raise UnsupportedOperatorError("MatMul", _where(node), "a constant left operand that is not 2-D")
        return {c: b.op("MatMul", [b.const(np.ascontiguousarray(av.T)), G])}

    @staticmethod
    def _bshape(batch_rest, op_rest):
        """The rest shape of a matmul operand broadcast to the output's leading dims."""
        lead = tuple(batch_rest)
        own = tuple(op_rest)
        k = len(own) - 2
        lead_own = own[:k]
        lead = tuple(max(x, y) for x, y in zip(lead[len(lead) - k:], lead_own)) if k else ()
        return tuple(batch_rest[:len(batch_rest) - k]) + lead + own[k:] if k else tuple(batch_rest) + own

    # --- pooling
    def maxpool_rule(self, i, node, G):
        p, b = self.plan, self.b
        x, y = node.input[0], node.output[0]
        A = _attrs(node)
        if A.get("storage_order", 0):
            raise UnsupportedOperatorError("MaxPool", _where(node), "storage_order=1")
        rest_in, rest_out = p.rest[x], p.rest[y]
        C = rest_in[0]
        hw, ohw = int(np.prod(rest_in[1:])), int(np.prod(rest_out[1:]))
        # explicand argmax: the forward node's Indices output
        if i not in self.maxpool_idx:
            self.maxpool_idx[i] = node.output[1] if len(node.output) > 1 and node.output[1] else b.fresh("mp_idx")
        ix = self.maxpool_idx[i]
        hw_c = b.i64(hw)
        ix = b.op("Mod", [ix, hw_c])
        ix4 = b.reshape(ix, [-1, 1, 1, C, ohw])                                     # (N,1,1,C,ohw)
        # reference argmax: MaxPool on the references (constant; folded at load time)
        rflat = b.reshape(self.R4_const(x), [self.M, *rest_in])
        ry, rix = b.op("MaxPool", [rflat], n_out=2, **A)
        rix4 = b.reshape(b.op("Mod", [rix, hw_c]), [1, 1, self.M, C, ohw])
        yr4 = b.reshape(ry, [1, 1, self.M, C, ohw])
        yx4 = b.reshape(y, [-1, 1, 1, C, ohw])
        cmax = b.op("Max", [yx4, yr4])
        G4 = b.reshape(G, self.nsm(C, ohw))    # (N,S,M,C,ohw)
        ga = b.mul(G4, b.sub(cmax, yr4))
        gb = b.mul(G4, b.sub(yx4, cmax))
        tiling = self._tiling_windows(node, A, rest_in, rest_out)
        if tiling is not None:
            # windows that tile the input (kernel = stride, no padding): no input element is in two windows,
            # so routing is MaxUnpool (zeros + one write per window) of ga at the explicand's argmax and of gb
            # at the reference's, instead of zeros + two ScatterElements (slower per element in onnxruntime)
            (oh, kh), (ow, kw) = tiling
            chw = C * hw
            nrows = b.op("ReduceProd", [b.op("Shape", [G4], start=0, end=3)], keepdims=1)   # P = N*S*M
            base = b.reshape(b.mul(b.op("Range", [b.i64(0), b.squeeze(nrows, [0]), b.i64(1)]), b.i64(chw)),
                             self.nsm(1, 1))                                           # (N,S,M,1,1)
            cpos = b.i64((np.arange(C, dtype=np.int64) * hw).reshape(1, 1, 1, C, 1))
            idx_x = b.add(b.add(ix4, cpos), base)                                      # (N,S,M,C,ohw)
            idx_r = b.add(b.add(rix4, cpos), base)
            out_shape = b.op("Concat", [nrows, b.i64([C, *rest_in[1:]])], axis=0)
            kw_ = {"kernel_shape": [kh, kw], "strides": [kh, kw]}
            part = [-1, C, oh, ow]
            ua = b.op("MaxUnpool", [b.reshape(ga, part), b.reshape(idx_x, part), out_shape], **kw_)
            ub = b.op("MaxUnpool", [b.reshape(gb, part), b.reshape(idx_r, part), out_shape], **kw_)
            routed = b.reshape(b.add(ua, ub), self.nsm(*rest_in))
            return self._maxpool_out(node, routed)
        shape = b.op("Shape", [G4])
        zshape = b.op("Concat", [b.op("Shape", [G4], start=0, end=4), b.i64([hw])], axis=0)
        zeros = b.op("ConstantOfShape", [zshape], value=helper.make_tensor("v", helper.np_dtype_to_tensor_dtype(
            p.dtype[x]), [1], [0]))
        routed = b.op("ScatterElements", [zeros, b.op("Expand", [ix4, shape]), ga], axis=4, reduction="add")
        routed = b.op("ScatterElements", [routed, b.op("Expand", [rix4, shape]), gb], axis=4, reduction="add")
        routed = b.op("Reshape", [routed, self.nsm(*rest_in)])
        return self._maxpool_out(node, routed)

    def _maxpool_out(self, node, routed4) -> dict:
        """The max-pool rule's input multiplier ⊙ G: routed / Δ. When the pool's input is the output of a ReLU
        that nothing else reads, the ReLU's rule is folded in: routed / Δy · Δy / Δx = routed / Δx, where
        Δy = 0 gives 0 either way (routed is 0 where Δy = 0, see _divide_delta); the ReLU node is then skipped.
        Saves 5 passes over the pairs at the pool's input."""
        p = self.plan
        x = node.input[0]
        j = p.producer.get(x)
        relu = p.nodes[j] if j is not None else None
        if (relu is not None and relu.op_type == "Relu" and j not in self.fused and j not in self.absorbed
                and len(p.consumers[x]) == 1 and x not in p.graph_outputs
                and _TINY.get(np.dtype(self.fdt(relu.input[0]))) is not None
                and relu.input[0] in p.var and p.rest[relu.input[0]] == p.rest[x]):
            xin = relu.input[0]
            self.absorbed.add(j)
            return {xin: self.flat(self._divide_delta(routed4, xin, spec.MAXPOOL_EPS), p.rest[xin])}
        return {x: self.flat(self._divide_delta(routed4, x, spec.MAXPOOL_EPS), p.rest[x])}

    @staticmethod
    def _tiling_windows(node, A, rest_in, rest_out):
        """((oh, kh), (ow, kw)) when a 2-D MaxPool's windows tile its input exactly, else None."""
        k = list(A.get("kernel_shape", []))
        if len(rest_in) != 3 or len(k) != 2 or list(A.get("strides", [1, 1])) != k:
            return None
        if any(d != 1 for d in A.get("dilations", [1, 1])) or any(A.get("pads", [0] * 4)):
            return None
        auto = A.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            return None
        (H, W), (oh, ow) = rest_in[1:], rest_out[1:]
        if oh * k[0] != H or ow * k[1] != W:
            return None
        return (oh, k[0]), (ow, k[1])

    def _divide_delta(self, routed4, x, eps):
        b = self.b
        tiny = _TINY.get(np.dtype(self.fdt(x)))
        if tiny is not None:
            # the max-pool rule routes nothing to an element where x_i = r_i: with i the explicand's argmax,
            # c - y_r = max(x_i - y_r, 0) = 0 as y_r >= r_i = x_i (the reference's side likewise), and
            # |routed_i| <= |G| |x_i - r_i| in general. So routed / (Δ + tiny) is 0 at Δ = 0 and bounded
            # everywhere: 3 passes instead of 8 (the spec's "0 where |Δ| < eps" differs by < eps |G|).
            return b.div(routed4, b.add(b.sub(self.X4(x), self.R4(x)), self.fc(tiny, x)))
        d = b.sub(self.X4(x), self.R4(x))
        # routed/d, 0 where |d| < eps, without Where: z = [|d| < eps]; routed·(1 − z)/(d + z)
        z = b.cast(b.op("Less", [b.abs(d), self.fc(eps, x)]), helper.np_dtype_to_tensor_dtype(self.fdt(x)))
        return b.div(b.mul(routed4, b.sub(self.fc(1.0, x), z)), b.add(d, z))

    def global_maxpool_rule(self, node, G):
        r = len(self.plan.rest[node.input[0]]) + 1
        return self._reduce_extreme(node, G, list(range(2, r)), True, is_min=False)

    def _axes(self, node, A):
        """A Reduce* node's axes: its second input (opset 18+) or its ``axes`` attribute; [] when absent."""
        if len(node.input) > 1 and node.input[1]:
            return [int(a) for a in self.plan.const(node.input[1]).reshape(-1)]
        return list(A.get("axes", []))

    def reduce_max_rule(self, node, G):
        p = self.plan
        x = node.input[0]
        A = _attrs(node)
        r = len(p.rest[x]) + 1
        axes = self._axes(node, A)
        if not axes:
            if A.get("noop_with_empty_axes", 0):
                return G
            axes = list(range(r))
        axes = sorted({a % r for a in axes})
        if 0 in axes:
            raise UnsupportedOperatorError(node.op_type, _where(node), "a reduction over the batch axis")
        return self._reduce_extreme(node, G, axes, bool(A.get("keepdims", 1)), is_min=node.op_type == "ReduceMin")

    def _reduce_extreme(self, node, G, axes, keepdims, is_min):
        """Max-pool rule (spec.MaxPool) for a max/min over ``axes`` (full-tensor axes, batch excluded)."""
        p, b = self.plan, self.b
        x, y = node.input[0], node.output[0]
        rest_in = p.rest[x]
        r = len(rest_in) + 1
        kept = [a for a in range(1, r) if a not in axes]
        perm = [0] + kept + list(axes)                                  # reduced axes last
        kshape = [rest_in[a - 1] for a in kept]
        rshape = [rest_in[a - 1] for a in axes]
        R = int(np.prod(rshape))
        onv = b.const(np.array([0, 1], p.dtype[x]))
        arg = "ArgMin" if is_min else "ArgMax"
        xt = b.reshape(b.transpose(x, perm), [-1, 1, 1, *kshape, R])
        rt = b.reshape(b.transpose(b.reshape(self.R4(x), [self.M, *rest_in]), perm), [1, 1, self.M, *kshape, R])
        last = 3 + len(kshape)
        mx = b.op("OneHot", [b.op(arg, [xt], axis=last, keepdims=0), b.i64(R), onv], axis=-1)
        mr = b.op("OneHot", [b.op(arg, [rt], axis=last, keepdims=0), b.i64(R), onv], axis=-1)
        yx4 = b.reshape(y, [-1, 1, 1, *kshape, 1])
        yr4 = b.reshape(self.R4(y), [1, 1, self.M, *kshape, 1])
        c = b.op("Min" if is_min else "Max", [yx4, yr4])
        G4 = b.reshape(G, self.nsm(*kshape, 1))
        routed = b.add(b.mul(b.mul(G4, b.sub(c, yr4)), mx), b.mul(b.mul(G4, b.sub(yx4, c)), mr))
        routed = b.reshape(routed, self.nsm(*kshape, *rshape))
        order = perm[1:]                                                # rest axes in routed's order
        routed = b.transpose(routed, [0, 1, 2] + [3 + order.index(j) for j in range(1, r)])   # (N,S,M,*rest)
        return self.flat(self._divide_delta(routed, x, spec.MAXPOOL_EPS), rest_in)

    def avgpool_rule(self, node, G):
        p, b = self.plan, self.b
        x, y = node.input[0], node.output[0]
        A = _attrs(node)
        rest_in, rest_out = p.rest[x], p.rest[y]
        C = rest_in[0]
        in_sp, out_sp = list(rest_in[1:]), list(rest_out[1:])
        nd = len(in_sp)
        k = list(A["kernel_shape"])
        s = list(A.get("strides", [1] * nd))
        d = list(A.get("dilations", [1] * nd))
        pb, pe = _pads_for(A, in_sp, out_sp, k, s, d)
        include = A.get("count_include_pad", 0)
        counts = []
        for ax in range(nd):
            cnt = np.zeros(out_sp[ax])
            lo, hi = (-pb[ax], in_sp[ax] + pe[ax]) if include else (0, in_sp[ax])
            for j in range(out_sp[ax]):
                pos = j * s[ax] - pb[ax] + np.arange(k[ax]) * d[ax]
                cnt[j] = np.sum((pos >= lo) & (pos < hi))
            counts.append(cnt)
        count = counts[0]
        for cnt in counts[1:]:
            count = np.multiply.outer(count, cnt)
        inv = (1.0 / np.maximum(count, 1)).astype(p.dtype[x])
        g = b.mul(G, b.const(inv))
        w = np.ones([C, 1] + k, p.dtype[x])
        op_, pe2 = [], []
        for i in range(nd):
            natural = (out_sp[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1 - pb[i] - pe[i]
            extra = in_sp[i] - natural
            op_.append(max(extra, 0))
            pe2.append(pe[i] - min(extra, 0))
        return b.op("ConvTranspose", [g, b.const(w)], strides=s, pads=pb + pe2, dilations=d, group=C,
                    output_padding=op_, kernel_shape=k)

    def reduce_rule(self, node, G):
        p, b = self.plan, self.b
        x = node.input[0]
        A = _attrs(node)
        r = len(p.rest[x]) + 1
        axes = self._axes(node, A)
        if not axes:
            if A.get("noop_with_empty_axes", 0):
                return G
            raise UnsupportedOperatorError(node.op_type, _where(node), "a reduction over the batch axis")
        axes = sorted(a % r for a in axes)
        if 0 in axes:
            raise UnsupportedOperatorError(node.op_type, _where(node), "a reduction over the batch axis")
        if not A.get("keepdims", 1):
            G = b.unsqueeze(G, axes)
        if node.op_type == "ReduceMean":
            n = int(np.prod([p.rest[x][a - 1] for a in axes]))
            G = b.mul(G, self.fc(1.0 / n, x))
        return b.op("Expand", [G, self.rows_like(G, p.rest[x])])

    # --- softmax family
    def _lse(self, z, ax):
        b = self.b
        mx = b.rmax(z, [ax], keepdims=1)
        return b.add(mx, b.op("Log", [b.rsum(b.exp(b.sub(z, mx)), [ax], keepdims=1)]))

    def softmax_rule(self, node, G, log: bool):
        p, b = self.plan, self.b
        x = node.input[0]
        A = _attrs(node)
        rest = p.rest[x]
        ax = A.get("axis", -1) % (len(rest) + 1)
        if ax == 0:
            raise UnsupportedOperatorError(node.op_type, _where(node), "softmax over the batch axis")
        a4 = ax + 2
        X4, R4 = self.X4(x), self.R4(x)
        Lx, Lr = self._lse(X4, a4), self._lse(R4, a4)
        dz = b.sub(X4, R4)
        eps = spec.SOFTMAX.eps
        small = b.op("Less", [b.abs(dz), self.fc(eps, x)])
        safe = b.where(small, self.fc(1.0, x), dz)
        ex_lx = b.exp(b.sub(X4, Lx))                    # p_x (N,1,1,...)
        u = b.where(small, ex_lx, b.div(b.sub(ex_lx, b.exp(b.sub(R4, Lx))), safe))
        G4 = self.to4(G, rest)
        if log:
            dL = b.sub(Lx, Lr)
            lsmall = b.op("Less", [b.abs(dL), self.fc(spec.LOG_SOFTMAX.eps, x)])
            denom = b.sub(self.fc(1.0, x), b.exp(b.sub(Lr, Lx)))
            w = b.where(lsmall, u, b.div(b.mul(dL, u), b.where(lsmall, self.fc(1.0, x), denom)))
            gsum = b.rsum(G4, [a4], keepdims=1)
            out = b.sub(G4, b.mul(gsum, w))
            return self.flat(out, rest)
        ex_lr = b.exp(b.sub(X4, Lr))
        v = b.where(small, ex_lr, b.div(b.sub(ex_lr, b.exp(b.sub(R4, Lr))), safe))
        pr = b.exp(b.sub(R4, Lr))
        half = self.fc(0.5, x)
        sx = b.rsum(b.mul(G4, ex_lx), [a4], keepdims=1)
        sr = b.rsum(b.mul(G4, pr), [a4], keepdims=1)
        out = b.mul(half, b.sub(b.mul(G4, b.add(u, v)), b.add(b.mul(v, sx), b.mul(u, sr))))
        return self.flat(out, rest)

    # --- normalization: mean (linear), centre (linear), var (rescale on square), rsqrt (rescale), product (bilinear)
    def norm_rule(self, node, G):
        p, b = self.plan, self.b
        x = node.input[0]
        A = _attrs(node)
        rest = p.rest[x]
        r = len(rest) + 1
        op = node.op_type
        eps = A.get("epsilon", 1e-5)
        X4, R4 = self.X4(x), self.R4(x)
        if op == "LayerNormalization":
            ax = A.get("axis", -1) % r
            if ax == 0:
                raise UnsupportedOperatorError(op, _where(node), "normalization over the batch axis")
            gamma = node.input[1]
            g = b.mul(G, gamma)
            axes4 = list(range(ax + 2, r + 2))
            gx4 = self._norm_core(self.to4(g, rest), X4, R4, axes4, eps, x)
            return self.flat(gx4, rest)
        if op == "InstanceNormalization":
            gamma = p.const(node.input[1]).reshape((-1,) + (1,) * (len(rest) - 1))
            g = b.mul(G, b.const(gamma.astype(p.dtype[x])))
            axes4 = list(range(4, r + 2))
            return self.flat(self._norm_core(self.to4(g, rest), X4, R4, axes4, eps, x), rest)
        # GroupNormalization: reshape channels into groups
        ng = A["num_groups"]
        C = rest[0]
        gamma = p.const(node.input[1])
        if gamma.size == ng and ng != C:
            gamma = np.repeat(gamma, C // ng)
        gamma = gamma.reshape((-1,) + (1,) * (len(rest) - 1)).astype(p.dtype[x])
        g = b.mul(G, b.const(gamma))
        grest = (ng, int(np.prod(rest)) // ng)
        g4 = b.reshape(self.to4(g, rest), self.nsm(*grest))
        Xg = b.reshape(X4, [-1, 1, 1, *grest])
        Rg = b.reshape(R4, [1, 1, self.M, *grest])
        gx4 = self._norm_core(g4, Xg, Rg, [4], eps, x)
        return self.flat(gx4, rest)

    def _norm_core(self, G4, X4, R4, axes, eps, x):
        b = self.b
        cx = b.sub(X4, b.rmean(X4, axes))
        cr = b.sub(R4, b.rmean(R4, axes))
        vx = b.add(b.rmean(b.mul(cx, cx), axes), self.fc(eps, x))
        vr = b.add(b.rmean(b.mul(cr, cr), axes), self.fc(eps, x))
        qx, qr = b.op("Sqrt", [vx]), b.op("Sqrt", [vr])
        sx, sr = b.op("Reciprocal", [qx]), b.op("Reciprocal", [qr])
        half = self.fc(0.5, x)
        s_bar = b.mul(b.add(sx, sr), half)
        c_bar = b.mul(b.add(cx, cr), half)
        grad_c = b.mul(G4, s_bar)
        grad_s = b.rsum(b.mul(G4, c_bar), axes)
        # the rsqrt rescale in closed form: (v_x^(-1/2) − v_r^(-1/2)) / (v_x − v_r) = −s_x·s_r / (√v_x + √v_r)
        # (no difference of nearby values: float32 keeps its digits for a narrow LayerNorm's small variances)
        m_rs = b.neg(b.div(b.mul(sx, sr), b.add(qx, qr)))
        grad_v = b.mul(grad_s, m_rs)
        # v = mean(c²): dv/dc_j = (c_x + c_r)_j / F, F = number of elements reduced
        grad_c = b.add(grad_c, b.mul(b.mul(grad_v, b.add(cx, cr)), self._inv_count(X4, axes, x)))
        return b.sub(grad_c, b.rmean(grad_c, axes))

    def _inv_count(self, X4, axes, x):
        """1 / (number of elements reduced), from the shape of X4."""
        b = self.b
        sh = b.op("Shape", [X4])
        n = b.op("ReduceProd", [b.op("Gather", [sh, b.i64(axes)], axis=0)], keepdims=0)
        return b.op("Reciprocal", [b.cast(n, helper.np_dtype_to_tensor_dtype(self.fdt(x)))])

    # --- indexing ops
    def _index_map_vjp(self, G, in_rest, out_rest, idx_map):
        """VJP of an op that copies input element idx_map[j] to output j (flat, within a row): scatter-add."""
        b = self.b
        n_in, n_out = int(np.prod(in_rest)), int(np.prod(out_rest))
        Gf = b.reshape(G, [-1, n_out])
        idx = b.op("Expand", [b.i64(idx_map.reshape(1, n_out)), b.op("Shape", [Gf])])
        zeros = self.zeros_rows(Gf, (n_in,), np.float32 if True else None)
        out = b.op("ScatterElements", [zeros, idx, Gf], axis=1, reduction="add")
        return b.reshape(out, [-1, *in_rest])

    def _index_map(self, in_rest, fn):
        arr = np.arange(int(np.prod(in_rest)), dtype=np.int64).reshape((1,) + tuple(in_rest))
        return np.asarray(fn(arr))

    def slice_rule(self, node, G):
        p, b = self.plan, self.b
        x, y = node.input[0], node.output[0]
        ins = list(node.input) + [""] * 5
        rest = p.rest[x]
        r = len(rest) + 1
        starts = p.const(ins[1]).reshape(-1)
        ends = p.const(ins[2]).reshape(-1)
        axes = p.const(ins[3]).reshape(-1) if ins[3] else np.arange(len(starts))
        steps = p.const(ins[4]).reshape(-1) if ins[4] else np.ones(len(starts), np.int64)
        sl = [slice(None)] * r
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = int(a) % r
            if a == 0:
                if not (int(s) == 0 and int(st) == 1 and int(e) >= 2 ** 31 - 1):
                    raise UnsupportedOperatorError("Slice", _where(node), "slicing the batch axis")
                continue
            sl[a] = slice(int(s), int(e), int(st))
        if all(s.step in (None, 1) for s in sl):
            pads_b, pads_e = [0], [0]
            for a in range(1, r):
                st, en, _ = sl[a].indices(rest[a - 1])
                en = max(en, st)
                pads_b.append(st)
                pads_e.append(rest[a - 1] - en)
            return b.op("Pad", [G, b.i64(pads_b + pads_e)], mode="constant")
        idx = self._index_map(rest, lambda a: a[tuple(sl)])
        return self._index_map_vjp(G, rest, p.rest[y], idx)

    def gather_rule(self, node, G):
        p = self.plan
        x, ind, y = node.input[0], node.input[1], node.output[0]
        if ind in p.dep:
            raise UnsupportedOperatorError("Gather", _where(node), "indices that depend on the input")
        A = _attrs(node)
        r = len(p.rest[x]) + 1
        ax = A.get("axis", 0) % r
        if ax == 0:
            raise UnsupportedOperatorError("Gather", _where(node), "gathering along the batch axis")
        iv = p.const(ind)
        idx = self._index_map(p.rest[x], lambda a: np.take(a, iv, axis=ax))
        return self._index_map_vjp(G, p.rest[x], p.rest[y], idx)

    def pad_rule(self, node, G):
        p, b = self.plan, self.b
        x, y = node.input[0], node.output[0]
        A = _attrs(node)
        rest = p.rest[x]
        r = len(rest) + 1
        ins = list(node.input) + [""] * 4
        pads = p.const(ins[1]).reshape(-1).astype(np.int64)
        axes = [int(a) % r for a in p.const(ins[3]).reshape(-1)] if ins[3] else list(range(r))
        full_b, full_e = [0] * r, [0] * r
        for j, a in enumerate(axes):
            full_b[a], full_e[a] = int(pads[j]), int(pads[len(axes) + j])
        if full_b[0] or full_e[0]:
            raise UnsupportedOperatorError("Pad", _where(node), "padding the batch axis")
        mode = A.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "constant" and min(full_b + full_e) >= 0:
            starts = full_b[1:]
            ends = [s + d for s, d in zip(starts, rest)]
            return b.op("Slice", [G, b.i64(starts), b.i64(ends), b.i64(list(range(1, r)))])
        npmode = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]

        def fn(a):
            crop = tuple(slice(max(-pb, 0), a.shape[i] - max(-pe, 0)) for i, (pb, pe) in
                         enumerate(zip(full_b, full_e)))
            a = a[crop]
            pw = [(max(pb, 0), max(pe, 0)) for pb, pe in zip(full_b, full_e)]
            if npmode == "constant":
                return np.pad(a, pw, mode="constant", constant_values=-1)
            return np.pad(a, pw, mode=npmode)

        idx = self._index_map(rest, fn)
        valid = idx >= 0
        if not valid.all():
            # padded constants carry no input: route them to a dummy extra slot, then drop it
            n_in = int(np.prod(rest))
            idx = np.where(valid, idx, n_in)
            Gs = self._index_map_vjp(G, (n_in + 1,), p.rest[y], idx)
            Gs = b.op("Slice", [Gs, b.i64([0]), b.i64([n_in]), b.i64([1])])
            return b.reshape(Gs, [-1, *rest])
        return self._index_map_vjp(G, rest, p.rest[y], idx)

    def resize_rule(self, node, G):
        """Separable interpolation: the per-axis matrices are read off the Resize op itself (one-hot probes)."""
        import onnxruntime as ort

        p, b = self.plan, self.b
        x, y = node.input[0], node.output[0]
        rest_in, rest_out = p.rest[x], p.rest[y]
        r = len(rest_in) + 1
        if rest_in[0] != rest_out[0] or r not in (3, 4):
            raise UnsupportedOperatorError("Resize", _where(node), "only spatial resizing of 3-D/4-D tensors")
        A = _attrs(node)
        ins = list(node.input) + [""] * 4
        scales = p.const(ins[2]).reshape(-1) if ins[2] and p.const(ins[2]).size else None
        if ins[1] and p.const(ins[1]).size:
            raise UnsupportedOperatorError("Resize", _where(node), "roi input")
        mats = []
        for ax in range(2, r):
            n_in, n_out = rest_in[ax - 1], rest_out[ax - 1]
            shape_in = [n_in, 1] + [1] * (r - 2)
            shape_in[ax] = n_in
            probe_in = np.zeros(shape_in, np.float32)
            for j in range(n_in):
                probe_in[(j, 0) + tuple(j if a == ax else 0 for a in range(2, r))] = 1.0
            if scales is not None:
                sc = np.ones(r, np.float32)
                sc[ax] = scales[ax]
                inputs = ["X", "", "scales"]
                inits = [numpy_helper.from_array(sc, "scales")]
            else:
                sz = np.array(shape_in, np.int64)
                sz[ax] = n_out
                inputs = ["X", "", "", "sizes"]
                inits = [numpy_helper.from_array(sz, "sizes")]
            rn = helper.make_node("Resize", inputs, ["Y"], **{k: v for k, v in A.items() if k != "axes"})
            gm = helper.make_graph([rn], "probe", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape_in)],
                                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
            mp = helper.make_model(gm, opset_imports=[helper.make_opsetid("", self.opset)])
            so = ort.SessionOptions()
            so.log_severity_level = 3
            out = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
                None, {"X": probe_in})[0]
            sel = (slice(None), 0) + tuple(slice(None) if a == ax else 0 for a in range(2, r))
            mat = out[sel]                                                  # (n_in, n_out): row j = response to e_j
            if mat.shape[1] != n_out:
                raise UnsupportedOperatorError("Resize", _where(node), "could not probe the interpolation")
            mats.append(mat.astype(p.dtype[x]))
        g = G
        if r == 4:
            g = b.op("MatMul", [g, b.const(np.ascontiguousarray(mats[1].T))])       # (..,Ho,Wo)@(Wo,W)
            g = b.op("MatMul", [b.const(np.ascontiguousarray(mats[0])), g])         # (H,Ho)@(..,Ho,W)
        else:
            g = b.op("MatMul", [g, b.const(np.ascontiguousarray(mats[0].T))])
        return g


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    avail = {t.name for t in g.initializer} | {v.name for v in g.input} | {""}
    avail |= {t.values.name for t in g.sparse_initializer}
    nodes = list(g.node)
    producers = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producers[o] = i
    implicit = {i: subgraph_refs(n) for i, n in enumerate(nodes) if n.op_type in ("Loop", "If", "Scan")}
    order, state = [], [0] * len(nodes)
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, 0)]
        while stack:
            i, k = stack.pop()
            if k == 0:
                if state[i]:
                    continue
                state[i] = 1
            ins = [t for t in list(nodes[i].input) + sorted(implicit.get(i, ()))
                   if t not in avail and t in producers]
            pushed = False
            while k < len(ins):
                j = producers[ins[k]]
                k += 1
                if not state[j]:
                    stack.append((i, k))
                    stack.append((j, 0))
                    pushed = True
                    break
            if not pushed and state[i] == 1:
                state[i] = 2
                order.append(nodes[i])
    del g.node[:]
    g.node.extend(order)
    return model
