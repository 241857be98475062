"""Exported grouped-query attention with a KV cache -> com.microsoft GroupQueryAttention.

Per layer the TorchScript export of a Llama-style decoder with past (optimum-onnx
`text-generation-with-past`) computes, with q, k, v the projection outputs [b, s, n·d], heads(x) =
Transpose(Reshape(x, [b, s, -1, d]), 0 2 1 3), rope(x) = x·cos + rotate_half(x)·sin:
    K = Concat(past_k, rope(heads(k))),   V = Concat(past_v, heads(v))          (present_k, present_v)
    A = Softmax(rope(heads(q))·c_q · (repeat(K)ᵀ·c_k) + Where(M, 0, -inf)),   A = Where(IsNaN(A), 0, A)
    out = Reshape(Transpose(A · repeat(V)), [b, s, n·d])
It becomes, with T = M.shape[3] the total length and the graph's own cos/sin rows as the cache:
    q' = RotaryEmbedding(q, pos, cos[:, :d/2], sin[:, :d/2]),  k' likewise  (pos indexes rows b·s)
    out, present_k, present_v = GroupQueryAttention(q', k', v, past_k, past_v, seqlens_k = T - 1,
                                   T, attention_bias = Where(M, 0, -inf), scale = c_q·c_k)
Exact up to float summation order when: the mask implies GroupQueryAttention's causal window
(proven in decode_mask), cos and sin repeat their halves (Concat(F, F) behind Cos/Sin, scalar Muls
and Casts), rotate_half splits at d/2, repeat(K) is Unsqueeze(axis 2)-Expand-Reshape (kv-major, as
GroupQueryAttention groups heads), the head size d is a multiple of 8 (the CPU kernel's
requirement, checked at run time), and every layer's cache has the length the mask implies
(T - s; otherwise onnxruntime refuses the shapes). A row whose every key is masked reads 0 in both
(the NaN guard there; GroupQueryAttention's causal path). A batch > 1 with both a past and more than
one new token is refused by the onnxruntime CPU kernel ("batch_size must be 1 ...").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.passes.decode_mask import check_causal
from graphpass.passes.decode_match import (NoMatch, expect, only_reader, other, producer, readers,
                                           scalar, shape_dim, skip, static_dim)
from graphpass.passes.decode_rope import RopeTables, match_rope

MS = "com.microsoft"


@dataclass
class Layer:
    softmax: str
    out: gs.Variable
    q: gs.Variable
    k: gs.Variable
    v: gs.Variable
    past_k: gs.Variable
    past_v: gs.Variable
    present_k: gs.Variable
    present_v: gs.Variable
    cos: gs.Variable
    sin: gs.Variable
    mask: gs.Variable
    scale: float
    heads: int
    kv_heads: int
    head_dim: int


def match_layer(sm: gs.Node, graph_inputs: set[str]) -> Layer:
    add = expect(sm.inputs[0], "Add")
    mms = [t for t in add.inputs if (p := producer(t)) is not None and p.op == "MatMul"]
    if len(mms) != 1:
        raise NoMatch("softmax input is not Add(MatMul(Q, K), bias)")
    mask = _bias_mask(other(add, mms[0]))
    a = _unguarded(sm.outputs[0])
    pv = only_reader(a, "MatMul")
    if pv.inputs[0] is not a:
        raise NoMatch("attention weights are not the left operand of the value MatMul")
    out, x_out = _merge_heads(pv.outputs[0])
    present_v, rep_v = _repeat_kv(pv.inputs[1])
    past_v, vh = _cache_concat(present_v, graph_inputs)
    qk = producer(mms[0])
    c_q, qrot = _scaled(qk.inputs[0])
    c_k, kt = _scaled(qk.inputs[1])
    ktr = expect(kt, "Transpose")
    if list(ktr.attrs.get("perm", [])) != [0, 1, 3, 2]:
        raise NoMatch("keys are not transposed as 0 1 3 2")
    present_k, rep_k = _repeat_kv(ktr.inputs[0])
    past_k, krot = _cache_concat(present_k, graph_inputs)
    d = static_dim(past_k, 3)
    kv = static_dim(past_k, 1)
    if d is None or kv is None or rep_k != rep_v:
        raise NoMatch("past key has no static head count or head size, or K and V repeat differently")
    if d % 8:
        raise NoMatch(f"head size {d} is not a multiple of 8 (onnxruntime's GroupQueryAttention refuses it at run time)")
    qh, cos, sin = match_rope(qrot)
    kh, cos_k, sin_k = match_rope(krot)
    if cos_k is not cos or sin_k is not sin:
        raise NoMatch("queries and keys rotate with different tables")
    heads = [_heads(t, d) for t in (qh, kh, vh)]
    if any(x is not x_out for _, x in heads):
        raise NoMatch("q, k, v and the merged output do not share their [b, s] dims")
    check_causal(mask, graph_inputs)
    return Layer(sm.name, out, heads[0][0], heads[1][0], heads[2][0], past_k, past_v, present_k, present_v,
                 cos, sin, mask, c_q * c_k, kv * rep_k, kv, d)


def _bias_mask(bias) -> gs.Variable:
    """bias = Where(M, 0, -inf) (M optionally sliced along keys from 0); returns M."""
    w = expect(bias, "Where")
    if scalar(w.inputs[1]) != 0.0 or scalar(w.inputs[2]) != -np.inf:
        raise NoMatch("attention bias is not Where(mask, 0, -inf)")
    m = w.inputs[0]
    sl = producer(m)
    if sl is not None and sl.op == "Slice":
        starts, axes = sl.inputs[1], sl.inputs[3] if len(sl.inputs) > 3 else None
        steps = sl.inputs[4] if len(sl.inputs) > 4 else None
        if scalar(starts) != 0 or axes is None or scalar(axes) not in (3, -1) or (
                steps is not None and scalar(steps) != 1):
            raise NoMatch("attention mask is sliced other than keys [0, n)")
        m = sl.inputs[0]
    return m


def _unguarded(s):
    """Softmax output, or Where(IsNaN(S), 0, S) when that guard reads it."""
    rs = readers(s)
    if not any(n.op == "IsNaN" for n in rs):
        return s
    if len(rs) != 2:
        raise NoMatch("softmax output has readers besides its NaN guard")
    isn = next(n for n in rs if n.op == "IsNaN")
    w = only_reader(isn.outputs[0], "Where")
    if w.inputs[0] is not isn.outputs[0] or scalar(w.inputs[1]) != 0.0 or w.inputs[2] is not s:
        raise NoMatch("NaN guard is not Where(IsNaN(P), 0, P)")
    return w.outputs[0]


def _merge_heads(t):
    tr = only_reader(t, "Transpose")
    _check_perm(tr, "attention output is not transposed as 0 2 1 3")
    rs = only_reader(tr.outputs[0], "Reshape")
    return rs.outputs[0], _batch_seq_shape(rs, (-1,), "merged attention output is not reshaped to [b, s, -1]")


def _check_perm(tr: gs.Node, why: str) -> None:
    if list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise NoMatch(why)


def _batch_seq_shape(rs: gs.Node, tail: tuple[int, ...], why: str):
    """Reshape(·, Concat(Shape(X)[0], Shape(X)[1], *tail)) -> X, whose dims 0, 1 are b, s."""
    c = expect(rs.inputs[1], "Concat")
    dims = [shape_dim(x) for x in c.inputs[:2]]
    if len(c.inputs) != 2 + len(tail) or None in dims or [dims[0][1], dims[1][1]] != [0, 1] \
            or dims[0][0] is not dims[1][0] or [scalar(x) for x in c.inputs[2:]] != list(tail):
        raise NoMatch(why)
    return dims[0][0]


def _repeat_kv(t) -> tuple[gs.Variable, int]:
    """Reshape(Expand(Unsqueeze(X, 2), [b, kv, r, T, d]), [b, kv·r, T, d]) -> (X, r)."""
    rs = expect(t, "Reshape")
    ex = expect(rs.inputs[0], "Expand")
    un = expect(ex.inputs[0], "Unsqueeze")
    if len(un.inputs) < 2 or scalar(un.inputs[1]) != 2:
        raise NoMatch("repeated keys/values are not unsqueezed at axis 2")
    shape = ex.inputs[1]
    if (w := producer(shape)) is not None and w.op == "Where":   # Where(Equal(s, -1), 1, s)
        shape = w.inputs[2]
    shape = skip(shape, "Reshape")
    c = expect(shape, "Concat")
    r = scalar(c.inputs[2]) if len(c.inputs) == 5 else None
    if r is None or r < 1:
        raise NoMatch("repeat count of keys/values is not a constant")
    return un.inputs[0], int(r)


def _cache_concat(present, graph_inputs: set[str]):
    c = expect(present, "Concat")
    if int(c.attrs.get("axis", 0)) not in (2, -2) or len(c.inputs) != 2 or c.inputs[0].name not in graph_inputs:
        raise NoMatch(f"'{present.name}' is not Concat(past input, new, axis=2)")
    return c.inputs[0], c.inputs[1]


def _scaled(t) -> tuple[float, gs.Variable]:
    m = expect(t, "Mul")
    for i in (0, 1):
        c = scalar(m.inputs[i])
        if c is not None:
            return c, m.inputs[1 - i]
    raise NoMatch("query or key is not scaled by a constant")


def _heads(t, d: int):
    """Transpose(Reshape(x, [b, s, -1, d]), 0 2 1 3) -> (x, X whose dims 0, 1 are b, s)."""
    tr = expect(t, "Transpose")
    _check_perm(tr, "heads are not transposed as 0 2 1 3")
    rs = expect(tr.inputs[0], "Reshape")
    return rs.inputs[0], _batch_seq_shape(rs, (-1, d), f"projection is not reshaped to [b, s, -1, {d}]")


def rewrite_layer(g: gs.Graph, L: Layer, tables: RopeTables, shared: dict) -> None:
    if id(L.mask) not in shared:
        shared[id(L.mask)] = _lengths_and_bias(g, L.mask)
    seqlens, total, bias = shared[id(L.mask)]
    cos_c, sin_c, pos = tables.get(g, L.cos, L.sin, L.head_dim)
    qr = _rotary(g, L.q, pos, cos_c, sin_c, L.heads)
    kr = _rotary(g, L.k, pos, cos_c, sin_c, L.kv_heads)
    outs = [L.out, L.present_k, L.present_v]
    for t in outs:
        t.inputs.clear()
    empty = [gs.Variable.empty() for _ in range(3)]
    g.nodes.append(gs.Node("GroupQueryAttention", name=f"{L.softmax}_gqa", domain=MS,
                           inputs=[qr, kr, L.v, L.past_k, L.past_v, seqlens, total, *empty, bias],
                           outputs=outs, attrs={"num_heads": L.heads, "kv_num_heads": L.kv_heads,
                                                "scale": float(L.scale)}))


def _rotary(g, x, pos, cos_c, sin_c, heads: int) -> gs.Variable:
    y = gs.Variable(f"{x.name}_rotary", dtype=x.dtype)
    g.nodes.append(gs.Node("RotaryEmbedding", name=f"{x.name}_RotaryEmbedding", domain=MS,
                           inputs=[x, pos, cos_c, sin_c], outputs=[y], attrs={"num_heads": heads}))
    return y


def _lengths_and_bias(g, mask):
    """seqlens_k = T - 1 per batch row (int32), T = mask.shape[3] (int32 scalar), Where(M, 0, -inf)."""
    def op(o, inputs, dtype, **attrs):
        v = gs.Variable(f"{mask.name}_{o}_{len(g.nodes)}", dtype=dtype)
        g.nodes.append(gs.Node(o, name=v.name, inputs=inputs, outputs=[v], attrs=attrs))
        return v
    c = lambda name, val: gs.Constant(f"{mask.name}_{name}", np.array(val))  # noqa: E731
    shape = op("Shape", [mask], np.int64)
    t64 = op("Gather", [shape, c("i3", np.int64(3))], np.int64, axis=0)
    total = op("Cast", [t64], np.int32, to=6)
    last = op("Sub", [total, c("one", np.int32(1))], np.int32)
    batch = op("Slice", [shape, c("s0", np.array([0], np.int64)), c("s1", np.array([1], np.int64))], np.int64)
    seqlens = op("Expand", [last, batch], np.int32)
    bias = op("Where", [mask, c("zero", np.float32(0)), c("ninf", np.float32(-np.inf))], np.float32)
    return seqlens, total, bias


def fuse_gqa(g: gs.Graph) -> tuple[int, list[str]]:
    """Rewrite every matching attention block; returns (count, reasons for those left as exported)."""
    inputs = {t.name for t in g.inputs}
    layers, why = [], []
    for sm in [n for n in g.nodes if n.op == "Softmax"]:
        try:
            layers.append(match_layer(sm, inputs))
        except NoMatch as e:
            why.append(f"{sm.name}: {e}")
    tables, shared = RopeTables(), {}
    for L in layers:
        rewrite_layer(g, L, tables, shared)
    if layers:
        g.cleanup().toposort()
    return len(layers), why
