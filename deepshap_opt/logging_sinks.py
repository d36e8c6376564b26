"""Where training-time attribution logs go, and the drift metrics computed on them (framework-agnostic).

The training hooks (:class:`deepshap_opt.torch.AttributionLogger`,
``deepshap_opt.tf.logger.AttributionCallback`` and the Lightning callback) explain a fixed *probe* batch
every so often and hand one :class:`AttributionRecord` per log to a *sink*:

* :class:`TensorBoardSink` — standard TensorBoard event files: a heat-map image of the attributions over the
  probe inputs, a histogram of the attributions, and scalar drift metrics;
* :class:`FileSink` — one JSON line per log (``records.jsonl``) plus the arrays of each log in an ``.npz``;
  read back with :func:`load_records`;
* :class:`MemorySink` — keeps the records in a list (the default);
* any callable ``fn(record)``; a list of sinks writes to each.

Drift metrics (:class:`DriftTracker`), computed on the attribution *magnitudes* ``|φ|`` of each probe row
(flattened over its features) and averaged over the probe rows:

* ``spearman_prev`` / ``spearman_first`` — Spearman rank correlation with the previous log / the first log;
* ``topk_prev`` / ``topk_first`` — overlap of the k most important features (|top-k ∩ top-k'| / k);
* ``mean_abs`` — mean |φ|;
* ``share/<feature>`` — for tabular probes (one axis of features per row), the share of the total |φ| that
  falls on each feature.

This module needs only NumPy; ``tensorboard`` (only its event-file writer and protobufs, not TensorFlow) is
imported when a :class:`TensorBoardSink` is created.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AttributionRecord",
    "CallableSink",
    "DriftTracker",
    "FileSink",
    "MemorySink",
    "MultiSink",
    "RecordBuilder",
    "Sink",
    "TensorBoardSink",
    "as_sink",
    "encode_png",
    "feature_share",
    "heatmap_image",
    "load_records",
    "rankdata",
    "spearman_rows",
    "topk_overlap_rows",
]


# ---------------------------------------------------------------------------------------------- records
@dataclass
class AttributionRecord:
    """One log of the probe's attributions.

    step: the global training step (optimizer steps taken) at the log; epoch: the epoch (Keras: 0-based
    index of the epoch that just ended; None where unknown). method: "deepshap" or "mfaba".
    attributions: (N, *in) float64 — each probe row's attribution for its target class.
    targets: (N,) int64 — the class explained per row; predictions: (N,) int64 — the model's argmax;
    outputs: (N, K) float64 — the model's outputs on the probe (eval mode).
    metrics: scalar drift metrics by name (NaN where undefined, e.g. ``spearman_prev`` at the first log).
    feature_share: (F,) for tabular probes, else None. inputs: the probe (N, *in) (the same array in every
    record). channel_axis: the channel axis of one probe row (0 for torch CHW, 2 for Keras HWC) or None.
    seconds: time spent computing this log.
    """

    step: int
    epoch: int | None
    method: str
    attributions: np.ndarray
    targets: np.ndarray
    predictions: np.ndarray
    outputs: np.ndarray
    metrics: dict
    feature_share: np.ndarray | None
    inputs: np.ndarray
    channel_axis: int | None
    feature_names: list | None = None
    wall_time: float = field(default_factory=time.time)
    seconds: float = 0.0

    def summary(self) -> dict:
        """The JSON-serialisable part (no per-element arrays; NaN → None)."""
        return {
            "step": int(self.step), "epoch": None if self.epoch is None else int(self.epoch),
            "method": self.method, "wall_time": float(self.wall_time), "seconds": float(self.seconds),
            "targets": [int(t) for t in self.targets], "predictions": [int(p) for p in self.predictions],
            "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
            "feature_share": None if self.feature_share is None else [float(s) for s in self.feature_share],
            "feature_names": self.feature_names,
            "shape": list(self.attributions.shape),
        }


def _json_float(v):
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------- metrics
def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) along the last axis, like scipy's rankdata."""
    a = np.asarray(a, np.float64)
    order = np.argsort(a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, -1)
    n = a.shape[-1]
    ranks_sorted = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), a.shape).copy()
    # average over runs of equal values
    flat_s = sorted_a.reshape(-1, n)
    flat_r = ranks_sorted.reshape(-1, n)
    for i in range(flat_s.shape[0]):
        row = flat_s[i]
        if n > 1 and np.any(row[1:] == row[:-1]):
            starts = np.r_[0, np.flatnonzero(row[1:] != row[:-1]) + 1]
            ends = np.r_[starts[1:], n]
            for s, e in zip(starts, ends):
                if e - s > 1:
                    flat_r[i, s:e] = (s + 1 + e) / 2.0
    out = np.empty_like(ranks_sorted)
    np.put_along_axis(out, order, flat_r.reshape(a.shape), -1)
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of a[i] and b[i] (each row flattened) per row i: (N,); NaN where a row
    is constant (no ranking)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _topk_sets(a: np.ndarray, k: int) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    return np.argsort(-a, axis=1, kind="stable")[:, :k]


