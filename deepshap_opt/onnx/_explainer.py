"""``deepshap_opt.onnx.DeepExplainer``: the shap.DeepExplainer API over the explanation graph in onnxruntime."""

from __future__ import annotations

import numpy as np

from .._explainer import ExplainerBase
from ._convert import check_background, check_background_arrays, check_X, load_model, to_numpy_list

#: default bound on the memory of one onnxruntime run (bytes), as the torch backend's ``memory_budget``
DEFAULT_MEMORY_BUDGET = 4 * 2**30
#: live tensors of the largest activation's size assumed per (explicand, output, reference) row
_LIVE_FACTOR = 6


def default_providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


class ONNXDeepExplainer(ExplainerBase):
    """DeepSHAP with cached references, computed by onnxruntime sessions.

    model_or_path: an onnx.ModelProto or path, a torch.nn.Module or a Keras model; data: the background
    (array, or a list of arrays for several inputs). ``providers`` are onnxruntime execution providers (default:
    CUDA when onnxruntime-gpu sees a GPU, else CPU). ``cache``/``opset``/``output_name`` as in
    :func:`deepshap_opt.onnx.export`. The explanation graph uses the ``"target"`` mode: the outputs to
    explain are chosen per call (all of them, or the ranked ones), from one forward session's predictions.

    ``memory_budget`` (bytes) bounds one onnxruntime run: the explicands and the explained outputs are split
    into chunks so that a run holds at most ``memory_budget`` of (explicand, output, reference) rows (estimated
    from the largest activation). When even one explicand against all M references would exceed it, the
    background is split into groups of references, one explanation graph per group, run one at a time (their
    sessions are created per call: slower, bounded memory); the groups' values are averaged with weights
    ``M_g / M``, which is exact (DeepSHAP is a mean over the references).
    """

    def __init__(self, model_or_path, data, *, providers=None, cache="auto", opset=None, output_name=None,
                 session_options=None, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        import onnxruntime as ort

        from ._graph import ExplanationBuilder, prepare_model

        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        self.memory_budget = int(memory_budget)
        bg = to_numpy_list(data)
        check_background_arrays(bg)
        self.multi_input = isinstance(data, (list, tuple))
        proto = prepare_model(load_model(model_or_path, bg, opset), opset)
        bg = check_background(proto, bg)
        self.data = bg
        # this class chunks the runs itself; a session is made from bytes in memory (protobuf's 2 GB limit), so
        # "auto" picks "runtime" rather than "embed" above the folding limit
        builder = ExplanationBuilder(proto, bg, outputs="target", cache=cache, output_name=output_name,
                                     memory_budget=None, big_cache="runtime")
        p = builder.plan
        self.input_names = list(p.inputs)
        self.output_name = builder.y
        self.num_outputs = builder.K
        self.cache = cache
        itemsize = max(np.dtype(p.dtype[t]).itemsize for t in p.rest)
        biggest = max(int(np.prod(r, dtype=np.int64)) for t, r in p.rest.items() if p.batched.get(t))
        #: bytes of one (explicand, output, reference) row of the backward pass (an estimate)
        self.row_bytes = _LIVE_FACTOR * biggest * itemsize
        M = len(bg[0])
        self.providers = list(providers) if providers is not None else default_providers()
        so = session_options
        if so is None:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            # onnxruntime's memory pattern: from the second run on it allocates the outer graph's planned block
            # anew beside its arena's chunks of the first run; with cache="runtime" (the references' activations
            # live in the outer graph during a run) that doubles the peak, and that run is slower too (DenseNet201
            # at 224x224, M=8: 2.5 -> 4.2 GB, 3.9 -> 8.4 s)
            so.enable_mem_pattern = False
        self._so = so
        m_max = max(1, self.memory_budget // self.row_bytes)
        if M <= m_max:
            model = builder.build()
            self.model_proto = model
            self.cache = builder.cache_used
            self.expected_value = np.asarray(builder.expected_value, np.float64)
            self._groups = [(M, model.SerializeToString())]
            self.session = ort.InferenceSession(self._groups[0][1], so, providers=self.providers)
        else:
            # enormous M: one explanation graph per group of references, run one at a time
            self.model_proto = None
            self.session = None
            self._groups, evs = [], []
            for s in range(0, M, m_max):
                part = [b[s:s + m_max] for b in bg]
                gb = ExplanationBuilder(proto, part, outputs="target", cache="recompute", output_name=output_name,
                                        memory_budget=None)
                self._groups.append((len(part[0]), gb.build().SerializeToString()))
                evs.append(len(part[0]) * np.asarray(gb.expected_value, np.float64))
            self.cache = "recompute"
            self.expected_value = np.sum(evs, axis=0) / M
        self.forward_session = ort.InferenceSession(proto.SerializeToString(), so, providers=self.providers)
        self._shap_names = ["shap_values"] if len(self.input_names) == 1 else \
            [f"shap_values_{n}" for n in self.input_names]
        self._dtypes = [b.dtype for b in bg]

    def _feed(self, X) -> dict:
        return dict(zip(self.input_names, check_X(X, self.data, self.multi_input)))

    def predict(self, X) -> np.ndarray:
        feed = self._feed(X)
        n = len(next(iter(feed.values())))
        if n == 0:
            return np.zeros((0, self.num_outputs), np.float64)
        y = self.forward_session.run([self.output_name], feed)[0]
        return y.reshape(y.shape[0], -1)

    def _explain(self, X, select):
        feed = self._feed(X)
        n = len(next(iter(feed.values())))
        if n == 0:
            indexes = np.asarray(select(np.zeros((0, self.num_outputs))), np.int64)
            k = indexes.shape[1]
            phis = [np.zeros((0, *b.shape[1:], k), np.float64) for b in self.data]
            return phis, np.zeros((0, self.num_outputs), np.float64), indexes, self._dtypes[0]
        outputs = self.forward_session.run([self.output_name], feed)[0]
        outputs = outputs.reshape(n, -1).astype(np.float64)
        indexes = np.ascontiguousarray(np.asarray(select(outputs), np.int64))
        k = indexes.shape[1]
        M_total = sum(m for m, _ in self._groups)
        phis = [np.zeros((n, *b.shape[1:], k), np.float64) for b in self.data]
        import onnxruntime as ort

        for m, blob in self._groups:
            sess = self.session if len(self._groups) == 1 else ort.InferenceSession(blob, self._so,
                                                                                   providers=self.providers)
            # rows per run: n_c explicands x s_c outputs x m references within the budget
            pairs = max(1, self.memory_budget // (self.row_bytes * m))
            s_c = min(k, pairs)
            n_c = max(1, pairs // s_c)
            w = m / M_total
            for i in range(0, n, n_c):
                sub = {name: x[i:i + n_c] for name, x in feed.items()}
                for j in range(0, k, s_c):
                    sub["target"] = np.ascontiguousarray(indexes[i:i + n_c, j:j + s_c])
                    res = sess.run(self._shap_names, sub)
                    for ph, r in zip(phis, res):
                        ph[i:i + n_c, ..., j:j + s_c] += w * r.astype(np.float64)
            del sess
        return phis, outputs, indexes, self._dtypes[0]
