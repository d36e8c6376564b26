"""MFABA settings shared by the torch and TF backends (framework-free): the variants and the argument
checks, so both backends accept and refuse exactly the same arguments."""

from __future__ import annotations

import numpy as np

#: "sharp": x_{t+1} = clip(x_t − 100·alpha·g_t/‖g_t‖₂); "smooth": signed steps within an epsilon-ball
VARIANTS = ("sharp", "smooth")


class MFABASettings:
    """Validated MFABA arguments (the reference implementation's defaults); backends subclass it."""

    def __init__(self, variant: str = "sharp", steps: int = 50, alpha: float = 0.001, epsilon: float = 0.3,
                 data_min=0.0, data_max=1.0, use_softmax: bool = True, early_stop: bool = True):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be non-negative, got {epsilon!r}")
        self.variant = variant
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)
        self.data_min = data_min
        self.data_max = data_max
        self.use_softmax = bool(use_softmax)
        self.early_stop = bool(early_stop)
