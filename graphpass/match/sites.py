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
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts, attr
from graphpass.graph.gs_io import import_graph
from graphpass.match.linears import Linear, find_linears, label

# op -> site kind, (input index of gamma, of beta or None): a new norm op is one row here.
# Only output 0 of a norm is normalized: SkipSimplifiedLayerNormalization's output 3 (input +
# skip, the residual stream) does not see γ, so folding into γ leaves it unchanged.
NORM_OPS = {"LayerNormalization": ("layernorm", 1, 2), "SimplifiedLayerNormalization": ("rmsnorm", 1, None),
            "RMSNormalization": ("rmsnorm", 1, None), "SkipSimplifiedLayerNormalization": ("rmsnorm", 2, None)}
PASS_THROUGH = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Expand"}


@dataclass(eq=False)
class NormFold:
    nodes: list[gs.Node]                         # the affine tail (cloned when X has other readers)
    scale: tuple[gs.Node, int] | None            # (node, input index) of γ
    bias: tuple[gs.Node, int] | None             # (node, input index) of β
    clone: bool = False
    via: gs.Node | None = None                   # a channel-keeping Reshape between norm and readers


@dataclass(eq=False)
class LinearFold:
    producer: Linear
    channel_map: np.ndarray | None = None        # X channel j <- producer output channel map[j]


@dataclass(eq=False)
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

    @property
    def graph(self) -> gs.Graph:
        return self.consts.graph

    def site(self, name: str) -> Site:
        for s in self.sites:
            if name in (s.name, s.anchor, s.act):
                return s
        raise KeyError(name)


class _Graph:
    def __init__(self, c: Consts):
        self.g, self.c = c.graph, c

    def prod(self, t: gs.Tensor | None) -> gs.Node | None:
        return self.c.producer(t)

    @staticmethod
    def readers(t: gs.Tensor) -> list[gs.Node]:
        return list(t.outputs)

    def is_output(self, t: gs.Tensor) -> bool:
        return t.name in self.c.graph_outputs

    def only_reader(self, t: gs.Tensor, node: gs.Node) -> bool:
        r = t.outputs
        return len(r) == 1 and r[0] is node and not self.is_output(t)

    def single_use(self, t: gs.Tensor) -> bool:
        return len(t.outputs) == 1 and not self.is_output(t)

    def channel_vector(self, t: gs.Tensor, width: int) -> bool:
        if isinstance(t, gs.Constant):
            shape = self.c.shape(t)
            return int(np.prod(shape)) == width and len(shape) > 0 and shape[-1] == width
        v = self.c.get(t)
        return v is not None and v.size == width and v.shape[-1] == width


def rescaled_channels(an: Analysis) -> dict[str, np.ndarray | None]:
    """Tensors smoothing may rescale per channel -> the channels it may rescale (None: all of
    them): each site's input X (X·diag(s)^-1), and the output of each producing linear layer that
    absorbed 1/s, on the columns its fold names (packed q/k/v: v's columns only)."""
    out: dict[str, np.ndarray | None] = {}
    for s in an.sites:
        if not isinstance(s.fold, LinearFold):
            continue
        p, cmap = s.fold.producer, s.fold.channel_map
        mask = None
        if cmap is not None:
            mask = np.zeros(p.shape(an.consts)[1], bool)
            mask[cmap] = True
        out[p.node.outputs[0].name] = None if mask is None or mask.all() else mask
    out.update((s.act, None) for s in an.sites)
    return out


def graph_of(model, base_dir: str | None = None) -> gs.Graph:
    """A gs.Graph as given, or imported from a ModelProto (external weights read from base_dir)."""
    return model if isinstance(model, gs.Graph) else import_graph(model, base_dir)


