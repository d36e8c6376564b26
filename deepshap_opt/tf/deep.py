"""Cached-reference DeepSHAP for TensorFlow 2 / Keras 3 (eager; no TF registry writes).

How it runs (see docs/tf.md):

1. The model is traced once with ``tf.function`` and its graph analysed (:mod:`._graph`): every op the
   explained inputs flow through is linear (ordinary gradient) or a rule *site*; anything else is an
   :class:`~deepshap_opt.UnsupportedOperatorError` naming the op and its layer, raised at construction.
2. The M references run forward once; the values every site needs are cached, in the reference chunks the
   backward uses (each distinct tensor once; a ReLU-like site's output that another site reads is
   recomputed from the cached input instead of stored).
3. Per batch of explicands: one forward of the ``n`` rows (outputs and site values), then for each
   explained output one *surrogate* backward over ``n × m`` rows (all pairs of explicand × reference in a
   chunk of ``batch_size`` rows): the graph is re-run with every site replaced by a ``tf.custom_gradient``
   function whose gradient is the site's rule on the broadcast pair ``(n, 1, ...)`` vs ``(1, m, ...)``,
   and linear ops keep their ordinary gradient. φ = mean over references of multiplier × (x − r).
Both steps are ``tf.function``s traced once per chunk shape. The reference cache is rebuilt when the
model's weights change (a fingerprint of the variables is checked on every call).
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np
import tensorflow as tf

from .._explainer import ExplainerBase, assert_additivity, format_values, output_selector
from ..rules.secant import closed_form_secants
from ..rules.spec import RESCALE_EPS
from . import _rules
from ._graph import GraphProgram

_LAYER_TAG = "deepshap_opt_layer_input"
#: keyword arguments of a layer call that are not inputs to explain
_NOT_INPUTS = {"training", "mask", "attention_mask", "query_mask", "value_mask", "key_mask",
               "use_causal_mask", "return_attention_scores"}
#: default bound (bytes) on the working set of one backward pass (the reference cache is not included)
DEFAULT_MEMORY_BUDGET = 2**30
#: construction patches ``layer.call`` of a (model, layer) pair while tracing: one construction at a time
_TRACE_LOCK = threading.RLock()


def _is_keras_tensor(t) -> bool:
    import keras

    return isinstance(t, keras.KerasTensor)


def _to_array(x, what: str):
    """numpy / tf.Tensor / DataFrame / list of numbers → float ndarray (no copy where possible)."""
    if hasattr(x, "values") and hasattr(x, "columns"):           # pandas DataFrame
        x = x.values
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tf / torch tensors
        x = x.numpy() if not hasattr(x, "detach") else x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"{what} must be array-like (numpy, tf.Tensor or DataFrame), got {type(x).__name__}") from e
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{what} must hold numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{what} has complex dtype {a.dtype}: DeepSHAP attributes real inputs")
    if a.ndim == 0:
        raise ValueError(f"{what} must have a batch axis, got a scalar")
    return a


def _cast(a, dt, what):
    """a as the model input's dtype dt; refuses integer data for a float input and NaN/Inf."""
    dt = np.dtype(dt)
    if np.issubdtype(dt, np.floating):
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{what} has dtype {a.dtype} but the model input is {dt.name}: only floating-point inputs "
                            f"can be attributed; convert explicitly ({what}.astype('{dt.name}')). For token ids, "
                            "explain the embedding's output: DeepExplainer((model, layer_after_embedding), data)")
        with np.errstate(over="ignore", invalid="ignore"):
            c = a.astype(dt, copy=False)
        if not np.isfinite(c).all():
            late = c is not a and np.isfinite(a).all()
            raise ValueError(f"{what} contains NaN or Inf{' after conversion to ' + dt.name if late else ''}: "
                             "DeepSHAP needs finite inputs")
        return c
    if np.issubdtype(a.dtype, np.floating) and (not np.isfinite(a).all() or np.any(a != np.round(a))):
        raise TypeError(f"{what} has non-integer values but the model input is {dt.name}")
    return a.astype(dt, copy=False)


