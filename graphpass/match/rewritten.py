"""Linear layers as a rewrite left them, read back from their output: Ŷ = X̂·W' (+ b).

A rewritten layer is a small cluster of nodes between the float tensor it reads, X̂, and its
output Ŷ (the reference's tensor name). Reading it back gives X̂ — after smoothing not always the
reference's X of that name: a norm whose output also feeds a residual is duplicated, and the
layer reads the copy — and, on demand, W' as [in, out] float64 (diag(s_in)·W·diag(s_out)^-1 up
to rounding, for a smoothed layer). The forms, with Q / DQ QuantizeLinear / DequantizeLinear:
  float     : MatMul(X̂, W) | MatMul(X̂, Transpose(E)) | Gemm(X̂, W, transB)    W' = W (· alpha)
  QDQ       : MatMul(DQ(Q(X̂)), DQ(Wq, w, z))    (graphpass static, onnxruntime)  W' = (Wq − z)·w
  token     : MatMulIntegerToFloat(Q(X̂ / r), Wq, 1, w, z) · r                     W' = (Wq − z)·w
  two digits: (MatMulIntegerToFloat(q1, Wq, ..) + MatMulIntegerToFloat(q2, Wq, ..)) · r, same W'
  dynamic   : Cast(MatMulInteger(DynamicQuantizeLinear(X̂), Wq)) · (a·w)          W' = (Wq − z)·w
  static    : MatMulIntegerToFloat(Q(X̂), Wq, a, w, z, _, b)                      W' = (Wq − z)·w
  split     : P1(X̂ ⊙ m) + P2(X̂[..., O])   (outlier scheme; P1, P2 of the forms above)
              W' = diag(m)·W'_1, rows O += W'_2
  MatMulNBits(X̂, B, s[, z])                                                   W' = (q − z)·s per block
  packed    : Split(P, axis -1)[i], P of the forms above (MatMulNBits layers reading one X̂)
              W' = P's columns of output i
and any of them followed by a bias Add(Ŷ', b), b constant. Structure only until weight() runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts, attr
from graphpass.graph.nbits_layout import Packed, unpack_reference

FLOATS = (np.float32, np.float16, np.float64)


@dataclass(eq=False)
class Part:
    """One product of a layer: X̂ seen whole, masked per channel (X̂ ⊙ m) or gathered (X̂[..., O])."""
    x: gs.Tensor                          # X̂
    read: object                          # Consts -> W'_part ([rows of the view, out] float64) or None
    form: str                             # "float", "qdq", "token", "digits", "dynamic", "static", "nbits"
    view: str = "all"                     # "all" | "mask" | "gather"
    index: gs.Tensor | None = None        # m (mask) or O (gather), a constant
    levels: float = 127.0                 # max |code| of its weight grid (int8: 127; 4 bits: 7)


@dataclass(eq=False)
class Rewritten:
    x: gs.Tensor                          # X̂, the float tensor the layer reads
    form: str                             # a Part's form, or "split"
    parts: list[Part] = field(default_factory=list)

    @property
    def levels(self) -> float:
        """The coarsest weight grid among the parts: W' rounds to max|W'_c| / levels steps or finer."""
        return min(p.levels for p in self.parts)

    def weight(self, c: Consts) -> np.ndarray | None:
        """W' [in, out] float64, or None when a part's weight cannot be read (float zero points, ...)."""
        ws = [p.read(c) for p in self.parts]
        if any(w is None for w in ws):
            return None
        if len(ws) == 1 and self.parts[0].view == "all":
            return ws[0]
        full = next((p for p in self.parts if p.view != "gather"), None)
        rows = ws[self.parts.index(full)].shape[0] if full is not None else None
        if rows is None:
            return None
        out = np.zeros((rows, ws[0].shape[1]))
        for p, w in zip(self.parts, ws):
            if w.shape[1] != out.shape[1]:
                return None
            idx = c.get(p.index) if p.index is not None else None
            if p.view == "mask":
                out += w * np.asarray(idx, np.float64).reshape(-1, 1)
            elif p.view == "gather":
                out[np.asarray(idx, np.int64).reshape(-1)] += w
            else:
                out += w
        return out


def read_rewritten(c: Consts, y: gs.Tensor | None) -> Rewritten | None:
    """The layer writing `y` in one of the module docstring's forms, else None."""
    n = c.producer(y)
    if n is not None and n.op == "Split":
        return _split_columns(c, n, y)
    if n is not None and n.op == "Add":
        k = next((i for i, t in enumerate(n.inputs) if c.is_const(t)), None)
        if k is not None:                                          # bias
            return read_rewritten(c, n.inputs[1 - k])
        return _split(c, n)
    part = _product(c, y)
    return None if part is None else Rewritten(part.x, part.form, [part])


