"""deepshap_opt.torch.AttributionLogger: training is bit-identical with and without it, the sink gets the
expected records, the explainer's cache follows the weights, the Lightning callback."""

from __future__ import annotations

import importlib
import random
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from deepshap_opt import UnsupportedOperatorError
from deepshap_opt.logging_sinks import FileSink, MemorySink, load_records
from deepshap_opt.torch import AttributionLogger
from deepshap_opt.torch.explainer import _fingerprint
from deepshap_opt.torch.logger import preserve_training_state

STEPS, EVERY = 12, 4
FIELDS = {"step", "epoch", "method", "attributions", "targets", "predictions", "outputs", "metrics",
          "feature_share", "inputs", "channel_axis", "wall_time", "seconds"}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 4 * 4, 3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and far steadier on a shared machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return x, y


def train(data, mode=None, method="deepshap", sink=None, steps=STEPS, every=EVERY, **kw):
    """Train a dropout + BatchNorm CNN with Adam; mode None (no hook), "attach" or "step"."""
    x, y = data
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    logger = None
    if mode is not None:
        logger = AttributionLogger(model, x[:8], x[:4], every_n_steps=every, method=method, sink=sink,
                                   method_kwargs={"steps": 5} if method == "mfaba" else None, **kw)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    if mode == "attach":
        logger.attach(opt)
    for i in range(1, steps + 1):
        idx = torch.randperm(len(x))[:16]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if mode == "step":
            logger.step(i)          # between backward and opt.step: .grad must survive the log untouched
        opt.step()
        random.random()
        np.random.rand()
    if logger is not None:
        logger.detach()
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return model, opt, logger, rng


def assert_same_training(a, b):
    (ma, oa, _, ra), (mb, ob, _, rb) = a, b
    assert ma.training == mb.training and all(p.training == q.training for p, q in zip(ma.modules(), mb.modules()))
    for (k, v), (k2, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k                       # parameters and BN running statistics
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p.grad, q.grad)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)     # Adam moments and step counts
    assert torch.equal(ra[0], rb[0]) and ra[1] == rb[1] and np.array_equal(ra[2], rb[2])


@pytest.fixture(scope="module")
def baseline(data):
    return train(data)


@pytest.mark.parametrize("mode,method", [("attach", "deepshap"), ("step", "deepshap"), ("attach", "mfaba")])
def test_training_is_bit_identical_with_the_hook(data, baseline, mode, method):
    run = train(data, mode, method)
    assert_same_training(baseline, run)
    records = run[2].records
    assert [r.step for r in records] == [4, 8, 12]
    for r in records:
        assert FIELDS <= set(vars(r)) and r.method == method
        assert r.attributions.shape == (4, 1, 8, 8) and r.attributions.dtype == np.float64
        assert r.targets.shape == (4,) and r.outputs.shape == (4, 3) and r.channel_axis == 0
        assert np.isfinite(r.attributions).all() and np.abs(r.attributions).sum() > 0
    assert np.isnan(records[0].metrics["spearman_prev"])
    for key in ("spearman_prev", "spearman_first", "topk_prev", "topk_first"):
        assert -1 <= records[-1].metrics[key] <= 1


def test_cache_follows_the_weights_with_one_explainer(data):
    """One explainer for the whole run; its reference cache matches the current weights at every log, and
    the attributions are complete with respect to the current model."""
    seen = []

    def check(record):
        ex = logger._explainer
        seen.append((id(ex), ex._cache.fingerprint == _fingerprint(logger.model), record.metrics["completeness_error"]))

    x, y = data
    model = make_model()
    logger = AttributionLogger(model, x[:8], x[:4], every_n_steps=2, targets=y[:4], sink=check)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with logger.attach(opt):
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            opt.step()
    assert len(seen) == 3 and len({s[0] for s in seen}) == 1
    assert all(s[1] for s in seen) and max(s[2] for s in seen) < 1e-4
    opt.step()                                                         # detached by the with block
    assert len(seen) == 3 and logger.global_step == 6


def test_fixed_targets_and_records_in_files(data, tmp_path):
    """Records reach every sink of a list; the file sink reads back the same arrays. (TensorBoard event
    files are read back with EventAccumulator in tests/test_logging_sinks.py and tests/tf/test_logger.py.)"""
    x, y = data
    mem, calls = MemorySink(), []
    _, _, logger, _ = train(data, "attach", sink=[mem, FileSink(tmp_path / "files"), calls.append], targets=y[:4])
    logger.close()
    assert [r.targets.tolist() for r in mem.records] == [y[:4].tolist()] * 3 and calls == mem.records
    recs = load_records(tmp_path / "files")
    assert [r["step"] for r in recs] == [4, 8, 12]
    assert all(r["metrics"]["completeness_error"] < 1e-4 for r in recs)
    np.testing.assert_array_equal(recs[-1]["attributions"], mem.records[-1].attributions)
    np.testing.assert_array_equal(recs[-1]["inputs"], x[:4].numpy())


