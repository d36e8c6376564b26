"""MFABA for PyTorch: attributions along an adversarial ascent to the decision boundary.

MFABA (Zhu et al., "MFABA: A More Faithful and Accelerated Boundary-based Attribution Method for Deep
Neural Networks", AAAI 2024, arXiv 2312.13630) walks from the input ``x0 = x`` away from the target class
``c`` by gradient steps on ``f_c`` (the softmax probability of ``c``, or its logit) and sums the
first-order changes of ``f_c`` along the way::

    A(x) = − Σ_{t=0}^{T−1} (x_{t+1} − x_t) ⊙ ∇ₓ f_c(x_t)

Each step lowers ``f_c``, so to first order ``Σ A ≈ f_c(x0) − f_c(x_T)``: the attribution distributes the
drop of the class score between the input's elements.

This implementation differs from the reference code (LMBTough/MFABA) where that code is wrong or slow:

* the gradient is taken fresh at every point (the reference never zeroes the input's ``.grad``, so each
  stored gradient is a running sum of earlier ones, reset only when some other image of the batch stops:
  an image's attribution there depends on its batch mates);
* the attribution is a running sum, so memory does not grow with ``steps`` (the reference stores every
  path point and gradient);
* only input gradients are computed (no parameter ``.grad`` is touched);
* the early-stop test reads the prediction from the forward pass the next step makes anyway (the
  reference runs one more forward per step for it);
* finished samples are masked, not re-indexed: no per-sample Python loop, and on a GPU no per-step
  host synchronisation (the host reads a "batch finished" flag of steps the GPU has completed, without
  blocking, so the GPU's queue never drains; the few extra steps this may cost change nothing, since
  finished samples are frozen).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .._mfaba import VARIANTS, MFABASettings

__all__ = ["MFABA", "VARIANTS", "MFABAPath"]

#: The two update rules of the reference code: normalised-gradient steps ("sharp") and sign steps inside
#: an L∞ ball of radius ``epsilon`` around the input ("smooth").
#: The sharp variant's step is ``SHARP_SCALE · alpha`` in L2 norm (the reference's constant).
SHARP_SCALE = 100.0


class MFABAPath(NamedTuple):
    """The path MFABA took, for ``attribute(..., return_path=True)``.

    points: (L+1, N, *in) — ``points[0]`` is x; ``points[t]`` for ``t > lengths[i]`` repeats sample i's
        last point ``x_T`` (the sample had stopped). ``L`` is the number of steps the batch ran.
    gradients: (L, N, *in) — ∇ₓ f_c at ``points[t]``, zero for ``t ≥ lengths[i]``, so that
        ``A = −Σ_t (points[t+1] − points[t]) · gradients[t]`` holds exactly.
    lengths: (N,) int64 — T, the number of steps each sample took.
    """

    points: torch.Tensor
    gradients: torch.Tensor
    lengths: torch.Tensor


class MFABA(MFABASettings):
    """MFABA attributions of a classifier (Zhu et al., AAAI 2024).

    Parameters
    ----------
    model : torch.nn.Module
        Maps (N, *in) to class scores (N, K) (logits; see ``use_softmax``).
    variant : {"sharp", "smooth"}
        ``"sharp"``: ``x_{t+1} = clip(x_t − 100·alpha · g_t/‖g_t‖₂, data_min, data_max)`` (norm per
        sample). ``"smooth"``: ``x_{t+1} = clip(x + clip(x_t − alpha·sign(g_t) − x, −epsilon, epsilon),
        data_min, data_max)``. ``g_t = ∇ₓ f_c(x_t)``; both move down ``f_c``, away from class c.
    steps : int
        Most steps per sample (the path has at most ``steps + 1`` points).
    alpha : float
        Step size (the sharp variant's L2 step is ``100 · alpha``).
    epsilon : float
        L∞ radius around x for the smooth variant (in data units; unused by "sharp").
    data_min, data_max : float or tensor broadcastable to one sample's shape (e.g. (C, 1, 1))
        The valid input range; every path point is clipped into it and x must lie inside it.
    use_softmax : bool
        ``f_c`` is the softmax probability of c (the paper's choice); False: the model's output c itself.
    early_stop : bool
        Stop a sample at the first point whose predicted class differs from the target (that point is
        x_T). False: every sample takes ``steps`` steps.

    Notes
    -----
    During :meth:`attribute` the model is put in eval mode — in train mode BatchNorm's batch statistics
    would make one image's attribution depend on its batch mates and dropout would make it random — and
    every submodule's mode is restored afterwards.
    """

    def __init__(self, model: torch.nn.Module, variant: str = "sharp", steps: int = 50, alpha: float = 0.001,
                 epsilon: float = 0.3, data_min=0.0, data_max=1.0, use_softmax: bool = True,
                 early_stop: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(variant, steps, alpha, epsilon, data_min, data_max, use_softmax, early_stop)
        self.model = model

    # ------------------------------------------------------------------------------------------ public
    def attribute(self, x, target=None, return_path: bool = False):
        """MFABA attributions of x.

        Parameters
        ----------
        x : torch.Tensor or np.ndarray, (N, *in), floating point, inside [data_min, data_max]
        target : None, int, or (N,) ints
            Class c per sample; None: the class the model predicts for x.
        return_path : bool
            Also return the :class:`MFABAPath` (this stores every point: memory grows with ``steps``).

        Returns
        -------
        attributions : same type, shape, dtype (and device) as x
        path : MFABAPath, only with ``return_path=True`` (numpy arrays when x is numpy)
        """
        was_numpy = isinstance(x, np.ndarray)
        x = self._as_input(x)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            attributions, path = self._run(x, target, return_path)
        finally:
            for m, mode in modes:
                m.training = mode
        if was_numpy:
            attributions = attributions.cpu().numpy()
            if path is not None:
                path = MFABAPath(*(p.cpu().numpy() for p in path))
        return (attributions, path) if return_path else attributions

    def shap_values(self, X, ranked_outputs=None, output_rank_order: str = "max"):
        """``shap``-style layout: ``(N, *in, K)`` float64, one MFABA run per explained class.

        With ``ranked_outputs=k`` returns ``(values (N, *in, k), indexes (N, k))``, the classes ranked by the
        model's output at X (``output_rank_order`` "max", "min" or "max_abs"), like ``shap.DeepExplainer``.
        MFABA explains one class per run, so K classes cost K runs: prefer ``ranked_outputs=1`` (the
        predicted class) for many-class models.
        """
        from .._explainer import output_selector

        x = self._as_input(X)
        with torch.no_grad():
            modes = [(m, m.training) for m in self.model.modules()]
            self.model.eval()
            try:
                out = self.model(x)
            finally:
                for m, mode in modes:
                    m.training = mode
        self._check_output(out, x.shape[0])
        out_np = out.detach().cpu().double().numpy()
        indexes = output_selector(ranked_outputs, output_rank_order, out_np.shape[1])(out_np)
        cols = [self.attribute(x, torch.as_tensor(indexes[:, j], device=x.device)).detach().cpu().double()
                .numpy() for j in range(indexes.shape[1])]
        values = np.stack(cols, axis=-1)
        return values if ranked_outputs is None else (values, indexes)

    # ------------------------------------------------------------------------------------------ checks
    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")

    def _as_input(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(x)).to(self._device())
        elif not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (gradients are taken w.r.t. it), got "
                            f"{x.dtype}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, *in), got shape {tuple(x.shape)}")
        return x.detach()

    def _bounds(self, x: torch.Tensor):
        lo = torch.as_tensor(self.data_min, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(self.data_max, dtype=x.dtype, device=x.device)
        sample = tuple(x.shape[1:])
        try:
            # numpy's check: torch.broadcast_shapes imports sympy on first use (~35 MB of host memory)
            fits = all(np.broadcast_shapes(tuple(b.shape), sample) == sample for b in (lo, hi))
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"data_min/data_max of shapes {tuple(lo.shape)}/{tuple(hi.shape)} do not "
                             "broadcast "
                             f"to one sample's shape {sample}")
        if bool((lo > hi).any()):
            raise ValueError("data_min must not exceed data_max")
        below, above = x < lo, x > hi
        if bool(below.any() | above.any()):
            raise ValueError(
                f"x must lie in [data_min, data_max] (MFABA clips every path point into that range): x spans "
                f"[{x.min().item():.6g}, {x.max().item():.6g}] but data_min={self.data_min!r}, "
                f"data_max={self.data_max!r}. Pass the bounds of your (normalised) input space.")
        return lo, hi

    @staticmethod
    def _check_output(out, n: int) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError("the model must return one tensor of class scores (N, K), got "
                            f"{type(out).__name__}")
        if out.dim() != 2 or out.shape[0] != n:
            raise ValueError(f"the model must return class scores of shape (N, K) = ({n}, K) with a class "
                             f"dimension, got shape {tuple(out.shape)}")

    def _targets(self, target, out: torch.Tensor) -> torch.Tensor:
        n, k = out.shape
        if target is None:
            return out.detach().argmax(1)
        t = torch.as_tensor(target, device=out.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"target must be integer class indexes, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"target must be an int or have one entry per sample ({n},), got shape "
                             f"{tuple(t.shape)}")
        if bool(((t < 0) | (t >= k)).any()):
            raise ValueError(f"target out of range: the model has {k} classes (0..{k - 1}), got "
                             f"{t.min().item()}..{t.max().item()}")
        return t

    # ------------------------------------------------------------------------------------------ the walk
    def _score(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Σ_i f_{c_i}(x_i): its gradient w.r.t. the batch is each sample's own ∇ₓ f_c (rows are
        independent)."""
        if self.use_softmax:
            if out.shape[1] < 2:
                raise ValueError("use_softmax=True needs at least 2 classes (a softmax over one class is "
                                 "constant); pass use_softmax=False to explain a single output")
            out = F.softmax(out, dim=1)
        return out.gather(1, target[:, None]).sum()

    def _step(self, x0, xt, g, lo, hi):
        if self.variant == "sharp":
            norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
            # a zero gradient gives a zero step (the reference divides by zero there)
            direction = g / torch.where(norm > 0, norm, torch.ones_like(norm))
            return torch.clamp(xt - (SHARP_SCALE * self.alpha) * direction, lo, hi)
        moved = torch.clamp(xt - self.alpha * torch.sign(g) - x0, -self.epsilon, self.epsilon)
        return torch.clamp(x0 + moved, lo, hi)

    def _run(self, x: torch.Tensor, target, return_path: bool):
        lo, hi = self._bounds(x)
        n = x.shape[0]
        bshape = (n,) + (1,) * (x.dim() - 1)
        xt = x
        total = torch.zeros_like(x)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        lengths = torch.zeros(n, dtype=torch.long, device=x.device)
        points, grads = ([x], []) if return_path else (None, None)
        watch = _DoneWatch(x.device)
        c = None
        for t in range(self.steps):
            xg = xt.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.model(xg)
                if t == 0:
                    self._check_output(out, n)
                    c = self._targets(target, out)
                elif self.early_stop:
                    # x_t's forward doubles as the early-stop test for the step that produced x_t
                    active = active & (out.detach().argmax(1) == c)
                    watch.push(active)
                    if watch.done():
                        break
                # only the input's gradient: parameters' .grad stay untouched (and are not computed)
                (g,) = torch.autograd.grad(self._score(out, c), xg)
            x_next = torch.where(active.view(bshape), self._step(x, xt, g, lo, hi), xt)
            total -= (x_next - xt) * g
            lengths += active
            if return_path:
                points.append(x_next)
                grads.append(torch.where(active.view(bshape), g, torch.zeros_like(g)))
            xt = x_next
        path = None
        if return_path:
            # on CUDA the loop can end a few steps after every sample stopped; those rows add nothing
            last = int(lengths.max())
            path = MFABAPath(torch.stack(points[:last + 1]), torch.stack(grads[:last]) if last
                             else x.new_zeros((0,) + x.shape), lengths)
        return total, path


class _DoneWatch:
    """Tells the loop when every sample has stopped, without making the host wait for the GPU each step.

    On CPU the flag is read at once. On CUDA each step's "all stopped" flag is copied to pinned host memory
    behind an event; the host reads the flags of steps the GPU has already finished (``Event.query`` does
    not block) and waits only to keep at most ``MAX_AHEAD`` steps queued, so the GPU's queue never drains.
    The loop ends a few steps late at worst; finished samples are frozen, so those steps change nothing.
    """

    MAX_AHEAD = 4

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self._done = False

    def push(self, active: torch.Tensor) -> None:
        if not self.cuda:
            self._done = not bool(active.any())
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(~active.any(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((flag, event))
        while self.pending and (len(self.pending) > self.MAX_AHEAD or self.pending[0][1].query()):
            flag, event = self.pending.pop(0)
            event.synchronize()  # returns at once after a successful query
            # `active` only ever loses samples: once a step's flag says "all stopped", it stays so
            self._done = self._done or bool(flag.item())

    def done(self) -> bool:
        return self._done
