"""MFABA for TensorFlow / Keras: attributions along an adversarial ascent to the decision boundary.

Same method, arguments and results as :mod:`deepshap_opt.torch.mfaba` (see there for the formula and for
how it departs from the reference code); this backend never imports torch. The whole walk runs as one
``tf.while_loop`` inside a ``tf.function``: fresh input-only gradients at every point, a running sum
instead of stored path points, finished samples masked, the early-stop test read from the next step's
forward pass, and no host round trip per step (the loop's condition is evaluated in the graph).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from .._mfaba import VARIANTS, MFABASettings

__all__ = ["MFABA", "VARIANTS", "MFABAPath"]

#: The sharp variant's step is ``SHARP_SCALE · alpha`` in L2 norm (the reference's constant).
SHARP_SCALE = 100.0


class MFABAPath(NamedTuple):
    """The path MFABA took, for ``attribute(..., return_path=True)``.

    points: (L+1, N, *in) — ``points[0]`` is x; past sample i's last step, ``points[t]`` repeats its x_T.
    gradients: (L, N, *in) — ∇ₓ f_c at ``points[t]``, zero for ``t ≥ lengths[i]``, so that
        ``A = −Σ_t (points[t+1] − points[t]) · gradients[t]`` holds exactly.
    lengths: (N,) int64 — T, the number of steps each sample took.
    """

    points: object
    gradients: object
    lengths: object


class MFABA(MFABASettings):
    """MFABA attributions of a Keras / TensorFlow classifier (Zhu et al., AAAI 2024).

    Parameters
    ----------
    model : callable
        A Keras model (or any callable taking ``(x, training=False)``) mapping (N, *in) to class scores
        (N, K). Inputs are laid out as the model expects them (NHWC for Keras images); MFABA is element-wise,
        so the layout does not matter to it.
    variant, steps, alpha, epsilon, data_min, data_max, use_softmax, early_stop
        As in :class:`deepshap_opt.torch.mfaba.MFABA`. ``data_min``/``data_max`` broadcast to one sample's
        shape, e.g. (1, 1, C) per channel for NHWC.

    Notes
    -----
    The model is always called with ``training=False`` (BatchNorm's moving statistics, no dropout), which
    keeps each image's attribution independent of its batch mates.
    """

    def __init__(self, model, variant: str = "sharp", steps: int = 50, alpha: float = 0.001,
                 epsilon: float = 0.3, data_min=0.0, data_max=1.0, use_softmax: bool = True,
                 early_stop: bool = True):
        if not callable(model):
            raise TypeError(f"model must be a Keras model or a callable, got {type(model).__name__}")
        super().__init__(variant, steps, alpha, epsilon, data_min, data_max, use_softmax, early_stop)
        self.model = model
        # traced walks by settings; reduce_retracing keeps new batch sizes from retracing them
        self._walks = {}

    # ------------------------------------------------------------------------------------------ public
    def attribute(self, x, target=None, return_path: bool = False):
        """MFABA attributions of x.

        Parameters
        ----------
        x : np.ndarray or tf.Tensor, (N, *in), floating point, inside [data_min, data_max]
        target : None, int, or (N,) ints
            Class c per sample; None: the class the model predicts for x.
        return_path : bool
            Also return the :class:`MFABAPath` (this stores every point: memory grows with ``steps``).

        Returns
        -------
        attributions : same shape and dtype as x; a NumPy array for NumPy input, else a tf.Tensor
        path : MFABAPath, only with ``return_path=True`` (NumPy arrays for NumPy input)
        """
        was_numpy = not tf.is_tensor(x)
        x = self._as_input(x)
        lo, hi = self._bounds(x)
        k = self._num_classes(x)
        n = int(x.shape[0])
        if target is None:
            c, use_pred = tf.zeros([n], tf.int64), tf.constant(True)
        else:
            c, use_pred = self._targets(target, n, k), tf.constant(False)
        # the settings are baked into the trace as constants: key the traced walk on them, so that changing
        # an attribute after a call takes effect
        key = (self.variant, self.steps, self.alpha, self.epsilon, self.use_softmax, self.early_stop,
               return_path)
        walk = self._walks.get(key)
        if walk is None:
            walk = self._walks[key] = tf.function(
                lambda *a: self._walk(*a, return_path=return_path), reduce_retracing=True)
        total, *path = walk(x, c, use_pred, lo, hi)
        if was_numpy:
            total = total.numpy()
            path = [p.numpy() for p in path]
        return (total, MFABAPath(*path)) if return_path else total

    def shap_values(self, X, ranked_outputs=None, output_rank_order: str = "max"):
        """``shap``-style layout: ``(N, *in, K)`` float64, one MFABA run per explained class.

        With ``ranked_outputs=k`` returns ``(values (N, *in, k), indexes (N, k))``, the classes ranked by the
        model's output at X, like ``shap.DeepExplainer``. K classes cost K runs.
        """
        from .._explainer import output_selector

        x = self._as_input(X)
        out = self._check_output(self.model(x, training=False), int(x.shape[0]))
        out_np = np.asarray(out, dtype=np.float64)
        indexes = output_selector(ranked_outputs, output_rank_order, out_np.shape[1])(out_np)
        cols = [np.asarray(self.attribute(x, indexes[:, j]), dtype=np.float64)
                for j in range(indexes.shape[1])]
        values = np.stack(cols, axis=-1)
        return values if ranked_outputs is None else (values, indexes)

    # ------------------------------------------------------------------------------------------ checks
    @staticmethod
    def _as_input(x) -> tf.Tensor:
        if not tf.is_tensor(x):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"x must be a numpy array or tf.Tensor, got {type(x).__name__}")
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
            x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(f"x must be a floating-point tensor (gradients are taken w.r.t. it), got "
                            f"{x.dtype.name}")
        if x.shape.rank is None or x.shape.rank < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, *in), got shape {tuple(x.shape)}")
        return x

    def _bounds(self, x: tf.Tensor):
        lo = tf.cast(tf.convert_to_tensor(self.data_min), x.dtype)
        hi = tf.cast(tf.convert_to_tensor(self.data_max), x.dtype)
        sample = tuple(x.shape[1:])
        try:
            fits = all(np.broadcast_shapes(tuple(b.shape), sample) == sample for b in (lo, hi))
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"data_min/data_max of shapes {tuple(lo.shape)}/{tuple(hi.shape)} do not "
                             "broadcast "
                             f"to one sample's shape {sample}")
        if bool(tf.reduce_any(lo > hi)):
            raise ValueError("data_min must not exceed data_max")
        if bool(tf.reduce_any(x < lo) or tf.reduce_any(x > hi)):
            raise ValueError(
                f"x must lie in [data_min, data_max] (MFABA clips every path point into that range): x spans "
                f"[{float(tf.reduce_min(x)):.6g}, {float(tf.reduce_max(x)):.6g}] but "
                f"data_min={self.data_min!r}, "
                f"data_max={self.data_max!r}. Pass the bounds of your (normalised) input space.")
        return lo, hi

    @staticmethod
    def _check_output(out, n: int):
        if isinstance(out, (list, tuple, dict)) or not tf.is_tensor(out) and not isinstance(out, np.ndarray):
            raise TypeError("the model must return one tensor of class scores (N, K), got "
                            f"{type(out).__name__}")
        if len(out.shape) != 2 or out.shape[0] != n:
            raise ValueError(f"the model must return class scores of shape (N, K) = ({n}, K) with a class "
                             f"dimension, got shape {tuple(out.shape)}")
        return out

    def _num_classes(self, x: tf.Tensor) -> int:
        # one forward of a single sample, to check the output and validate targets before tracing the walk
        k = int(self._check_output(self.model(x[:1], training=False), 1).shape[1])
        if self.use_softmax and k < 2:
            raise ValueError("use_softmax=True needs at least 2 classes (a softmax over one class is "
                             "constant); pass use_softmax=False to explain a single output")
        return k

    @staticmethod
    def _targets(target, n: int, k: int) -> tf.Tensor:
        t = np.asarray(target.numpy() if tf.is_tensor(target) else target)
        if t.dtype == bool or not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"target must be integer class indexes, got dtype {t.dtype}")
        if t.ndim == 0:
            t = np.full(n, t)
        if t.shape != (n,):
            raise ValueError(f"target must be an int or have one entry per sample ({n},), got shape "
                             f"{t.shape}")
        if (t < 0).any() or (t >= k).any():
            raise ValueError(f"target out of range: the model has {k} classes (0..{k - 1}), got "
                             f"{t.min()}..{t.max()}")
        return tf.constant(t, tf.int64)

    # ------------------------------------------------------------------------------------------ the walk
    def _forward_grad(self, xt, c, t, use_pred):
        """Scores at x_t, the target (the prediction at t = 0 when none was given) and ∇ₓ f_c(x_t)."""
        # watch only the input: the tape neither records nor differentiates the model's variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(xt)
            out = self.model(xt, training=False)
            c = tf.where(tf.logical_and(tf.equal(t, 0), use_pred), tf.argmax(out, axis=1), c)
            scores = tf.nn.softmax(out, axis=1) if self.use_softmax else out
            # Σ_i f_{c_i}(x_i): rows are independent, so its gradient is each sample's own ∇ₓ f_c
            score = tf.reduce_sum(tf.gather(scores, c, axis=1, batch_dims=1))
        return out, c, tape.gradient(score, xt)

    def _step(self, x0, xt, g, lo, hi):
        if self.variant == "sharp":
            norm = tf.norm(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1)
            norm = tf.reshape(tf.where(norm > 0, norm, tf.ones_like(norm)), [-1] + [1] * (g.shape.rank - 1))
            return tf.clip_by_value(xt - (SHARP_SCALE * self.alpha) * (g / norm), lo, hi)
        moved = tf.clip_by_value(xt - self.alpha * tf.sign(g) - x0, -self.epsilon, self.epsilon)
        return tf.clip_by_value(x0 + moved, lo, hi)

    def _walk(self, x, c, use_pred, lo, hi, return_path: bool):
        n = tf.shape(x)[0]
        bshape = tf.concat([[n], tf.ones([x.shape.rank - 1], tf.int32)], 0)
        early_stop = self.early_stop
        placeholder = tf.zeros([], x.dtype)  # loop_vars need a tensor where the path is not kept
        pts = grs = placeholder
        if return_path:
            pts = tf.TensorArray(x.dtype, size=0, dynamic_size=True, element_shape=x.shape).write(0, x)
            grs = tf.TensorArray(x.dtype, size=0, dynamic_size=True, element_shape=x.shape)

        def cond(t, xt, total, c, active, lengths, pts, grs):
            return tf.logical_and(t < self.steps, tf.reduce_any(active))

        def body(t, xt, total, c, active, lengths, pts, grs):
            out, c, g = self._forward_grad(xt, c, t, use_pred)
            if early_stop:
                # x_t's forward doubles as the early-stop test for the step that produced x_t
                active = tf.logical_and(active, tf.logical_or(tf.equal(t, 0), tf.equal(tf.argmax(out, 1), c)))
            keep = tf.reshape(active, bshape)
            x_next = tf.where(keep, self._step(x, xt, g, lo, hi), xt)
            total = total - (x_next - xt) * g
            lengths = lengths + tf.cast(active, tf.int64)
            if return_path:
                pts = pts.write(t + 1, x_next)
                grs = grs.write(t, tf.where(keep, g, tf.zeros_like(g)))
            # tf.where with the runtime-shaped mask forgets static shapes that the loop must keep
            x_next, total = tf.ensure_shape(x_next, x.shape), tf.ensure_shape(total, x.shape)
            c, active, lengths = (tf.ensure_shape(v, x.shape[:1]) for v in (c, active, lengths))
            return t + 1, x_next, total, c, active, lengths, pts, grs

        per_sample = x.shape[:1]
        init = (tf.constant(0), x, tf.zeros_like(x), tf.ensure_shape(c, per_sample),
                tf.ensure_shape(tf.ones([n], tf.bool), per_sample),
                tf.ensure_shape(tf.zeros([n], tf.int64), per_sample), pts, grs)
        _, _, total, c, _, lengths, pts, grs = tf.while_loop(cond, body, init)
        if not return_path:
            return (total,)
        # steps that ran after every sample had stopped add nothing; drop them to match torch's path
        last = tf.reduce_max(lengths)
        points = pts.stack()[:last + 1]
        gradients = grs.stack()[:last]  # t >= 1: the first step always runs
        return total, points, gradients, lengths