def topk_overlap_rows(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """|top-k(a[i]) ∩ top-k(b[i])| / k per row (values compared as given; pass magnitudes)."""
    ta, tb = _topk_sets(a, k), _topk_sets(b, k)
    return np.array([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)])


def feature_share(attributions: np.ndarray) -> np.ndarray:
    """Share of the total |φ| on each feature of a tabular probe (N, F): (F,) summing to 1 (zeros if φ ≡ 0)."""
    mag = np.abs(np.asarray(attributions, np.float64)).reshape(len(attributions), -1).sum(0)
    total = mag.sum()
    return mag / total if total > 0 else np.zeros_like(mag)


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


class DriftTracker:
    """Drift metrics of successive attributions of the same probe (see the module docstring).

    top_k: the k of the top-k overlap; None → 10 % of the features per row (at least 1).
    feature_names: names for the ``share/<name>`` metrics of tabular probes (default ``f0, f1, ...``).
    """

    def __init__(self, top_k: int | None = None, feature_names: Sequence[str] | None = None):
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        self.top_k = top_k
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.first: np.ndarray | None = None
        self.prev: np.ndarray | None = None

    def k_for(self, n_features: int) -> int:
        k = self.top_k if self.top_k is not None else max(1, int(round(0.1 * n_features)))
        return min(k, n_features)

    def update(self, attributions: np.ndarray, tabular: bool) -> tuple[dict, np.ndarray | None]:
        """Metrics of this log against the previous and the first; then remember it. Returns
        (metrics, feature share or None)."""
        mag = np.abs(np.asarray(attributions, np.float64)).reshape(len(attributions), -1)
        k = self.k_for(mag.shape[1])
        m = {"mean_abs": float(mag.mean()) if mag.size else float("nan")}
        for name, ref in (("prev", self.prev), ("first", self.first)):
            if ref is None or ref.shape != mag.shape:
                m[f"spearman_{name}"] = float("nan")
                m[f"topk_{name}"] = float("nan")
            else:
                m[f"spearman_{name}"] = _nanmean(spearman_rows(mag, ref))
                m[f"topk_{name}"] = _nanmean(topk_overlap_rows(mag, ref, k))
        share = None
        if tabular:
            share = feature_share(attributions)
            names = self.feature_names or [f"f{j}" for j in range(len(share))]
            if len(names) != len(share):
                raise ValueError(f"{len(names)} feature_names for {len(share)} features")
            for n, s in zip(names, share):
                m[f"share/{n}"] = float(s)
        if self.first is None:
            self.first = mag
        self.prev = mag
        return m, share


