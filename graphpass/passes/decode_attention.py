"""GroupQueryAttention at one new token -> attention over the concatenated cache, query heads grouped.

In a graph that only ever sees one new token (the decode body of passes/decode_route.py), each
GroupQueryAttention that decode_gqa wrote,
    out, K', V' = GroupQueryAttention(q, k, v, K, V, seqlens_k = T - 1, T, bias = Where(M, 0, -inf))
with q [b, 1, h·d], k, v [b, 1, kv·d], K, V [b, kv, T - 1, d], r = h / kv and query head i reading
kv head ⌊i / r⌋, is, per batch row,
    K' = Concat(K, k as [b, kv, 1, d]),   V' = Concat(V, v as [b, kv, 1, d])          (axis 2)
    P  = Softmax(c · (q as [b, kv, r, d]) · K'ᵀ + bias)                               [b, kv, r, T]
    out = (any(M) ? P · V' : 0) as [b, 1, h·d]
(GroupQueryAttention gives 0 for a row whose every key is masked; Softmax would give NaN there,
so `any(M)` = ReduceMax(bias) > -inf keeps that row at 0). Exact up to float summation order.
onnxruntime's CPU kernel fills `present` with zeros and then copies the past into it once per
*query* head (r times per kv head) before its per-head GEMV; the Concat copies it once, and the
score and value products run as one batched MatMul per layer. Measured on SmolLM2's 30 layers at
a past of 256 (2 threads): 0.6x the CPU time of the fused kernel.

Matched only where this is the whole of what the node does: no rotary, cache quantization, softcap,
local window, sink or packed QKV; the attention bias is Where(M, 0, -inf) and seqlens_k is
mask.shape[3] - 1 for every row (so every row's past is the whole past input), both from the same
M, as decode_gqa builds them.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.passes.decode_match import NoMatch, expect, scalar, shape_dim, static_dim
from graphpass.passes.qforms import Emitter

PLAIN = {"do_rotary": 0, "softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0, "qk_output": 0,
         "causal": 1, "sliding_window_cache": 0}


def attend_one_token(g: gs.Graph, opset: int, names: set[str]) -> tuple[int, list[str]]:
    """Rewrite every matching GroupQueryAttention of g in place (g sees one new token per row);
    returns (count, reasons for those kept)."""
    e, rewritten, why, valid = Emitter(g, opset, names), 0, [], {}
    for n in [n for n in g.nodes if n.op == "GroupQueryAttention"]:
        try:
            mask, d = _match(n)
        except NoMatch as err:
            why.append(f"{n.name}: {err}")
            continue
        bias = n.inputs[10]
        if bias.name not in valid:
            valid[bias.name] = _any_key(e, bias, opset)
        _rewrite(e, n, d, valid[bias.name])
        rewritten += 1
    if rewritten:
        g.cleanup().toposort()
    return rewritten, why


def _match(n: gs.Node) -> tuple[gs.Variable, int]:
    """(M, head size) when n is decode_gqa's plain GroupQueryAttention."""
    ins = n.inputs
    for k, v in PLAIN.items():
        if n.attrs.get(k, v) != v:
            raise NoMatch(f"attribute {k} is {n.attrs[k]}")
    if any(a in n.attrs for a in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")) or len(ins) != 11:
        raise NoMatch("cache quantization, a sink or other optional inputs are set")
    if any(t.name for t in ins[7:10]) or any(not t.name for t in ins[:5]):
        raise NoMatch("q, k, v are packed, or rotary tables / position ids are given")
    w = expect(ins[10], "Where")
    if scalar(w.inputs[1]) != 0.0 or scalar(w.inputs[2]) != -np.inf:
        raise NoMatch("attention bias is not Where(M, 0, -inf)")
    mask = w.inputs[0]
    total = _mask_length(ins[6])
    ex = expect(ins[5], "Expand")
    sub = expect(ex.inputs[0], "Sub")
    if total is not mask or _mask_length(sub.inputs[0]) is not mask or scalar(sub.inputs[1]) != 1:
        raise NoMatch("seqlens_k / total_sequence_length are not M.shape[3] - 1 / M.shape[3] of the bias's M")
    d = static_dim(ins[3], 3)
    if d is None or n.attrs["num_heads"] % n.attrs["kv_num_heads"]:
        raise NoMatch("past key has no static head size, or heads are not a multiple of kv heads")
    return mask, d


def _mask_length(t):
    """M when t is Cast(Gather(Shape(M), 3)), else None."""
    dim = shape_dim(t)
    return dim[0] if dim is not None and dim[1] == 3 else None


def _any_key(e: Emitter, bias, opset: int) -> gs.Variable:
    """[b, 1, 1, 1] bool: the row has a key it may read (bias is 0 or -inf)."""
    if opset >= 18:
        (m,) = e.node("ReduceMax", [bias, e.const(f"{bias.name}_keys", np.array([3], np.int64))], bias.name, keepdims=1)
    else:
        (m,) = e.node("ReduceMax", [bias], bias.name, keepdims=1, axes=[3])
    (ok,) = e.node("Greater", [m, e.const(f"{bias.name}_ninf", np.float32(-np.inf))], bias.name)
    return ok


def _rewrite(e: Emitter, n: gs.Node, d: int, ok: gs.Variable) -> None:
    q, k, v, past_k, past_v, *_ = n.inputs
    bias = n.inputs[10]
    heads, kv = int(n.attrs["num_heads"]), int(n.attrs["kv_num_heads"])
    scale = float(n.attrs.get("scale", 0.0)) or 1.0 / float(np.sqrt(d))
    out, present_k, present_v = n.outputs
    base = n.name
    n.outputs.clear()
    n.inputs.clear()
    shape = lambda tag, dims: e.const(f"{base}_{tag}", np.array(dims, np.int64))  # noqa: E731
    (q4,) = e.node("Reshape", [q, shape("q_shape", [0, kv, heads // kv, d])], f"{base}_q")
    one = shape("kv_shape", [0, kv, 1, d])
    (k4,) = e.node("Reshape", [k, one], f"{base}_k")
    (v4,) = e.node("Reshape", [v, one], f"{base}_v")
    e.emit("Concat", [past_k, k4], [present_k], f"{base}_present_k", axis=2)
    e.emit("Concat", [past_v, v4], [present_v], f"{base}_present_v", axis=2)
    (kt,) = e.node("Transpose", [present_k], base, perm=[0, 1, 3, 2])
    (s,) = e.node("MatMul", [q4, kt], f"{base}_scores")
    (s,) = e.node("Mul", [s, e.const(f"{base}_scale", np.float32(scale))], base)
    (s,) = e.node("Add", [s, bias], base)
    (p,) = e.node("Softmax", [s], base, axis=-1)
    (a,) = e.node("MatMul", [p, present_v], f"{base}_values")
    (a,) = e.node("Where", [ok, a, e.const(f"{base}_zero", np.float32(0.0))], base)
    e.emit("Reshape", [a, shape("out_shape", [0, 1, heads * d])], [out], f"{base}_out")
