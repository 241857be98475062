"""Smoothing sites, found once and shared by calibration, smoothing and quantization.

A site is an activation X (last axis = C channels) read by linear layers Y_k = X·W_k, plus a
producer into which X -> X·diag(s)^-1 folds exactly:
  norm   : X = n(z)·γ (+ β)            -> γ /= s, β /= s           (LayerNormalization, RMSNorm in
           SimplifiedLayerNormalization / RMSNormalization / Mul-by-weight form, decomposed LN)
  glu    : X = f(g) ⊙ (h·W_up + b)     -> W_up[:, j] /= s_j, b_j /= s_j   (SwiGLU up -> down)
  linear : X = h·W_p + b               -> same, on the producing linear layer
  attn   : X = heads(P·V), V = h·W_v   -> W_v columns /= s mapped through the head layout; with
           grouped-query attention s is shared by the query heads that read one kv head.
Matching is on structure only, never on names. Every linear layer not covered says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from graphpass.graph.consts import Consts
from graphpass.graph.io import consumers, producers
from graphpass.match.linears import Linear, _attr, find_linears, label

# op -> (kind, index of γ, index of β or None). Only output 0 of a norm is normalized:
# SkipSimplifiedLayerNormalization's output 3 (input + skip, the residual) does not see γ.
NORM_OPS = {"LayerNormalization": ("layernorm", 1, 2), "SimplifiedLayerNormalization": ("rmsnorm", 1, None),
            "RMSNormalization": ("rmsnorm", 1, None), "SkipSimplifiedLayerNormalization": ("rmsnorm", 2, None)}
PASS_THROUGH = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Expand"}


@dataclass
class NormFold:
    nodes: list[onnx.NodeProto]                  # the affine tail (cloned when X has other readers)
    scale: tuple[onnx.NodeProto, int]            # (node, input index) of γ
    bias: tuple[onnx.NodeProto, int] | None      # (node, input index) of β
    clone: bool = False
    via: onnx.NodeProto | None = None            # a channel-keeping Reshape between norm and readers


@dataclass
class LinearFold:
    producer: Linear
    channel_map: np.ndarray | None = None        # X channel j <- producer output channel map[j]


@dataclass
class Site:
    kind: str
    act: str
    consumers: list[Linear]
    fold: NormFold | LinearFold
    anchor: str                                   # name of the producer node, for reports

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.anchor}"


@dataclass
class Analysis:
    consts: Consts
    linears: list[Linear]
    sites: list[Site] = field(default_factory=list)
    uncovered: list[tuple[str, str]] = field(default_factory=list)   # (linear name, reason)
    unfoldable: list[tuple[str, list[Linear]]] = field(default_factory=list)  # (act, readers)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if name in (s.name, s.anchor, s.act):
                return s
        raise KeyError(name)


class _Graph:
    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None, consts: Consts | None = None):
        self.g = model.graph
        self.c = consts if consts is not None else Consts(self.g, base_dir)
        self.prod, self.cons = producers(self.g), consumers(self.g)

    def readers(self, t: str) -> list[onnx.NodeProto]:
        return self.cons.get(t, [])

    def only_reader(self, t: str, node: onnx.NodeProto) -> bool:
        r = self.readers(t)
        return len(r) == 1 and r[0] is node and t not in self.c.graph_outputs

    def single_use(self, t: str) -> bool:
        return len(self.readers(t)) == 1 and t not in self.c.graph_outputs

    def channel_vector(self, name: str, width: int) -> bool:
        v = self.c.get(name)
        return v is not None and v.size == width and v.shape[-1] == width


def analyze(model: onnx.ModelProto, base_dir: str | None = None, consts: Consts | None = None) -> Analysis:
    """All linear layers of the model, grouped into sites, and the reason for each one left out.

    `base_dir`: the model's folder, when its weights were left in external data (read on demand).
    `consts`: reuse the constant table of an earlier pass (its pending values included).
    """
    gr = _Graph(model, base_dir, consts)
    linears, skipped = find_linears(gr.g, gr.c, gr.prod, gr.cons)
    res = Analysis(gr.c, linears, uncovered=list(skipped))
    groups: dict[str, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(lin.act, []).append(lin)
    by_out = {lin.out: lin for lin in linears}
    for act, group in groups.items():
        width = group[0].shape(gr.c)[0]
        if any(lin.shape(gr.c)[0] != width for lin in group):
            why = "readers disagree on the channel count"
        else:
            site, why = _match(gr, act, group, width, by_out)
            if site is not None:
                res.sites.append(site)
                continue
        res.uncovered += [(lin.name, why) for lin in group]
        if all(lin.shape(gr.c)[0] == width and not _tied(gr, lin) for lin in group):
            res.unfoldable.append((act, group))
    return res


def _match(gr: _Graph, act: str, group: list[Linear], width: int, by_out: dict):
    others = [n for n in gr.readers(act) if all(n is not lin.node for lin in group)]
    extra = bool(others) or act in gr.c.graph_outputs
    p = gr.prod.get(act)
    if p is None:
        return None, "input is a graph input (no producer to fold into)"
    tied = [lin for lin in group if _tied(gr, lin)]
    if tied:
        return None, (f"{tied[0].name} reads a tied weight (Transpose of a table used elsewhere); "
                      "smoothing would store it twice")
    table = [lin for lin in group if _table_weight(gr, lin)]
    if table:      # e.g. the genai builder's LM head, whose weight the embedding reads transposed
        return None, (f"{table[0].name} shares its weight with an embedding lookup "
                      f"({_table_weight(gr, table[0])}); smoothing would store the table twice")
    if p.op_type == "Reshape" and not extra and _last_dim(gr, p.input[1]) == width and gr.prod.get(p.input[0]):
        x = p.input[0]                 # [.., C] -> [-1, C] before a Gemm keeps the channels
        others_x = [n for n in gr.readers(x) if n is not p]
        fold, kind = _norm_fold(gr, gr.prod[x], x, width)
        if fold is not None:
            fold.clone, fold.via = bool(others_x) or x in gr.c.graph_outputs, p
            return Site(kind, act, group, fold, label(fold.nodes[-1])), ""
    fold, kind = _norm_fold(gr, p, act, width)
    if fold is not None:
        fold.clone = extra
        return Site(kind, act, group, fold, label(fold.nodes[-1])), ""
    if extra:
        names = ", ".join(sorted({n.op_type for n in others})) or "a graph output"
        return None, f"input also feeds {names}, and its producer {p.op_type} cannot be duplicated"
    if act in by_out:
        prodlin = by_out[act]
        return _linear_site("linear", gr, act, group, prodlin, None)
    if p.op_type == "Mul":
        for t in p.input:
            lin = by_out.get(t)
            if lin is not None and gr.only_reader(t, p) and lin.shape(gr.c)[1] == width:
                return _linear_site("glu", gr, act, group, lin, None)
    lin, cmap, why = _trace_attention(gr, act, width, by_out)
    if lin is not None:
        return _linear_site("attn", gr, act, group, lin, cmap)
    return None, why or (f"input produced by {p.op_type}, not a norm or a per-channel linear map "
                         "(a Mul can be inserted with --allow-mul)")


def _linear_site(kind: str, gr: _Graph, act: str, group, prod: Linear, cmap):
    if prod.shared_weight(gr.c):
        return None, f"producer {prod.name} shares its weight with another reader; folding would change it"
    return Site(kind, act, group, LinearFold(prod, cmap), prod.name), ""


def _table_weight(gr: _Graph, lin: Linear) -> str:
    """The op (Gather / Transpose) through which a table-lookup also reads lin's weight, or ''."""
    n, i = lin._holder()
    return next((r.op_type for r in gr.readers(n.input[i]) if r.op_type in ("Gather", "Transpose")
                 and r is not lin.via), "")


