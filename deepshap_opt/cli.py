"""The ``deepshap-opt`` command line (also ``python -m deepshap_opt``).

    deepshap-opt export MODEL --background BG.npy -o explained.onnx [--outputs top1|topK|all|INDEX]
    deepshap-opt explain explained.onnx --input X.npy|DIR_OF_IMAGES -o OUT_DIR [--png]
    deepshap-opt check MODEL [--background BG.npy] [--onnx]
    deepshap-opt bench [--quick] [--suite torch|onnx|tf|mfaba|all] [-- ARGS for the suite]

MODEL is an ``.onnx`` file, a Keras ``.keras`` / ``.h5`` file, a PyTorch program saved with
``torch.export.save`` (``.pt2``) or a TorchScript file (``.pt`` / ``.pth`` / ``.ts``, saved with
``torch.jit.save``). ``explain`` needs only numpy and onnxruntime (plus matplotlib for ``--png``, Pillow for a
directory of images and, optionally, tqdm for the progress bar).

Errors are printed as one line (``deepshap-opt: error: ...``) with exit code 2; ``--debug`` shows the
traceback instead. ``check`` exits with 1 when an op has no rule.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROG = "deepshap-opt"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TORCHSCRIPT_EXTS = (".pt", ".pth", ".ts", ".torchscript", ".jit")
KERAS_EXTS = (".keras", ".h5", ".hdf5")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ============================================================================================ helpers
def _model_kind(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"no such file: {path}")
    if p.is_dir():
        if (p / "saved_model.pb").exists():
            raise CLIError(f"{path} is a TensorFlow SavedModel directory: save the Keras model as a .keras file")
        raise CLIError(f"{path} is a directory, expected a model file")
    ext = p.suffix.lower()
    if ext == ".onnx":
        return "onnx"
    if ext in KERAS_EXTS:
        return "keras"
    if ext == ".pt2":
        return "pt2"
    if ext in TORCHSCRIPT_EXTS:
        return "torchscript"
    raise CLIError(f"cannot tell the model format of {path!r} from its extension: expected .onnx, .keras/.h5, "
                   ".pt2 (torch.export.save) or .pt/.pth (torch.jit.save)")


def _load_npy(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"no such file: {path}")
    try:
        if p.suffix.lower() == ".npz":
            with np.load(p) as z:
                if len(z.files) != 1:
                    raise CLIError(f"{path}: an .npz {what} must hold exactly one array, found {z.files}")
                return np.asarray(z[z.files[0]])
        return np.asarray(np.load(p, allow_pickle=False))
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"cannot read {what} {path}: {exc}") from exc


def _float_bg(bg: np.ndarray, what: str = "background", keep_float64: bool = False) -> np.ndarray:
    """The background as floats: float64 becomes float32 (torch / Keras weights) unless keep_float64 (ONNX:
    the backend matches the file's input type itself)."""
    if bg.ndim < 1 or bg.shape[0] < 1:
        raise CLIError(f"the {what} needs a leading axis of rows (M, *input_shape), got shape {bg.shape}")
    if bg.dtype == np.float64:
        return bg if keep_float64 else bg.astype(np.float32)
    if not np.issubdtype(bg.dtype, np.floating):
        return bg.astype(np.float32)
    return bg


def _torch_module(path: str, kind: str):
    """An nn.Module for a .pt2 (torch.export) or TorchScript file, ready for torch.onnx.export."""
    try:
        import torch
    except ImportError as exc:
        raise CLIError(f"{path}: loading a PyTorch model needs torch ({exc})") from exc
    if kind == "torchscript":
        try:
            return torch.jit.load(path, map_location="cpu")
        except Exception as exc:
            raise CLIError(f"cannot load TorchScript file {path}: {exc}".splitlines()[0]) from exc
    try:
        ep = torch.export.load(path)
    except Exception as exc:
        raise CLIError(f"cannot load torch.export program {path}: {exc}".splitlines()[0]) from exc
    gm = ep.module()

    class ExportedModule(torch.nn.Module):
        """Wraps the unlifted module of an ExportedProgram, whose .eval()/.train() raise."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

        def train(self, mode: bool = True):
            return self

    return ExportedModule(gm)


def _load_keras(path: str):
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
    except ImportError as exc:
        raise CLIError(f"{path}: loading a Keras model needs keras/tensorflow ({exc})") from exc
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise CLIError(f"cannot load Keras model {path}: {exc}".splitlines()[0]) from exc


def _keras_background(model):
    """Two random rows of a single-input Keras model's (static) input shape, or None."""
    try:
        inputs = list(model.inputs)
    except Exception:  # noqa: BLE001 -- subclassed models without inputs
        return None
    if len(inputs) != 1:
        return None
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        return None
    return np.random.default_rng(0).random((2, *shape), dtype=np.float32)


def _parse_outputs(value: str):
    v = value.strip().lower()
    if v in ("top1", "all", "target"):
        return v
    if v.startswith("topk:"):
        return v
    if v.startswith("top") and v[3:].isdigit():
        return f"topk:{int(v[3:])}"
    try:
        return int(v)
    except ValueError:
        raise CLIError(f"--outputs must be top1, topK (e.g. top3), all, target or an output index, got {value!r}")


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    first = msg.splitlines()[0].strip()
    if isinstance(exc, (CLIError,)):
        return first
    name = type(exc).__name__
    return first if name in ("UnsupportedOperatorError", "AdditivityError") else f"{name}: {first}"


# ============================================================================================ export
def cmd_export(args) -> int:
    kind = _model_kind(args.model)
    bg = _float_bg(_load_npy(args.background, "background"), keep_float64=kind == "onnx")
    outputs = _parse_outputs(args.outputs)
    try:
        import deepshap_opt.onnx as dso
    except ImportError as exc:
        raise CLIError(f"export needs the onnx extra (pip install deepshap-opt[onnx]): {exc}") from exc
    if kind == "onnx":
        model = args.model
        try:
            import onnx

            outs = [o.name for o in onnx.load(args.model, load_external_data=False).graph.output]
        except Exception as exc:
            raise CLIError(f"cannot read ONNX file {args.model}: {_one_line(exc)}") from exc
        if any(o == "shap_values" or o.startswith("shap_values_") for o in outs):
            raise CLIError(f"{args.model} already has shap_values outputs (an exported file): export the original model")
    elif kind == "keras":
        model = _load_keras(args.model)
    else:
        model = _torch_module(args.model, kind)
    out = args.output
    if Path(out).parent and not Path(out).parent.exists():
        raise CLIError(f"output directory does not exist: {Path(out).parent}")
    t0 = time.perf_counter()
    try:
        dso.export(model, bg, out, outputs=outputs, opset=args.opset, cache=args.cache,
                   output_name=args.output_name)
    except Exception as exc:
        if kind == "pt2" and "guard" in str(exc).lower():
            raise CLIError(f"{args.model}: the exported program rejects a batch of {min(2, len(bg))} rows; export it "
                           "with a dynamic batch axis (dynamic_shapes={{'x': {{0: torch.export.Dim('N')}}}})") from exc
        raise
    dt = time.perf_counter() - t0
    size = os.path.getsize(out)
    extra = [p for p in (out + ".data",) if os.path.exists(p)]
    msg = f"wrote {out} ({size / 2**20:.2f} MiB"
    msg += f" + {os.path.basename(extra[0])}" if extra else ""
    msg += f") from {args.model} [{kind}], {len(bg)} references, outputs={args.outputs}, in {dt:.1f} s"
    print(msg)
    return 0


# ============================================================================================ explain
def _progress(total: int, desc: str, enabled: bool):
    """tqdm if installed, else a plain counter on stderr; None when disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="row", file=sys.stderr)
    except ImportError:
        class _Plain:
            def __init__(self):
                self.n, self._last = 0, 0.0

            def update(self, k):
                self.n += k
                now = time.monotonic()
                if now - self._last > 1.0 or self.n >= total:
                    print(f"{desc}: {self.n}/{total} rows", file=sys.stderr, flush=True)
                    self._last = now

            def close(self):
                pass

        return _Plain()


def _image_layout(shape, layout: str) -> str:
    """'nchw', 'nhwc' or 'nhw' for an input shape (N, ...) of an image model."""
    if layout != "auto":
        return layout
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4:
        c1, c3 = shape[1], shape[3]
        if c1 in (1, 3, 4) and not (c3 in (1, 3, 4) and c1 not in (1, 3)):
            return "nchw"
        if c3 in (1, 3, 4):
            return "nhwc"
    raise CLIError(f"cannot tell the image layout of an input of shape {list(shape)}: pass --layout nchw|nhwc")


def _load_images(folder: str, shape, layout: str, scale: float, dtype):
    try:
        from PIL import Image
    except ImportError as exc:
        raise CLIError(f"reading a directory of images needs Pillow (pip install pillow): {exc}") from exc
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    lay = _image_layout(shape, layout)
    if lay == "nchw":
        c, h, w = shape[1], shape[2], shape[3]
    elif lay == "nhwc":
        h, w, c = shape[1], shape[2], shape[3]
    else:
        c, h, w = 1, shape[1], shape[2]
    if not all(isinstance(d, int) and d > 0 for d in (c, h, w)):
        raise CLIError(f"the model's input shape {list(shape)} is not static: cannot resize images to it")
    arrays = []
    for f in files:
        try:
            img = Image.open(f)
            img = img.convert("L" if c == 1 else "RGB" if c == 3 else "RGBA").resize((w, h), Image.BILINEAR)
        except Exception as exc:
            raise CLIError(f"cannot read image {f}: {exc}") from exc
        a = np.asarray(img, dtype=np.float32) * scale
        a = a.reshape(h, w, c)
        if lay == "nchw":
            a = a.transpose(2, 0, 1)
        elif lay == "nhw":
            a = a[..., 0]
        arrays.append(a)
    return np.stack(arrays).astype(dtype), [f.name for f in files], lay


_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def cmd_explain(args) -> int:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise CLIError(f"explain needs onnxruntime (pip install onnxruntime): {exc}") from exc
    if not Path(args.model).is_file():
        raise CLIError(f"no such file: {args.model}")
    if not Path(args.input).exists():
        raise CLIError(f"no such file or directory: {args.input}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # onnxruntime's memory pattern costs these files time and memory (docs/deployment.md, "Session options")
    so.enable_mem_pattern = False
    if args.threads:
        so.intra_op_num_threads = args.threads
    try:
        sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CLIError(f"onnxruntime cannot load {args.model}: {_one_line(exc)}") from exc
    outs = [o.name for o in sess.get_outputs()]
    shap_names = [o for o in outs if o == "shap_values" or o.startswith("shap_values_")]
    if not shap_names:
        raise CLIError(f"{args.model} has no shap_values output: create it with `{PROG} export`")
    ins = [i for i in sess.get_inputs() if i.name != "target"]
    needs_target = any(i.name == "target" for i in sess.get_inputs())
    if len(ins) != 1:
        raise CLIError(f"explain supports single-input models; {args.model} has inputs {[i.name for i in ins]}")
    inp = ins[0]
    dtype = _ORT_TO_NP.get(inp.type, np.float32)
    names = None
    layout = None
    if Path(args.input).is_dir():
        X, names, layout = _load_images(args.input, inp.shape, args.layout, args.scale, dtype)
    else:
        X = _load_npy(args.input, "input").astype(dtype, copy=False)
    static = [d for d in inp.shape[1:]]
    if X.ndim != len(inp.shape) or any(isinstance(d, int) and d != x for d, x in zip(static, X.shape[1:])):
        raise CLIError(f"input of shape {list(X.shape)} does not match the model's input {inp.name} "
                       f"{['N' if not isinstance(d, int) else d for d in inp.shape]}")
    target = None
    if args.target is not None and not needs_target:
        raise CLIError(f"--target applies to files exported with --outputs target; {args.model} explains "
                       "the outputs chosen at export time")
    if needs_target:
        if args.target is None:
            raise CLIError(f"{args.model} was exported with --outputs target: pass --target INDEX")
        target = np.full((len(X), 1), int(args.target), np.int64)
    model_outs = [o for o in outs if o not in shap_names and o != "shap_indexes"]
    want = model_outs[:1] + shap_names + (["shap_indexes"] if "shap_indexes" in outs else [])
    bs = max(1, int(args.batch_size))
    n_batches = (len(X) + bs - 1) // bs
    bar = _progress(len(X), "explain", enabled=(n_batches > 1 and not args.quiet))
    results: list[list[np.ndarray]] = []
    t0 = time.perf_counter()
    try:
        for s in range(0, len(X), bs):
            feed = {inp.name: np.ascontiguousarray(X[s:s + bs])}
            if target is not None:
                feed["target"] = target[s:s + bs]
            try:
                results.append(sess.run(want, feed))
            except Exception as exc:
                raise CLIError(f"onnxruntime failed on rows {s}..{s + len(feed[inp.name]) - 1}: "
                               f"{_one_line(exc)}") from exc
            if bar is not None:
                bar.update(len(feed[inp.name]))
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    merged = {name: np.concatenate([r[j] for r in results]) for j, name in enumerate(want)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    phi = merged[shap_names[0]]
    np.save(out / "shap_values.npy", phi)
    pred_name = model_outs[0] if model_outs else None
    if pred_name:
        np.save(out / "predictions.npy", merged[pred_name])
    idx = merged.get("shap_indexes")
    if idx is None and target is not None:
        idx = target
    if idx is not None:
        np.save(out / "shap_indexes.npy", idx)
    meta = sess.get_modelmeta().custom_metadata_map
    ev = meta.get("deepshap_opt.expected_value")
    if ev is not None:
        try:
            evv = np.asarray([float(v) for v in ev.replace("[", " ").replace("]", " ").replace(",", " ").split()])
            np.save(out / "expected_value.npy", evv)
        except ValueError:
            pass
    if names is not None:
        (out / "files.txt").write_text("\n".join(names) + "\n")
    written = ["shap_values.npy"] + (["predictions.npy"] if pred_name else []) + \
              (["shap_indexes.npy"] if idx is not None else [])
    if args.png:
        pngs = _write_pngs(out / "png", X, phi, idx, merged.get(pred_name) if pred_name else None, names,
                           layout or _guess_layout(X.shape, args.layout))
        written.append(f"png/ ({pngs} images)")
    print(f"explained {len(X)} rows in {dt:.2f} s ({len(X) / max(dt, 1e-9):.1f} rows/s); wrote "
          f"{', '.join(written)} to {out}")
    return 0


def _guess_layout(shape, layout):
    try:
        return _image_layout(shape, layout)
    except CLIError:
        return "other"


def _write_pngs(folder: Path, X, phi, idx, pred, names, layout) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CLIError(f"--png needs matplotlib (pip install matplotlib): {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for i in range(len(X)):
        # the first explained output (the top-1 for ranked exports); for "all", the predicted class
        if idx is not None:
            j, label = 0, int(idx[i][0])
        elif pred is not None and np.asarray(pred[i]).size == phi.shape[-1]:
            j = label = int(np.argmax(np.asarray(pred[i]).reshape(-1)))
        else:
            j = label = 0
        p = phi[i][..., j]
        title = f"output {label}"
        if pred is not None:
            title += f"  (f = {np.asarray(pred[i]).reshape(-1)[label]:.3g})"
        name = Path(names[i]).stem if names else f"{i:04d}"
        if layout in ("nchw", "nhwc", "nhw"):
            x = X[i]
            if layout == "nchw":
                heat, img = p.sum(0), np.moveaxis(x, 0, -1)
            elif layout == "nhwc":
                heat, img = p.sum(-1), x
            else:
                heat, img = p, x[..., None]
            img = img.astype(np.float64)
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            shown = img if img.shape[-1] == 3 else img.mean(-1)
            lim = float(np.abs(heat).max()) or 1.0
            fig, (ax0, ax) = plt.subplots(1, 2, figsize=(6.0, 3.0), dpi=100)
            ax0.imshow(shown, cmap=None if shown.ndim == 3 else "gray")
            ax0.set_title(name, fontsize=9)
            ax0.axis("off")
            ax.imshow(img.mean(-1), cmap="gray", alpha=0.5)
            im = ax.imshow(heat, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.6)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="SHAP value (summed over channels)")
        else:
            fig, ax = plt.subplots(figsize=(4.0, 3.0), dpi=100)
            flat = p.reshape(-1)
            ax.bar(np.arange(len(flat)), flat, color=np.where(flat >= 0, "tab:red", "tab:blue"))
            ax.set_xlabel("feature")
            ax.set_ylabel("SHAP value")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)
        count += 1
    return count


# ============================================================================================ check
#: ONNX op type → (canonical op of rules.spec, note). Mirrors the dispatch of
#: deepshap_opt.onnx._graph.ExplanationBuilder.vjp; per-node conditions are checked by the dry run.
def _onnx_op_table() -> dict[str, str]:
    from deepshap_opt.onnx import _graph as g

    table = {op: canon for op, canon in g._ELEMENTWISE.items()}
    table.update({op: op.lower() for op in g._PASS})
    table.update({
        "Cast": "cast", "Neg": "neg", "Add": "add", "Sub": "sub", "Sum": "add", "Mul": "mul", "Div": "div",
        "Max": "maximum", "Min": "minimum", "Pow": "pow", "Conv": "conv", "ConvTranspose": "conv_transpose",
        "Gemm": "linear", "MatMul": "matmul", "BatchNormalization": "batch_norm_eval", "MaxPool": "max_pool",
        "GlobalMaxPool": "global_max_pool", "AveragePool": "avg_pool", "GlobalAveragePool": "global_avg_pool",
        "ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "reduce_max", "ReduceMin": "reduce_min",
        "Softmax": "softmax", "LogSoftmax": "log_softmax",
        "LayerNormalization": "layer_norm", "InstanceNormalization": "instance_norm",
        "GroupNormalization": "group_norm", "Transpose": "transpose", "Concat": "concat", "Split": "split",
        "Slice": "slice", "Gather": "gather", "Pad": "pad", "Resize": "upsample", "Expand": "expand",
        "Tile": "tile",
    })
    return table


def _rule_name(canon: str) -> str:
    from deepshap_opt.rules import spec

    r = spec.OPS.get(canon)
    return r.name if r is not None else "?"


def _onnx_listing(proto, output_name=None):
    """Rows (op, node, status, rule, canonical) for every node of an ONNX graph, by data flow."""
    g = proto.graph
    inits = {t.name for t in g.initializer}
    inputs = [v.name for v in g.input if v.name not in inits]
    var = set(inputs)
    shape_ops = {"Shape", "Size"}
    for n in g.node:
        if n.op_type not in shape_ops and any(t in var for t in n.input if t):
            var.update(o for o in n.output if o)
    # nodes on the path to the explained output
    y = output_name or (g.output[0].name if len(g.output) else None)
    producer = {o: n for n in g.node for o in n.output if o}
    on_path, stack = set(), [y]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in on_path:
            continue
        on_path.add(id(n))
        stack.extend(i for i in n.input if i)
    table = _onnx_op_table()
    fused = _onnx_fusions(g)
    rows = []
    for n in g.node:
        name = n.name or (n.output[0] if n.output else n.op_type)
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        varying = any(o in var for o in n.output if o)
        if not varying:
            rows.append((op, name, "constant", "—", "(does not depend on the input's values)"))
            continue
        if id(n) not in on_path:
            rows.append((op, name, "off-path", "—", f"(does not feed the explained output {y!r})"))
            continue
        if id(n) in fused:
            canon = fused[id(n)]
            rows.append((op, name, "ok", _rule_name(canon), f"{canon} (fused)"))
            continue
        canon = table.get(op) if n.domain in ("", "ai.onnx") else None
        if canon is None:
            rows.append((op, name, "unsupported", "—", "no rule"))
            continue
        nv = sum(1 for t in n.input if t and t in var)
        if op == "Mul" and nv < 2:
            canon = "mul_const"
        elif op == "Div" and not (n.input[0] in var and n.input[1] in var):
            canon = "div_const" if n.input[0] in var else "reciprocal"
        elif op == "MatMul" and nv < 2:
            canon = "matmul_const"
        elif op in ("Max", "Min") and nv < 2:
            canon = "clip"
        elif op == "Pow" and nv == 2:
            canon = "pow_pair"
        rows.append((op, name, "ok", _rule_name(canon), canon))
    return rows


def _onnx_fusions(g) -> dict[int, str]:
    """Mul(x, Sigmoid(x)) → silu and Mul(x, Tanh(Softplus(x))) → mish, as the ONNX backend fuses them."""
    producer = {o: n for n in g.node for o in n.output if o}
    out = {}
    for n in g.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        for a, b in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            s = producer.get(b)
            if s is not None and s.op_type == "Sigmoid" and s.input[0] == a:
                out[id(n)], out[id(s)] = "silu", "silu"
            elif s is not None and s.op_type == "Tanh":
                sp = producer.get(s.input[0])
                if sp is not None and sp.op_type == "Softplus" and sp.input[0] == a:
                    out[id(n)] = out[id(s)] = out[id(sp)] = "mish"
    return out


def _synth_background(proto):
    g = proto.graph
    inits = {t.name for t in g.initializer}
    bgs = []
    from onnx import helper

    for v in g.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in dims):
            return None
        dt = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        bgs.append(np.random.default_rng(0).normal(size=(2, *[d.dim_value for d in dims])).astype(dt))
    return bgs


_TORCH_ALIASES = {
    # aten / TorchScript names that differ from the torch-function names of deepshap_opt.torch._ops
    "convolution": "conv2d", "_convolution": "conv2d", "_softmax": "softmax", "_log_softmax": "log_softmax",
    "native_layer_norm": "layer_norm", "native_group_norm": "group_norm", "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm", "_native_batch_norm_legit_functional": "batch_norm",
    "slice": "__getitem__", "index": "__getitem__", "alias": "clone", "_to_copy": "to", "lift_fresh_copy": "clone",
    "hardtanh_": "hardtanh", "relu_": "relu", "silu_": "silu", "add_": "add", "mul_": "mul",
    "adaptive_avg_pool2d": "adaptive_avg_pool2d", "_adaptive_avg_pool2d": "adaptive_avg_pool2d",
    "upsample_nearest2d": "interpolate", "upsample_bilinear2d": "interpolate", "constant_pad_nd": "pad",
    "reflection_pad2d": "pad", "replication_pad2d": "pad", "mean": "mean", "sum": "sum", "rsub": "rsub",
    "sym_size": "size", "scaled_dot_product_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu": "scaled_dot_product_attention", "getitem": "__getitem__",
    "max_pool2d_with_indices": "max_pool2d_with_indices", "linear": "linear", "t": "t",
}


def _torch_rule(name: str, n_varying: int) -> tuple[str, str, str]:
    """(status, rule, canonical) of a torch op name under deepshap_opt.torch's op table."""
    from deepshap_opt.torch import _ops as T

    base = name.rstrip("_") if name.endswith("_") and not name.startswith("__") else name
    base = _TORCH_ALIASES.get(name, _TORCH_ALIASES.get(base, base))
    if base in T.RESCALE:
        return "ok", "rescale", T.RESCALE[base]
    if base in T.LINEAR:
        return "ok", "linear", base
    if base in T.BILINEAR:
        if n_varying >= 2:
            return "ok", _rule_name(T.BILINEAR[base]), T.BILINEAR[base]
        return "ok", "linear", f"{T.BILINEAR[base]} (one varying operand)"
    if base in T.PAIR:
        if base in ("max", "min") and n_varying < 2:
            return "ok", "maxpool", f"reduce_{base}"
        if n_varying >= 2:
            return "ok", _rule_name(T.PAIR[base]), T.PAIR[base]
        return "ok", "rescale", f"{T.PAIR[base]} (one varying operand)"
    if base in T.MAXPOOL or base in T.REDUCE_MAX:
        return "ok", "maxpool", base
    if base in T.SOFTMAX:
        return "ok", _rule_name(T.SOFTMAX[base]), T.SOFTMAX[base]
    if base in T.DECOMPOSE:
        from deepshap_opt.rules import spec

        if base in spec.OPS:                    # layer_norm, group_norm, ...: a rule of their own
            return "ok", spec.OPS[base].name, f"{base} (decomposed exactly)"
        return "ok", "decomposed", f"{base} (rewritten into ops with rules)"
    if base in T.PASSTHROUGH:
        return "meta", "—", "metadata"
    if base in T.TAINT:
        return "no-grad", "—", "data-dependent constant: an error if it reaches the explained output's values"
    return "unsupported", "—", "no rule"


def _pt2_listing(path: str):
    import torch

    try:
        ep = torch.export.load(path)
    except Exception as exc:
        raise CLIError(f"cannot load torch.export program {path}: {exc}".splitlines()[0]) from exc
    from torch.export.graph_signature import InputKind

    user = {s.arg.name for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")}
    var: set[str] = set(user)
    rows = []

    def names_in(a):
        out = []
        if isinstance(a, torch.fx.Node):
            out.append(a.name)
        elif isinstance(a, (list, tuple)):
            for b in a:
                out += names_in(b)
        elif isinstance(a, dict):
            for b in a.values():
                out += names_in(b)
        return out

    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        args = names_in(list(node.args)) + names_in(dict(node.kwargs))
        nv = sum(1 for a in args if a in var)
        tgt = node.target
        if isinstance(tgt, torch._ops.OpOverload):
            op = f"aten.{tgt._opname}"
            short = tgt._opname
        else:
            op = getattr(tgt, "__name__", str(tgt))
            short = op
        if nv == 0:
            rows.append((op, node.name, "constant", "—", "(does not depend on the input)"))
            continue
        status, rule, canon = _torch_rule(short, nv)
        if status not in ("meta",):
            var.add(node.name)
        rows.append((op, node.name, status, rule, canon))
    return rows


def _torchscript_listing(path: str):
    import torch

    try:
        m = torch.jit.load(path, map_location="cpu")
    except Exception as exc:
        raise CLIError(f"cannot load TorchScript file {path}: {exc}".splitlines()[0]) from exc
    graph = m.inlined_graph
    inputs = list(graph.inputs())[1:]   # the first is the module itself
    var = {v.debugName() for v in inputs}
    rows = []

    def walk(block):
        for node in block.nodes():
            kind = node.kind()
            ins = [v.debugName() for v in node.inputs()]
            nv = sum(1 for v in ins if v in var)
            blocks = list(node.blocks())
            for sub in blocks:
                walk(sub)
            if blocks and any(v.debugName() in var for b in blocks for v in b.outputs()):
                var.update(v.debugName() for v in node.outputs())
                rows.append((kind, _ts_where(node), "structural", "—",
                             "control flow: one path per call (explicands and references must take the same one)"))
                continue
            if nv == 0:
                if kind.startswith("aten::"):
                    rows.append((kind, _ts_where(node), "constant", "—", "(does not depend on the input)"))
                continue
            outs = [v.debugName() for v in node.outputs()]
            if kind.startswith("prim::") or kind.startswith("aten::__") and kind in ("aten::__getitem__",):
                var.update(outs)
                rows.append((kind, _ts_where(node), "structural", "—", "container/control flow (no arithmetic)"))
                continue
            short = kind.split("::", 1)[1]
            status, rule, canon = _torch_rule(short, nv)
            if status != "meta":
                var.update(outs)
            rows.append((kind, _ts_where(node), status, rule, canon))

    walk(graph)
    return rows


def _ts_where(node) -> str:
    s = node.scopeName() or ""
    if s:
        return s.split("/")[-1].split("::")[-1] or node.kind()
    outs = [v.debugName() for v in node.outputs()]
    return outs[0] if outs else node.kind()


def cmd_check(args) -> int:
    kind = _model_kind(args.model)
    dry_msg = None
    if kind in ("pt2", "torchscript") and not args.onnx:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise CLIError(f"{args.model}: checking a PyTorch model needs torch ({exc})") from exc
        rows = _pt2_listing(args.model) if kind == "pt2" else _torchscript_listing(args.model)
        scope = ("torch listing: the ops recorded in the file (torch.export aten graph or TorchScript graph), "
                 "mapped by name through deepshap_opt.torch's op table; deepshap_opt.torch.DeepExplainer decides "
                 "at run time on the torch-function calls of the original module, and `export` goes through "
                 "ONNX: use --onnx --background BG.npy for the exact check of the exported graph.")
    else:
        try:
            import onnx

            import deepshap_opt.onnx as dso
        except ImportError as exc:
            raise CLIError(f"checking through ONNX needs the onnx extra: {exc}") from exc
        bg = _float_bg(_load_npy(args.background, "background"), keep_float64=kind == "onnx") \
            if args.background else None
        if kind == "onnx":
            try:
                proto = onnx.load(args.model)
            except Exception as exc:
                raise CLIError(f"cannot read ONNX file {args.model}: {_one_line(exc)}") from exc
        else:
            from deepshap_opt.onnx._convert import load_model

            model = _load_keras(args.model) if kind == "keras" else _torch_module(args.model, kind)
            if bg is None and kind == "keras":
                bg = _keras_background(model)
            if bg is None:
                raise CLIError(f"checking a {kind} model through ONNX needs --background BG.npy (the input shape)")
            proto = load_model(model, [bg], args.opset)
        rows = _onnx_listing(proto, args.output_name)
        scope = ("ONNX listing: every node of the graph with the rule the ONNX backend (deepshap_opt.onnx.export) "
                 "gives it, by data flow from the input to the explained output")
        if not args.static:
            bgs = [bg] if bg is not None else _synth_background(proto)
            if bgs is None:
                dry_msg = "dry run skipped: the input shape is not static (pass --background BG.npy)"
            else:
                from deepshap_opt.errors import UnsupportedOperatorError

                try:
                    dso.build(proto, bgs, outputs="top1", opset=args.opset, output_name=args.output_name)
                    dry_msg = "dry run: the explanation graph builds"
                except UnsupportedOperatorError as exc:
                    dry_msg = f"dry run FAILED: {exc}"
                    if not any(r[2] == "unsupported" for r in rows):
                        rows.append((exc.op, exc.where, "unsupported", "—", str(exc)))
                except Exception as exc:  # noqa: BLE001 -- any build failure is reported, exit 1
                    dry_msg = f"dry run FAILED: {_one_line(exc)}"
                    rows.append(("(build)", "-", "unsupported", "—", _one_line(exc)))
    _print_listing(rows, args.verbose)
    print(f"# {scope}")
    if dry_msg:
        print(f"# {dry_msg}")
    bad = [r for r in rows if r[2] == "unsupported"]
    if bad:
        ops = sorted({r[0] for r in bad})
        print(f"{len(bad)} node(s) without a rule: {', '.join(ops)}")
        return 1
    print(f"all {sum(1 for r in rows if r[2] == 'ok')} explained node(s) have a rule")
    return 0


def _print_listing(rows, verbose: bool) -> None:
    if verbose:
        w0 = max([len(r[0]) for r in rows] + [2])
        w1 = max([len(r[1]) for r in rows] + [4])
        print(f"{'op':<{w0}}  {'node':<{w1}}  {'status':<11}  {'rule':<13}  canonical")
        for r in rows:
            print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<11}  {r[3]:<13}  {r[4]}")
        return
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r[0], r[2], r[3], r[4]), []).append(r[1])
    w0 = max([len(k[0]) for k in groups] + [2])
    print(f"{'op':<{w0}}  {'count':>5}  {'status':<11}  {'rule':<13}  canonical")
    order = {"unsupported": 0, "ok": 1, "no-grad": 2, "structural": 3, "meta": 4, "off-path": 5, "constant": 6}
    for k in sorted(groups, key=lambda k: (order.get(k[1], 9), k[0])):
        names = groups[k]
        line = f"{k[0]:<{w0}}  {len(names):>5}  {k[1]:<11}  {k[2]:<13}  {k[3]}"
        if k[1] == "unsupported":
            line += f"  [{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}]"
        print(line)


