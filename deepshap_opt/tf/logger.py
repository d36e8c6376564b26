"""``AttributionCallback``: a Keras callback logging a probe batch's attributions while a model trains.

    cb = AttributionCallback(background, probe, every_n_epochs=1, sink=TensorBoardSink("logs/attr"))
    model.fit(x, y, epochs=10, callbacks=[cb])

The callback does not change training: the model is explained with ``training=False`` (no dropout draw,
no BatchNorm update), and before returning to ``fit`` the model's non-trainable variables (BatchNorm
moving statistics), its layers' Keras ``SeedGenerator`` states, Keras' global seed generator, TensorFlow's
global ``tf.random.Generator`` (if one exists), Python's ``random`` and NumPy's global generator are put
back as they were. The explainer is built once; the DeepSHAP backend rebuilds its reference cache by
itself when the weights changed.
"""

from __future__ import annotations

import random
import time
import warnings
from contextlib import contextmanager

import keras
import numpy as np

from ..logging_sinks import RecordBuilder, as_sink, find_memory_records

__all__ = ["METHODS", "AttributionCallback", "preserve_training_state"]

METHODS = ("deepshap", "mfaba")


def _seed_generators(model):
    gens = []
    try:
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

        g = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)   # never creates one
        if g is not None:
            gens.append(g)
    except Exception:  # noqa: BLE001, S110  # pragma: no cover - Keras internals moved
        pass
    layers = model._flatten_layers(include_self=True) if hasattr(model, "_flatten_layers") else []
    for layer in layers:
        gens.extend(getattr(layer, "_seed_generators", None) or [])
    return gens


def _tf_global_generator():
    try:
        from tensorflow.python.ops import stateful_random_ops

        return getattr(stateful_random_ops, "global_generator", None)
    except Exception:  # noqa: BLE001  # pragma: no cover - TF internals moved
        return None


@contextmanager
def preserve_training_state(model):
    """Restores, after the block, whatever a log could change: the model's non-trainable variables
    (where they changed), seed-generator states (the model's layers' and Keras' global one), TF's global
    ``tf.random.Generator`` if it exists, Python's ``random`` and NumPy's global generator."""
    variables = []
    seen = set()
    for v in list(getattr(model, "non_trainable_variables", [])) + [g.state for g in _seed_generators(model)]:
        key = id(v)
        if key not in seen:
            seen.add(key)
            variables.append((v, np.array(v.numpy(), copy=True)))
    tf_gen = _tf_global_generator()
    tf_gen_state = tf_gen.state.numpy().copy() if tf_gen is not None else None
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    try:
        yield
    finally:
        for v, saved in variables:
            now = v.numpy()
            if now.shape != saved.shape or not np.array_equal(now, saved):
                v.assign(saved)
        if tf_gen is not None:
            tf_gen.state.assign(tf_gen_state)
        random.setstate(py_rng)
        np.random.set_state(np_rng)


def _as_array(x, name):
    if hasattr(x, "values") and hasattr(x, "columns"):
        x = x.values
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (a single input), got dtype {a.dtype}")
    if a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, *in), got shape {a.shape}")
    return a


