"""Sinks and drift metrics of the training hooks (NumPy + tensorboard only, no framework)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepshap_opt import logging_sinks as ls

ROOT = Path(__file__).resolve().parents[1]


def make_record(step, attributions, inputs=None, channel_axis=None, metrics=None, share=None, names=None):
    n = len(attributions)
    inputs = np.zeros_like(attributions) if inputs is None else inputs
    return ls.AttributionRecord(
        step=step, epoch=0, method="deepshap", attributions=attributions, targets=np.arange(n) % 3,
        predictions=np.zeros(n, np.int64), outputs=np.zeros((n, 3)), metrics=metrics or {"mean_abs": 1.0},
        feature_share=share, inputs=inputs, channel_axis=channel_axis, feature_names=names)


# ---- metrics ----------------------------------------------------------------------------------------
def test_rankdata_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 17)).astype(float)          # many ties
    ours = ls.rankdata(a)
    ref = np.stack([stats.rankdata(r) for r in a])
    np.testing.assert_allclose(ours, ref)


def test_spearman_rows_matches_scipy_and_constant_rows_are_nan():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 2, 5))
    b[1] = a[1] * 2 + 1                                          # monotone → 1
    ours = ls.spearman_rows(a, b)
    ref = [stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours[1] == pytest.approx(1.0)
    assert np.isnan(ls.spearman_rows(np.zeros((1, 4)), rng.normal(size=(1, 4)))[0])


def test_topk_overlap_and_feature_share():
    a = np.array([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    b = np.array([[5.0, 4, 0, 0, 9], [1, 2, 3, 4, 5]])
    np.testing.assert_allclose(ls.topk_overlap_rows(a, b, 2), [0.5, 1.0])
    share = ls.feature_share(np.array([[1.0, -3.0], [1.0, 1.0]]))
    np.testing.assert_allclose(share, [2 / 6, 4 / 6])
    assert ls.feature_share(np.zeros((2, 3))).tolist() == [0, 0, 0]


def test_drift_tracker_first_prev_and_shares():
    d = ls.DriftTracker(top_k=1, feature_names=["a", "b", "c"])
    x1 = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    m1, share1 = d.update(x1, tabular=True)
    assert np.isnan(m1["spearman_prev"]) and np.isnan(m1["topk_first"])
    assert set(m1) == {"mean_abs", "spearman_prev", "topk_prev", "spearman_first", "topk_first",
                       "share/a", "share/b", "share/c"}
    np.testing.assert_allclose(share1, [4 / 12, 4 / 12, 4 / 12])
    m2, _ = d.update(-x1, tabular=True)                 # same magnitudes: no drift
    assert m2["spearman_prev"] == pytest.approx(1.0) and m2["topk_first"] == 1.0
    m3, _ = d.update(x1[:, ::-1], tabular=True)         # ranking reversed
    assert m3["spearman_prev"] == pytest.approx(-1.0) and m3["spearman_first"] == pytest.approx(-1.0)
    assert m3["topk_prev"] == 0.0
    with pytest.raises(ValueError):
        ls.DriftTracker(top_k=0)


def test_record_builder_writes_records_with_fields():
    seen = []
    b = ls.RecordBuilder(seen.append, "mfaba", np.ones((2, 3)), None, feature_names=["x", "y", "z"])
    r = b.emit(10, 1, np.array([[1.0, 0, 0], [0, 1, 0]]), [0, 1], np.eye(2, 4), 0.5, {"extra": 2.0})
    assert seen == [r] and b.count == 1
    assert (r.step, r.epoch, r.method) == (10, 1, "mfaba")
    assert r.predictions.tolist() == [0, 1] and r.targets.dtype == np.int64
    assert r.metrics["extra"] == 2.0 and "share/x" in r.metrics
    s = r.summary()
    json.dumps(s)                                        # NaN → None, all serialisable
    assert s["metrics"]["spearman_prev"] is None and s["shape"] == [2, 3]
    with pytest.raises(ValueError):
        ls.RecordBuilder(None, "deepshap", np.ones((2, 1, 4, 4)), 0, feature_names=["a"])


def test_as_sink_variants():
    assert isinstance(ls.as_sink(None), ls.MemorySink)
    got = []
    multi = ls.as_sink([print, got.append, ls.MemorySink()])
    assert isinstance(multi, ls.MultiSink) and len(multi.sinks) == 3
    assert ls.find_memory_records(multi) is multi.sinks[2].records
    with pytest.raises(TypeError):
        ls.as_sink(3)


# ---- images -------------------------------------------------------------------------------------------
def test_png_and_heatmaps_decode():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    img = ls.heatmap_image(rng.random((3, 1, 8, 8)), rng.normal(size=(3, 1, 8, 8)), channel_axis=0)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    back = np.asarray(Image.open(io.BytesIO(ls.encode_png(img))))
    np.testing.assert_array_equal(back, img)
    hwc = ls.heatmap_image(rng.random((3, 8, 8, 3)), rng.normal(size=(3, 8, 8, 3)), channel_axis=2)
    tab = ls.heatmap_image(rng.random((4, 5)), rng.normal(size=(4, 5)), None)
    assert hwc.shape[1] > hwc.shape[0] and tab.shape[0] < tab.shape[1]
    flat = ls.heatmap_image(np.zeros((2, 7)), np.zeros((2, 7)), None)      # all-zero attributions: no NaN
    assert flat.min() == flat.max() == 255


# ---- file and TensorBoard sinks ------------------------------------------------------------------------
def test_file_sink_round_trip(tmp_path):
    sink = ls.FileSink(tmp_path / "logs")
    rng = np.random.default_rng(3)
    probe = rng.random((2, 4))
    attrs = [rng.normal(size=(2, 4)) for _ in range(3)]
    for i, a in enumerate(attrs):
        sink.write(make_record(5 * (i + 1), a, inputs=probe, metrics={"spearman_prev": float("nan"), "m": 1.0}))
    sink.close()
    recs = ls.load_records(tmp_path / "logs")
    assert [r["step"] for r in recs] == [5, 10, 15]
    assert {"step", "epoch", "method", "metrics", "targets", "predictions", "attributions", "outputs",
            "inputs", "wall_time"} <= set(recs[0])
    for r, a in zip(recs, attrs):
        np.testing.assert_array_equal(r["attributions"], a)
        np.testing.assert_array_equal(r["inputs"], probe)
        assert r["metrics"]["spearman_prev"] is None
    assert len((tmp_path / "logs" / "records.jsonl").read_text().splitlines()) == 3


def test_tensorboard_sink_is_readable_by_event_accumulator(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    sink = ls.TensorBoardSink(tmp_path / "tb")
    rng = np.random.default_rng(4)
    probe = rng.random((3, 1, 6, 6))
    tracker = ls.DriftTracker()
    for step in (10, 20, 30):
        a = rng.normal(size=(3, 1, 6, 6))
        m, _ = tracker.update(a, tabular=False)
        sink.write(make_record(step, a, inputs=probe, channel_axis=0, metrics=m))
    sink.close()
    acc = ea_mod.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "attributions/heatmap" in tags["images"] and "attributions/histogram" in tags["histograms"]
    assert {"attributions/mean_abs", "attributions/spearman_prev", "attributions/spearman_first",
            "attributions/topk_prev", "attributions/topk_first"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("attributions/mean_abs")] == [10, 20, 30]
    assert [e.step for e in acc.Scalars("attributions/spearman_prev")] == [20, 30]      # NaN at the first: skipped
    imgs = acc.Images("attributions/heatmap")
    assert len(imgs) == 3 and imgs[0].encoded_image_string.startswith(b"\x89PNG")
    h = acc.Histograms("attributions/histogram")
    assert len(h) == 3 and h[0].histogram_value.num == 3 * 36


def test_tabular_shares_reach_tensorboard(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    b = ls.RecordBuilder(ls.TensorBoardSink(tmp_path, prefix="attr"), "deepshap", np.ones((2, 2)), None,
                         feature_names=["age", "income"])
    b.emit(1, None, np.array([[1.0, 3.0], [0.0, 4.0]]), [0, 0], np.zeros((2, 2)), 0.0)
    b.sink.close()
    acc = ea_mod.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Scalars("attr/share/income")[0].value == pytest.approx(7 / 8)


def test_sinks_import_neither_tensorflow_nor_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from deepshap_opt import logging_sinks as ls\n"
        "b = ls.RecordBuilder([ls.TensorBoardSink(sys.argv[1]), ls.FileSink(sys.argv[1])], 'deepshap',\n"
        "                     np.zeros((2, 1, 4, 4)), 0)\n"
        "b.emit(1, None, np.ones((2, 1, 4, 4)), [0, 1], np.zeros((2, 3)), 0.0); b.sink.close()\n"
        "bad = [m for m in ('tensorflow', 'torch', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.glob("events.out.tfevents.*")) and (tmp_path / "records.jsonl").exists()
