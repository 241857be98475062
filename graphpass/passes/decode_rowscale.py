"""Per-token rescale folded into MatMulIntegerToFloat's activation scale.

The `token` W8A8 form (qforms) is, with r = max(max_k |X_k|, ε) / 127 per row, shape [..., 1]:
    Y = Mul(MatMulIntegerToFloat(QuantizeLinear(X / r, 1, 128), Wq, 1, w, 128), r)
MatMulIntegerToFloat scales its integer product by a_scale · b_scale with broadcasting, and
onnxruntime's CPU kernel accepts an a_scale of shape [..., 1] (one per row of A), so
    Y = MatMulIntegerToFloat(QuantizeLinear(X / r, 1, 128), Wq, r, w, 128)
is the same function (one float product reordered: (P·w)·r -> P·(r·w)). One node fewer per
linear layer. Matched only where r provably has A's rank with a last axis of 1: r is
ReduceMax(Abs(X), [-1], keepdims=1) behind Max / Mul / Div by scalar constants, and
A = QuantizeLinear(X / r, 1, z).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphpass.passes.decode_match import NoMatch, const, expect, only_reader, producer, scalar


def _row_scale(r, x) -> None:
    while (n := producer(r)) is not None and n.op in ("Max", "Mul", "Div") and len(n.inputs) == 2 \
            and scalar(n.inputs[1]) is not None and scalar(n.inputs[0]) is None:
        r = n.inputs[0]            # elementwise with a scalar constant: the shape stays
    rm = expect(r, "ReduceMax")
    axes = const(rm.inputs[1]) if len(rm.inputs) > 1 else None
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) != -1 or int(rm.attrs.get("keepdims", 1)) != 1:
        raise NoMatch("row scale is not a ReduceMax over the last axis with keepdims")
    if expect(rm.inputs[0], "Abs").inputs[0] is not x:
        raise NoMatch("row scale is not the absmax of the quantized tensor")


def match_rescale(mul: gs.Node) -> tuple[gs.Node, gs.Variable]:
    """mul = Mul(MatMulIntegerToFloat(...), r) -> (that MatMulIntegerToFloat, r)."""
    for i in (0, 1):
        p = producer(mul.inputs[i])
        if p is not None and p.op == "MatMulIntegerToFloat" and p.domain == "com.microsoft":
            mm, r = p, mul.inputs[1 - i]
            break
    else:
        raise NoMatch("not a Mul after MatMulIntegerToFloat")
    only_reader(mm.outputs[0], "Mul")
    if scalar(mm.inputs[2]) != 1.0:
        raise NoMatch("activation scale is not 1")
    ql = expect(mm.inputs[0], "QuantizeLinear")
    div = expect(ql.inputs[0], "Div")
    if div.inputs[1] is not r or scalar(ql.inputs[1]) != 1.0:
        raise NoMatch("activation is not QuantizeLinear(X / r, 1, z) with this r")
    _row_scale(r, div.inputs[0])
    return mm, r


def fold_rescales(g: gs.Graph) -> int:
    done = 0
    for mul in [n for n in g.nodes if n.op == "Mul"]:
        try:
            mm, r = match_rescale(mul)
        except NoMatch:
            continue
        y = mul.outputs[0]
        mul.outputs.clear()
        mm.inputs[2] = r
        mm.outputs[0] = y
        done += 1
    if done:
        g.cleanup().toposort()
    return done
