"""PyTorch Lightning callback logging attributions during ``Trainer.fit`` (needs ``lightning`` or
``pytorch_lightning``; importing this module without either raises an ImportError saying so).

    from deepshap_opt.torch.lightning import AttributionCallback
    trainer = lightning.pytorch.Trainer(callbacks=[AttributionCallback(background, probe, every_n_steps=100)])

It wraps an :class:`deepshap_opt.torch.AttributionLogger` on the ``LightningModule`` being trained and logs
when ``trainer.global_step`` (optimizer steps taken) is a multiple of ``every_n_steps`` — once per step,
also with gradient accumulation. With ``sink=None`` and a trainer that has a ``log_dir`` (its TensorBoard
logger's directory), the records go to a :class:`~deepshap_opt.logging_sinks.TensorBoardSink` in
``<log_dir>/attributions`` and are also kept in memory (``callback.records``).
"""

from __future__ import annotations

import os

try:
    from lightning.pytorch import Callback as _Callback
except ImportError:
    try:
        from pytorch_lightning import Callback as _Callback
    except ImportError as e:
        raise ImportError(
            "deepshap_opt.torch.lightning needs PyTorch Lightning: pip install lightning (or pytorch-lightning). "
            "Without it, use deepshap_opt.torch.AttributionLogger directly: logger.attach(optimizer) or "
            "logger.step(global_step) in your loop.") from e

from ..logging_sinks import MemorySink, TensorBoardSink
from .logger import AttributionLogger

__all__ = ["AttributionCallback"]


class AttributionCallback(_Callback):
    """Lightning ``Callback`` around :class:`~deepshap_opt.torch.AttributionLogger`.

    Takes the logger's arguments except ``model`` (the trained ``LightningModule`` is used, or ``model``
    to explain a submodule of it, e.g. ``model=lambda pl_module: pl_module.net``).
    """

    def __init__(self, background, probe, every_n_steps: int = 100, method: str = "deepshap", targets=None,
                 sink=None, model=None, **logger_kwargs):
        super().__init__()
        self.background, self.probe = background, probe
        self.every_n_steps, self.method, self.targets, self.sink = every_n_steps, method, targets, sink
        self.model = model
        self.logger_kwargs = logger_kwargs
        self.logger: AttributionLogger | None = None

    @property
    def records(self):
        return None if self.logger is None else self.logger.records

    def _module(self, pl_module):
        return self.model(pl_module) if callable(self.model) and not hasattr(self.model, "parameters") else (
            self.model if self.model is not None else pl_module)

    def setup(self, trainer, pl_module, stage=None):
        if self.logger is not None:
            return
        sink = self.sink
        if sink is None:
            log_dir = getattr(trainer, "log_dir", None)
            sink = [MemorySink()] + ([TensorBoardSink(os.path.join(log_dir, "attributions"))] if log_dir else [])
        self.logger = AttributionLogger(self._module(pl_module), self.background, self.probe, self.every_n_steps,
                                        self.method, self.targets, sink, **self.logger_kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.logger is None:
            self.setup(trainer, pl_module)
        step = int(trainer.global_step)
        if step > 0:   # global_step 0: no optimizer step yet (gradient accumulation's first batches)
            self.logger.step(step, epoch=int(trainer.current_epoch))

    def on_train_end(self, trainer, pl_module):
        if self.logger is not None:
            self.logger.sink.flush()

    def teardown(self, trainer, pl_module, stage=None):
        if self.logger is not None and stage in (None, "fit"):
            self.logger.sink.flush()