def _mib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _available_memory():
    """Bytes of memory available to this process (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover - not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def _pad_rows(a, n):
    """a with its last row repeated up to n rows (chunks keep one shape: no retracing)."""
    if len(a) >= n:
        return a
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)], 0)


def _pad_rows_tf(t, n):
    k = int(t.shape[0])
    if k >= n:
        return t
    return tf.concat([t, tf.repeat(t[-1:], n - k, axis=0)], 0)


def _dim(t, i):
    d = t.shape[i]
    return int(d) if d is not None else tf.shape(t)[i]


#: ops whose TF kernel computes exp(x) − 1 (absolute error ~6e-8 near 0 in float32, relative 0.2 at x = −1e-7):
#: the rescale rule recomputes them with expm1, so that f(x) − f(r) of nearby inputs keeps its digits
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
_EXPM1_FORMS = {
    "Elu": lambda s: tf.where(s > 0, s, tf.math.expm1(s)),
    "Selu": lambda s: _SELU_SCALE * tf.where(s > 0, s, _SELU_ALPHA * tf.math.expm1(s)),
}


#: rescale multipliers in closed form, m(x, r) without the difference f(x) − f(r) (see ``rules.secant``), by TF op
_SECANTS = closed_form_secants(SimpleNamespace(sigmoid=tf.sigmoid, tanh=tf.tanh, sqrt=tf.sqrt, rsqrt=tf.math.rsqrt,
                                               where=tf.where, ones_like=tf.ones_like))
_CLOSED_FORM_SECANT = {"Sigmoid": _SECANTS["sigmoid"], "Tanh": _SECANTS["tanh"], "Rsqrt": _SECANTS["rsqrt"],
                       "Sqrt": _SECANTS["sqrt"], "Reciprocal": _SECANTS["reciprocal"],
                       "Inv": _SECANTS["reciprocal"], "Square": _SECANTS["square"]}


def _closed_form(site):
    """The closed-form secant of a rescale site (a single op in ``_CLOSED_FORM_SECANT``), or None: such a
    site's rule reads x and r alone (no f'(x), no recomputed f)."""
    return None if site.region else _CLOSED_FORM_SECANT.get(site.op.type)


class _Pairs:
    """Reshaping between explicand (n, ...), reference (m, ...) and pair rows (n*m, ...) / (n, m, ...)."""

    def __init__(self, n, m):
        self.n, self.m = n, m
        #: the names under which this trace's tf.custom_gradient rules registered their gradient functions
        self.gradient_names: list[str] = []

    def track(self, out):
        """Record the gradient registration of a rule's output (the IdentityN tf.custom_gradient makes)."""
        self.gradient_names.append(out.op.get_attr("_gradient_op_type").decode())
        return out

    def forget_gradients(self):
        """Drop this trace's entries from TF's process-global gradient registry.

        In graph mode ``tf.custom_gradient`` registers each rule's gradient function under a fresh name
        (``CustomGradient-N``) and never removes it; the function is a closure over the explainer, so the
        explainer, its model and its traced graphs would live as long as the process. The entries are read
        only by the ``tf.gradients`` call of the same trace, which has run when this is called.
        """
        from tensorflow.python.framework import ops as tf_ops

        entries = getattr(getattr(tf_ops, "_gradient_registry", None), "_registry", None)
        if isinstance(entries, dict):       # a private TF structure: left alone if it ever changes shape
            for name in self.gradient_names:
                entries.pop(name, None)
        self.gradient_names.clear()

    @staticmethod
    def _rest(t, k):
        shape = t.shape.as_list()[k:]
        return shape if all(d is not None for d in shape) else tf.shape(t)[k:]

    def _cat(self, head, rest):
        if isinstance(rest, list) and all(isinstance(h, int) for h in head):
            return head + rest
        return tf.concat([tf.stack(head), rest], 0)

    def rows_shape(self, x):
        return self._cat([self.n * self.m], self._rest(x, 1))

    def bx(self, t):
        return tf.expand_dims(t, 1)

    def br(self, t):
        return tf.expand_dims(t, 0)

    def flat(self, t):
        return tf.reshape(t, self._cat([self.n * self.m], self._rest(t, 2)))

    def unflat(self, t):
        return tf.reshape(t, self._cat([self.n, self.m], self._rest(t, 1)))

    def pairs(self, x, r):
        xs = tf.broadcast_to(self.bx(x), self._cat([self.n, self.m], self._rest(x, 1)))
        rs = tf.broadcast_to(self.br(r), self._cat([self.n, self.m], self._rest(r, 1)))
        return self.flat(xs), self.flat(rs)