# ============================================================================================ bench
SUITES = {
    "torch": ("benchmarks/bench_torch.py",
              ["--models-module", "benchmarks/plots.py", "--models", "small_cnn", "--size", "32", "--n", "2",
               "--m", "4", "--repeats", "1", "--outputs", "top1", "--methods", "ours", "shap", "captum"]),
    "onnx": ("benchmarks/bench_onnx.py",
             ["--models", "efficientnet_b0", "--size", "32", "--n", "1", "--m", "4", "--classes", "10",
              "--repeats", "1", "--warmup", "0", "--threads", "1"]),
    "tf": ("benchmarks/bench_tf.py",
           ["--models", "EfficientNetB0", "--size", "32", "--n", "1", "--m", "4", "--classes", "10",
            "--methods", "ours"]),
    "mfaba": ("benchmarks/bench_mfaba.py",
              ["--models", "efficientnet_b0", "--methods", "mfaba_sharp,ig", "--batch", "2", "--size", "32",
               "--steps", "5", "--memory-steps", "5", "--repeats", "1", "--num-classes", "10"]),
}


def _repo_root() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "benchmarks").is_dir():
            return base
    return None


def cmd_bench(args, extra: list[str]) -> int:
    root = _repo_root()
    if root is None:
        raise CLIError("the benchmark suite (benchmarks/) is not here: run from a checkout of the repository")
    names = list(SUITES) if args.suite == "all" else [args.suite]
    status = 0
    ran = 0
    for name in names:
        script, quick = SUITES[name]
        path = root / script
        if not path.exists():
            print(f"# {name}: {script} not present, skipped", flush=True)
            continue
        cmd = [sys.executable, str(path)] + (quick if args.quick else []) + extra
        print(f"# {name}: {' '.join(cmd[1:])}", flush=True)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(cmd, cwd=root, env=env, check=False)
        ran += 1
        if proc.returncode != 0:
            print(f"# {name}: exited with code {proc.returncode}", file=sys.stderr, flush=True)
            status = 1
    if ran == 0:
        raise CLIError(f"no benchmark script found for suite {args.suite!r} under {root / 'benchmarks'}")
    return status