class RecordBuilder:
    """Turns one log's arrays into an :class:`AttributionRecord` (drift metrics included) and writes it to
    the sink. Shared by the PyTorch and Keras hooks."""

    def __init__(self, sink, method: str, inputs: np.ndarray, channel_axis: int | None,
                 top_k: int | None = None, feature_names: Sequence[str] | None = None):
        self.sink = as_sink(sink)
        self.method = method
        self.inputs = np.asarray(inputs)
        self.channel_axis = channel_axis
        self.tabular = self.inputs.ndim == 2
        self.drift = DriftTracker(top_k, feature_names)
        self.feature_names = list(feature_names) if feature_names is not None else None
        if self.feature_names is not None and (not self.tabular or len(self.feature_names) != self.inputs.shape[1]):
            raise ValueError(f"feature_names needs a tabular probe (N, F) with F = {len(self.feature_names)}; got "
                             f"shape {self.inputs.shape}")
        self.count = 0

    def emit(self, step: int, epoch, attributions, targets, outputs, seconds: float,
             extra_metrics: dict | None = None) -> AttributionRecord:
        attributions = np.asarray(attributions, np.float64)
        outputs = np.asarray(outputs, np.float64).reshape(len(attributions), -1)
        metrics, share = self.drift.update(attributions, self.tabular)
        if extra_metrics:
            metrics.update(extra_metrics)
        rec = AttributionRecord(
            step=int(step), epoch=None if epoch is None else int(epoch), method=self.method,
            attributions=attributions, targets=np.asarray(targets, np.int64).reshape(-1),
            predictions=outputs.argmax(1).astype(np.int64), outputs=outputs, metrics=metrics,
            feature_share=share, inputs=self.inputs, channel_axis=self.channel_axis,
            feature_names=self.feature_names, seconds=float(seconds))
        self.sink.write(rec)
        self.count += 1
        return rec


# ---------------------------------------------------------------------------------------------- sinks
class Sink:
    """Receives :class:`AttributionRecord` s. Subclasses implement :meth:`write`."""

    def write(self, record: AttributionRecord) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()

    def __call__(self, record: AttributionRecord) -> None:
        self.write(record)


class MemorySink(Sink):
    """Keeps every record in ``self.records``."""

    def __init__(self):
        self.records: list[AttributionRecord] = []

    def write(self, record):
        self.records.append(record)


class CallableSink(Sink):
    """Calls ``fn(record)`` for each record."""

    def __init__(self, fn: Callable[[AttributionRecord], object]):
        if not callable(fn):
            raise TypeError(f"a sink must be a Sink or a callable, got {type(fn).__name__}")
        self.fn = fn

    def write(self, record):
        self.fn(record)


class MultiSink(Sink):
    """Writes each record to every sink in ``sinks``."""

    def __init__(self, sinks: Iterable):
        self.sinks = [as_sink(s) for s in sinks]

    def write(self, record):
        for s in self.sinks:
            s.write(record)

    def flush(self):
        for s in self.sinks:
            s.flush()

    def close(self):
        for s in self.sinks:
            s.close()


def as_sink(obj) -> Sink:
    """None → :class:`MemorySink`; a Sink → itself; a list/tuple → :class:`MultiSink`; a callable →
    :class:`CallableSink`."""
    if obj is None:
        return MemorySink()
    if isinstance(obj, Sink):
        return obj
    if isinstance(obj, (list, tuple)):
        return MultiSink(obj)
    if callable(obj):
        return CallableSink(obj)
    raise TypeError(f"sink must be None, a Sink, a callable or a list of those, got {type(obj).__name__}")


def find_memory_records(sink: Sink) -> list | None:
    """The records list of the first :class:`MemorySink` in ``sink`` (None if there is none)."""
    if isinstance(sink, MemorySink):
        return sink.records
    if isinstance(sink, MultiSink):
        for s in sink.sinks:
            r = find_memory_records(s)
            if r is not None:
                return r
    return None