class DeepExplainer(ExplainerBase):
    """Drop-in for ``shap.DeepExplainer`` on Keras 3 / TF 2 models, computed with cached references.

    Parameters
    ----------
    model : a Keras model (Sequential, functional or subclassed), an ``(inputs, outputs)`` pair of
        KerasTensors of a functional graph, or ``(model, layer)`` to explain the input of ``layer``.
    data : the background (references): an array, tensor or DataFrame ``(M, ...)``, or a list of those
        for a multi-input model.
    batch_size : most explicand × reference rows in one backward pass; None (default) picks it from
        ``memory_budget``. It bounds memory and does not change the values.
    memory_budget : bytes for the working set of one backward pass when ``batch_size`` is None (default
        1 GiB; about six row-sized temporaries of the largest rule site per row). The reference cache
        (``cache_nbytes``: M × the site values of one row) comes on top.

    Calls are serialised per explainer (a lock): an explainer may be shared between threads.
    """

    def __init__(self, model, data, batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        self._batch_size_arg = None if batch_size is None else int(batch_size)
        self.memory_budget = int(memory_budget)
        self._lock = threading.RLock()
        self._layer = None
        self._model = self._resolve_model(model)
        self.multi_input = isinstance(data, (list, tuple))
        data_list = list(data) if self.multi_input else [data]
        if not data_list:
            raise ValueError("data is an empty list")
        arrays = [_to_array(d, "data") for d in data_list]
        m = arrays[0].shape[0]
        if m == 0:
            raise ValueError("the background (data) is empty: pass at least one reference row")
        if any(a.shape[0] != m for a in arrays):
            raise ValueError("every background array must have the same number of rows; got shapes "
                             f"{[a.shape for a in arrays]}")
        self._in_dtypes = self._input_dtypes(arrays)
        self.data = [_cast(a, dt, "data") for a, dt in zip(arrays, self._in_dtypes)]
        self._row_shapes = [a.shape[1:] for a in self.data]
        self.M = m
        with _TRACE_LOCK:
            self._trace()
        self._multi_values = self.multi_input or len(self.prog.explained) > 1
        self._plan()
        self._build_cache()

    # -- model forms -----------------------------------------------------------------------------------
    def _resolve_model(self, model):
        import keras

        if isinstance(model, tuple) and len(model) == 2 and not isinstance(model[0], keras.Model) and (
                all(_is_keras_tensor(t) for t in tf.nest.flatten(model[1]))
                or all(_is_keras_tensor(t) for t in tf.nest.flatten(model[0]))):
            inputs, outputs = model
            if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
                outputs = outputs[0]
            if isinstance(outputs, (list, tuple, dict)) and len(outputs) > 1:
                raise TypeError(f"(inputs, outputs): {len(outputs)} output tensors given; DeepExplainer explains one "
                                "output tensor (N, K) or (N,): pass e.g. (model.inputs, model.outputs[0])")
            if not all(_is_keras_tensor(t) for t in tf.nest.flatten(inputs)) or not _is_keras_tensor(outputs):
                raise TypeError("an (inputs, outputs) pair must hold KerasTensors of a functional model "
                                "(Keras 3 has no graph-mode tf.Tensors)")
            return keras.Model(inputs, outputs)
        if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], keras.Model):
            mdl, layer = model
            if not isinstance(layer, keras.layers.Layer):
                raise TypeError(f"(model, layer): the second item must be a keras Layer, got {type(layer).__name__}")
            if not any(lyr is layer for lyr in mdl._flatten_layers(include_self=False)):
                raise ValueError(f"layer {layer.name!r} is not a layer of model {mdl.name!r}")
            self._layer = layer
            return mdl
        if isinstance(model, (keras.Model, keras.layers.Layer)):
            return model
        if callable(model) and not isinstance(model, (list, tuple)):
            return model
        raise TypeError(f"model must be a Keras model, (inputs, outputs) KerasTensors or (model, layer); got "
                        f"{type(model).__name__}")

    def _input_dtypes(self, arrays):
        k = len(arrays)
        dts = []
        specs = getattr(self._model, "inputs", None)
        try:
            specs = list(specs) if specs is not None else None
        except Exception:  # noqa: BLE001 - subclassed models raise (various types) before being called
            specs = None
        for i in range(k):
            dt = None
            if specs and len(specs) == k:
                dt = getattr(specs[i], "dtype", None)
            if dt:
                dt = np.dtype(tf.as_dtype(dt).as_numpy_dtype)
            elif np.issubdtype(arrays[i].dtype, np.integer):      # unknown input spec: integer data stays integer
                dt = np.dtype(np.int64 if arrays[i].dtype.itemsize > 4 else np.int32)
            else:
                dt = np.dtype(np.float32)
            dts.append(dt)
        return dts

    def _call_model(self, xs):
        inp = list(xs) if self.multi_input else xs[0]
        try:
            return self._model(inp, training=False)
        except TypeError:
            return self._model(inp)

    def _trace(self):
        specs = [tf.TensorSpec((None,) + tuple(s), tf.as_dtype(d)) for s, d in zip(self._row_shapes, self._in_dtypes)]
        layer, names = self._layer, []
        if layer is not None:
            orig = layer.call
            had_own = "call" in vars(layer)

            def tag(x):
                if isinstance(x, tf.Tensor) and (x.dtype.is_floating or (not names and x is args0[0])):
                    t = tf.identity(x, name=_LAYER_TAG)
                    names.append(t.name)
                    return t
                return x

            args0 = [None]

            def tagged(*args, **kwargs):
                if not names:
                    # every float tensor the layer receives (a list input, or several arguments such as
                    # MultiHeadAttention's query and value), in order: positional, then keyword arguments;
                    # the first positional input is tagged whatever its dtype (token ids stop with a TypeError)
                    args0[0] = tf.nest.flatten(args[0])[0] if args and tf.nest.flatten(args[0]) else None
                    args = tuple(tf.nest.map_structure(tag, a) for a in args)
                    kwargs = {k: v if k in _NOT_INPUTS else tf.nest.map_structure(tag, v) for k, v in kwargs.items()}
                return orig(*args, **kwargs)

            object.__setattr__(layer, "call", tagged)
        try:
            fn = tf.function(lambda *xs: self._call_model(xs), autograph=False)
            cf = fn.get_concrete_function(*specs)
        except ValueError as e:
            shapes = [tuple(s.shape) for s in specs]
            raise ValueError(f"the model cannot be called on inputs of shape {shapes}: {e}") from e
        finally:
            if layer is not None:
                if had_own:
                    object.__setattr__(layer, "call", orig)
                else:
                    object.__delattr__(layer, "call")
        if layer is not None and not names:
            raise ValueError(f"layer {layer.name!r} was not called when the model ran")
        self._cf = cf
        self.prog = GraphProgram(cf, len(specs), names or None, f"(input of layer {layer.name!r})" if layer else "")
        out = self.prog.output
        if out.shape.rank not in (1, 2):
            raise ValueError(f"the model output must be (batch, outputs) or (batch,), got shape {out.shape}")
        self._vector_out = out.shape.rank == 1
        self.num_outputs = 1 if self._vector_out else int(out.shape[1])
        self._variables = list(cf.variables) if hasattr(cf, "variables") else []
        self._fwd = tf.function(lambda *xs: self._fwd_impl(*xs, derivatives=True), autograph=False,
                                reduce_retracing=True)
        self._fwd_ref = tf.function(lambda *xs: self._fwd_impl(*xs, derivatives=False), autograph=False,
                                    reduce_retracing=True)
        # traced per chunk shape (static shapes let grappler drop the surrogate's forward values)
        self._bwd = tf.function(self._bwd_impl, autograph=False, reduce_retracing=False)

    # -- planning: which values are cached, how many rows per backward ----------------------------------
    def _plan(self):
        """Unique site values to cache (slots), the rows per backward pass, the reference chunk size."""
        prog = self.prog
        slots, index = [], {}
        self._site_slots = []
        for site in prog.sites:
            idx = []
            for t in site.inputs:
                key = prog.resolve(t).ref()
                if key not in index:
                    index[key] = len(slots)
                    slots.append(prog.resolve(t))
                idx.append(index[key])
            self._site_slots.append(idx)
        self._slots = slots
        # a slot that is the output of a rescale site whose input is cached is recomputed, not stored
        # (e.g. VGG's max-pool input = relu(conv output)): element-wise, cheap, and it saves its memory
        out_of = {prog.resolve(s.output).ref(): s for s in prog.sites if s.kind == "rescale"}
        self._derived = {}
        for j, t in enumerate(slots):
            site = out_of.get(t.ref())
            if site is not None and prog.resolve(site.inputs[0]).ref() in index:
                self._derived[j] = (site, index[prog.resolve(site.inputs[0]).ref()])
        # no cycles: a derived slot's source chain must end at a stored slot
        for j in list(self._derived):
            seen, k = set(), j
            while k in self._derived and k not in seen:
                seen.add(k)
                k = self._derived[k][1]
            if k in self._derived:
                del self._derived[j]
        self._stored = [j for j in range(len(slots)) if j not in self._derived]
        self._stored_pos = {j: i for i, j in enumerate(self._stored)}

        def row_bytes(t):
            dims = t.shape.as_list()[1:] if t.shape.rank else None
            if dims is None or any(d is None for d in dims):
                return None
            return int(np.prod(dims, dtype=np.int64)) * t.dtype.size

        sizes = [row_bytes(t) for t in slots] + [row_bytes(s.output) for s in prog.sites] + \
            [row_bytes(t) for t in prog.explained]
        known = [z for z in sizes if z is not None]
        self._largest_row = max(known) if known else None
        per_row_cache = sum(z for z in (row_bytes(slots[j]) for j in self._stored) if z is not None) + \
            sum(z for z in (row_bytes(t) for t in prog.explained) if z is not None)
        #: bytes of the reference cache (M rows of every cached site value and explained input)
        self.cache_nbytes = int(per_row_cache) * self.M
        if self._batch_size_arg is not None:
            rows = self._batch_size_arg
        elif self._largest_row:
            rows = max(1, self.memory_budget // (6 * self._largest_row))
        else:
            rows = 32
        self.batch_size = int(rows)
        self._mc = min(self.M, self.batch_size)       # references per backward chunk (the cache's chunking)
        avail = _available_memory()
        if avail is not None and self.cache_nbytes > 0.8 * avail:
            raise ValueError(
                f"the reference cache would need {_mib(self.cache_nbytes)} for M={self.M} background rows "
                f"({_mib(per_row_cache)} per row) and {_mib(avail)} are available: pass fewer background rows (a few "
                "hundred are usually enough)")

    # -- forward (explicands and references) -----------------------------------------------------------
    def _fwd_impl(self, *xs, derivatives=True):
        prog = self.prog
        env = prog.run({t.ref(): x for t, x in zip(prog.model_inputs, xs)})
        out = prog.value(env, prog.output)
        if self._vector_out:
            out = out[:, None]
        vals = [prog.value(env, self._slots[j]) for j in self._stored]
        dfs = []
        if derivatives:
            # f'(s) of every element-wise site whose rule reads it (not the closed-form ones) from one gradient
            # call (each y depends on its own private copy s only, element-wise, so d(Σ y)/ds_i = f_i'(s_i));
            # one call per site costs ~0.1 s each
            sites = [site for site in prog.sites if site.kind == "rescale" and _closed_form(site) is None]
            ss = [tf.identity(prog.value(env, site.inputs[0])) for site in sites]
            ys = [self._recompute_output(site, s) for site, s in zip(sites, ss)]
            ds = tf.gradients(ys, ss) if ss else []
            dfs = [tf.zeros_like(s) if d is None else d for s, d in zip(ss, ds)]
        expl = [prog.value(env, t) for t in prog.explained]
        return out, expl, vals, dfs

    def _fingerprint(self):
        """Σv and Σ|v| of every variable the model reads (eager: cheaper than a traced function here)."""
        vals = [(tf.reduce_sum(tf.cast(v, tf.float32)), tf.reduce_sum(tf.abs(tf.cast(v, tf.float32))))
                for v in self._variables if v.dtype.is_floating or v.dtype.is_integer]
        return np.array([float(a) for pair in vals for a in pair])

    def _chunks(self, n, size):
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    def _check_batch_axis(self, tensors, rows):
        for t in tensors:
            if t.shape.rank == 0 or t.shape[0] != rows:
                raise ValueError("a tensor inside the model does not keep the batch axis first (the batch is folded "
                                 "or reduced); DeepSHAP needs every activation to have one row per input row")

    def _build_cache(self):
        """Forward the references once, in chunks of exactly ``_mc`` rows (the last one padded, its padding
        weighted 0); the chunks are kept as they are (no concatenated copy)."""
        self._ref_chunks = None                      # free the old cache before building the new one
        chunks, outs, mc = [], [], self._mc
        for a, b in self._chunks(self.M, mc):
            o, e, v, _ = self._fwd_ref(*[tf.convert_to_tensor(_pad_rows(d[a:b], mc)) for d in self.data])
            self._check_batch_axis(e + v + [o], mc)
            outs.append(o.numpy()[:b - a])
            w = np.zeros(mc, e[0].dtype.as_numpy_dtype)
            w[:b - a] = 1
            chunks.append((e, v, tf.constant(w)))
        self._ref_chunks = chunks
        self._expl_shapes = [tuple(t.shape[1:]) for t in chunks[0][0]]
        self._expl_dtype = chunks[0][0][0].dtype.as_numpy_dtype
        self.expected_value = np.asarray(np.concatenate(outs, 0), np.float64).mean(axis=0)
        self._fp = self._fingerprint()

    # -- backward over explicand × reference pairs -----------------------------------------------------
    def _bwd_impl(self, expl_x, expl_r, vals_x, dfs_x, vals_r, idx, w_r):
        """Σ over the chunk's references of multiplier × (x − r), for output idx[i] of row i: (n, *in).

        The graph is re-run on zeros with every site replaced by a tf.custom_gradient function; each
        rule's multipliers are computed inside its gradient function (after the upstream gradient
        exists, so only a few sites' multipliers are alive at a time) from the explicand values
        (n, ...) and the cached reference values (m, ...), broadcast as (n, 1, ...) vs (1, m, ...).
        """
        prog = self.prog
        n, m = _dim(expl_x[0], 0), _dim(expl_r[0], 0)
        ctx = _Pairs(n, m)
        hooks = {}
        dfi = 0
        for si, site in enumerate(prog.sites):
            vx, vr = [self._lazy(vals_x, j) for j in self._site_slots[si]], \
                [self._lazy(vals_r, j) for j in self._site_slots[si]]
            if site.kind == "rescale":
                closed = _closed_form(site) is not None
                hooks[id(site.op)] = self._rescale_hook(site, vx[0], vr[0], None if closed else dfs_x[dfi], ctx)
                dfi += not closed
            elif site.kind == "maxlike":
                hooks[id(site.op)] = self._maxlike_hook(site, vx[0], vr[0], ctx)
            elif site.kind in ("softmax", "log_softmax"):
                hooks[id(site.op)] = self._softmax_hook(site, vx[0], vr[0], ctx)
            elif site.kind in ("bilinear", "pair"):
                hooks[id(site.op)] = self._binary_hook(site, vx, vr, ctx)
        zs = [tf.zeros(ctx.rows_shape(x), x.dtype) for x in expl_x]
        feeds = {t.ref(): z for t, z in zip(prog.explained, zs)}
        for t, x in zip(prog.model_inputs, self._surrogate_inputs(n * m)):
            if t.ref() not in feeds:
                feeds[t.ref()] = x
        try:
            env = prog.run(feeds, ops=self._surrogate_ops, hooks=hooks)
            out = prog.value(env, prog.output)
            if self._vector_out:
                out = out[:, None]
            seed = tf.one_hot(tf.repeat(idx, m), self.num_outputs, dtype=out.dtype)
            grads = tf.gradients(out, zs, grad_ys=seed)
        finally:
            ctx.forget_gradients()
        phis = []
        for g, x, r, z in zip(grads, expl_x, expl_r, zs):
            if g is None:
                g = tf.zeros_like(z)
            g = ctx.unflat(g)
            wr = tf.reshape(w_r, [1, -1] + [1] * (x.shape.rank - 1))
            phis.append(tf.reduce_sum(g * (ctx.bx(x) - ctx.br(r)) * wr, axis=1))
        return phis

    def _lazy(self, vals, j):
        """A function giving slot j's value: stored, or recomputed from the input of the rescale site whose
        output it is (called inside a gradient function, so the value exists only while that rule runs)."""
        d = self._derived.get(j)
        if d is None:
            t = vals[self._stored_pos[j]]
            return lambda: t
        site, src = d
        inner = self._lazy(vals, src)
        return lambda: self._recompute_output(site, inner())

    def _surrogate_inputs(self, rows):
        # model inputs the surrogate still reads (only for shapes, checked by the analysis): zeros
        return [tf.zeros([rows] + list(s), d) for s, d in zip(self._row_shapes, self._in_dtypes)]

    @property
    def _surrogate_ops(self):
        ops = getattr(self, "_sur_ops", None)
        if ops is None:
            prog = self.prog
            keep = prog._needed([prog.output], stop=prog.explained)
            exits = {id(s.op) for s in prog.sites if s.region}
            ops = [op for op in keep if id(op) not in prog.region_ops or id(op) in exits]
            self._sur_ops = ops
        return ops

    def _recompute_output(self, site, s):
        """The site's output for input value s (re-running the op / region on cached inputs)."""
        if not site.region and site.op.type in _EXPM1_FORMS:
            return _EXPM1_FORMS[site.op.type](s)
        prog = self.prog
        env = {site.inputs[0].ref(): s}
        prog.run(env, ops=site.region if site.region else [site.op], env=env)
        return prog.value(env, site.output)

    def _run_single(self, op, feeds):
        env = dict(feeds)
        self.prog.run(env, ops=[op], env=env)
        return env

    def _zeros_out(self, site, ctx, like):
        shape = site.output.shape
        if shape.rank is not None and all(d is not None for d in shape.as_list()[1:]):
            return tf.zeros([ctx.n * ctx.m] + shape.as_list()[1:], site.output.dtype)
        return like()

    def _rescale_hook(self, site, sx_f, sr_f, dfx, ctx):
        """dfx: f'(x) of the explicand rows, or None for a closed-form site (which does not read it)."""
        prog = self.prog
        secant = _closed_form(site)

        def hook(env):
            x = prog.value(env, site.inputs[0])

            @tf.custom_gradient
            def rule(z):
                def grad(g):
                    with tf.control_dependencies([g]):
                        sx, sr = sx_f(), sr_f()
                        if secant is not None:
                            return ctx.flat(ctx.unflat(g) * secant(ctx.bx(sx), ctx.br(sr)))
                        yx, yr = self._recompute_output(site, sx), self._recompute_output(site, sr)
                        return ctx.flat(_rules.rescale_apply(ctx.unflat(g), ctx.bx(sx), ctx.br(sr), ctx.bx(yx),
                                                             ctx.br(yr), ctx.bx(dfx)))
                return tf.identity(z), grad

            env[site.output.ref()] = ctx.track(rule(x))
        return hook

    def _maxlike_hook(self, site, xin_f, rin_f, ctx):
        prog = self.prog
        op = site.op
        src = site.inputs[0]
        is_min = op.type == "Min"

        def apply(v):
            return prog.value(self._run_single(op, {src.ref(): v}), site.output)

        def hook(env):
            x = prog.value(env, src)

            @tf.custom_gradient
            def rule(z):
                def grad(g):
                    # sequenced so that each broadcast pair tensor dies before the next one is made
                    with tf.control_dependencies([g]):
                        xin, rin = xin_f(), rin_f()
                        yx, yr = apply(xin), apply(rin)
                        yxb, yrb = ctx.flat(ctx.bx(yx) + 0 * ctx.br(yr)), ctx.flat(ctx.br(yr) + 0 * ctx.bx(yx))
                        c = tf.minimum(yxb, yrb) if is_min else tf.maximum(yxb, yrb)
                        gx, gr = g * (c - yrb), g * (yxb - c)
                        xb = ctx.pairs(xin, rin[:1])[0]
                        routed_x = tf.gradients(apply(xb), xb, grad_ys=gx)[0]
                    with tf.control_dependencies([routed_x]):
                        rb = ctx.pairs(xin[:1], rin)[1]
                        routed = routed_x + tf.gradients(apply(rb), rb, grad_ys=gr)[0]
                    with tf.control_dependencies([routed]):
                        return ctx.flat(_rules.divide_routed(ctx.unflat(routed), ctx.bx(xin), ctx.br(rin)))
                return self._zeros_out(site, ctx, lambda: apply(z)), grad

            env[site.output.ref()] = ctx.track(rule(x))
        return hook

    def _softmax_hook(self, site, zx_f, zr_f, ctx):
        prog = self.prog

        def grad_fn(g):
            with tf.control_dependencies([g]):
                zx, zr = zx_f(), zr_f()
                g5 = ctx.unflat(g)
                if site.kind == "softmax":
                    u, v, px, pr = _rules.softmax_coefficients(ctx.bx(zx), ctx.br(zr), RESCALE_EPS)
                    return ctx.flat(_rules.softmax_grad(g5, u, v, px, pr))
                w = _rules.log_softmax_weights(ctx.bx(zx), ctx.br(zr), RESCALE_EPS)
                return ctx.flat(g5 - tf.reduce_sum(g5, axis=-1, keepdims=True) * w)

        def hook(env):
            x = prog.value(env, site.inputs[0])

            @tf.custom_gradient
            def rule(z):
                return tf.identity(z), grad_fn

            env[site.output.ref()] = ctx.track(rule(x))
        return hook

    def _clone_with(self, env, site, override):
        """Re-run site.op with the inputs at `override` positions replaced; the others from env."""
        return self.prog.exec_op(site.op, dict(env), override=override)[0]

    def _binary_hook(self, site, vx_f, vr_f, ctx):
        """Bilinear (VJPs at the operand means) and Shapley-pair sites: two varying operands."""
        (pa, pb) = site.positions
        prog = self.prog

        def hook(env):
            a, b = (prog.value(env, t) for t in site.inputs)

            @tf.custom_gradient
            def rule(a_, b_):
                def grad(g):
                    with tf.control_dependencies([g]):
                        vx, vr = [f() for f in vx_f], [f() for f in vr_f]
                        if site.kind == "bilinear":
                            abar = ctx.flat(0.5 * (ctx.bx(vx[0]) + ctx.br(vr[0])))
                            bbar = ctx.flat(0.5 * (ctx.bx(vx[1]) + ctx.br(vr[1])))
                            zz = self._clone_with(env, site, {pa: abar, pb: bbar})
                            ga, gb = tf.gradients(zz, [abar, bbar], grad_ys=g)
                        else:
                            def g2(p, q):
                                return self._clone_with(env, site, {pa: p, pb: q})

                            ops = (ctx.bx(vx[0]), ctx.br(vr[0]), ctx.bx(vx[1]), ctx.br(vr[1]))
                            if site.op.type in ("RealDiv", "Div") and (pa, pb) == (0, 1):
                                ma, mb = _rules.div_pair_multipliers(*ops)     # a / b: closed form
                            else:
                                ma, mb = _rules.pair_multipliers(g2, *ops)
                            pa0, pb0 = tf.zeros_like(a_), tf.zeros_like(b_)
                            lin = pa0 * tf.stop_gradient(ctx.flat(ma)) + pb0 * tf.stop_gradient(ctx.flat(mb))
                            ga, gb = tf.gradients(lin, [pa0, pb0], grad_ys=g)
                        return ga, gb
                return self._zeros_out(site, ctx, lambda: self._clone_with(env, site, {pa: a_, pb: b_})), grad

            env[site.output.ref()] = ctx.track(rule(a, b))
        return hook

    # -- the public computation -----------------------------------------------------------------------
    def shap_values(self, X, ranked_outputs=None, output_rank_order="max", check_additivity=True):
        """SHAP values of X, laid out as shap 0.51 lays them out.

        Returns ``(N, *in, K)`` float64 — a list of those, one per input, for a multi-input model or a
        ``(model, layer)`` pair whose layer takes several inputs; with ``ranked_outputs=k``,
        ``(values, indexes)`` with values ``(N, *in, k)`` and indexes ``(N, k)``.
        """
        select = output_selector(ranked_outputs, output_rank_order, self.num_outputs)
        phis, outputs, indexes, dtype = self._explain(X, select)
        if check_additivity:
            assert_additivity(phis, outputs, self.expected_value, indexes, dtype)
        values = format_values(phis, self._multi_values)
        return (values, indexes) if ranked_outputs is not None else values

    def __call__(self, X):
        """``shap.Explanation`` of X (a list of them for several explained inputs), base_values filled."""
        if self._layer is None:
            return super().__call__(X)
        from shap import Explanation

        with self._lock:
            values = self.shap_values(X)
            data = self._last_explained                # what is attributed: the layer's input values
        n = data[0].shape[0]
        base = np.broadcast_to(np.asarray(self.expected_value, np.float64), (n, self.num_outputs)).copy()
        if self._multi_values:
            return [Explanation(values=v, base_values=base, data=d) for v, d in zip(values, data)]
        return Explanation(values=values, base_values=base, data=data[0])

    def _check_cache(self):
        fp = self._fingerprint()
        if fp.shape != self._fp.shape or not np.array_equal(fp, self._fp):
            self._build_cache()

    def _inputs_of(self, X):
        if self.multi_input:
            if not isinstance(X, (list, tuple)) or len(X) != len(self.data):
                raise ValueError(f"this model has {len(self.data)} inputs: pass X as a list of {len(self.data)} arrays")
            xs = list(X)
        else:
            if isinstance(X, (list, tuple)) and len(X) == 1 and not np.isscalar(X[0]) and \
                    np.ndim(X[0]) == len(self._row_shapes[0]) + 1:
                X = X[0]
            elif isinstance(X, (list, tuple)) and len(X) > 1 and all(hasattr(x, "shape") for x in X) and \
                    np.ndim(X[0]) == len(self._row_shapes[0]) + 1:
                raise ValueError(f"this model has one input: pass X as one array, not a list of {len(X)} arrays")
            xs = [X]
        arrays = []
        for i, (x, shape, dt) in enumerate(zip(xs, self._row_shapes, self._in_dtypes)):
            name = f"X[{i}]" if self.multi_input else "X"
            a = _to_array(x, name)
            if a.ndim == len(shape) and a.shape == tuple(shape):
                raise ValueError(f"{name} has shape {a.shape}: pass a batch "
                                 f"(N, {', '.join(map(str, shape))})")
            if a.shape[1:] != tuple(shape):
                raise ValueError(f"{name} has rows of shape {a.shape[1:]}, the "
                                 f"background has {tuple(shape)}")
            arrays.append(_cast(a, dt, name))
        if len({a.shape[0] for a in arrays}) != 1:
            raise ValueError(f"the inputs have different numbers of rows: {[a.shape[0] for a in arrays]}")
        return arrays

    def _explain(self, X, select):
        xs = self._inputs_of(X)
        with self._lock:          # the cache check, a rebuild and the explanation happen as one step
            return self._explain_locked(xs, select)

    def _explain_locked(self, xs, select):
        self._check_cache()
        N, M = xs[0].shape[0], self.M
        per = max(1, self.batch_size // M) if self.batch_size >= M else 1
        n_fix = max(1, min(per, N))                         # every chunk padded to n_fix rows: one trace
        spans = self._chunks(N, n_fix)

        def forward(a, b):
            out, ex, vals, dfs = self._fwd(*[tf.convert_to_tensor(_pad_rows(x[a:b], n_fix)) for x in xs])
            return out.numpy()[:b - a], ex, vals, dfs

        # the outputs of every row first (select may rank across rows); with several chunks the site
        # values are recomputed per chunk instead of being held for all N explicands at once
        kept = None
        if len(spans) == 1:
            kept = forward(*spans[0])
            outputs = kept[0]
        else:
            outputs = np.concatenate([forward(a, b)[0] for a, b in spans], 0) if spans else \
                np.zeros((0, self.num_outputs), np.float32)
        indexes = np.asarray(select(outputs))
        k = indexes.shape[1]
        phis = [np.zeros((N,) + s + (k,), np.float64) for s in self._expl_shapes]
        keep_expl = self._layer is not None           # explainer(X) of a (model, layer) pair returns them as data
        explained = [np.zeros((N,) + s, self._expl_dtype) for s in self._expl_shapes] if keep_expl else []
        for a, b in spans:
            _, ex, vals, dfs = kept if kept is not None else forward(a, b)
            for i, e in enumerate(ex if keep_expl else []):
                explained[i][a:b] = e.numpy()[:b - a]
            for j in range(k):
                idx = tf.constant(_pad_rows(indexes[a:b, j], n_fix), tf.int32)
                acc = None
                for rex, rvals, w in self._ref_chunks:
                    part = self._bwd(ex, rex, vals, dfs, rvals, idx, w)
                    acc = [p.numpy().astype(np.float64) for p in part] if acc is None else \
                        [s + p.numpy() for s, p in zip(acc, part)]
                for i, s in enumerate(acc):
                    phis[i][a:b, ..., j] = s[:b - a] / M
            ex = vals = dfs = kept = None
        self._last_explained = explained
        return phis, outputs.astype(np.float64), indexes, self._in_dtypes[0] if self._layer is None else \
            self._expl_dtype

    def __repr__(self):
        return (f"deepshap_opt.tf.DeepExplainer({len(self.prog.sites)} rule sites, M={self.M}, "
                f"outputs={self.num_outputs}, batch_size={self.batch_size})")
