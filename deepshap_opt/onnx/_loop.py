"""Bounded memory: the explanation graph inside an ONNX ``Loop`` over chunks of explicands.

Without it, one run of the file holds all ``N·S·M`` (explicand, output, reference) rows of the backward pass
at once — tens of GB at 224×224 with N=4, M=32 on the paper models. With it, the forward copy that the
backward reads and the backward itself run once per chunk of ``c`` explicands (``c·S·M`` rows), so the peak
does not grow with ``N``. Standard ONNX only (``Loop``, ``Gather``, ``Range``, ``Slice``, ``Reshape``).

Layout of the wrapped graph:

* outer graph: ``n = N``, ``c = max(1, R // (S·M))`` (``R``: rows per run allowed by the memory budget, a
  constant; ``S`` read from ``target`` at run time in that mode), ``iters = max(ceil(n / c), 1)``, then the
  chunk is balanced to ``c' = ceil(n / iters)`` (padding < ``iters`` rows); the inputs are gathered at rows
  ``min(arange(iters·c'), n − 1)`` (the last row repeated as padding: real values, no NaN risk; for n = 0 an
  empty gather);
* body (iteration ``i``): rows ``[i·c', (i+1)·c')`` of the gathered inputs feed a copy of the forward nodes
  that depend on the inputs, then the backward nodes; the body's outputs (per chunk: SHAP values, the
  ranked indexes, and — when every model output has the batch on axis 0 — the model outputs) are scan
  outputs ``(iters, c', ...)``, reshaped to ``(iters·c', ...)`` and sliced to the first ``n`` rows;
* nodes that do not depend on the explicands (kernels rearranged for the backward, shape constants, the
  references' recomputation) stay in the outer graph, where onnxruntime folds them once at load time.

When some model output has no batch axis (or merges it into another axis), the outer graph keeps the
original forward for the model outputs and the body has its own copy (one extra forward of N rows).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._builder import Builder


def subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (Loop/If/Scan bodies) read from the enclosing scope."""
    out: set[str] = set()
    for a in node.attribute:
        graphs = ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                  list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            local = {v.name for v in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                out.update(t for t in n.input if t and t not in local)
                out.update(t for t in subgraph_refs(n) if t not in local)
            out.update(o.name for o in g.output if o.name not in local)
    return out


def wrap_in_loop(*, opset: int, taken: set[str], fwd_nodes: list, dep: set[str], inputs: list[str],
                 back_nodes: list, final_outputs: list[tuple[str, int, list]],
                 model_outputs: list[tuple[str, int, list]],
                 model_outputs_from_body: bool, rows_per_run: int, M: int, S, target: str | None,
                 const_value=None, weight_value=None):
    """Split the graph into an outer part and a Loop body; returns (outer nodes, outer initializers).

    fwd_nodes: the forward nodes (with the MaxPool ``Indices`` outputs the backward reads); dep: tensors that
    depend on the inputs; inputs: the graph inputs fed per chunk (``target`` included in that mode);
    back_nodes: the backward nodes (they read forward tensors by their names); final_outputs /
    model_outputs: ``(name, elem_type, per-row dims)`` of the outputs produced per chunk (per-row dims may
    hold the string ``"S"``); S: the number of explained outputs (an int) or None (read from ``target``);
    const_value: name → the value of a small constant tensor (or None), copied into the body.
    weight_value: name → the value of a constant Conv kernel (or None), copied into the body: onnxruntime's
    NCHWc layout (its fast CPU convolutions) only takes a Conv whose kernel is an initializer of the Conv's own
    graph, not one of an enclosing scope (VGG19 at 224x224: ~12% of the explanation's time).
    """
    w = Builder(opset, prefix="dsw", taken=taken)       # outer wrapper nodes
    lb = Builder(opset, prefix="dsl", taken=w._taken)    # body-local names
    x0 = inputs[0]
    # ------------------------------------------------------------------ outer: chunking arithmetic
    n1 = w.op("Shape", [x0], start=0, end=1, hint="n")                               # (1,)
    if S is None:
        s1 = w.op("Shape", [target], start=1, end=2, hint="s")
    else:
        s1 = w.i64([int(S)])
    one = w.i64([1])
    sm = w.op("Mul", [s1, w.i64([int(M)])])
    c = w.op("Max", [w.op("Div", [w.i64([int(rows_per_run)]), w.op("Max", [sm, one])]), one], hint="chunk")
    iters1 = w.op("Div", [w.add(n1, w.sub(c, one)), c], hint="iters")                 # ceil(n / c)
    den = w.op("Max", [iters1, one])
    ce1 = w.op("Div", [w.add(n1, w.sub(den, one)), den], hint="c_eff")                 # ceil(n / iters)
    total1 = w.mul(den, ce1)
    # at least one iteration (n = 0: one iteration over 0 rows), so that every runtime has a scan output to
    # stack; the condition is given explicitly (onnx.reference's Loop treats an absent one as false)
    iters = w.squeeze(den, [0])
    ce = w.squeeze(ce1, [0])
    rows = w.op("Min", [w.op("Range", [w.i64(0), w.squeeze(total1, [0]), w.i64(1)]),
                        w.squeeze(w.sub(n1, one), [0])], hint="rows")
    padded = {t: w.op("Gather", [t, rows], axis=0, hint="padded") for t in inputs}
    # ------------------------------------------------------------------ body
    it, cond_in = lb.fresh("iter"), lb.fresh("cond")
    start = lb.unsqueeze(lb.mul(it, ce), [0])
    end = lb.add(start, lb.unsqueeze(ce, [0]))
    ren: dict[str, str] = {}
    for t in inputs:
        ren[t] = lb.op("Slice", [padded[t], start, end, lb.i64([0])], hint="chunk_in")
    body_nodes = list(lb.nodes)
    outer_nodes = list(w.nodes)
    kernels: dict[str, str] = {}

    def local_kernel(new):
        """A Conv's constant kernel as a body initializer (one copy per kernel)."""
        if new.op_type != "Conv" or weight_value is None or len(new.input) < 2:
            return
        t = new.input[1]
        if t in kernels:
            new.input[1] = kernels[t]
            return
        if t in dep or t in ren:
            return
        v = weight_value(t)
        if v is not None:
            kernels[t] = lb.fresh("kernel")
            lb.inits.append(numpy_helper.from_array(np.ascontiguousarray(v), kernels[t]))
            new.input[1] = kernels[t]
    for n in fwd_nodes:
        if not any(t in dep for t in n.input if t):
            continue                                     # constant: stays in the outer graph
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.name = lb.fresh("fwd_" + n.op_type)         # "dsl/fwd_<op>_k": the forward copy
        for j, t in enumerate(n.input):
            if t in ren:
                new.input[j] = ren[t]
            elif t and t not in dep and const_value is not None:
                # a small constant operand (shape pieces, axes, sizes) is given to the body as its own
                # initializer: onnx's shape inference does not see the values of outer-scope tensors, and the
                # shape-driven subgraphs (Shape → Slice → Concat → Resize sizes) need them to type-check
                v = const_value(t)
                if v is not None:
                    new.input[j] = lb.const(v, hint="k")
        local_kernel(new)
        for j, t in enumerate(n.output):
            if t:
                ren[t] = lb.fresh("f")
                new.output[j] = ren[t]
        body_nodes.append(new)
    final_names = {name for name, _, _ in final_outputs}
    hoisted = []
    for n in back_nodes:
        if not any(t in ren for t in n.input if t):
            hoisted.append(n)                            # reads only constants: folded once, outside
            continue
        new = onnx.NodeProto()
        new.CopyFrom(n)
        for j, t in enumerate(n.input):
            if t in ren:
                new.input[j] = ren[t]
        local_kernel(new)
        for j, t in enumerate(n.output):
            if t:
                ren[t] = lb.fresh("b") if t in final_names else t
                new.output[j] = ren[t]
        body_nodes.append(new)
    cond_out = lb.fresh("cond_out")
    body_nodes.append(helper.make_node("Identity", [cond_in], [cond_out], name=lb.fresh("n_Identity")))
    per_chunk = list(final_outputs) + (list(model_outputs) if model_outputs_from_body else [])
    body_outs = [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, [])]
    for name, elem, _ in per_chunk:
        body_outs.append(helper.make_tensor_value_info(ren[name], elem, None))
    body = helper.make_graph(
        body_nodes, "deepshap_explicand_chunk",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
        body_outs, initializer=lb.inits)
    scans = [w.fresh("scan") for _ in per_chunk]
    loop = helper.make_node("Loop", [iters, w.const(np.array(True))], scans, name=w.fresh("n_Loop_explicands"),
                            body=body)
    # ------------------------------------------------------------------ outer: unstack, drop the padding
    w.nodes = []
    for (name, _, dims), sc in zip(per_chunk, scans):
        parts = [total1]
        for d in dims:
            parts.append(s1 if d == "S" else w.i64([int(d)]))
        flat = w.op("Reshape", [sc, w.op("Concat", parts, axis=0)], allowzero=1)     # n = 0: a literal 0
        w.node("Slice", [flat, w.i64([0]), n1, w.i64([0])], [name])
    return outer_nodes + hoisted + [loop] + w.nodes, w.inits
