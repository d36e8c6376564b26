"""deepshap_opt.torch.mfaba against a per-sample transcription of the MFABA formula."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepshap_opt.torch.mfaba import MFABA, MFABAPath


def small_cnn(dtype=torch.float64, seed=0, extras=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()]
    if extras:
        layers += [torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)]
    layers += [torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
               torch.nn.Linear(8 * 16, 10)]
    return torch.nn.Sequential(*layers).to(dtype).eval()


def images(n=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype)


def reference_mfaba(model, x, target, variant, steps, alpha, epsilon, lo, hi, use_softmax=True,
                    early_stop=True):
    """The formula, one sample at a time, keeping the whole path (as the paper writes it).

    Unlike the reference code it zeroes nothing because it never accumulates: each gradient is a fresh
    ``autograd.grad`` call at one point. The early-stop test is a separate forward, as in the paper's code.
    """
    out = []
    for i in range(x.shape[0]):
        x0, c = x[i:i + 1], int(target[i])
        points, grads = [x0], []
        xt = x0
        for _ in range(steps):
            xg = xt.clone().requires_grad_(True)
            scores = model(xg)
            f = (torch.softmax(scores, 1) if use_softmax else scores)[0, c]
            (g,) = torch.autograd.grad(f, xg)
            if variant == "sharp":
                xt = torch.clamp(xt - 100 * alpha * g / g.norm(), lo, hi)
            else:
                xt = torch.clamp(x0 + torch.clamp(xt - alpha * torch.sign(g) - x0, -epsilon, epsilon), lo, hi)
            points.append(xt.detach())
            grads.append(g)
            if early_stop and int(model(xt).argmax(1)) != c:
                break
        out.append(-sum((points[t + 1] - points[t]) * grads[t] for t in range(len(grads))))
    return torch.cat(out)


# (variant, alpha, use_softmax, early_stop): small and large steps, so some samples stop and some don't
CASES = [
    ("sharp", 0.001, True, True),
    ("sharp", 0.004, True, True),
    ("sharp", 0.002, False, True),
    ("smooth", 0.001, True, True),
    ("smooth", 0.01, True, True),
    ("smooth", 0.01, True, False),
]


@pytest.mark.parametrize("variant,alpha,use_softmax,early_stop", CASES)
def test_matches_per_sample_reference(variant, alpha, use_softmax, early_stop):
    model, x = small_cnn(), images()
    target = model(x).argmax(1)
    kw = dict(variant=variant, steps=30, alpha=alpha, epsilon=0.05, use_softmax=use_softmax,
              early_stop=early_stop)
    A = MFABA(model, **kw).attribute(x)
    R = reference_mfaba(model, x, target, variant, 30, alpha, 0.05, 0.0, 1.0, use_softmax, early_stop)
    assert A.shape == x.shape and A.dtype == x.dtype
    # every coordinate moves against its gradient (clipping shortens moves, never reverses them)
    assert bool((A >= 0).all())
    scale = R.abs().max()
    assert scale > 0
    torch.testing.assert_close(A, R, rtol=1e-5, atol=1e-5 * float(scale))


def test_early_stop_cases_cover_both_outcomes():
    # guards the test above: it must see samples that stop early and samples that run all steps
    model, x = small_cnn(), images()
    _, p = MFABA(model, steps=30, alpha=0.001).attribute(x, return_path=True)
    assert int(p.lengths.min()) < 30
    _, p = MFABA(model, variant="smooth", steps=30, alpha=0.001).attribute(x, return_path=True)
    assert int(p.lengths.max()) == 30


@pytest.mark.parametrize("variant", ["sharp", "smooth"])
def test_given_target_matches_reference(variant):
    model, x = small_cnn(), images()
    target = torch.tensor([3, 1, 4, 1, 5, 9])
    A = MFABA(model, variant=variant, steps=20, alpha=0.003).attribute(x, target)
    R = reference_mfaba(model, x, target, variant, 20, 0.003, 0.3, 0.0, 1.0)
    torch.testing.assert_close(A, R, rtol=1e-5, atol=1e-5 * float(R.abs().max()))


@pytest.mark.parametrize("variant", ["sharp", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_independence(variant, dtype):
    model, x = small_cnn(dtype), images(6, dtype)
    mf = MFABA(model, variant=variant, steps=30, alpha=0.002)
    batch = mf.attribute(x)
    alone = torch.cat([mf.attribute(x[i:i + 1]) for i in range(x.shape[0])])
    reordered = mf.attribute(x.flip(0)).flip(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    scale = float(alone.abs().max())
    torch.testing.assert_close(batch, alone, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(reordered, alone, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("variant", ["sharp", "smooth"])
def test_completeness_to_first_order(variant):
    # Σ A is the first-order estimate of f_c(x0) − f_c(x_T); the gap is second order in the step
    model, x = small_cnn(), images()
    mf = MFABA(model, variant=variant, steps=50, alpha=0.0005)
    A, path = mf.attribute(x, return_path=True)
    rows = torch.arange(x.shape[0])
    with torch.no_grad():
        p0 = torch.softmax(model(x), 1)
        c = p0.argmax(1)
        pT = torch.softmax(model(path.points[path.lengths, rows]), 1)[rows, c]
    drop = p0[rows, c] - pT
    gap = (A.flatten(1).sum(1) - drop).abs()
    assert bool((drop > 0).all())
    assert float((gap / drop).max()) < 0.05, (gap / drop)


def test_path_reconstructs_attribution():
    model, x = small_cnn(), images()
    A, p = MFABA(model, steps=25, alpha=0.002).attribute(x, return_path=True)
    assert isinstance(p, MFABAPath)
    L = p.gradients.shape[0]
    assert p.points.shape == (L + 1,) + x.shape and p.gradients.shape == (L,) + x.shape
    torch.testing.assert_close(p.points[0], x)
    torch.testing.assert_close(-((p.points[1:] - p.points[:-1]) * p.gradients).sum(0), A)
    # finished samples are frozen after their last step
    for i, T in enumerate(p.lengths.tolist()):
        assert torch.equal(p.points[T:, i], p.points[T, i].expand_as(p.points[T:, i]))
        assert not p.gradients[T:, i].any()
        if T < 25:  # stopped early: x_T is classified differently, x_{T-1} is not
            with torch.no_grad():
                c = model(x[i:i + 1]).argmax(1)
                assert model(p.points[T, i:i + 1]).argmax(1) != c
                assert model(p.points[T - 1, i:i + 1]).argmax(1) == c


def test_no_early_stop_runs_all_steps_and_stays_in_bounds():
    model, x = small_cnn(), images()
    _, p = MFABA(model, variant="smooth", steps=12, alpha=0.05, epsilon=0.1,
                 early_stop=False).attribute(x, return_path=True)
    assert p.lengths.tolist() == [12] * x.shape[0]
    assert float(p.points.min()) >= 0.0 and float(p.points.max()) <= 1.0
    assert float((p.points - x).abs().max()) <= 0.1 + 1e-12


def test_one_forward_per_step():
    # the early-stop test reuses the next step's forward: at most `steps` forwards, never 2 per step
    model, x = small_cnn(), images()
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    _, p = MFABA(model, steps=30, alpha=0.001).attribute(x, return_path=True)
    h.remove()
    assert len(calls) == min(30, int(p.lengths.max()) + 1)


def test_parameters_untouched_and_modes_restored():
    model = small_cnn(extras=True).train()
    model[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MFABA(model, steps=5).attribute(images())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model[0].training
    assert all(m.training for i, m in enumerate(model) if i != 0)
    for k, v in model.state_dict().items():  # eval mode: BatchNorm running stats not updated
        assert torch.equal(v, before[k]), k


def test_eval_mode_makes_train_mode_models_batch_independent():
    model, x = small_cnn(extras=True).train(), images()
    mf = MFABA(model, steps=10, alpha=0.002)
    torch.testing.assert_close(mf.attribute(x)[:1], mf.attribute(x[:1]))


def test_numpy_in_numpy_out_and_targets():
    model, x = small_cnn(), images()
    mf = MFABA(model, steps=10, alpha=0.002)
    A = mf.attribute(x.numpy())
    assert isinstance(A, np.ndarray) and A.shape == tuple(x.shape)
    np.testing.assert_allclose(A, mf.attribute(x).numpy())
    pred = model(x).argmax(1)
    np.testing.assert_allclose(mf.attribute(x, target=pred).numpy(), A)
    np.testing.assert_allclose(mf.attribute(x, target=pred.numpy()).numpy(), A)
    # an int target explains the same class for every sample
    torch.testing.assert_close(mf.attribute(x, target=2), mf.attribute(x, target=[2] * x.shape[0]))
    _, p = mf.attribute(x.numpy(), return_path=True)
    assert isinstance(p.points, np.ndarray)


def test_per_channel_bounds():
    model, x = small_cnn(), images()
    lo, hi = torch.full((1, 1, 1), -0.5, dtype=x.dtype), torch.full((1, 1, 1), 1.5, dtype=x.dtype)
    _, p = MFABA(model, steps=10, alpha=0.05, data_min=lo, data_max=hi).attribute(x, return_path=True)
    assert float(p.points.min()) >= -0.5 and float(p.points.max()) <= 1.5


def test_shap_values_layout():
    model, x = small_cnn(), images(3)
    mf = MFABA(model, steps=5, alpha=0.002)
    v, idx = mf.shap_values(x, ranked_outputs=2)
    assert v.shape == (3, 1, 8, 8, 2) and v.dtype == np.float64 and idx.shape == (3, 2)
    np.testing.assert_array_equal(idx[:, 0], model(x).argmax(1).numpy())
    np.testing.assert_allclose(v[..., 0], mf.attribute(x).numpy())
    assert mf.shap_values(x[:1]).shape == (1, 1, 8, 8, 10)


class Vector(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


class Sequence3d(torch.nn.Module):
    def forward(self, x):
        return x.flatten(2)


def test_errors():
    model, x = small_cnn(), images()
    mf = MFABA(model)
    with pytest.raises(ValueError, match="target out of range"):
        mf.attribute(x, target=10)
    with pytest.raises(ValueError, match="target out of range"):
        mf.attribute(x, target=-1)
    with pytest.raises(ValueError, match="one entry per sample"):
        mf.attribute(x, target=[1, 2])
    with pytest.raises(TypeError, match="integer class"):
        mf.attribute(x, target=1.5)
    with pytest.raises(ValueError, match=r"\[data_min, data_max\]"):
        mf.attribute(x + 1.0)
    with pytest.raises(ValueError, match=r"\[data_min, data_max\]"):
        mf.attribute(x - 0.5)
    with pytest.raises(ValueError, match="do not broadcast"):
        MFABA(model, data_min=torch.zeros(2, 1, 1)).attribute(x)
    with pytest.raises(TypeError, match="floating-point"):
        mf.attribute((x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="floating-point"):
        mf.attribute(np.zeros((1, 1, 8, 8), dtype=np.int64))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        mf.attribute([[0.0]])
    with pytest.raises(ValueError, match="class dimension"):
        MFABA(Vector()).attribute(x)
    with pytest.raises(ValueError, match="class dimension"):
        MFABA(Sequence3d()).attribute(x)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MFABA(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1).double())).attribute(x)
    with pytest.raises(ValueError, match="variant"):
        MFABA(model, variant="blunt")
    with pytest.raises(ValueError, match="steps"):
        MFABA(model, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        MFABA(model, alpha=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MFABA(lambda z: z)


def test_single_logit_without_softmax_is_allowed():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)).double()
    A = MFABA(model, steps=5, use_softmax=False).attribute(images(2), target=0)
    assert A.shape == (2, 1, 8, 8) and bool(torch.isfinite(A).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, x = small_cnn(), images()
    mf = MFABA(model, steps=30, alpha=0.002)
    cpu = mf.attribute(x)
    mf.model = model.cuda()
    gpu = mf.attribute(x.cuda())
    model.cpu()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("early_stop", [False, True])
def test_cuda_no_per_step_host_sync(early_stop):
    # torch warns on every synchronising call; their number must not grow with the number of steps
    import warnings

    model, x = small_cnn().cuda(), images().cuda()
    target = model(x).argmax(1)
    counts = []
    for steps in (5, 40):
        mf = MFABA(model, steps=steps, alpha=1e-5, early_stop=early_stop)  # tiny steps: nobody stops early
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                mf.attribute(x, target)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(m.message) for m in w))
    assert counts[0] == counts[1], counts