def _tied(gr: _Graph, lin: Linear) -> bool:
    return lin.via is not None and lin.shared_weight(gr.c)


def _norm_fold(gr: _Graph, p: onnx.NodeProto, act: str, width: int):
    """γ (and β) behind X when X is a per-channel affine of a normalized tensor."""
    if p.op_type in NORM_OPS:
        kind, gi, bi = NORM_OPS[p.op_type]
        if p.output[0] != act or _attr(p, "axis", -1) != -1 or not gr.channel_vector(p.input[gi], width):
            return None, ""
        has_bias = bi is not None and len(p.input) > bi and p.input[bi]
        if has_bias and not gr.channel_vector(p.input[bi], width):
            return None, ""
        return NormFold([p], (p, gi), (p, bi) if has_bias else None), kind
    bias = None
    if p.op_type == "Add":
        k = next((i for i, t in enumerate(p.input) if gr.channel_vector(t, width)), None)
        m = gr.prod.get(p.input[1 - k]) if k is not None else None
        if m is None or m.op_type != "Mul" or not gr.only_reader(m.output[0], p):
            return None, ""
        bias, tail, p = (p, k), [m, p], m
    else:
        tail = [p]
    if p.op_type != "Mul":
        return None, ""
    k = next((i for i, t in enumerate(p.input) if gr.channel_vector(t, width)), None)
    if k is None:
        return None, ""
    return NormFold(tail, (p, k), bias), _norm_kind(gr, p.input[1 - k])


def _norm_kind(gr: _Graph, t: str, depth: int = 6) -> str:
    """'rmsnorm' / 'layernorm' when a ReduceMean chain normalizes t, else 'scale'."""
    seen, frontier, ops = set(), [t], set()
    for _ in range(depth):
        nxt = []
        for name in frontier:
            n = gr.prod.get(name)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            ops.add(n.op_type)
            nxt += list(n.input)
        frontier = nxt
    if "ReduceMean" not in ops:
        return "scale"
    return "layernorm" if "Sub" in ops else "rmsnorm"