def _split_columns(c: Consts, n: gs.Node, y: gs.Tensor) -> Rewritten | None:
    """Y_i = Split(X̂·[W_1 | ... | W_n], axis -1)[i] (layers packed into one product): W'_i is
    its columns of the packed weight."""
    sizes = c.get(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else attr(n, "split", None)
    if attr(n, "axis", 0) != -1 or sizes is None:
        return None
    k = next(i for i, o in enumerate(n.outputs) if o is y)
    ends = np.cumsum(np.asarray(sizes, np.int64).reshape(-1))
    packed = read_rewritten(c, n.inputs[0])
    if packed is None or k >= ends.size:
        return None
    lo, hi = int(ends[k - 1]) if k else 0, int(ends[k])

    def read(cc: Consts):
        w = packed.weight(cc)
        return None if w is None else w[:, lo:hi]
    return Rewritten(packed.x, packed.form, [Part(packed.x, read, packed.form, levels=packed.levels)])


def _split(c: Consts, add: gs.Node) -> Rewritten | None:
    parts = []
    for t in add.inputs:
        part = _product(c, t)
        if part is None:
            return None
        v = c.producer(part.x)
        if v is not None and v.op == "Mul":                        # X̂ ⊙ m
            k = next((i for i, t in enumerate(v.inputs) if c.is_const(t)), None)
            if k is None:
                return None
            part.x, part.view, part.index = v.inputs[1 - k], "mask", v.inputs[k]
        elif v is not None and v.op == "Gather" and attr(v, "axis", 0) == -1 and c.is_const(v.inputs[1]):
            part.x, part.view, part.index = v.inputs[0], "gather", v.inputs[1]
        parts.append(part)
    if len({id(p.x) for p in parts}) != 1 or all(p.view == "gather" for p in parts):
        return None
    return Rewritten(parts[0].x, "split", parts)


def _product(c: Consts, y: gs.Tensor) -> Part | None:
    n = c.producer(y)
    if n is None:
        return None
    if n.op in ("MatMul", "Gemm"):
        return _matmul(c, n)
    if n.op == "MatMulIntegerToFloat":                             # static, bias inside
        x = _dequantized_input(c, n.inputs[0])
        return None if x is None else Part(x, lambda cc: _mmitf_weight(cc, n), "static")
    if n.op == "MatMulNBits":
        return Part(n.inputs[0], lambda cc: _nbits_weight(cc, n), "nbits",
                    levels=float(2 ** (int(attr(n, "bits", 4)) - 1) - 1))
    if n.op != "Mul":
        return None
    for i in n.inputs:
        p = c.producer(i)
        if p is None:
            continue
        if p.op == "Add":                                          # two digits: MMITF + MMITF
            p = next((q for q in map(c.producer, p.inputs) if q is not None and q.op == "MatMulIntegerToFloat"), None)
            form = "digits"
        else:
            form = "token"
        if p is None:
            continue
        if p.op == "MatMulIntegerToFloat":
            x = _dequantized_input(c, p.inputs[0])
            return None if x is None else Part(x, lambda cc, p=p: _mmitf_weight(cc, p), form)
        if p.op == "Cast":                                         # dynamic: Cast(MMI)·(a·w)
            mmi, comb = c.producer(p.inputs[0]), c.producer(next(j for j in n.inputs if j is not i))
            if mmi is None or mmi.op != "MatMulInteger" or comb is None or comb.op != "Mul":
                return None
            x = _dequantized_input(c, mmi.inputs[0])
            return None if x is None else Part(x, lambda cc: _dynamic_weight(cc, mmi, comb), "dynamic")
    return None


def _matmul(c: Consts, n: gs.Node) -> Part | None:
    if n.op == "Gemm" and attr(n, "transA", 0):
        return None
    w = n.inputs[1]
    dq = c.producer(w)
    trans_b = bool(n.op == "Gemm" and attr(n, "transB", 0))
    if dq is not None and dq.op == "DequantizeLinear":             # QDQ
        x = n.inputs[0]
        p = c.producer(x)
        if p is not None and p.op == "DequantizeLinear":
            x = _dequantized_input(c, p.inputs[0])

        def read_q(cc: Consts):
            v = _dq(cc, dq)
            return v.T if v is not None and trans_b else v
        return None if x is None else Part(x, read_q, "qdq")
    via = dq if dq is not None and dq.op == "Transpose" and c.is_const(dq.inputs[0]) else None
    src = via.inputs[0] if via is not None else w
    if not c.is_const(src) or c.dtype(src) not in FLOATS:
        return None
    flip = (via is not None) != trans_b
    gain = float(attr(n, "alpha", 1.0)) if n.op == "Gemm" else 1.0

    def read(cc: Consts):
        v = cc.get(src)
        if v is None or v.ndim != 2:
            return None
        return (v.T if flip else v).astype(np.float64) * gain
    return Part(n.inputs[0], read, "float")


def _dequantized_input(c: Consts, q: gs.Tensor) -> gs.Tensor | None:
    """X̂ behind an int8 activation: Q(X̂) (static), Q(X̂ / r) (token, r per row, not constant),
    DynamicQuantizeLinear(X̂) (dynamic)."""
    p = c.producer(q)
    if p is None or p.op not in ("QuantizeLinear", "DynamicQuantizeLinear"):
        return None
    x = p.inputs[0]
    d = c.producer(x)
    if p.op == "QuantizeLinear" and d is not None and d.op == "Div" and _reads(c, d.inputs[1], d.inputs[0]):
        x = d.inputs[0]                                            # token: X̂ / r, r from X̂
    return x


def _reads(c: Consts, t: gs.Tensor, x: gs.Tensor, depth: int = 5) -> bool:
    """t is computed from x within `depth` nodes (the token form's row scale r = max|X̂| / 127)."""
    frontier = [t]
    for _ in range(depth):
        nodes = [n for n in map(c.producer, frontier) if n is not None]
        if any(i is x for n in nodes for i in n.inputs):
            return True
        frontier = [i for n in nodes for i in n.inputs if not c.is_const(i)]
    return False


def _mmitf_weight(c: Consts, n: gs.Node) -> np.ndarray | None:
    """MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zp, b_zp, bias): W' = (B − b_zp)·b_scale."""
    return _scaled(c, n.inputs[1], n.inputs[3], n.inputs[5] if len(n.inputs) > 5 else None)


def _dynamic_weight(c: Consts, mmi: gs.Node, comb: gs.Node) -> np.ndarray | None:
    w = next((j for j in comb.inputs if c.is_const(j) and (c.shape(j) or (1,))[-1] > 1), None)
    zp = mmi.inputs[3] if len(mmi.inputs) > 3 else None
    return None if w is None else _scaled(c, mmi.inputs[1], w, zp)


def _nbits_weight(c: Consts, n: gs.Node) -> np.ndarray | None:
    """MatMulNBits(A, B, scales[, zero_points]) with uint8 codes and zero points (graphpass's and
    onnxruntime's packing): W' = (q − z)·s per block; None with g_idx, a bias or float zero points."""
    if len(n.inputs) > 4 and any(t.name for t in n.inputs[4:]):
        return None
    k, m, bits, block = (int(attr(n, a, 0)) for a in ("K", "N", "bits", "block_size"))
    b, s = c.get(n.inputs[1]), c.get(n.inputs[2])
    zp = c.get(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
    if b is None or s is None or bits not in (4, 8) or block <= 0 or (zp is not None and zp.dtype != np.uint8):
        return None
    kb = -(-k // block)
    packed = Packed(b.reshape(m, kb, block * bits // 8), s.reshape(m, kb), None if zp is None else zp.reshape(m, -1), k, m)
    return unpack_reference(packed, bits, block).astype(np.float64)


def _scaled(c: Consts, q: gs.Tensor, scale: gs.Tensor, zp: gs.Tensor | None) -> np.ndarray | None:
    wq, s = c.get(q), c.get(scale)
    if wq is None or s is None or wq.ndim != 2:
        return None
    z = c.get(zp) if zp is not None and zp.name else None
    w = wq.astype(np.float64) - (0.0 if z is None else z.astype(np.float64))
    return w * s.astype(np.float64).reshape(1, -1)


def _dq(c: Consts, dq: gs.Node) -> np.ndarray | None:
    wq, s = c.get(dq.inputs[0]), c.get(dq.inputs[1])
    if wq is None or s is None or wq.ndim != 2:
        return None
    z = c.get(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    axis = attr(dq, "axis", 1)
    shape = (1, -1) if axis in (1, -1) else (-1, 1)
    w = wq.astype(np.float64) - (0.0 if z is None else z.astype(np.float64).reshape(shape))
    return w * s.astype(np.float64).reshape(shape)