class AttributionCallback(keras.callbacks.Callback):
    """Explains a fixed ``probe`` batch during ``model.fit`` and writes the result to ``sink``.

    Args:
        background: references for DeepSHAP (M, *in) (checked but unused by MFABA).
        probe: the inputs whose attributions are tracked (N, *in), laid out as the model takes them.
        every_n_batches: also log when the global step (``model.optimizer.iterations``) is a multiple of
            this; None: no per-batch logs.
        every_n_epochs: log at the end of every n-th epoch; None: no per-epoch logs.
        method: "deepshap" (:class:`deepshap_opt.tf.DeepExplainer`) or "mfaba" (:class:`deepshap_opt.tf.MFABA`).
        targets: None (the model's prediction at each log), an int, or (N,) ints.
        sink, method_kwargs, top_k, feature_names, on_error: as for
            :class:`deepshap_opt.torch.AttributionLogger`.
        channel_axis: channel axis of one probe row for the heat-map ("auto": 2 for (H, W, C)).
        log_on_train_begin: also log the untrained model when ``fit`` starts.
    """

    def __init__(self, background, probe, every_n_batches: int | None = None, every_n_epochs: int | None = 1,
                 method: str = "deepshap", targets=None, sink=None, method_kwargs: dict | None = None,
                 top_k: int | None = None, feature_names=None, channel_axis="auto", on_error: str = "raise",
                 log_on_train_begin: bool = False):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for name, v in (("every_n_batches", every_n_batches), ("every_n_epochs", every_n_epochs)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.background = _as_array(background, "background")
        self.probe = _as_array(probe, "probe")
        if self.background.shape[1:] != self.probe.shape[1:]:
            raise ValueError(f"probe rows {self.probe.shape[1:]} and background rows "
                             f"{self.background.shape[1:]} differ")
        self.every_n_batches = every_n_batches
        self.every_n_epochs = every_n_epochs
        self.method = method
        self.method_kwargs = dict(method_kwargs or {})
        self.targets = self._check_targets(targets)
        self.on_error = on_error
        self.log_on_train_begin = bool(log_on_train_begin)
        if channel_axis == "auto":
            channel_axis = 2 if self.probe.ndim == 4 else None
        self.sink = as_sink(sink)
        self._builder = RecordBuilder(self.sink, method, self.probe, channel_axis, top_k, feature_names)
        self._explainer = None
        self._explained_model = None
        self._batches = 0
        self._epoch = None
        self._last_logged = None

    def _check_targets(self, targets):
        if targets is None:
            return None
        t = np.asarray(targets.numpy() if hasattr(targets, "numpy") else targets)
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"targets must be integer class indexes, got dtype {t.dtype}")
        t = np.broadcast_to(t, (self.probe.shape[0],)) if t.ndim == 0 else t
        if t.shape != (self.probe.shape[0],):
            raise ValueError(f"targets must be an int or one per probe row ({self.probe.shape[0]},), got {t.shape}")
        return t.astype(np.int64)

    @property
    def records(self):
        """The records kept by the first in-memory sink (the default sink), else None."""
        return find_memory_records(self.sink)

    # ---- Keras hooks -----------------------------------------------------------------------------------
    def _global_step(self) -> int:
        opt = getattr(self.model, "optimizer", None)
        it = getattr(opt, "iterations", None)
        if it is not None:
            try:
                return int(np.asarray(it.numpy() if hasattr(it, "numpy") else it))
            except Exception:  # noqa: BLE001, S110  # pragma: no cover - optimizer not built yet
                pass
        return self._batches

    def on_train_begin(self, logs=None):
        if self.log_on_train_begin:
            self.log(self._global_step(), None)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.every_n_batches is None:
            return
        step = self._global_step()
        if step % self.every_n_batches == 0 and step != self._last_logged:
            self.log(step, self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs is None or (epoch + 1) % self.every_n_epochs:
            return
        step = self._global_step()
        if step != self._last_logged:
            self.log(step, epoch)

    def on_train_end(self, logs=None):
        self.sink.flush()

    # ---- one log ---------------------------------------------------------------------------------------
    def log(self, step: int | None = None, epoch: int | None = None):
        """Explain the probe now and write a record; returns it (None if it failed with on_error="warn")."""
        if self.model is None:
            raise RuntimeError("the callback has no model yet: pass it to model.fit(callbacks=[...]) or call "
                               "set_model(model)")
        step = self._global_step() if step is None else int(step)
        t0 = time.perf_counter()
        try:
            with preserve_training_state(self.model):
                attributions, targets, outputs, extra = self._attribute()
        except Exception as e:
            if self.on_error == "raise":
                raise
            warnings.warn(f"AttributionCallback: the log at step {step} failed: {type(e).__name__}: {e}", stacklevel=2)
            return None
        self._last_logged = step
        return self._builder.emit(step, epoch, attributions, targets, outputs, time.perf_counter() - t0, extra)

    def _explainer_for(self, model):
        if self._explainer is None or self._explained_model is not model:
            if self.method == "deepshap":
                from .deep import DeepExplainer

                self._explainer = DeepExplainer(model, self.background, **self.method_kwargs)
            else:
                from .mfaba import MFABA

                self._explainer = MFABA(model, **self.method_kwargs)
            self._explained_model = model
        return self._explainer

    def _attribute(self):
        model = self.model
        explainer = self._explainer_for(model)
        fixed = self.targets
        extra = {}
        if self.method == "deepshap":
            select = (lambda out: out.argmax(1)[:, None]) if fixed is None else (lambda out: fixed[:, None])
            # the explainer compares a fingerprint of the weights on each call and rebuilds its cache
            phis, outputs, idx, _ = explainer._explain(self.probe, select)
            attributions = np.asarray(phis[0])[..., 0]
            targets = np.asarray(idx)[:, 0]
            ev = np.asarray(explainer.expected_value, np.float64)
            outputs = np.asarray(outputs, np.float64).reshape(len(targets), -1)
            rows = np.arange(len(targets))
            gap = outputs[rows, targets] - ev[targets]
            total = attributions.reshape(len(targets), -1).sum(1)
            scale = max(float(np.abs(outputs).max()), float(np.abs(ev).max()), 1e-12)
            extra["completeness_error"] = float(np.abs(total - gap).max() / scale)
        else:
            out = model(self.probe, training=False)
            outputs = np.asarray(out.numpy() if hasattr(out, "numpy") else out, np.float64).reshape(len(self.probe), -1)
            targets = outputs.argmax(1) if fixed is None else fixed
            attributions = np.asarray(explainer.attribute(self.probe, targets), np.float64)
        return attributions, targets, outputs, extra

    def close(self):
        """Close the sink (files are closed; in-memory records stay readable)."""
        self.sink.close()
