"""Prefill and decode on the kernels each runs fastest on, the int8 weights stored once.

The `token` form of a linear layer (after decode_rowscale), with Wq [K, N] int8 and w [N]:
    Y = MatMulIntegerToFloat(QuantizeLinear(X / r, 1, 128), Wq, r, w, 128)
runs well at many tokens (u8 x s8 GEMM) but not at one token, where MatMulNBits' 8-bit GEMV
is faster and needs no activation quantizer nodes (tools/bench_kernels.py). The same weights in
MatMulNBits layout, blocks of `block_size` along K with the per-channel scale repeated in
every block and the implied zero point 128:
    B[n, b, j] = Wq[b·bs + j, n] + 128   (uint8; 128 in the padding),  scales[n, b] = w[n]
    MatMulNBits(X, B, scales) = X·(Wq·diag(w))      (accuracy_level 4: X in int8 per block)
A float head reading the int8 token table (--embedding-int8 without --lm-head),
    Y = MatMul(X, Transpose(DequantizeLinear(T, t, 0, axis=0))),   T [N, K] int8, t [N],
is the same layer with Wq = T^T and w = t: at one token it becomes MatMulNBits too.
So the graph becomes
    If(Shape(input_ids)[1] == 1,
       then: the graph with every such layer as MatMulNBits(X, B, scales)   (decode)
       else: the graph as it was, Wq read from B)                          (prefill)
with one copy of the bytes: B and scales are main-graph initializers, and the prefill body
reads Wq = Cast(Transpose(Reshape(B)[:, :K]) XOR 0x80, int8) (onnxruntime casts wrapping: (q + 128) XOR
0x80 = q mod 256) (or the [N, K] table
without the Transpose, for a tied head / lookup), a chain of constants onnxruntime folds at
session load. The prefill branch computes what the graph computed before, bit for bit; the
decode branch differs only by MatMulNBits' per-block activation rounding.
Every other node is in both bodies; outer-scope graph inputs are read by name. In the decode body,
where every row has one new token, each GroupQueryAttention becomes attention over the
concatenated cache (passes/decode_attention.py: 0.6x the kernel's CPU time at a past of 256).
That alone is worth the If in a graph with no int8 token layer (w8 / w4 after the decode fusions,
their MatMulNBits weights read from the main graph by both bodies): the prefill body is the graph
as it was, bit for bit, and the decode body differs by float summation order only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.errors import GraphpassError
from graphpass.graph.gs_io import add_opset, opset_version, read
from graphpass.graph.io import unique_name
from graphpass.passes.decode_attention import attend_one_token
from graphpass.passes.decode_match import NoMatch, expect, scalar
from graphpass.passes.nbits import BLOCK_SIZES

MS = "com.microsoft"


@dataclass(frozen=True)
class RouteConfig:
    block_size: int = 64          # MatMulNBits block along K (scales repeat per block: size only)
    accuracy_level: int = 4       # 4: int8 activations per block (VNNI); 0: float compute
    token_input: str = "input_ids"
    store_once: bool = True       # False: the int8 [K, N] copy stored too (no folding at load)
    pack: bool = True             # the layers reading one X (q/k/v, gate/up) as one MatMulNBits + Split

    def __post_init__(self):
        if self.block_size not in BLOCK_SIZES:
            raise GraphpassError(f"decode route: block size must be a power of two in 16..256, got {self.block_size}")


@dataclass
class RouteReport:
    routed: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    weights: int = 0
    attention: int = 0                 # GroupQueryAttention nodes unfused in the decode body
    attention_kept: list[str] = field(default_factory=list)

    def format(self) -> str:
        s = (f"{len(self.routed)} int8 layers read through MatMulNBits at one token, {self.weights} weights "
             "stored once; " if self.routed else "one token: ") + \
            f"{self.attention} attention blocks over the concatenated cache"
        s += f" (kept: {self.attention_kept[0]})" if self.attention_kept else ""
        return s + (f"; kept: {self.kept[0][0]}: {self.kept[0][1]}" if self.kept else "")


@dataclass(frozen=True)
class _Layer:
    node: gs.Node
    x: gs.Tensor             # the float activation X
    weight: gs.Constant      # Wq [K, N], or the table [N, K] behind a Transpose
    transposed: bool
    scale: np.ndarray        # w [N]


def match_layer(n: gs.Node) -> _Layer:
    """MatMulIntegerToFloat(QuantizeLinear(X / r, 1, 128), Wq, r, w, 128) with constant Wq, w."""
    if n.op != "MatMulIntegerToFloat" or len(n.inputs) != 5:
        raise NoMatch("not a MatMulIntegerToFloat without zero point for B and without bias")
    a, b, a_scale, b_scale, a_zp = n.inputs
    q = expect(a, "QuantizeLinear")
    if scalar(q.inputs[1]) != 1.0 or len(q.inputs) < 3 or scalar(q.inputs[2]) != 128 or scalar(a_zp) != 128:
        raise NoMatch("activation is not QuantizeLinear(X / r, 1, 128) with zero point 128")
    div = expect(q.inputs[0], "Div")
    if div.inputs[1] is not a_scale:
        raise NoMatch("activation scale is not the row scale X was divided by (run decode fusions first)")
    transposed = isinstance(b, gs.Variable)
    if transposed:
        t = expect(b, "Transpose")
        if list(t.attrs.get("perm", [1, 0])) != [1, 0]:
            raise NoMatch("weight is a Transpose with another perm")
        b = t.inputs[0]
    if not isinstance(b, gs.Constant) or b.dtype != np.int8 or len(b.shape) != 2:
        raise NoMatch("weight is not a constant 2-D int8 tensor")
    n_out = b.shape[0] if transposed else b.shape[1]
    if not isinstance(b_scale, gs.Constant) or int(np.prod(b_scale.shape)) not in (1, n_out):
        raise NoMatch("weight scale is not a constant per output channel")
    scale = np.broadcast_to(np.asarray(read(b_scale), np.float32).reshape(-1), (n_out,))
    return _Layer(n, div.inputs[0], b, transposed, scale)


def match_float_head(n: gs.Node) -> _Layer:
    """MatMul(X, Transpose(DequantizeLinear(T, s, 0, axis=0))): a float head reading an int8 table
    T [N, K] with a scale per row (--embedding-int8 without --lm-head)."""
    if n.op != "MatMul":
        raise NoMatch("not a MatMul")
    t = expect(n.inputs[1], "Transpose")
    if list(t.attrs.get("perm", [1, 0])) != [1, 0]:
        raise NoMatch("weight is a Transpose with another perm")
    dq = expect(t.inputs[0], "DequantizeLinear")
    table, scale = dq.inputs[0], dq.inputs[1]
    if not isinstance(table, gs.Constant) or table.dtype != np.int8 or len(table.shape) != 2:
        raise NoMatch("table is not a constant 2-D int8 tensor")
    zp = np.asarray(read(dq.inputs[2])) if len(dq.inputs) > 2 and isinstance(dq.inputs[2], gs.Constant) else None
    if int(dq.attrs.get("axis", 1)) != 0 or not isinstance(scale, gs.Constant) or \
            int(np.prod(scale.shape)) != table.shape[0] or (len(dq.inputs) > 2 and (zp is None or zp.any())):
        raise NoMatch("table is not dequantized symmetrically with one scale per row")
    return _Layer(n, n.inputs[0], table, True, np.asarray(read(scale), np.float32).reshape(-1))


def nbits_layout(table: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Int8 table [N, K] and scale [N] -> MatMulNBits B [N, k_blocks, block] uint8, scales [N, k_blocks]."""
    n, k = table.shape
    kb = -(-k // block)
    b = np.full((n, kb * block), 128, np.uint8)
    b[:, :k] = (table.astype(np.int16) + 128).astype(np.uint8)
    return b.reshape(n, kb, block), np.repeat(scale[:, None], kb, 1).astype(np.float32)


def route_decode(g: gs.Graph, cfg: RouteConfig = RouteConfig()) -> RouteReport:
    """Rewrite g in place into the If form above; a graph with neither a matching layer nor an
    attention block to unfuse at one token is left as is."""
    rep, layers = RouteReport(), []
    for n in g.nodes:
        if n.op == "MatMulIntegerToFloat":
            try:
                layers.append(match_layer(n))
            except NoMatch as e:
                rep.kept.append((n.name, str(e)))
        elif n.op == "MatMul":
            try:
                layers.append(match_float_head(n))
            except NoMatch:
                pass                  # attention and other float MatMuls: not weights
    tokens = next((t for t in g.inputs if t.name == cfg.token_input), None)
    if not layers and not any(n.op == "GroupQueryAttention" for n in g.nodes):
        return rep
    if tokens is None:
        raise GraphpassError(f"decode route: the graph has no input '{cfg.token_input}' to tell decode from prefill")
    taken = {t for t in g.tensors()} | {n.name for n in g.nodes}
    top: list[gs.Node] = []
    groups = [_pack(grp, cfg, taken, top) for grp in _groups(layers, cfg)]
    views = {k: v for grp in groups for k, v in grp.views.items()}
    dec, pre = g.copy(), g.copy()
    for body in (dec, pre):      # every reader of a weight now reads its view from the main graph
        mine = {k: v.copy() for k, v in views.items()}    # one outer-scope reference per body
        for n in body.nodes:
            for i, t in enumerate(n.inputs):
                if isinstance(t, gs.Constant) and t.name in mine:
                    n.inputs[i] = mine[t.name]
    _local_dq_params(g, pre, {v.name for v in views.values()}, taken)
    nodes, tensors = {n.name: n for n in dec.nodes}, dec.tensors()   # once: each group rewires only its own layers
    for grp in groups:
        _to_nbits(dec, grp, cfg, nodes, tensors)
        rep.routed += [lay.node.name for lay in grp.layers]
    rep.weights = len(views)
    rep.attention, rep.attention_kept = attend_one_token(dec, opset_version(g), taken)
    if not layers and not rep.attention:
        return rep
    _assemble(g, dec, pre, tokens, top, taken)
    return rep


def _local_dq_params(g: gs.Graph, body: gs.Graph, views: set[str], taken: set) -> None:
    """A DequantizeLinear of a weight view keeps its scale and zero point as the body's own
    initializers: onnxruntime's DQ -> MatMulNBits fusion looks for them in the body's scope only
    (and fails the session load when they are outer-scope initializers)."""
    local = getattr(g, "graphpass_local", None)
    if local is None:
        local = g.graphpass_local = set()
    for n in body.nodes:
        if n.op == "DequantizeLinear" and n.inputs[0].name in views:
            for i in range(1, len(n.inputs)):
                if isinstance(n.inputs[i], gs.Constant):
                    c = n.inputs[i]
                    n.inputs[i] = gs.Constant(unique_name(f"{c.name}_local", taken), c.values)
                    local.add(n.inputs[i].name)


@dataclass
class _Group:
    """Layers sharing one MatMulNBits weight: the readers of one X (q/k/v, gate/up) packed along N,
    or the readers of one weight. rows[name] = (n0, n1) of each weight in B."""
    layers: list[_Layer]
    b: gs.Constant | None = None
    s: gs.Constant | None = None
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    views: dict[str, gs.Tensor] = field(default_factory=dict)


def _groups(layers: list[_Layer], cfg: RouteConfig) -> list[_Group]:
    uses: dict[str, int] = {}
    for lay in layers:
        uses[lay.weight.name] = uses.get(lay.weight.name, 0) + 1
    out: dict[str, _Group] = {}
    for lay in layers:
        key = f"x:{lay.x.name}" if cfg.pack and uses[lay.weight.name] == 1 else f"w:{lay.weight.name}"
        out.setdefault(key, _Group([])).layers.append(lay)
    return list(out.values())


def _pack(grp: _Group, cfg: RouteConfig, taken: set, top: list) -> _Group:
    """B and scales of the group's weights stacked along N, and per weight the main-graph chain
    giving back its int8 value as stored (folded by onnxruntime at load)."""
    tables, scales, n0 = [], [], 0
    for lay in {lay.weight.name: lay for lay in grp.layers}.values():
        w = np.asarray(read(lay.weight))
        tables.append(w if lay.transposed else w.T)
        scales.append(lay.scale)
        grp.rows[lay.weight.name] = (n0, n0 + tables[-1].shape[0])
        n0 += tables[-1].shape[0]
    b, s = nbits_layout(np.concatenate(tables), np.concatenate(scales), cfg.block_size)
    k = tables[0].shape[1]
    del tables
    base = grp.layers[0].weight.name
    name = lambda suffix: unique_name(f"{base}_{suffix}", taken)  # noqa: E731
    grp.b, grp.s = gs.Constant(name("nbits"), b), gs.Constant(name("nbits_scales"), s)
    i64 = lambda suffix, v: gs.Constant(name(suffix), np.array(v, np.int64))  # noqa: E731

    def node(op, inputs, **attrs):
        out = gs.Variable(name(op.lower()), dtype=np.int8 if op == "Cast" else np.uint8)
        top.append(gs.Node(op, name(op), attrs, inputs, [out]))
        return out

    flat = node("Reshape", [grp.b, i64("flat", [b.shape[0], b.shape[1] * b.shape[2]])])
    for lay in {lay.weight.name: lay for lay in grp.layers}.values():
        lo, hi = grp.rows[lay.weight.name]
        shape = list(lay.weight.shape)
        if not cfg.store_once:
            grp.views[lay.weight.name] = gs.Constant(name("int8"), np.asarray(read(lay.weight)))
            continue
        v = flat
        if (lo, hi) != (0, b.shape[0]):
            v = node("Slice", [v, i64("lo", [lo]), i64("hi", [hi]), i64("ax", [0])])
        if b.shape[1] * b.shape[2] != k:
            v = node("Slice", [v, i64("lo", [0]), i64("hi", [k]), i64("ax", [1])])
        if not lay.transposed:
            v = node("Transpose", [v], perm=[1, 0])
        v = node("BitwiseXor", [v, gs.Constant(name("sign"), np.array(128, np.uint8))])   # u ^ 0x80 = q mod 256
        v = node("Cast", [v], to=3)                            # onnxruntime's Cast wraps: q
        v.shape = shape
        grp.views[lay.weight.name] = gs.Variable(v.name, dtype=np.int8, shape=shape)
    return grp


def _to_nbits(dec: gs.Graph, grp: _Group, cfg: RouteConfig, nodes: dict, tensors: dict) -> None:
    """In the decode body: the group's layers -> MatMulNBits(X, B, scales) (+ Split back to each
    layer's output when several share B); their quantizers go at cleanup. `nodes` / `tensors`:
    dec's nodes and tensors by name, taken before the first group (a group's X stays in dec)."""
    n_all, _, block = grp.b.shape
    k = grp.layers[0].weight.shape[1 if grp.layers[0].transposed else 0]
    attrs = dict(K=int(k), N=int(n_all), bits=8, block_size=int(block), accuracy_level=cfg.accuracy_level)
    packed = len(grp.rows) > 1
    outs = []
    for lay in grp.layers:
        node = nodes[lay.node.name]
        x = tensors[lay.x.name]       # X itself: the int8 layer's quantizer goes at cleanup
        outs.append(node.outputs[0])
        node.outputs.clear()
        node.inputs.clear()
        if not packed:
            dec.nodes.append(gs.Node("MatMulNBits", f"{lay.node.name}_nbits", attrs, [x, grp.b, grp.s], [outs[-1]],
                                     domain=MS))
    if packed:
        base = grp.layers[0].node.name
        y = gs.Variable(f"{base}_nbits_packed", dtype=np.float32)
        dec.nodes.append(gs.Node("MatMulNBits", f"{base}_nbits", attrs, [x, grp.b, grp.s], [y], domain=MS))
        split = gs.Constant(f"{base}_nbits_split", np.array([hi - lo for lo, hi in
                                                             (grp.rows[lay.weight.name] for lay in grp.layers)], np.int64))
        dec.nodes.append(gs.Node("Split", f"{base}_nbits_Split", {"axis": -1}, [y, split], outs))


def _assemble(g: gs.Graph, dec: gs.Graph, pre: gs.Graph, tokens, top: list, taken: set) -> None:
    """g := the view chains, cond = (Shape(tokens)[1] == 1), If(cond, dec, pre) -> g's outputs."""
    outs = list(g.outputs)
    for body, tag in ((dec, "decode"), (pre, "prefill")):
        body.inputs = []
        for t in body.outputs:
            t.name = unique_name(f"{t.name}_{tag}", taken)
        body.name = f"{g.name or 'graph'}_{tag}"
        body.cleanup().toposort()
    name = lambda s: unique_name(s, taken)  # noqa: E731
    seq = gs.Variable(name("route_seq_len"), dtype=np.int64, shape=[1])
    eq = gs.Variable(name("route_is_decode1"), dtype=np.bool_, shape=[1])
    cond = gs.Variable(name("route_is_decode"), dtype=np.bool_, shape=[])
    one = gs.Constant(name("route_one"), np.array([1], np.int64))
    nodes = top + [gs.Node("Shape", name("route_Shape"), {"start": 1, "end": 2}, [tokens], [seq]),
                   gs.Node("Equal", name("route_Equal"), {}, [seq, one], [eq]),
                   gs.Node("Squeeze", name("route_Squeeze"), {}, [eq], [cond]),
                   gs.Node("If", name("route_If"), {"then_branch": dec, "else_branch": pre}, [cond], outs)]
    for t in outs:
        t.inputs.clear()
    g.nodes = nodes
    for t in outs:
        t.inputs.append(nodes[-1])
    add_opset(g, MS, 1)
