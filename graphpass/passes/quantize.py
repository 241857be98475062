"""W8A8: every linear layer with a constant weight becomes an int8 integer-kernel form (see qforms).

Weights: symmetric int8 per output channel. Activations: `static` (per tensor, from calibration),
`dynamic` (per tensor at run time) or `token` (per row at run time). The LM head keeps a float
activation unless asked; with `embedding_int8` the token table is stored once in int8 with one
scale per row: Gather reads rows and rescales them, and a tied LM head reads the same table
through DequantizeLinear (a per-output-channel int8 weight).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphpass.graph.consts import Consts
from graphpass.errors import GraphpassError
from graphpass.graph.io import consumers, opset_version, prune_dead_nodes, prune_initializers, toposort
from graphpass.match.linears import Linear, _attr
from graphpass.match.sites import analyze
from graphpass.passes.qforms import (MS, Emitter, emit_dynamic, emit_static, emit_static_fused, emit_token, quantize_weight,
                     static_qparams)

SCHEMES = ("static", "dynamic", "token", "w8", "w4")   # w8 / w4: weight-only, passes/nbits.py


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "token"
    lm_head: bool = False            # integer LM head (activation quantized too)
    embedding_int8: bool = False     # token table in int8, shared with a tied LM head
    skip: tuple[str, ...] = ()       # fnmatch patterns on linear layer names

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise GraphpassError(f"unknown scheme '{self.scheme}' (choose {', '.join(SCHEMES)})")


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{len(self.quantized)} linear layers quantized, {len(self.skipped)} kept in float"
                 + (f", {len(self.tables)} embedding table(s) in int8" if self.tables else "")]
        lines += [f"  kept in float: {n}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def is_lm_head(lin: Linear, c: Consts) -> bool:
    return lin.out in c.graph_outputs or (lin.via is not None and lin.shared_weight(c))


def quantize(model: onnx.ModelProto, config: QuantConfig,
             act_ranges: dict[str, tuple[float, float]] | None = None, base_dir: str | None = None,
             consts: Consts | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """Rewrite `model` in place; `act_ranges` (tensor -> (min, max)) is needed by `static`.

    `base_dir`: the model's folder when weights were left in external data; each is read once,
    quantized, and the rest are brought into the graph at the end.
    """
    g = model.graph
    an = analyze(model, base_dir, consts)
    names = {lin.name for lin in an.linears}   # uncovered-by-smoothing layers still get quantized
    c, rep = an.consts, QuantReport(skipped=[u for u in an.uncovered if u[0] not in names])
    opset = opset_version(model)
    e = Emitter(g, opset, c._names)   # one name table for the constant table and the emitter
    tables = _quantize_tables(g, c, e) if config.embedding_int8 else {}
    rep.tables = sorted(tables)
    remove = []
    for lin in an.linears:
        why = _skip_reason(lin, c, config, act_ranges)
        if why:
            rep.skipped.append((lin.name, why))
            continue
        _rewrite(lin, c, e, config, act_ranges, tables)
        remove.append(lin.node)
        rep.quantized.append(lin.name)
    drop = {id(n) for n in remove}
    keep = [n for n in g.node if id(n) not in drop] if drop else None
    if keep is not None:
        _replace_nodes(g, keep + e.nodes)
    elif e.nodes:
        g.node.extend(e.nodes)
    if any(n.domain == MS for n in g.node) and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    toposort(g)
    prune_dead_nodes(g)        # e.g. the Transpose that fed a quantized weight
    prune_initializers(g)
    c.flush()
    return model, rep


def _replace_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = [onnx.NodeProto() for _ in nodes]
    for dst, src in zip(copies, nodes):
        dst.CopyFrom(src)
    g.ClearField("node")
    g.node.extend(copies)


def _skip_reason(lin: Linear, c: Consts, cfg: QuantConfig, ranges) -> str:
    if any(fnmatch.fnmatchcase(lin.name, p) for p in cfg.skip):
        return "matches a --skip pattern"
    if is_lm_head(lin, c) and not cfg.lm_head:
        return "LM head (activation kept in float; --lm-head to quantize it)"
    if lin.via is not None and lin.shared_weight(c) and not cfg.embedding_int8:
        return "tied to the embedding table (quantize it with --embedding-int8)"
    if cfg.scheme == "static" and (ranges is None or lin.act not in ranges):
        return "no calibrated range for its input"
    return ""


def _rewrite(lin: Linear, c: Consts, e: Emitter, cfg: QuantConfig, ranges, tables) -> None:
    n, base = lin.node, (lin.node.name or lin.node.output[0]).strip("/").replace("/", "_")
    alpha = float(_attr(n, "alpha", 1.0)) if n.op_type == "Gemm" else 1.0
    if lin.via is not None and lin.via.input[0] in tables:
        eq, es = tables[lin.via.input[0]]
        (wq,) = e.node("Transpose", [eq], f"{base}_w", perm=[1, 0])   # folded by onnxruntime at load
        ws = e.const(f"{base}_w_scale", (es * alpha).astype(np.float32))
        width = es.size
    else:
        q, s = quantize_weight(lin.weight(c))
        wq, ws, width = e.const(f"{base}_w_int8", q), e.const(f"{base}_w_scale", s * np.float32(alpha)), s.size
        c.release(lin._holder()[0].input[lin._holder()[1]])
    y = n.output[0]
    has_c = n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]
    if has_c:
        y = e.name(f"{base}_noBias")
    if cfg.scheme == "dynamic":
        emit_dynamic(e, lin.act, wq, ws, y, base)
    elif cfg.scheme == "token":
        emit_token(e, lin.act, wq, ws, y, base)
    elif has_c:   # ORT fuses MatMul+Add into a float Gemm before its QDQ pass: emit the fused op
        beta = float(_attr(n, "beta", 1.0))
        b = e.const(f"{base}_bias", c.get(n.input[2]).astype(np.float32).reshape(-1) * np.float32(beta)
                    * np.ones(width, np.float32))
        emit_static_fused(e, lin.act, wq, ws, n.output[0], base, static_qparams(*ranges[lin.act]), b)
        return
    else:
        emit_static(e, lin.act, wq, ws, y, base, static_qparams(*ranges[lin.act]), width)
    if has_c:
        beta = float(_attr(n, "beta", 1.0))
        b = c.get(n.input[2]).astype(np.float32) * np.float32(beta)
        e.nodes.append(helper.make_node("Add", [y, e.const(f"{base}_bias", b)], [n.output[0]],
                                        name=e.name(f"{base}_bias_Add")))


def _quantize_tables(g: onnx.GraphProto, c: Consts, e: Emitter) -> dict[str, tuple[str, np.ndarray]]:
    """Gather tables -> int8 rows + per-row scale; a Transpose reader gets DequantizeLinear."""
    cons = consumers(g)
    out: dict[str, tuple[str, np.ndarray, str]] = {}
    dead = []
    for k, node in enumerate(g.node):
        if node.op_type != "Gather" or _attr(node, "axis", 0) != 0 or not c.is_const(node.input[0]):
            continue
        name = node.input[0]
        table = c.get(name)
        if table.ndim != 2 or table.dtype != np.float32 or table.shape[0] < 256:
            continue
        if name not in out:
            out[name] = _int8_table(e, name, table, cons.get(name, []))
        eq, _, scol, _ = out[name]
        base = (node.name or node.output[0]).strip("/").replace("/", "_")
        (rows,) = e.node("Gather", [eq, node.input[1]], base, axis=0)
        (rf,) = e.node("Cast", [rows], base, to=TensorProto.FLOAT)
        (rs,) = e.node("Gather", [scol, node.input[1]], f"{base}_scale", axis=0)
        e.nodes.append(helper.make_node("Mul", [rf, rs], [node.output[0]], name=e.name(f"{base}_dequant")))
        dead.append(k)
    for k in reversed(dead):
        del g.node[k]
    res = {}
    for v in out.values():   # keyed by what a tied head's Transpose now reads: the DQ output
        res.update({dq: (v[0], v[1]) for dq in v[3]})
    return res


def _int8_table(e: Emitter, name: str, table: np.ndarray, readers) -> tuple:
    q, s = quantize_weight(table.T)                  # a row of the table = an output channel
    eq = e.const(f"{name}_int8", np.ascontiguousarray(q.T))
    dqs = []
    for r in readers:
        if r.op_type == "Transpose":                 # tied LM head: read the int8 table through DQ
            zp = e.const(f"{name}_zp", np.zeros(s.size, np.int8))
            (dq,) = e.node("DequantizeLinear", [eq, e.const(f"{name}_scale", s), zp], f"{name}_table", axis=0)
            r.input[0] = dq
            dqs.append(dq)
    return eq, s, e.const(f"{name}_row_scale", s.reshape(-1, 1)), dqs
