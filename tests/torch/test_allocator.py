"""keep_freed_memory: glibc's thresholds are raised for a call and released after it, never where the user
chose an allocator setting, and the values do not depend on it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepshap_opt.torch import DeepExplainer  # noqa: E402
from deepshap_opt.torch import _allocator  # noqa: E402


class FakeLibc:
    """Records mallopt / malloc_trim calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    holder = _allocator._Holder()
    libc = FakeLibc()
    holder.libc, holder.probed = libc, True
    monkeypatch.setattr(_allocator, "_HOLDER", holder)
    return libc


def test_hold_then_release_once_when_nested(fake_libc):
    with _allocator.hold_freed_memory() as outer:
        assert outer
        with _allocator.hold_freed_memory() as inner:
            assert inner
        # the inner exit must not release what the outer block still holds
        assert fake_libc.calls == [("mallopt", p, v) for p, v in _allocator.HOLD]
    assert fake_libc.calls == ([("mallopt", p, v) for p, v in _allocator.HOLD]
                               + [("mallopt", p, v) for p, v in _allocator.RELEASE] + [("malloc_trim", 0)])


def test_released_after_an_error(fake_libc):
    with pytest.raises(RuntimeError):
        with _allocator.hold_freed_memory():
            raise RuntimeError("inside")
    assert fake_libc.calls[-1] == ("malloc_trim", 0)
    assert _allocator._HOLDER.depth == 0


def test_disabled_does_nothing(fake_libc):
    with _allocator.hold_freed_memory(False) as active:
        assert not active
    assert fake_libc.calls == []


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}])
def test_user_settings_are_left_alone(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _allocator._glibc() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_found_on_linux(monkeypatch):
    for k in (*_allocator._USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    libc = _allocator._glibc()
    if libc is None:
        pytest.skip("not glibc")
    assert libc.mallopt(_allocator.M_TRIM_THRESHOLD, 128 * 1024) == 1


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 3)).double().eval()


@pytest.mark.parametrize("keep", [None, True, False])
def test_values_do_not_depend_on_keep_freed_memory(fake_libc, keep):
    model = _cnn()
    bg, X = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    ref = DeepExplainer(model, bg, keep_freed_memory=False).shap_values(X)
    fake_libc.calls.clear()
    got = DeepExplainer(model, bg, keep_freed_memory=keep).shap_values(X)
    np.testing.assert_array_equal(got, ref)
    held = bool(fake_libc.calls)
    # None: this model's temporaries are far below glibc's own 32 MiB ceiling, so nothing is changed
    assert held == bool(keep)
    if held:
        assert fake_libc.calls[-1] == ("malloc_trim", 0)


def test_auto_holds_for_large_temporaries(fake_libc):
    model = _cnn()
    e = DeepExplainer(model, torch.randn(4, 1, 8, 8, dtype=torch.float64))
    x = torch.zeros(1)
    big_rows = _allocator.MIN_HOLD_BYTES // e._cache.largest_site_nbytes() + 1
    assert e._holds_memory(x, big_rows) and not e._holds_memory(x, 1)
    assert not e._holds_memory(x.to("meta"), big_rows)   # not a CPU tensor: glibc does not serve it
