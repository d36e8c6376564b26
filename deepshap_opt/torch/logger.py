"""``AttributionLogger``: log a probe batch's attributions while a PyTorch model trains.

Three ways to drive it (see docs/training_hooks.md)::

    logger = AttributionLogger(model, background, probe, every_n_steps=100, sink=TensorBoardSink("runs/x"))
    with logger.attach(optimizer):            # 1. an Optimizer step post-hook
        train(...)
    for step, batch in enumerate(loader, 1):  # 2. a hand-written loop
        ...; optimizer.step(); logger.step(step)
    trainer = Trainer(callbacks=[deepshap_opt.torch.lightning.AttributionCallback(...)])   # 3. Lightning

The hook does not change training: the modules' train/eval modes, buffers (BatchNorm running statistics),
parameters' ``.grad``, the optimizer and the random-number generators (torch CPU and initialised CUDA
generators, ``random``, NumPy's global generator) are as they were before each log. The explainer is
built once; the DeepSHAP backend rebuilds its reference cache by itself when the weights changed.
"""

from __future__ import annotations

import random
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..logging_sinks import RecordBuilder, as_sink, find_memory_records

__all__ = ["METHODS", "AttributionLogger", "preserve_training_state"]

METHODS = ("deepshap", "mfaba")


@contextmanager
def preserve_training_state(model: nn.Module):
    """Everything a log could touch, restored afterwards: the modules' modes, grad mode, each parameter's
    ``.grad`` (the tensor object, so accumulation continues into the same one), buffers (restored only
    where they changed, so their version counters stay untouched otherwise), and the RNG states."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grad_enabled = torch.is_grad_enabled()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_enabled)
        for m, t in modes:
            m.training = t
        for p, g in grads:
            if p.grad is not g:
                p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape != saved.shape or not torch.equal(b, saved):
                    b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)


def _first_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _as_tensor(x, name: str) -> torch.Tensor:
    if hasattr(x, "values") and hasattr(x, "columns"):
        x = x.values
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array (a single input), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, *in), got shape {tuple(x.shape)}")
    return x.detach()


class AttributionLogger:
    """Explains a fixed ``probe`` batch every ``every_n_steps`` training steps and writes the result.

    Args:
        model: the ``nn.Module`` being trained (single tensor input, outputs (N, K)).
        background: references for DeepSHAP (M, *in) (unused by MFABA but checked for shape).
        probe: the inputs whose attributions are tracked (N, *in); keep it small (8–32 rows).
        every_n_steps: log when the global step is a multiple of this.
        method: "deepshap" (:class:`~deepshap_opt.torch.DeepExplainer`) or "mfaba"
            (:class:`~deepshap_opt.torch.MFABA`).
        targets: the class explained per probe row: None (the model's prediction at each log), an int, or
            (N,) ints — pass the probe's labels to follow the same class through training.
        sink: where records go (see :mod:`deepshap_opt.logging_sinks`): a Sink, a callable, a list of those;
            None keeps them in memory (``logger.records``).
        method_kwargs: passed to the explainer (e.g. ``batch_size`` for DeepSHAP, ``steps``/``data_min``/
            ``data_max`` for MFABA).
        top_k, feature_names: drift-metric options (:class:`~deepshap_opt.logging_sinks.DriftTracker`).
        channel_axis: the channel axis of one probe row for the heat-map ("auto": 0 for (C, H, W)).
        on_error: "raise" (default) or "warn" — a failing log warns and training goes on.
    """

    def __init__(self, model: nn.Module, background, probe, every_n_steps: int = 100, method: str = "deepshap",
                 targets=None, sink=None, method_kwargs: dict | None = None, top_k: int | None = None,
                 feature_names=None, channel_axis="auto", on_error: str = "raise"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, (int, np.integer)) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.model = model
        self.background = _as_tensor(background, "background")
        self.probe = _as_tensor(probe, "probe")
        if self.background.shape[1:] != self.probe.shape[1:]:
            raise ValueError(f"probe rows {tuple(self.probe.shape[1:])} and background rows "
                             f"{tuple(self.background.shape[1:])} differ")
        self.every_n_steps = int(every_n_steps)
        self.method = method
        self.method_kwargs = dict(method_kwargs or {})
        self.targets = self._check_targets(targets)
        self.on_error = on_error
        if channel_axis == "auto":
            channel_axis = 0 if self.probe.dim() == 4 else None
        self.sink = as_sink(sink)
        self._builder = RecordBuilder(self.sink, method, self.probe.cpu().numpy(), channel_axis, top_k, feature_names)
        self.global_step = 0
        self._last_logged: int | None = None
        self._explainer = None
        self._device = None
        self._handle = None

    # ---- configuration -------------------------------------------------------------------------------
    def _check_targets(self, targets):
        if targets is None:
            return None
        t = np.asarray(targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else targets)
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

    # ---- the three ways of driving it ----------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, start_step: int | None = None) -> AttributionLogger:
        """Log from an ``Optimizer.register_step_post_hook``: each optimizer step counts as one global step.

        Returns self, which is a context manager that detaches on exit (or call :meth:`detach`).
        """
        if self._handle is not None:
            raise RuntimeError("this logger is already attached to an optimizer; detach() it first")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if start_step is not None:
            self.global_step = int(start_step)
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        """Remove the optimizer hook (if attached) and flush the sink."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.sink.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def step(self, global_step: int | None = None, epoch: int | None = None):
        """Count one step (or set the global step to ``global_step``) and log if it is a multiple of
        ``every_n_steps`` (once per step). Returns the record or None."""
        self.global_step = self.global_step + 1 if global_step is None else int(global_step)
        if self.global_step % self.every_n_steps or self.global_step == self._last_logged:
            return None
        return self.log(self.global_step, epoch)

    # ---- one log ---------------------------------------------------------------------------------------
    def log(self, step: int | None = None, epoch: int | None = None):
        """Explain the probe now and write a record (at ``step``, default the current global step)."""
        step = self.global_step if step is None else int(step)
        t0 = time.perf_counter()
        try:
            with preserve_training_state(self.model):
                attributions, targets, outputs, extra = self._attribute()
        except Exception as e:
            if self.on_error == "raise":
                raise
            warnings.warn(f"AttributionLogger: the log at step {step} failed: {type(e).__name__}: {e}", stacklevel=2)
            return None
        self._last_logged = step
        return self._builder.emit(step, epoch, attributions, targets, outputs, time.perf_counter() - t0, extra)

    def _explainer_for(self, device):
        if self._explainer is None or device != self._device:
            bg = self.background.to(device)
            if self.method == "deepshap":
                from .explainer import DeepExplainer

                self._explainer = DeepExplainer(self.model, bg, **self.method_kwargs)
            else:
                from .mfaba import MFABA

                self._explainer = MFABA(self.model, **self.method_kwargs)
            self._device = device
        return self._explainer

    def _attribute(self):
        device = _first_device(self.model)
        self.model.eval()   # modes are restored by preserve_training_state
        explainer = self._explainer_for(device)
        probe = self.probe.to(device)
        fixed = self.targets
        extra = {}
        if self.method == "deepshap":
            select = (lambda out: out.argmax(1)[:, None]) if fixed is None else (lambda out: fixed[:, None])
            # the explainer notices changed parameters/buffers itself and rebuilds its reference cache
            phis, outputs, idx, _ = explainer._explain(probe, select)
            attributions = phis[0][..., 0]
            targets = idx[:, 0]
            ev = np.asarray(explainer.expected_value, np.float64)
            outputs = np.asarray(outputs, np.float64).reshape(len(targets), -1)
            rows = np.arange(len(targets))
            gap = outputs[rows, targets] - ev[targets]
            total = attributions.reshape(len(targets), -1).sum(1)
            scale = max(float(np.abs(outputs).max()), float(np.abs(ev).max()), 1e-12)
            extra["completeness_error"] = float(np.abs(total - gap).max() / scale)
        else:
            with torch.no_grad():
                out = self.model(probe)
            outputs = out.detach().reshape(out.shape[0], -1).double().cpu().numpy()
            targets = outputs.argmax(1) if fixed is None else fixed
            attributions = explainer.attribute(probe, torch.as_tensor(targets, device=device))
            attributions = attributions.detach().double().cpu().numpy()
        return attributions, targets, outputs, extra

    def close(self) -> None:
        """Detach and close the sink (files are closed; in-memory records stay readable)."""
        self.detach()
        self.sink.close()

    def __repr__(self):
        return (f"AttributionLogger(method={self.method!r}, every_n_steps={self.every_n_steps}, "
                f"probe={tuple(self.probe.shape)}, global_step={self.global_step}, logs={self._builder.count})")
