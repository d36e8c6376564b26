"""``deepshap_opt.onnx.DeepExplainer``: the shap.DeepExplainer API over the explanation graph in onnxruntime."""

from __future__ import annotations

import numpy as np

from .._explainer import ExplainerBase
from ._convert import load_model, to_numpy_list


def default_providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


class ONNXDeepExplainer(ExplainerBase):
    """DeepSHAP with cached references, computed by one onnxruntime session.

    model_or_path: an onnx.ModelProto or path, a torch.nn.Module or a Keras model; data: the background
    (array, or a list of arrays for several inputs). ``providers`` are onnxruntime execution providers (default:
    CUDA when onnxruntime-gpu sees a GPU, else CPU). ``cache``/``opset``/``output_name`` as in
    :func:`deepshap_opt.onnx.export`. The explanation graph uses the ``"target"`` mode: the outputs to
    explain are chosen per call (all of them, or the ranked ones), from one forward session's predictions.
    """

    def __init__(self, model_or_path, data, *, providers=None, cache="auto", opset=None, output_name=None,
                 session_options=None):
        import onnxruntime as ort

        from ._graph import ExplanationBuilder, prepare_model

        bg = to_numpy_list(data)
        self.multi_input = isinstance(data, (list, tuple))
        proto = prepare_model(load_model(model_or_path, bg, opset), opset)
        inits = {t.name for t in proto.graph.initializer}
        elem = [v.type.tensor_type.elem_type for v in proto.graph.input if v.name not in inits]
        bg = [b.astype(np.float32) if (b.dtype == np.float64 and e == 1) else b for b, e in zip(bg, elem)]
        self.data = bg
        builder = ExplanationBuilder(proto, bg, outputs="target", cache=cache, output_name=output_name)
        model = builder.build()
        self.model_proto = model
        self.input_names = list(builder.plan.inputs)
        self.output_name = builder.y
        self.num_outputs = builder.K
        self.expected_value = np.asarray(builder.expected_value, np.float64)
        self.cache = builder.cache_used
        self.providers = list(providers) if providers is not None else default_providers()
        so = session_options
        if so is None:
            so = ort.SessionOptions()
            so.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=self.providers)
        self.forward_session = ort.InferenceSession(proto.SerializeToString(), so, providers=self.providers)
        self._shap_names = ["shap_values"] if len(self.input_names) == 1 else \
            [f"shap_values_{n}" for n in self.input_names]
        self._dtypes = [b.dtype for b in bg]

    def _feed(self, X):
        xs = to_numpy_list(X)
        if len(xs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs, got {len(xs)}")
        return {n: np.ascontiguousarray(x.astype(d, copy=False)) for n, x, d in zip(self.input_names, xs, self._dtypes)}

    def predict(self, X) -> np.ndarray:
        y = self.forward_session.run([self.output_name], self._feed(X))[0]
        return y.reshape(y.shape[0], -1)

    def _explain(self, X, select):
        feed = self._feed(X)
        outputs = self.predict(X).astype(np.float64)
        indexes = np.asarray(select(outputs), np.int64)
        feed["target"] = np.ascontiguousarray(indexes)
        phis = self.session.run(self._shap_names, feed)
        return [p.astype(np.float64) for p in phis], outputs, indexes, self._dtypes[0]
