"""Rotary embedding as exported, and the tables com.microsoft RotaryEmbedding reads instead.

Exported (rotate_half form, H = heads [b, n, s, d], cos/sin [b, s, d]):
    rope(H) = H·Unsqueeze(cos, 1) + Concat(-H[..., h:], H[..., :h])·Unsqueeze(sin, 1),  h = d/2
RotaryEmbedding(x, pos, C, S) (interleaved=0) computes for each head, i < d/2, p = pos[b, s]:
    y_i = x_i·C[p, i] - x_{i+d/2}·S[p, i],   y_{i+d/2} = x_{i+d/2}·C[p, i] + x_i·S[p, i]
which is the same function when C = rows of cos[..., :d/2] and cos[..., d/2:] = cos[..., :d/2]
(likewise sin). The tables are the graph's own cos/sin flattened to b·s rows, and pos[b, s] =
b·S + s indexes them, so any position_ids the caller feeds (beyond any table size) stay exact.
The halves are equal when cos is Concat(F, F) on the last axis behind Cos/Sin, Casts and Muls by
scalar constants; h = Div(Shape(H)[3], 2).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.passes.decode_match import NoMatch, expect, producer, scalar, shape_dim, skip


def match_rope(t) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
    """rope(H) -> (H, cos, sin) with cos/sin [b, s, d] before their Unsqueeze."""
    add = expect(t, "Add")
    muls = [expect(x, "Mul") for x in add.inputs]
    rot = [m for m in muls if any((p := producer(x)) is not None and p.op == "Concat" for x in m.inputs)]
    if len(rot) != 1:
        raise NoMatch("rotary embedding is not H·cos + rotate_half(H)·sin")
    sin_mul, cos_mul = rot[0], muls[1 - muls.index(rot[0])]
    cat_in = next(x for x in sin_mul.inputs if producer(x) is not None and producer(x).op == "Concat")
    sin = _unsqueezed_1(sin_mul.inputs[1] if sin_mul.inputs[0] is cat_in else sin_mul.inputs[0])
    h, cos = _split_cos(cos_mul)
    _rotate_half(producer(cat_in), h)
    for table in (cos, sin):
        _halves_equal(table)
    return h, cos, sin


def _split_cos(m: gs.Node):
    for i in (0, 1):
        p = producer(m.inputs[i])
        if p is not None and p.op == "Unsqueeze":
            return m.inputs[1 - i], _unsqueezed_1(m.inputs[i])
    raise NoMatch("cos term is not H·Unsqueeze(cos, 1)")


def _unsqueezed_1(t):
    u = expect(t, "Unsqueeze")
    if len(u.inputs) < 2 or scalar(u.inputs[1]) != 1:
        raise NoMatch("rotary table is not unsqueezed at axis 1")
    return u.inputs[0]


def _rotate_half(cat: gs.Node, h) -> None:
    """Concat(Neg(Slice(H, m, big, 3)), Slice(H, 0, m, 3)), m = Shape(H)[3] / 2, on the last axis."""
    if int(cat.attrs.get("axis", 0)) not in (-1, 3) or len(cat.inputs) != 2:
        raise NoMatch("rotate_half does not concatenate two halves on the last axis")
    neg = expect(cat.inputs[0], "Neg")
    hi, lo = expect(neg.inputs[0], "Slice"), expect(cat.inputs[1], "Slice")
    for s in (hi, lo):
        if s.inputs[0] is not h or len(s.inputs) < 4 or scalar(s.inputs[3]) not in (3, -1) or (
                len(s.inputs) > 4 and scalar(s.inputs[4]) != 1):
            raise NoMatch("rotate_half slices another tensor or another axis")
    mid_lo, mid_hi = skip(lo.inputs[2], "Unsqueeze", "Cast"), skip(hi.inputs[1], "Unsqueeze", "Cast")
    if scalar(lo.inputs[1]) != 0 or mid_lo is not mid_hi or (scalar(hi.inputs[2]) or 0) < 2 ** 62:
        raise NoMatch("rotate_half does not split at one point into [0, m) and [m, end)")
    div = expect(mid_lo, "Div")
    sd = shape_dim(div.inputs[0])
    if scalar(div.inputs[1]) != 2 or sd is None or sd[0] is not h or sd[1] not in (3, -1):
        raise NoMatch("rotate_half does not split at half the head size")


def _halves_equal(t) -> None:
    while (n := producer(t)) is not None and n.op in ("Cast", "Cos", "Sin", "Mul"):
        if n.op == "Mul":
            consts = [scalar(x) for x in n.inputs]
            if consts.count(None) != 1:
                raise NoMatch("rotary table is scaled by a non-scalar")
            t = n.inputs[consts.index(None)]
        else:
            t = n.inputs[0]
    cat = expect(t, "Concat")
    if len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] or int(cat.attrs.get("axis", 0)) not in (-1, 2):
        raise NoMatch("rotary table is not Concat(F, F) on its last axis")


class RopeTables:
    """Per (cos, sin) pair, built once: C = cos rows[:, :d/2], S likewise, pos = arange(b·s) as [b, s]."""

    def __init__(self):
        self.made: dict[tuple[int, int], tuple] = {}

    def get(self, g: gs.Graph, cos, sin, d: int):
        key = (id(cos), id(sin))
        if key not in self.made:
            self.made[key] = self._build(g, cos, sin, d)
        return self.made[key]

    @staticmethod
    def _build(g: gs.Graph, cos, sin, d: int):
        def op(o, inputs, dtype, **attrs):
            v = gs.Variable(f"{cos.name}_rope_{o}_{len(g.nodes)}", dtype=dtype)
            g.nodes.append(gs.Node(o, name=v.name, inputs=inputs, outputs=[v], attrs=attrs))
            return v

        def c(name, val):
            return gs.Constant(f"{cos.name}_rope_{name}", np.array(val, np.int64))
        rows = c("rows", [-1, d])
        cut = [c("c0", [0]), c("c1", [d // 2]), c("c2", [1])]
        cos2 = op("Reshape", [cos, rows], np.float32)
        cos_c = op("Slice", [cos2, *cut], np.float32)
        sin_c = op("Slice", [op("Reshape", [sin, rows], np.float32), *cut], np.float32)
        n = op("Gather", [op("Shape", [cos2], np.int64), c("i0", 0)], np.int64, axis=0)
        rng = op("Range", [c("zero", 0), n, c("one", 1)], np.int64)
        bs = op("Shape", [cos], np.int64, start=0, end=2)
        pos = op("Reshape", [rng, bs], np.int64)
        return cos_c, sin_c, pos
