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
from onnx import helper

from graphpass.graph.consts import Consts
from graphpass.graph.io import consumers, opset_version, producers, prune_dead_nodes, toposort
from graphpass.match.linears import _attr
from graphpass.passes.causal_mask import Dims, causal_mask
from graphpass.passes.qforms import Emitter


def split_causal_attention(model: onnx.ModelProto, chunks: int = 3,
                           names: set[str] | None = None) -> tuple[onnx.ModelProto, int]:
    """Returns (model, attention blocks rewritten). `names`: a name table to share with later
    passes (new names are added to it)."""
    g = model.graph
    if chunks < 2 or opset_version(model, 0) < 15:     # Shape(start, end) needs opset 15
        return model, 0
    prod, cons, c = producers(g), consumers(g), Consts(g)
    outs = {o.name for o in g.output}
    names = set() if names is None else names
    names.update({n for node in g.node for n in (*node.input, *node.output, node.name)} | set(c.inits)
                 | {v.name for v in (*g.input, *g.output, *g.value_info)})
    b, dims = _Builder(Emitter(g, opset_version(model), names)), Dims(model)
    dead: list[onnx.NodeProto] = []
    for sm in list(g.node):
        found = _match(sm, prod, cons, c, outs)
        if found is None:
            continue
        q, k, v, mask, post, nodes = found
        n = dims.length(q, v, mask)
        if n is None:
            continue
        q, k = _unscaled(q, prod, cons, c, nodes, outs), _unscaled(k, prod, cons, c, nodes, outs)
        b.chunked(q, k, v, mask, post, nodes[-1].output[0], chunks, sm.name or sm.output[0], n)
        dead.extend(nodes)
    if not dead:
        return model, 0
    ids = {id(n) for n in dead}
    keep = [n for n in g.node if id(n) not in ids]
    g.ClearField("node")
    g.node.extend(keep + b.e.nodes)
    toposort(g)
    prune_dead_nodes(g)                      # the full-size scores MatMul
    return model, sum(n.op_type == "Softmax" for n in dead)


def _unscaled(t: str, prod: dict, cons: dict, c: Consts, dead: list, outs: set[str]
              ) -> tuple[str, str | None]:
    """(x, s) when `t` = Mul(x, scalar constant s) read only here: each chunk then slices x and
    scales its slice, which onnxruntime folds into the MatMul (FusedMatMul alpha)."""
    n = prod.get(t)
    x, s = _scalar_mul(n, c)
    if x is not None and len(cons.get(t, [])) == 1 and t not in outs:
        dead.insert(0, n)
        return x, s
    return t, None


def _match(sm: onnx.NodeProto, prod: dict, cons: dict, c: Consts, outs: set[str]):
    """Softmax(scores + causal mask) read only by MatMul(P, V); scores = MatMul(q, k), maybe
    times a scalar. Returns (q, k, v, mask, post-scale, nodes replaced) or None."""
    if sm.op_type != "Softmax" or _attr(sm, "axis", -1) != -1:
        return None
    add = prod.get(sm.input[0])
    readers = cons.get(sm.output[0], [])
    if add is None or add.op_type != "Add" or len(readers) != 1 or readers[0].op_type != "MatMul":
        return None
    pv = readers[0]
    if pv.input[0] != sm.output[0] or len(cons.get(add.output[0], [])) != 1 \
            or {add.output[0], sm.output[0]} & outs:
        return None
    for s_idx in (0, 1):
        scores, mask = add.input[s_idx], add.input[1 - s_idx]
        nodes = [add, sm, pv]
        mm, post = prod.get(scores), None
        x, scale = _scalar_mul(mm, c)
        if x is not None and len(cons.get(scores, [])) == 1 and scores not in outs:
            nodes.insert(0, mm)
            scores, mm, post = x, prod.get(x), scale
        if mm is None or mm.op_type != "MatMul" or len(cons.get(scores, [])) != 1 or scores in outs:
            continue
        if causal_mask(mask, prod, c):
            return mm.input[0], mm.input[1], pv.input[1], mask, post, nodes
    return None


def _scalar_mul(n: onnx.NodeProto | None, c: Consts) -> tuple[str | None, str | None]:
    """(x, s) when n = Mul(x, s) with s a float32 scalar constant."""
    if n is not None and n.op_type == "Mul":
        for i in (0, 1):
            s = c.get(n.input[1 - i])
            if s is not None and s.size == 1 and s.dtype == np.float32:
                return n.input[i], n.input[1 - i]
    return None, None


class _Builder:
    """Emits the chunked attention. Blocks whose length is the same symbolic dim share the chunk
    bounds, and those reading the same mask share its slices too."""

    def __init__(self, e: Emitter):
        self.e = e
        self.bounds: dict = {}
        self.masks: dict = {}
        self.zero = self.ax_q = self.ax_k = self.ax_m = ""

    def const(self, s: str, value) -> str:
        return self.e.const(s, np.array(value, np.int64))

    def node(self, op: str, ins: list[str], s: str, **attrs) -> str:
        return self.e.node(op, ins, s, **attrs)[0]

    def _bounds(self, q: str, mask: str, chunks: int, base: str, n) -> tuple[list[str], list[str]]:
        """(row bounds, mask slices) for length `n` (q's rows, proven equal to the mask's)."""
        if not self.zero:
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
        if (n, mask) not in self.masks:
            masks = []
            for i in range(chunks):
                lo = self.node("Concat", [bounds[i], self.zero], f"{base}_mlo{i}", axis=0)
                hi = self.node("Concat", [bounds[i + 1], bounds[i + 1]], f"{base}_mhi{i}", axis=0)
                masks.append(self.node("Slice", [mask, lo, hi, self.ax_m], f"{base}_mask{i}"))
            self.masks[(n, mask)] = masks
        return bounds, self.masks[(n, mask)]

    def chunked(self, q: tuple[str, str | None], k: tuple[str, str | None], v: str, mask: str,
                post: str | None, out: str, chunks: int, base: str, n) -> None:
        base = base.strip("/").replace("/", "_")
        (q, q_scale), (k, k_scale) = q, k
        bounds, masks = self._bounds(q, mask, chunks, base, n)
        parts = []
        for i in range(chunks):
            lo, hi = bounds[i], bounds[i + 1]
            qi = self.node("Slice", [q, lo, hi, self.ax_q], f"{base}_q{i}")
            ki = self.node("Slice", [k, self.zero, hi, self.ax_k], f"{base}_k{i}")
            if q_scale:
                qi = self.node("Mul", [qi, q_scale], f"{base}_qs{i}")
            if k_scale:
                ki = self.node("Mul", [ki, k_scale], f"{base}_ks{i}")
            vi = self.node("Slice", [v, self.zero, hi, self.ax_q], f"{base}_v{i}")
            si = self.node("MatMul", [qi, ki], f"{base}_s{i}")
            if post:
                si = self.node("Mul", [si, post], f"{base}_ss{i}")
            pi = self.node("Softmax", [self.node("Add", [si, masks[i]], f"{base}_a{i}")], f"{base}_p{i}", axis=-1)
            parts.append(self.node("MatMul", [pi, vi], f"{base}_o{i}"))
        self.e.nodes.append(helper.make_node("Concat", parts, [out], name=self.e.name(f"{base}_Concat"), axis=-2))