class FileSink(Sink):
    """``directory/records.jsonl`` (one :meth:`AttributionRecord.summary` per line) and, with
    ``arrays=True``, ``directory/step_<step>.npz`` holding ``attributions``, ``targets``, ``outputs`` of
    each log, and ``directory/probe.npz`` holding the probe ``inputs`` once. Read back with
    :func:`load_records`. Each line is flushed as it is written (a crashed run keeps its logs)."""

    def __init__(self, directory, arrays: bool = True):
        self.directory = os.fspath(directory)
        self.arrays = bool(arrays)
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, "records.jsonl")
        self._fh = None
        self._probe_saved = False

    def write(self, record):
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        line = record.summary()
        if self.arrays:
            name = f"step_{record.step:09d}.npz"
            np.savez_compressed(os.path.join(self.directory, name), attributions=record.attributions,
                                targets=record.targets, outputs=record.outputs)
            line["arrays"] = name
            if not self._probe_saved:
                np.savez_compressed(os.path.join(self.directory, "probe.npz"), inputs=record.inputs)
                self._probe_saved = True
        self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()

    def flush(self):
        if self._fh is not None:
            self._fh.flush()

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def load_records(directory) -> list[dict]:
    """The records a :class:`FileSink` wrote: dicts of the JSON fields, with ``attributions``, ``targets``
    and ``outputs`` arrays added where they were saved (and ``inputs``, the probe)."""
    directory = os.fspath(directory)
    probe = None
    if os.path.exists(os.path.join(directory, "probe.npz")):
        with np.load(os.path.join(directory, "probe.npz")) as z:
            probe = z["inputs"]
    out = []
    with open(os.path.join(directory, "records.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("arrays"):
                with np.load(os.path.join(directory, rec["arrays"])) as z:
                    rec.update({k: z[k] for k in z.files})
                rec["inputs"] = probe
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- images
def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image (zlib only, no imaging library)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = rgb.shape
    if c != 3:
        raise ValueError("encode_png expects (H, W, 3)")
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _diverging(v: np.ndarray) -> np.ndarray:
    """v in [-1, 1] → RGB in [0, 1]: blue (−) – white (0) – red (+)."""
    v = np.clip(v, -1.0, 1.0)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    r = 1.0 - 0.85 * neg
    g = 1.0 - 0.85 * (pos + neg)
    b = 1.0 - 0.85 * pos
    return np.stack([r, g, b], -1)


def _to_2d(x: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """One probe row → a 2-D map: (H, W) as is, (C, H, W)/(H, W, C) summed over the channel axis,
    (F,) as a 1 × F strip, anything else flattened."""
    if x.ndim == 3 and channel_axis is not None:
        return x.sum(axis=channel_axis)
    if x.ndim == 2:
        return x
    return x.reshape(1, -1)


def _upscale(img: np.ndarray, cell: int) -> np.ndarray:
    return np.repeat(np.repeat(img, cell, 0), cell, 1)


def heatmap_image(inputs: np.ndarray, attributions: np.ndarray, channel_axis: int | None,
                  max_images: int = 16, min_size: int = 48) -> np.ndarray:
    """An (H, W, 3) uint8 picture of the attributions over the probe inputs.

    Image probes: one column per probe row (at most ``max_images``): the input in grey on top, the
    attribution (summed over channels) below, red positive, blue negative, each scaled to its own max |φ|.
    Tabular probes: one row of cells per probe row, one column per feature, scaled to the log's max |φ|.
    """
    inputs = np.asarray(inputs, np.float64)[:max_images]
    attributions = np.asarray(attributions, np.float64)[:max_images]
    n = len(attributions)
    if attributions.ndim == 2:                                   # tabular: rows × features
        lim = np.abs(attributions).max()
        rgb = _diverging(attributions / lim if lim > 0 else attributions)
        cell = max(4, int(math.ceil(min_size / max(attributions.shape[1], 1))), 8)
        return (np.clip(_upscale(rgb, cell), 0, 1) * 255).round().astype(np.uint8)
    maps = [_to_2d(a, channel_axis) for a in attributions]
    pics = [_to_2d(x, channel_axis) for x in inputs]
    h, w = maps[0].shape
    cell = max(1, int(math.ceil(min_size / max(h, w))))
    pad = 2
    H, W = 2 * h * cell + 3 * pad, n * (w * cell + pad) + pad
    canvas = np.full((H, W, 3), 0.5)
    for i, (p, a) in enumerate(zip(pics, maps)):
        lo, hi = p.min(), p.max()
        grey = (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)
        lim = np.abs(a).max()
        heat = _diverging(a / lim if lim > 0 else a)
        x0 = pad + i * (w * cell + pad)
        canvas[pad:pad + h * cell, x0:x0 + w * cell] = _upscale(np.repeat(grey[..., None], 3, -1), cell)
        canvas[2 * pad + h * cell:2 * pad + 2 * h * cell, x0:x0 + w * cell] = _upscale(heat, cell)
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- TensorBoard
class TensorBoardSink(Sink):
    """Writes each record to a standard TensorBoard event file in ``logdir``.

    Tags (``prefix`` defaults to ``"attributions"``): ``<prefix>/heatmap`` (image, see
    :func:`heatmap_image`), ``<prefix>/histogram`` (the attributions' values), and scalars
    ``<prefix>/<metric>`` for every finite drift metric (``spearman_prev``, ``topk_first``, ``mean_abs``,
    ``share/<feature>``, ``completeness_error`` ...), all at the record's step.

    Uses tensorboard's own event-file machinery (``Event``/``Summary`` protobufs, ``RecordWriter``), not
    TensorFlow: nothing imports TensorFlow for a local ``logdir``. Paths with a URL scheme (``gs://``) go
    through ``tensorboard.summary.writer.event_file_writer.EventFileWriter`` (which uses ``tf.io.gfile``).
    """

    def __init__(self, logdir, prefix: str = "attributions", images: bool = True, histograms: bool = True,
                 max_images: int = 16, bins: int = 30):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TensorBoardSink needs the tensorboard package: pip install tensorboard") from e
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.logdir = os.fspath(logdir)
        self.prefix = prefix.rstrip("/")
        self.images, self.histograms = bool(images), bool(histograms)
        self.max_images, self.bins = int(max_images), int(bins)
        self._writer = None

    def _open(self):
        if "://" in self.logdir:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._writer = EventFileWriter(self.logdir)
            self._add = self._writer.add_event
            return
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(self.logdir, exist_ok=True)
        name = "events.out.tfevents.%010d.%s.%s.deepshap_opt%d" % (time.time(), socket.gethostname(), os.getpid(),
                                                                  id(self) % 100000)
        self.path = os.path.join(self.logdir, name)
        self._writer = RecordWriter(open(self.path, "wb"))
        self._add = lambda ev: self._writer.write(ev.SerializeToString())
        self._add(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _histogram(self, values: np.ndarray):
        values = np.asarray(values, np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
        counts, edges = np.histogram(values, bins=self.bins)
        return self._summary_pb2.HistogramProto(
            min=float(values.min()), max=float(values.max()), num=float(values.size), sum=float(values.sum()),
            sum_squares=float((values * values).sum()), bucket_limit=edges[1:].tolist(),
            bucket=counts.astype(np.float64).tolist())

    def write(self, record):
        if self._writer is None:
            self._open()
        S = self._summary_pb2.Summary
        vals = []
        for name, v in record.metrics.items():
            if v is not None and math.isfinite(float(v)):
                vals.append(S.Value(tag=f"{self.prefix}/{name}", simple_value=float(v)))
        if self.histograms:
            h = self._histogram(record.attributions)
            if h is not None:
                vals.append(S.Value(tag=f"{self.prefix}/histogram", histo=h))
        if self.images:
            img = heatmap_image(record.inputs, record.attributions, record.channel_axis, self.max_images)
            vals.append(S.Value(tag=f"{self.prefix}/heatmap", image=S.Image(
                height=img.shape[0], width=img.shape[1], colorspace=3, encoded_image_string=encode_png(img))))
        self._add(self._event_pb2.Event(wall_time=record.wall_time, step=int(record.step), summary=S(value=vals)))

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