# ============================================================================================ main
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line too (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Fast, exact DeepSHAP: export, explain, check, bench.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="{export,explain,check,bench}", parser_class=_Parser)

    e = sub.add_parser("export", help="write ONE .onnx file with the model's outputs plus shap_values",
                       description="Export MODEL and its DeepSHAP explanation graph to one .onnx file.")
    e.add_argument("model", help=".onnx, .keras/.h5, .pt2 (torch.export.save) or .pt/.pth (torch.jit.save)")
    e.add_argument("--background", "-b", required=True, help="references, an .npy array (M, *input_shape)")
    e.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    e.add_argument("--outputs", default="top1",
                   help="what is explained: top1 (default), topK (e.g. top3), all, target (an int64 'target' "
                   "input picks the outputs at run time) or an output index")
    e.add_argument("--cache", default="auto", choices=("auto", "embed", "recompute"),
                   help="store the references' activations (embed) or recompute them at session load")
    e.add_argument("--opset", type=int, default=None)
    e.add_argument("--output-name", default=None, help="which model output to explain (default: the first)")

    x = sub.add_parser("explain", help="run an exported .onnx file with onnxruntime only",
                       description="Explain inputs with an exported .onnx file, using only onnxruntime.")
    x.add_argument("model", help="a file written by `deepshap-opt export`")
    x.add_argument("--input", "-i", required=True, help="an .npy array (N, *input_shape) or a directory of images")
    x.add_argument("--output", "-o", required=True, help="output directory (created)")
    x.add_argument("--png", action="store_true", help="also write a heat-map overlay per input to OUT/png/")
    x.add_argument("--batch-size", type=int, default=16, help="rows per onnxruntime call (default 16)")
    x.add_argument("--target", type=int, default=None, help="output index, for files exported with --outputs target")
    x.add_argument("--layout", default="auto", choices=("auto", "nchw", "nhwc", "nhw"),
                   help="image layout of the model input (directory inputs and --png)")
    x.add_argument("--scale", type=float, default=1 / 255, help="pixel scale for image inputs (default 1/255)")
    x.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    c = sub.add_parser("check", help="list every op with its rule; exit 1 if any has none",
                       description="List every op of MODEL with the DeepSHAP rule it gets, before running anything.")
    c.add_argument("model")
    c.add_argument("--background", "-b", default=None,
                   help="an .npy background: gives the input shape for the dry run / the ONNX conversion")
    c.add_argument("--onnx", action="store_true",
                   help="torch models: convert to ONNX first and check what `export` would build (needs -b)")
    c.add_argument("--static", action="store_true", help="ONNX: only the op listing, no dry-run build")
    c.add_argument("--verbose", "-v", action="store_true", help="one line per node instead of per op type")
    c.add_argument("--opset", type=int, default=None)
    c.add_argument("--output-name", default=None)

    b = sub.add_parser("bench", help="run the benchmark suite and print its table",
                       description="Run benchmarks/bench_*.py as subprocesses; arguments after -- go to the suite.")
    b.add_argument("--quick", action="store_true", help="a tiny run (32x32 inputs, few references, one repeat)")
    b.add_argument("--suite", default="torch", choices=(*SUITES, "all"))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    debug = "--debug" in argv          # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    ap = build_parser()
    args = ap.parse_args(argv)
    args.debug = debug
    if args.version:
        try:
            from deepshap_opt import __version__
        except ImportError:      # a stale editable install can leave the package's __init__ unexecuted
            from importlib.metadata import version

            __version__ = version("deepshap-opt")
        print(f"{PROG} {__version__}")
        return 0
    if not args.command:
        ap.print_help()
        return 2
    try:
        if args.command == "export":
            return cmd_export(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "check":
            return cmd_check(args)
        return cmd_bench(args, extra)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
