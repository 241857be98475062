"""Skip the masked half of causal attention: split the queries into chunks, each reading only
the keys it can see.

    P = Softmax(Q·Kᵀ + M),  O = P·V,  M[i, j] = 0 if j <= i else -big (plus other conjuncts)

Rows lo..hi-1 of O depend only on keys 0..hi-1: every later key is masked for them, so its
exp() is exactly 0 in the softmax sum and contributes 0·v to O. With c chunks the two attention
MatMuls do (c+1)/2c of the work (2/3 for c = 3); the result is the same function up to float
summation order. What must be proven from the graph (passes/causal_mask.py): the mask is causal,
and queries, values and mask share one length. Nothing is rewritten whose intermediate tensors
(scores, probabilities) are graph outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts, attr
from graphpass.graph.gs_io import export_into, import_graph, names as all_names, opset_version
from graphpass.passes.causal_mask import Dims, causal_mask
from graphpass.passes.qforms import Emitter

T = gs.Tensor


def split_causal_attention(model: onnx.ModelProto | gs.Graph, chunks: int = 3,
                           names: set[str] | None = None) -> tuple[onnx.ModelProto | gs.Graph, int]:
    """Returns (model, attention blocks rewritten). `names`: a name table to share with later
    passes (new names are added to it). A gs.Graph is edited in place; a ModelProto is imported,
    edited and written back into the same object."""
    g = model if isinstance(model, gs.Graph) else import_graph(model)
    if chunks < 2 or opset_version(g, 0) < 15:     # Shape(start, end) needs opset 15
        return model, 0
    names = set() if names is None else names
    names.update(all_names(g))
    c = Consts(g, names)
    dims, blocks = Dims(g), []
    for sm in list(g.nodes):               # every proof reads the graph as it came
        found = _match(sm, c)
        if found is None:
            continue
        q, k, v, mask, post, out = found
        n = dims.length(q, v, mask)
        if n is not None:
            blocks.append((_unscaled(q, c), _unscaled(k, c), v, mask, post, out, sm.name or sm.outputs[0].name, n))
    if not blocks:
        return model, 0
    b = _Builder(Emitter(g, opset_version(g), names))
    for q, k, v, mask, post, out, base, n in blocks:
        out.inputs.clear()                   # the full-size block goes with cleanup()
        b.chunked(q, k, v, mask, post, out, chunks, base, n)
    g.cleanup().toposort()
    if isinstance(model, onnx.ModelProto):
        export_into(model, g)
    return model, len(blocks)


def _unscaled(t: T, c: Consts) -> tuple[T, T | None]:
    """(x, s) when `t` = Mul(x, scalar constant s) read only here: each chunk then slices x and
    scales its slice, which onnxruntime folds into the MatMul (FusedMatMul alpha)."""
    x, s = _scalar_mul(c.producer(t), c)
    if x is not None and len(t.outputs) == 1 and t.name not in c.graph_outputs:
        return x, s
    return t, None


def _match(sm: gs.Node, c: Consts):
    """Softmax(scores + causal mask) read only by MatMul(P, V); scores = MatMul(q, k), maybe
    times a scalar. Returns (q, k, v, mask, post-scale, output of P·V) or None."""
    if sm.op != "Softmax" or attr(sm, "axis", -1) != -1:
        return None
    p = sm.outputs[0]
    add = c.producer(sm.inputs[0])
    readers = p.outputs
    if add is None or add.op != "Add" or len(readers) != 1 or readers[0].op != "MatMul":
        return None
    pv, outs = readers[0], c.graph_outputs
    if pv.inputs[0] is not p or len(add.outputs[0].outputs) != 1 or {add.outputs[0].name, p.name} & outs:
        return None
    for s_idx in (0, 1):
        scores, mask = add.inputs[s_idx], add.inputs[1 - s_idx]
        mm, post = c.producer(scores), None
        x, scale = _scalar_mul(mm, c)
        if x is not None and len(scores.outputs) == 1 and scores.name not in outs:
            scores, mm, post = x, c.producer(x), scale
        if mm is None or mm.op != "MatMul" or len(scores.outputs) != 1 or scores.name in outs:
            continue
        if causal_mask(mask, c):
            return mm.inputs[0], mm.inputs[1], pv.inputs[1], mask, post, pv.outputs[0]
    return None


def _scalar_mul(n: gs.Node | None, c: Consts) -> tuple[T | None, T | None]:
    """(x, s) when n = Mul(x, s) with s a float32 scalar constant."""
    if n is not None and n.op == "Mul":
        for i in (0, 1):
            s = c.get(n.inputs[1 - i])
            if s is not None and s.size == 1 and s.dtype == np.float32:
                return n.inputs[i], n.inputs[1 - i]
    return None, None


class _Builder:
    """Emits the chunked attention. Blocks whose length is the same symbolic dim share the chunk
    bounds, and those reading the same mask share its slices too."""

    def __init__(self, e: Emitter):
        self.e = e
        self.bounds: dict = {}
        self.masks: dict = {}
        self.zero = self.ax_q = self.ax_k = self.ax_m = None

    def const(self, s: str, value) -> gs.Constant:
        return self.e.const(s, np.array(value, np.int64))

    def node(self, op: str, ins: list[T], s: str, **attrs) -> gs.Variable:
        return self.e.node(op, ins, s, **attrs)[0]

    def _bounds(self, q: T, mask: T, chunks: int, base: str, n) -> tuple[list[T], list[T]]:
        """(row bounds, mask slices) for length `n` (q's rows, proven equal to the mask's)."""
        if self.zero is None:
            self.zero = self.const("causal_zero", [0])
            self.ax_q, self.ax_k = self.const("causal_axis_rows", [-2]), self.const("causal_axis_cols", [-1])
            self.ax_m = self.const("causal_axes_mask", [-2, -1])
        if n not in self.bounds:
            seq = self.node("Shape", [q], f"{base}_seq", start=-2, end=-1)
            bounds = [self.zero]
            for i in range(1, chunks):
                scaled = self.node("Mul", [seq, self.const(f"{base}_num{i}", [i])], f"{base}_seq{i}")
                bounds.append(self.node("Div", [scaled, self.const(f"{base}_den{i}", [chunks])], f"{base}_b{i}"))
            self.bounds[n] = bounds + [seq]
        bounds = self.bounds[n]
        if (n, mask.name) not in self.masks:
            masks = []
            for i in range(chunks):
                lo = self.node("Concat", [bounds[i], self.zero], f"{base}_mlo{i}", axis=0)
                hi = self.node("Concat", [bounds[i + 1], bounds[i + 1]], f"{base}_mhi{i}", axis=0)
                masks.append(self.node("Slice", [mask, lo, hi, self.ax_m], f"{base}_mask{i}"))
            self.masks[(n, mask.name)] = masks
        return bounds, self.masks[(n, mask.name)]

    def chunked(self, q: tuple[T, T | None], k: tuple[T, T | None], v: T, mask: T,
                post: T | None, out: T, chunks: int, base: str, n) -> None:
        base = base.strip("/").replace("/", "_")
        (q, q_scale), (k, k_scale) = q, k
        bounds, masks = self._bounds(q, mask, chunks, base, n)
        parts = []
        for i in range(chunks):
            lo, hi = bounds[i], bounds[i + 1]
            qi = self.node("Slice", [q, lo, hi, self.ax_q], f"{base}_q{i}")
            ki = self.node("Slice", [k, self.zero, hi, self.ax_k], f"{base}_k{i}")
            if q_scale is not None:
                qi = self.node("Mul", [qi, q_scale], f"{base}_qs{i}")
            if k_scale is not None:
                ki = self.node("Mul", [ki, k_scale], f"{base}_ks{i}")
            vi = self.node("Slice", [v, self.zero, hi, self.ax_q], f"{base}_v{i}")
            si = self.node("MatMul", [qi, ki], f"{base}_s{i}")
            if post is not None:
                si = self.node("Mul", [si, post], f"{base}_ss{i}")
            pi = self.node("Softmax", [self.node("Add", [si, masks[i]], f"{base}_a{i}")], f"{base}_p{i}", axis=-1)
            parts.append(self.node("MatMul", [pi, vi], f"{base}_o{i}"))
        self.e.emit("Concat", parts, [out], f"{base}_Concat", axis=-2)
