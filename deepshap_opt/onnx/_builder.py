"""A small helper that appends standard ONNX nodes and initializers to a graph under construction."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """Emits nodes (standard ONNX ops only) with unique names; opset-aware for the Reduce* ops."""

    def __init__(self, opset: int, prefix: str = "dsx", taken: set[str] | None = None):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._taken = set(taken or ())
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str = "t") -> str:
        while True:
            self._n += 1
            name = f"{self.prefix}/{hint}_{self._n}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    # ------------------------------------------------------------------ constants
    def const(self, value, dtype=None, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        small = arr.size <= 64
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if small else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C", copy=True), name))
        if key is not None:
            self._consts[key] = name
        return name

    def i64(self, values) -> str:
        return self.const(np.asarray(values, np.int64), hint="i")

    def f(self, value, dtype=np.float32) -> str:
        return self.const(np.asarray(value, dtype), hint="f")

    # ------------------------------------------------------------------ nodes
    def op(self, op_type: str, inputs, n_out: int = 1, hint: str | None = None, **attrs):
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def node(self, op_type: str, inputs, outputs, **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh("n_" + op_type),
                                           **attrs))

    # shorthands
    def add(self, a, b): return self.op("Add", [a, b])
    def sub(self, a, b): return self.op("Sub", [a, b])
    def mul(self, a, b): return self.op("Mul", [a, b])
    def div(self, a, b): return self.op("Div", [a, b])
    def where(self, c, a, b): return self.op("Where", [c, a, b])
    def abs(self, a): return self.op("Abs", [a])
    def exp(self, a): return self.op("Exp", [a])
    def neg(self, a): return self.op("Neg", [a])

    def reshape(self, x, shape) -> str:
        shape_in = shape if isinstance(shape, str) else self.i64(list(shape))
        return self.op("Reshape", [x, shape_in])

    def unsqueeze(self, x, axes) -> str:
        return self.op("Unsqueeze", [x, self.i64(list(axes))])

    def squeeze(self, x, axes) -> str:
        return self.op("Squeeze", [x, self.i64(list(axes))])

    def transpose(self, x, perm) -> str:
        return self.op("Transpose", [x], perm=list(perm))

    def reduce(self, op_type: str, x, axes, keepdims: int = 1) -> str:
        axes = [int(a) for a in axes]
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.i64(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def rsum(self, x, axes, keepdims=1):
        return self.reduce("ReduceSum", x, axes, keepdims) if len(axes) else x

    def rmean(self, x, axes, keepdims=1):
        return self.reduce("ReduceMean", x, axes, keepdims) if len(axes) else x

    def rmax(self, x, axes, keepdims=1):
        return self.reduce("ReduceMax", x, axes, keepdims)

    def cast(self, x, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def castf(self, x, elem=TensorProto.FLOAT) -> str:
        return self.op("Cast", [x], to=elem)

    def sum(self, items) -> str:
        items = list(items)
        if len(items) == 1:
            return items[0]
        return self.op("Sum", items)