def test_tabular_probe_gets_feature_shares():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(32, 4)
    logger = AttributionLogger(model, x[:8], x[8:12], every_n_steps=1, feature_names=["a", "b", "c", "d"],
                               top_k=2)
    rec = logger.step()
    assert rec.channel_axis is None and rec.feature_share.shape == (4,)
    assert rec.feature_share.sum() == pytest.approx(1.0)
    assert [rec.metrics[f"share/{n}"] for n in "abcd"] == pytest.approx(rec.feature_share.tolist())


def test_preserve_training_state_undoes_a_training_forward(data):
    """The guard itself: a forward in train mode (dropout draws, BatchNorm updates), a backward and RNG
    draws inside it leave no trace."""
    x, y = data
    model = make_model().train()
    model[1].eval()                                                    # mixed modes survive too
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    grad_objs = [p.grad for p in model.parameters()]
    bn = {k: v.clone() for k, v in model.state_dict().items()}
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with preserve_training_state(model):
        model.train()
        for p in model.parameters():
            p.grad = None
        nn.functional.cross_entropy(model(x[8:16]), y[8:16]).backward()
        random.random(), np.random.rand(), torch.rand(3)
        model.eval()
    assert model.training and not model[1].training and model[5].training
    assert all(p.grad is g and torch.equal(g, c) for p, g, c in zip(model.parameters(), grad_objs, grads))
    assert all(torch.equal(v, bn[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_step_counting_and_manual_log(data):
    x, _ = data
    logger = AttributionLogger(make_model(), x[:4], x[:2], every_n_steps=3)
    assert [logger.step() is not None for _ in range(7)] == [False, False, True, False, False, True, False]
    assert logger.step(6) is None                                      # once per step
    rec = logger.log(100, epoch=2)
    assert (rec.step, rec.epoch) == (100, 2) and len(logger.records) == 3
    assert logger.step(0) is not None                                 # step 0: the initial model, if asked


def test_bad_arguments_and_errors(data):
    x, _ = data
    model = make_model()
    with pytest.raises(ValueError, match="method"):
        AttributionLogger(model, x[:4], x[:2], method="ig")
    with pytest.raises(ValueError, match="every_n_steps"):
        AttributionLogger(model, x[:4], x[:2], every_n_steps=0)
    with pytest.raises(ValueError, match="differ"):
        AttributionLogger(model, x[:4], x[:2, :, :4])
    with pytest.raises(ValueError, match="targets"):
        AttributionLogger(model, x[:4], x[:2], targets=[0, 1, 2])
    logger = AttributionLogger(model, x[:4], x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logger.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        logger.attach(opt)
    logger.detach()

    class Gate(nn.Module):   # a data-dependent mask has no DeepSHAP rule
        def forward(self, x):
            h = x.flatten(1)
            return torch.stack([torch.where(h > 0.5, h, 0).sum(1), h.sum(1)], 1)

    warn = AttributionLogger(Gate(), x[:4], x[:2], every_n_steps=1, on_error="warn")
    with pytest.warns(UserWarning, match="failed"):
        assert warn.step() is None
    with pytest.raises(UnsupportedOperatorError):
        AttributionLogger(Gate(), x[:4], x[:2], every_n_steps=1).step()


# ---- Lightning -------------------------------------------------------------------------------------------
def test_lightning_module_without_lightning_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "deepshap_opt.torch.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("deepshap_opt.torch.lightning")
    monkeypatch.delitem(sys.modules, "deepshap_opt.torch.lightning", raising=False)


def test_lightning_callback_logic_with_a_stub_lightning(monkeypatch, data):
    """The callback's hooks, driven by hand with a stand-in ``lightning.pytorch.Callback`` (lightning itself
    is optional and may be absent)."""
    pl = types.ModuleType("lightning.pytorch")
    pl.Callback = type("Callback", (), {})
    root = types.ModuleType("lightning")
    root.pytorch = pl
    monkeypatch.setitem(sys.modules, "lightning", root)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", pl)
    monkeypatch.delitem(sys.modules, "deepshap_opt.torch.lightning", raising=False)
    mod = importlib.import_module("deepshap_opt.torch.lightning")
    try:
        x, _ = data
        model = make_model()
        cb = mod.AttributionCallback(x[:4], x[:2], every_n_steps=2)
        trainer = types.SimpleNamespace(global_step=0, current_epoch=0, log_dir=None)
        cb.setup(trainer, model, "fit")
        for gs in [0, 1, 1, 2, 2, 3, 4]:                     # gradient accumulation repeats global steps
            trainer.global_step = gs
            cb.on_train_batch_end(trainer, model, None, None, 0)
        assert [r.step for r in cb.records] == [2, 4]
        cb.on_train_end(trainer, model)
    finally:
        monkeypatch.delitem(sys.modules, "deepshap_opt.torch.lightning", raising=False)


def test_lightning_trainer_fit(tmp_path, data):
    L = pytest.importorskip("lightning.pytorch")
    from deepshap_opt.torch.lightning import AttributionCallback

    x, y = data

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, inp):
            return self.net(inp)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cb = AttributionCallback(x[:4], x[:2], every_n_steps=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], default_root_dir=str(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Module(), loader)
    assert [r.step for r in cb.records] == [2, 4]
