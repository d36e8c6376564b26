"""Rescale multipliers of Sigmoid and Tanh in closed form, as ONNX nodes (the spec's ``Rescale`` docstring).

(f(x) − f(r)) / (x − r) loses its digits in float32 when x and r are close (a gate whose input barely moves:
the difference of two rounded values near 0.6 keeps ~eps·0.6/|Δ| of relative error). Written as a product
of accurate terms instead, exact algebra with no threshold (Δ = 0 gives f'(x)): with a = k·x, c = k·r
(k = 1 for Sigmoid, 2 for Tanh, since tanh v = 2σ(2v) − 1) and t(h) = tanh(h)/h,

    m = (k²/2) · t((a − c)/2) · (σ(a)σ(−c) + σ(−a)σ(c)).
"""

from __future__ import annotations

#: op kind → k
BOUNDED_SECANT = {"sigmoid": 1.0, "tanh": 2.0}


def bounded_secant(b, kind: str, X4: str, R4: str, fc, elem: int) -> str:
    """m for explicand inputs X4 (N, S, 1, ...) against reference inputs R4 (1, 1, M, ...): (N, S, M, ...).

    b: the graph builder; fc(v): a scalar constant of the inputs' float type, elem: that type (TensorProto).
    """
    k = BOUNDED_SECANT[kind]
    a, c = (X4, R4) if k == 1.0 else (b.mul(X4, fc(k)), b.mul(R4, fc(k)))
    sa, sc = b.op("Sigmoid", [a]), b.op("Sigmoid", [c])          # on the N and M rows: cheap
    sna, snc = b.op("Sigmoid", [b.neg(a)]), b.op("Sigmoid", [b.neg(c)])
    s = b.add(b.mul(sa, snc), b.mul(sna, sc))
    h = b.mul(b.sub(a, c), fc(0.5))
    # t(h) without Where (slow in onnxruntime): z = [h == 0]; (tanh h + z) / (h + z) is 1 at h = 0
    z = b.cast(b.op("Equal", [h, fc(0.0)]), elem)
    t = b.div(b.add(b.op("Tanh", [h]), z), b.add(h, z))
    return b.mul(t, b.mul(s, fc(k * k / 2)))