def _last_dim(gr: _Graph, shape: str) -> int | None:
    """Last entry of a Reshape target: a constant, or the constant tail of a Concat of pieces."""
    v = gr.c.get(shape)
    if v is None:
        n = gr.prod.get(shape)
        if n is None or n.op_type != "Concat":
            return None
        v = gr.c.get(n.input[-1])
    return int(v.reshape(-1)[-1]) if v is not None and v.size else None


def _trace_attention(gr: _Graph, act: str, width: int, by_out: dict):
    """Follow X back through head reshapes and P·V to the value projection.

    With a KV cache, V = Concat(past_v, v_new) on the sequence axis and the Concat is also the
    `present` output: folding 1/s into the value projection makes the cache hold v·diag(1/s)
    mapped through the heads, which the next step reads back as past. That is exact for the
    graph's own generation loop (a cache written by the unsmoothed graph must not be mixed in).
    """
    gqa = gr.prod.get(act)
    if gqa is not None and gqa.op_type == "GroupQueryAttention" and gqa.output[0] == act:
        return _gqa_value(gr, gqa, width, by_out)
    t, path, seen_pv = act, [], False
    while True:
        cached = _cache_concat(gr, t) if seen_pv else None
        if cached is not None:
            t = cached
            continue
        if t != act and not gr.single_use(t):
            return None, None, "value path tensor has other readers (a kv-cache output?)" if seen_pv else ""
        if t in by_out and seen_pv:
            break
        n = gr.prod.get(t)
        if n is None:
            return None, None, ""
        if n.op_type in PASS_THROUGH:
            path.append(n)
            t = n.input[0]
        elif n.op_type == "MatMul" and not seen_pv and not gr.c.is_const(n.input[1]) and t == n.output[0]:
            seen_pv, t = True, n.input[1]
        else:
            return None, None, ""
    lin = by_out[t]
    cv = lin.shape(gr.c)[1]
    if cv == width:
        return lin, None, ""
    if width % cv or not any(n.op_type == "Expand" for n in path):
        return None, None, f"value width {cv} does not divide into {width} by a head repeat"
    reshapes = [n for n in path if n.op_type == "Reshape"]
    d = _last_dim(gr, reshapes[-1].input[1]) if reshapes else None
    if d is None or d <= 0 or cv % d:
        return None, None, "head size of the value projection is not a constant"
    return lin, _head_map(width, cv, d), ""


def _head_map(width: int, kv_width: int, d: int, offset: int = 0) -> np.ndarray:
    """Channel j of the attention output (query head j // d) <- value column of kv head
    (j // d) // g, where g = width / kv_width query heads share one kv head."""
    g, j = width // kv_width, np.arange(width)
    return offset + (j // (d * g)) * d + j % d


def _cache_concat(gr: _Graph, t: str) -> str | None:
    """v_new when t = Concat(past, v_new) along the sequence axis, past a graph input, and t read
    by one node besides the graph output (present) it may be; else None."""
    n = gr.prod.get(t)
    if n is None or n.op_type != "Concat" or len(n.input) != 2:
        return None
    graph_inputs = {i.name for i in gr.g.input}
    if n.input[0] not in graph_inputs or n.input[1] in graph_inputs:
        return None
    if _attr(n, "axis", None) not in (2, -2) or len(gr.readers(t)) != 1:
        return None
    return n.input[1]


def _gqa_value(gr: _Graph, n: onnx.NodeProto, width: int, by_out: dict):
    """com.microsoft GroupQueryAttention: output = heads(softmax(...)·V); V is its input 2, or
    the last kv_num_heads·d columns of a packed q/k/v input 0 (inputs 1 and 2 empty). Rotary
    touches only q and k. The present value output holds v·diag(1/s) (see _trace_attention)."""
    heads, kv = _attr(n, "num_heads", 0), _attr(n, "kv_num_heads", 0)
    if heads <= 0 or kv <= 0 or width % heads or heads % kv:
        return None, None, "GroupQueryAttention without a usable num_heads / kv_num_heads"
    d = width // heads
    packed = len(n.input) < 3 or not n.input[2]
    src = n.input[0] if packed else n.input[2]
    lin = by_out.get(src)
    if lin is None or not gr.single_use(src):
        return None, None, "GroupQueryAttention's value input is not a linear layer's own output"
    cols = lin.shape(gr.c)[1]
    want = (heads + 2 * kv) * d if packed else kv * d
    if cols != want:
        return None, None, f"value projection has {cols} columns, expected {want} for the head layout"
    return lin, _head_map(width, kv * d, d, offset=(heads + kv) * d if packed else 0), ""
