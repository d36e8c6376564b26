"""Argument checks of the training-time loggers and of torch MFABA: each bad argument is a readable
``TypeError``/``ValueError`` naming it; a failing TF log with ``on_error="warn"`` warns and training goes on."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepshap_opt.torch import MFABA, AttributionLogger


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


BG, PROBE = torch.randn(5, 4), torch.randn(3, 4)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"model": "not a module"}, TypeError, "model must be a torch.nn.Module"),
    ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'warn'"),
    ({"probe": [[1.0, 2.0]]}, TypeError, "probe must be a torch.Tensor or numpy array"),
    ({"probe": torch.ones(3, 4, dtype=torch.int64)}, TypeError, "probe must be floating point"),
    ({"probe": torch.ones(4)}, ValueError, "probe must be a non-empty batch"),
    ({"targets": [0.5, 1.0, 2.0]}, TypeError, "targets must be integer class indexes"),
])
def test_torch_logger_argument_errors(kwargs, exc, match):
    args = {"model": _net(), "background": BG, "probe": PROBE, **kwargs}
    with pytest.raises(exc, match=match):
        AttributionLogger(args.pop("model"), args.pop("background"), args.pop("probe"), **args)


def test_torch_logger_numpy_inputs_attach_and_repr():
    pd = pytest.importorskip("pandas")
    model = _net()
    logger = AttributionLogger(model, pd.DataFrame(BG.numpy()), PROBE.numpy(), every_n_steps=2)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        logger.attach("sgd")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with logger.attach(opt, start_step=10):
        for _ in range(2):
            opt.zero_grad()
            model(PROBE).sum().backward()
            opt.step()
    assert [r.step for r in logger.records] == [12]          # steps 11, 12: one log at the multiple of 2
    assert repr(logger).startswith("AttributionLogger(method='deepshap', every_n_steps=2, probe=(3, 4)")


def test_torch_mfaba_argument_errors():
    model = _net()
    m = MFABA(model, data_min=-5.0, data_max=5.0)
    with pytest.raises(ValueError, match="non-empty batch"):
        m.attribute(torch.ones(4))
    with pytest.raises(ValueError, match="data_min must not exceed data_max"):
        MFABA(model, data_min=torch.ones(4), data_max=torch.zeros(4)).attribute(torch.zeros(2, 4) + 0.5)
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="one tensor of class scores"):
        MFABA(Pair(), data_min=-5.0, data_max=5.0).attribute(PROBE)


def test_torch_mfaba_parameterless_model_runs_on_cpu():
    m = MFABA(torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Softmax(1)), data_min=-5.0, data_max=5.0, steps=3)
    a = m.attribute(PROBE, target=0)
    assert a.shape == PROBE.shape and a.device.type == "cpu"


# ---- TF --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("keras")


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'warn'"),
    ({"probe": np.ones((3, 4), np.int32)}, TypeError, "probe must be a floating-point array"),
    ({"probe": np.ones(4, np.float32)}, ValueError, "probe must be a non-empty batch"),
    ({"probe": np.ones((3, 5), np.float32)}, ValueError, "probe rows .* and background rows .* differ"),
    ({"targets": np.array([0.5, 1.0, 2.0])}, TypeError, "targets must be integer class indexes"),
])
def test_tf_callback_argument_errors(keras, kwargs, exc, match):
    from deepshap_opt.tf import AttributionCallback

    args = {"background": np.zeros((5, 4), np.float32), "probe": np.ones((3, 4), np.float32), **kwargs}
    with pytest.raises(exc, match=match):
        AttributionCallback(**args)


def test_tf_callback_failing_log_warns_and_tensor_inputs(keras):
    import tensorflow as tf

    from deepshap_opt.tf import AttributionCallback

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    cb = AttributionCallback(tf.constant(np.zeros((5, 4), np.float32)), tf.constant(np.ones((3, 4), np.float32)),
                             targets=7, on_error="warn", every_n_epochs=2)     # class 7 of 3: the log fails
    cb.set_model(model)
    with pytest.warns(UserWarning, match="AttributionCallback: the log at step 0 failed"):
        assert cb.log() is None
    cb.on_epoch_end(0)                  # every second epoch only: nothing logged, nothing raised
    assert cb.records == []
