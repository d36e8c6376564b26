"""deepshap_opt.tf.logger.AttributionCallback: ``model.fit`` ends bit-identical with and without it, the
sink receives the expected records, the event files read back, and the state guard undoes a training
forward."""

from __future__ import annotations

import random

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from deepshap_opt.logging_sinks import FileSink, MemorySink, TensorBoardSink, load_records
from deepshap_opt.tf.logger import AttributionCallback, preserve_training_state

EPOCHS, BATCH = 2, 16          # 96 rows → 6 batches per epoch, 12 optimizer steps


def make_model():
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(4, 3, padding="same"), L.BatchNormalization(),
                              L.ReLU(), L.MaxPooling2D(2), L.Flatten(), L.Dropout(0.3), L.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.random((96, 6, 6, 1)).astype("float32"), rng.integers(0, 3, 96)


def fit(data, callback=None):
    x, y = data
    model = make_model()
    keras.utils.set_random_seed(1)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0,
              callbacks=[callback] if callback is not None else [])
    return model, (random.getstate(), np.random.get_state()[1].copy())


@pytest.fixture(scope="module")
def baseline(data):
    return fit(data)


def assert_same(a, b):
    (ma, ra), (mb, rb) = a, b
    va, vb = ma.variables, mb.variables
    assert len(va) == len(vb)
    for p, q in zip(va, vb):          # weights, BatchNorm moving statistics, dropout's seed-generator state
        assert p.shape == q.shape and np.array_equal(p.numpy(), q.numpy()), p.path
    for p, q in zip(ma.optimizer.variables, mb.optimizer.variables):     # Adam moments and iterations
        assert np.array_equal(p.numpy(), q.numpy()), p.path
    assert ra[0] == rb[0] and np.array_equal(ra[1], rb[1])


@pytest.mark.parametrize("method", ["deepshap", "mfaba"])
def test_fit_is_bit_identical_with_the_callback(data, baseline, method):
    x, _ = data
    explainers = []
    cb = AttributionCallback(x[:8], x[:4], every_n_batches=4, every_n_epochs=1, method=method,
                             method_kwargs={"steps": 5} if method == "mfaba" else None,
                             sink=[MemorySink(), lambda r: explainers.append(cb._explainer)])
    run = fit(data, cb)
    assert_same(baseline, run)
    recs = cb.records
    assert len(explainers) == 4 and all(e is explainers[0] for e in explainers)     # built once, reused
    # per batch at optimizer steps 4, 8, 12; per epoch at steps 6 and 12 (12 already logged: once per step)
    assert [(r.step, r.epoch) for r in recs] == [(4, 0), (6, 0), (8, 1), (12, 1)]
    for r in recs:
        assert r.method == method and r.attributions.shape == (4, 6, 6, 1) and r.channel_axis == 2
        assert r.outputs.shape == (4, 3) and np.isfinite(r.attributions).all()
    if method == "deepshap":   # the cache was rebuilt for the current weights at each log
        assert max(r.metrics["completeness_error"] for r in recs) < 1e-3
        ex = explainers[0]
        assert np.array_equal(ex._fp, ex._fingerprint())       # the last log (step 12) saw the final weights


def test_records_reach_files_and_tensorboard(data, tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    x, y = data
    mem = MemorySink()
    cb = AttributionCallback(x[:8], x[:4], every_n_epochs=1, targets=y[:4],
                             sink=[mem, FileSink(tmp_path / "f"), TensorBoardSink(tmp_path / "tb")],
                             log_on_train_begin=True)
    fit(data, cb)
    cb.close()
    assert [(r.step, r.epoch) for r in mem.records] == [(0, None), (6, 0), (12, 1)]
    assert all(r.targets.tolist() == y[:4].tolist() for r in mem.records)
    assert [r["step"] for r in load_records(tmp_path / "f")] == [0, 6, 12]
    acc = ea_mod.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0,
                                                                     "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("attributions/spearman_first")] == [6, 12]
    assert len(acc.Images("attributions/heatmap")) == 3 and len(acc.Histograms("attributions/histogram")) == 3


def test_preserve_training_state_undoes_a_training_forward(data):
    x, _ = data
    model = make_model()
    model(x[:4], training=False)
    keras.random.uniform((1,))                  # make sure Keras' global seed generator exists
    from keras.src.random.seed_generator import global_seed_generator

    global_state = global_seed_generator().state.numpy().copy()
    before = [v.numpy().copy() for v in model.variables]
    py, npst = random.getstate(), np.random.get_state()[1].copy()
    with preserve_training_state(model):
        model(x[:16], training=True)            # BatchNorm update, dropout draw (seed generator advances)
        keras.random.uniform((2,))              # Keras' global seed generator
        random.random(), np.random.rand()
    for v, b in zip(model.variables, before):
        assert np.array_equal(v.numpy(), b), v.path
    assert np.array_equal(global_seed_generator().state.numpy(), global_state)
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npst)


def test_bad_arguments(data):
    x, _ = data
    with pytest.raises(ValueError, match="method"):
        AttributionCallback(x[:4], x[:2], method="ig")
    with pytest.raises(ValueError, match="every_n_batches"):
        AttributionCallback(x[:4], x[:2], every_n_batches=0)
    with pytest.raises(ValueError, match="targets"):
        AttributionCallback(x[:4], x[:2], targets=[1, 2, 3])
    with pytest.raises(RuntimeError, match="no model"):
        AttributionCallback(x[:4], x[:2]).log()
