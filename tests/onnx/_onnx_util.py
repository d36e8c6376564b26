"""Helpers for the ONNX backend tests (small models only)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def expected_value(proto: onnx.ModelProto) -> np.ndarray:
    meta = {p.key: p.value for p in proto.metadata_props}
    return np.array([float(v) for v in meta["deepshap_opt.expected_value"].split(",")])


def all_nodes(graph):
    """Every node of a graph and of its subgraphs (the explanation's Loop body)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_nodes(g)


def all_ops(proto) -> set[str]:
    return {n.op_type for n in all_nodes(proto.graph)}


def forward_ops(proto) -> set[str]:
    """Op types of the model's own forward nodes: outside the Loop, or copied into its body ("dsl/fwd_")."""
    return {n.op_type for n in all_nodes(proto.graph)
            if n.name.startswith("dsl/fwd_") or not n.name.startswith(("dsx/", "dsr/", "dsw/", "dsl/"))}


def run(proto, feeds: dict) -> dict:
    s = session(proto)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def completeness_error(proto, out: dict, output_name: str | None = None) -> tuple[float, float]:
    """max |Σφ − (f(x) − E f)| over rows and explained outputs, and the output scale."""
    ev = expected_value(proto)
    y = out[output_name or proto.graph.output[0].name]
    y = y.reshape(y.shape[0], -1).astype(np.float64)
    phis = [v for k, v in out.items() if k.startswith("shap_values")]
    total = sum(p.reshape(p.shape[0], -1, p.shape[-1]).astype(np.float64).sum(1) for p in phis)   # (N, S)
    if "shap_indexes" in out:
        idx = out["shap_indexes"]
    elif total.shape[1] == y.shape[1]:
        idx = np.broadcast_to(np.arange(y.shape[1]), total.shape)
    else:
        raise ValueError("cannot tell the explained outputs")
    rows = np.arange(y.shape[0])[:, None]
    target = y[rows, idx] - ev[idx]
    scale = max(np.abs(y).max(), np.abs(ev).max(), 1e-12)
    return float(np.abs(total - target).max()), float(scale)


def torch_backend():
    try:
        from deepshap_opt.torch import DeepExplainer
        return DeepExplainer
    except Exception:  # noqa: BLE001 - pragma: no cover - the torch backend is written concurrently
        return None
