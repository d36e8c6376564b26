"""ONNX backend: DeepSHAP as an ONNX graph ("one-shot deployment", after ONNXExplainer, arXiv 2309.16916).

``export(model, background, path)`` writes ONE .onnx file holding the forward network and its explanation
graph (the DeepLIFT backward pass written as standard ONNX ops by our own reverse-mode differentiation, with
the references' activations cached). Any ONNX runtime serves it: its outputs are the model's outputs plus
``shap_values`` (and ``shap_indexes`` for ranked modes).

``DeepExplainer(model_or_path, data)`` is the drop-in ``shap.DeepExplainer`` API, running in onnxruntime.

Importing this module does not import torch or tensorflow; they are imported only when a torch module or a
Keras model is passed.
"""

from __future__ import annotations

import os

from ._convert import load_model, to_numpy_list

__all__ = ["DeepExplainer", "build", "export"]

#: protobuf's limit; above it the initializers go to an external data file next to the .onnx file
_PROTO_LIMIT = 2_000_000_000
#: default bound on one run of the exported explanation (bytes; see ``export``)
_DEFAULT_BUDGET = 1 << 30


def build(model, background, *, outputs="top1", opset=None, cache="auto", output_name=None,
          memory_budget=_DEFAULT_BUDGET):
    """The explanation model as an ``onnx.ModelProto`` (see :func:`export` for the arguments)."""
    from ._convert import check_background, check_background_arrays
    from ._graph import ExplanationBuilder, prepare_model

    bg = to_numpy_list(background)
    check_background_arrays(bg)
    proto = load_model(model, bg, opset)
    proto = prepare_model(proto, opset)
    bg = check_background(proto, bg)
    builder = ExplanationBuilder(proto, bg, outputs=outputs, cache=cache, output_name=output_name,
                                 memory_budget=memory_budget)
    return builder.build()


def export(model, background, path, *, outputs="top1", opset=None, cache="auto", output_name=None,
           memory_budget=_DEFAULT_BUDGET, check=True):
    """Export ``model`` and its DeepSHAP explanation graph to ONE .onnx file at ``path``.

    Parameters
    ----------
    model: an ``onnx.ModelProto`` or a path to one, a ``torch.nn.Module`` (exported with
        ``torch.onnx.export``) or a Keras model (converted with tf2onnx).
    background: the references, an array ``(M, *in)`` (a list of arrays for several inputs).
    outputs: what is explained: ``"top1"`` / ``"topk:K"`` (ranked by the prediction; the file then also
        outputs ``shap_indexes``), ``"all"`` (every output), an int (that output) or ``"target"`` (an int64 graph
        input ``target`` of shape ``(N, S)`` picks the outputs at run time).
    opset: the file's opset (default: the model's, at least 17).
    cache: ``"embed"`` (the references' activations at every rule site are stored in the file),
        ``"recompute"`` (only the background is stored; a copy of the forward graph recomputes the
        activations from it, which onnxruntime folds into constants when the session is created),
        ``"runtime"`` (the same copy, made to depend on the run's batch size so that no runtime can fold it:
        it runs in every call, and the session holds only the weights and the background) or ``"auto"``
        (embed while that adds at most 64 MB or half the weights' size, else recompute while the activations
        are at most 2 GiB (folding them at load holds ~4x that), else embed: over protobuf's 2 GB the file's
        initializers go to external data, which onnxruntime maps from disk). Only the activations the
        backward rules read are cached (a ReLU's output is derived from its input's in the run).
    output_name: which graph output to explain (default: the first).
    memory_budget: bytes that one run of the explanation may hold (default 1 GiB; estimated as 16 × the
        largest activation per (explicand, output, reference) row). The explanation is written inside an ONNX
        ``Loop`` over chunks of explicands sized to fit it (at least one explicand, i.e. ``S·M`` rows, per
        iteration), so the file's peak memory does not grow with the batch. ``None``: no Loop, one run over
        all ``N·S·M`` rows (the peak grows with ``N``).

    The file's outputs are the model's outputs plus ``shap_values`` ``(N, *in, S)`` (``shap_values_<input>``
    per input when there are several) and, for ranked modes, ``shap_indexes`` ``(N, S)``. The expected value
    ``E[f(background)]`` is stored in the metadata key ``deepshap_opt.expected_value``. Returns the path.
    """
    import onnx

    proto = build(model, background, outputs=outputs, opset=opset, cache=cache, output_name=output_name,
                  memory_budget=memory_budget)
    path = os.fspath(path)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size > _PROTO_LIMIT:
        loc = os.path.basename(path) + ".data"
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=loc,
                        size_threshold=1024)
        if check:
            onnx.checker.check_model(path, full_check=True)
    else:
        onnx.save_model(proto, path)
        if check:
            onnx.checker.check_model(proto, full_check=True)
    return path


def DeepExplainer(model_or_path, data, **kwargs):
    """Drop-in ``shap.DeepExplainer`` running in onnxruntime; see :class:`ONNXDeepExplainer`."""
    from ._explainer import ONNXDeepExplainer

    return ONNXDeepExplainer(model_or_path, data, **kwargs)
