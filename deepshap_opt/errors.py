"""Exceptions raised by every backend."""

from __future__ import annotations


class UnsupportedOperatorError(NotImplementedError):
    """An op that the explained input flows through has no DeepLIFT rule.

    Raised before any number is returned, never replaced by a silent plain gradient. (Not a TypeError:
    torch turns a TypeError raised inside a binary operator into NotImplemented, hiding the message.)
    ``op`` is the op's name in its framework, ``where`` the module path / layer / node name.
    """

    def __init__(self, op: str, where: str = "", hint: str = ""):
        self.op, self.where = op, where
        msg = f"no DeepSHAP rule for op '{op}'"
        if where:
            msg += f" (called in {where})"
        if hint:
            msg += f": {hint}"
        super().__init__(msg)


class AdditivityError(AssertionError):
    """The attributions do not sum to f(x) − E[f(background)] within the tolerance."""