def analyze(model: onnx.ModelProto | gs.Graph, base_dir: str | None = None,
            consts: Consts | None = None) -> Analysis:
    """All linear layers of the model, grouped into sites, and the reason for each one left out.

    `base_dir`: the model's folder, when its weights were left in external data (read on demand).
    `consts`: reuse the constant table (and graph) of an earlier pass.
    """
    c = consts if consts is not None else Consts(graph_of(model, base_dir))
    gr = _Graph(c)
    linears, skipped = find_linears(gr.g, c)
    res = Analysis(c, linears, uncovered=list(skipped))
    groups: dict[str, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(lin.act, []).append(lin)
    by_out = {lin.out: lin for lin in linears}
    for act, group in groups.items():
        width = group[0].shape(c)[0]
        if any(lin.shape(c)[0] != width for lin in group):
            why = "readers disagree on the channel count"
        else:
            site, why = _match(gr, group[0].x, group, width, by_out)
            if site is not None:
                res.sites.append(site)
                continue
        res.uncovered += [(lin.name, why) for lin in group]
        if all(lin.shape(c)[0] == width and not _tied(gr, lin) for lin in group):
            res.unfoldable.append((act, group))
    return res


def _match(gr: _Graph, x: gs.Tensor, group: list[Linear], width: int, by_out: dict):
    others = [n for n in gr.readers(x) if all(n is not lin.node for lin in group)]
    extra = bool(others) or gr.is_output(x)
    p = gr.prod(x)
    if p is None:
        return None, "input is a graph input (no producer to fold into)"
    tied = [lin for lin in group if _tied(gr, lin)]
    if tied:
        return None, (f"{tied[0].name} reads a tied weight (Transpose of a table used elsewhere); "
                      "smoothing would store it twice")
    table = [lin for lin in group if _table_weight(lin)]
    if table:      # e.g. the genai builder's LM head, whose weight the embedding reads transposed
        return None, (f"{table[0].name} shares its weight with an embedding lookup "
                      f"({_table_weight(table[0])}); smoothing would store the table twice")
    if p.op == "Reshape" and not extra and _last_dim(gr, p.inputs[1]) == width and gr.prod(p.inputs[0]):
        y = p.inputs[0]                # [.., C] -> [-1, C] before a Gemm keeps the channels
        fold, kind = _norm_fold(gr, gr.prod(y), width, y)
        if fold is not None:
            fold.clone, fold.via = any(n is not p for n in gr.readers(y)) or gr.is_output(y), p
            return Site(kind, x.name, group, fold, label(fold.nodes[-1])), ""
    fold, kind = _norm_fold(gr, p, width, x)
    if fold is not None:
        fold.clone = extra
        return Site(kind, x.name, group, fold, label(fold.nodes[-1])), ""
    if extra:
        names = ", ".join(sorted({n.op for n in others})) or "a graph output"
        return None, f"input also feeds {names}, and its producer {p.op} cannot be duplicated"
    if x.name in by_out:
        return _linear_site("linear", gr, x.name, group, by_out[x.name], None)
    if p.op == "Mul":
        for t in p.inputs:
            lin = by_out.get(t.name)
            if lin is not None and gr.only_reader(t, p) and lin.shape(gr.c)[1] == width:
                return _linear_site("glu", gr, x.name, group, lin, None)
    lin, cmap, why = _trace_attention(gr, x, width, by_out)
    if lin is not None:
        return _linear_site("attn", gr, x.name, group, lin, cmap)
    return None, why or (f"input produced by {p.op}, not a norm or a per-channel linear map "
                         "(a Mul can be inserted with --allow-mul)")


def _linear_site(kind: str, gr: _Graph, act: str, group, prod: Linear, cmap):
    if prod.shared_weight(gr.c):
        return None, f"producer {prod.name} shares its weight with another reader; folding would change it"
    return Site(kind, act, group, LinearFold(prod, cmap), prod.name), ""


def _table_weight(lin: Linear) -> str:
    """The op (Gather / Transpose) through which a table lookup also reads lin's weight, or ''."""
    n, i = lin._holder()
    return next((r.op for r in n.inputs[i].outputs if r.op in ("Gather", "Transpose")
                 and r is not lin.via), "")


def _tied(gr: _Graph, lin: Linear) -> bool:
    return lin.via is not None and lin.shared_weight(gr.c)


def _norm_fold(gr: _Graph, p: gs.Node, width: int, x: gs.Tensor):
    """γ (and β) behind X when X is a per-channel affine of a normalized tensor."""
    if p.op in NORM_OPS:
        kind, gi, bi = NORM_OPS[p.op]
        if p.outputs[0] is not x or attr(p, "axis", -1) != -1 or not gr.channel_vector(p.inputs[gi], width):
            return None, ""
        has_bias = bi is not None and len(p.inputs) > bi and p.inputs[bi].name
        if has_bias and not gr.channel_vector(p.inputs[bi], width):
            return None, ""
        return NormFold([p], (p, gi), (p, bi) if has_bias else None), kind
    bias = None
    if p.op == "Add":
        k = next((i for i, t in enumerate(p.inputs) if gr.channel_vector(t, width)), None)
        m = gr.prod(p.inputs[1 - k]) if k is not None else None
        if m is None or m.op != "Mul" or not gr.only_reader(m.outputs[0], p):
            return None, ""
        bias, tail, p = (p, k), [m, p], m
    else:
        tail = [p]
    if p.op != "Mul":
        return None, ""
    k = next((i for i, t in enumerate(p.inputs) if gr.channel_vector(t, width)), None)
    if k is None:
        return None, ""
    return NormFold(tail, (p, k), bias), _norm_kind(gr, p.inputs[1 - k])


def _norm_kind(gr: _Graph, t: gs.Tensor, depth: int = 6) -> str:
    """'rmsnorm' / 'layernorm' when a ReduceMean chain normalizes t, else 'scale'."""
    seen, frontier, ops = set(), [t], set()
    for _ in range(depth):
        nxt = []
        for tensor in frontier:
            n = gr.prod(tensor)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            ops.add(n.op)
            nxt += list(n.inputs)
        frontier = nxt
    if "ReduceMean" not in ops:
        return "scale"
    return "layernorm" if "Sub" in ops else "rmsnorm"


def _last_dim(gr: _Graph, shape: gs.Tensor) -> int | None:
    """Last entry of a Reshape target: a constant, or the constant tail of a Concat of pieces."""
    v = gr.c.get(shape)
    if v is None:
        n = gr.prod(shape)
        if n is None or n.op != "Concat":
            return None
        v = gr.c.get(n.inputs[-1])
    return int(v.reshape(-1)[-1]) if v is not None and v.size else None


def _trace_attention(gr: _Graph, x: gs.Tensor, width: int, by_out: dict):
    """Follow X back through head reshapes and P·V to the value projection.

    With a KV cache, V = Concat(past_v, v_new) on the sequence axis and the Concat is also the
    `present` output: folding 1/s into the value projection makes the cache hold v·diag(1/s)
    mapped through the heads, which the next step reads back as past. That is exact for the
    graph's own generation loop (a cache written by the unsmoothed graph must not be mixed in).
    """
    gqa = gr.prod(x)
    if gqa is not None and gqa.op == "GroupQueryAttention" and gqa.outputs[0] is x:
        return _gqa_value(gr, gqa, width, by_out)
    t, path, seen_pv = x, [], False
    while True:
        cached = _cache_concat(gr, t) if seen_pv else None
        if cached is not None:
            t = cached
            continue
        if t is not x and (len(_value_readers(t)) != 1 or gr.is_output(t)):
            return None, None, "value path tensor has other readers (a kv-cache output?)" if seen_pv else ""
        if t.name in by_out and seen_pv:
            break
        n = gr.prod(t)
        if n is None:
            return None, None, ""
        if n.op in PASS_THROUGH:
            path.append(n)
            t = n.inputs[0]
        elif n.op == "MatMul" and not seen_pv and not gr.c.is_const(n.inputs[1]) and t is n.outputs[0]:
            seen_pv, t = True, n.inputs[1]
        else:
            return None, None, ""
    lin = by_out[t.name]
    cv = lin.shape(gr.c)[1]
    if cv == width:
        return lin, None, ""
    if width % cv or not any(n.op == "Expand" for n in path):
        return None, None, f"value width {cv} does not divide into {width} by a head repeat"
    reshapes = [n for n in path if n.op == "Reshape"]
    d = _last_dim(gr, reshapes[-1].inputs[1]) if reshapes else None
    if d is None or d <= 0 or cv % d:
        return None, None, "head size of the value projection is not a constant"
    return lin, _head_map(width, cv, d), ""


def _head_map(width: int, kv_width: int, d: int, offset: int = 0) -> np.ndarray:
    """Channel j of the attention output (query head j // d) <- value column of kv head
    (j // d) // g, where g = width / kv_width query heads share one kv head."""
    g, j = width // kv_width, np.arange(width)
    return offset + (j // (d * g)) * d + j % d


def _cache_concat(gr: _Graph, t: gs.Tensor) -> gs.Tensor | None:
    """v_new when t = Concat(past, v_new) along the sequence axis, past a graph input, and t read
    by one node besides the graph output (present) it may be; else None."""
    n = gr.prod(t)
    if n is None or n.op != "Concat" or len(n.inputs) != 2:
        return None
    inputs = {i.name for i in gr.g.inputs}
    if n.inputs[0].name not in inputs or n.inputs[1].name in inputs:
        return None
    if attr(n, "axis", None) not in (2, -2) or len(_value_readers(t)) != 1:
        return None
    return n.inputs[1]


def _value_readers(t: gs.Tensor) -> list[gs.Node]:
    """Readers that see t's values (a Shape reader sees only its shape, which scaling keeps)."""
    return [r for r in t.outputs if r.op != "Shape"]


def _gqa_value(gr: _Graph, n: gs.Node, width: int, by_out: dict):
    """com.microsoft GroupQueryAttention: output = heads(softmax(...)·V); V is its input 2, or
    the last kv_num_heads·d columns of a packed q/k/v input 0 (inputs 1 and 2 empty). Rotary
    touches only q and k. The present value output holds v·diag(1/s) (see _trace_attention)."""
    heads, kv = attr(n, "num_heads", 0), attr(n, "kv_num_heads", 0)
    if heads <= 0 or kv <= 0 or width % heads or heads % kv:
        return None, None, "GroupQueryAttention without a usable num_heads / kv_num_heads"
    d = width // heads
    packed = len(n.inputs) < 3 or not n.inputs[2].name
    src = n.inputs[0] if packed else n.inputs[2]
    lin = by_out.get(src.name)
    if lin is None or not gr.single_use(src):
        return None, None, "GroupQueryAttention's value input is not a linear layer's own output"
    cols = lin.shape(gr.c)[1]
    want = (heads + 2 * kv) * d if packed else kv * d
    if cols != want:
        return None, None, f"value projection has {cols} columns, expected {want} for the head layout"
    return lin, _head_map(width, kv * d, d, offset=(heads + kv) * d if packed else 0), ""
