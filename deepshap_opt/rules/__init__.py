"""The operator-rule specification shared by every backend, and its NumPy reference.

``spec.OPS`` maps each canonical op name to its rule (read it in one screen); ``reference`` holds the
NumPy implementation of every rule that backends are tested against.
"""

from . import reference
from .spec import (
    BILINEAR, ELEMENTWISE_OPS, LINEAR, LOG_SOFTMAX, MAXPOOL, MAXPOOL_EPS, NORMALIZATION, OPS, PAIR, PAIR_EPS,
    PAIR_EPS_FLOAT64, RESCALE, RESCALE_EPS, SOFTMAX, Bilinear, Linear, LogSoftmax, MaxPool, Normalization,
    Rescale, Rule, ShapleyPair, Softmax, pair_eps, rule_for,
)

__all__ = [
    "reference", "OPS", "ELEMENTWISE_OPS", "rule_for", "Rule", "Linear", "Rescale", "MaxPool", "ShapleyPair",
    "Bilinear", "Softmax", "LogSoftmax", "Normalization", "LINEAR", "RESCALE", "MAXPOOL", "PAIR", "BILINEAR",
    "SOFTMAX", "LOG_SOFTMAX", "NORMALIZATION", "RESCALE_EPS", "MAXPOOL_EPS", "PAIR_EPS",
    "PAIR_EPS_FLOAT64", "pair_eps",
]
