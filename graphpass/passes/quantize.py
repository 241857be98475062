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
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphpass.errors import GraphpassError
from graphpass.graph.consts import Consts, attr
from graphpass.graph.gs_io import add_opset, export_into, opset_version, release
from graphpass.match.linears import Linear
from graphpass.match.sites import analyze
from graphpass.passes.qforms import (MS, Emitter, emit_dynamic, emit_static, emit_static_fused, emit_token,
                                     quantize_weight, static_qparams)

SCHEMES = ("static", "dynamic", "token", "w8", "w4", "outlier")   # w8 / w4: passes/nbits.py; outlier: passes/outlier.py


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


def quantize(model: onnx.ModelProto | gs.Graph, config: QuantConfig,
             act_ranges: dict[str, tuple[float, float]] | None = None, base_dir: str | None = None,
             consts: Consts | None = None) -> tuple[onnx.ModelProto | gs.Graph, QuantReport]:
    """Rewrite `model` in place; `act_ranges` (tensor -> (min, max)) is needed by `static`.

    `base_dir`: the model's folder when weights were left in external data; each is read once
    and quantized, and its float value leaves memory with the node it fed. A ModelProto is
    imported, rewritten and written back into the same object.
    """
    if config.scheme == "outlier":
        raise GraphpassError("scheme 'outlier' needs calibrated columns: use passes/outlier.split_outliers")
    an = analyze(model, base_dir, consts)
    names = {lin.name for lin in an.linears}   # uncovered-by-smoothing layers still get quantized
    g, c, rep = an.graph, an.consts, QuantReport(skipped=[u for u in an.uncovered if u[0] not in names])
    e = Emitter(g, opset_version(g), c._names)   # one name table for the constant table and the emitter
    tables = _quantize_tables(g, c, e) if config.embedding_int8 else {}
    rep.tables = sorted(tables)
    for lin in an.linears:
        why = _skip_reason(lin, c, config, act_ranges)
        if why:
            rep.skipped.append((lin.name, why))
            continue
        name = lin.name          # before the rewrite detaches the node (an unnamed one is named by its output)
        _rewrite(lin, c, e, config, act_ranges, tables)
        rep.quantized.append(name)
    if any(n.domain == MS for n in g.nodes):
        add_opset(g, MS, 1)
    g.cleanup().toposort()     # drops e.g. the Transpose that fed a quantized weight
    if isinstance(model, onnx.ModelProto):
        export_into(model, g)
    return model, rep


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


def _detach(n: gs.Node) -> gs.Tensor:
    """Disconnect a replaced node; returns its output. A weight no one reads any more leaves
    memory now: gs tensors sit in reference cycles, which only the cyclic collector would free."""
    y, ins = n.outputs[0], list(n.inputs)
    n.outputs.clear()
    n.inputs.clear()
    for t in ins:
        if isinstance(t, gs.Constant) and not t.outputs:
            release(t)
    return y


def _rewrite(lin: Linear, c: Consts, e: Emitter, cfg: QuantConfig, ranges, tables) -> None:
    n, base = lin.node, (lin.node.name or lin.node.outputs[0].name).strip("/").replace("/", "_")
    alpha = float(attr(n, "alpha", 1.0)) if n.op == "Gemm" else 1.0
    beta = float(attr(n, "beta", 1.0))
    bias = c.get(n.inputs[2]) if n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name else None
    if lin.via is not None and lin.via.inputs[0].name in tables:
        eq, es = tables[lin.via.inputs[0].name]
        (wq,) = e.node("Transpose", [eq], f"{base}_w", perm=[1, 0])   # folded by onnxruntime at load
        ws = e.const(f"{base}_w_scale", (es * alpha).astype(np.float32))
        width = es.size
    else:
        q, s = quantize_weight(lin.weight(c))
        wq, ws, width = e.const(f"{base}_w_int8", q), e.const(f"{base}_w_scale", s * np.float32(alpha)), s.size
    x, act, out = lin.x, lin.act, _detach(n)
    y = gs.Variable(e.name(f"{base}_noBias")) if bias is not None else out
    if cfg.scheme == "dynamic":
        emit_dynamic(e, x, wq, ws, y, base)
    elif cfg.scheme == "token":
        emit_token(e, x, wq, ws, y, base)
    elif bias is not None:   # ORT fuses MatMul+Add into a float Gemm before its QDQ pass: emit the fused op
        b = e.const(f"{base}_bias", bias.astype(np.float32).reshape(-1) * np.float32(beta) * np.ones(width, np.float32))
        emit_static_fused(e, x, wq, ws, out, base, static_qparams(*ranges[act]), b)
        return
    else:
        emit_static(e, x, wq, ws, y, base, static_qparams(*ranges[act]), width)
    if bias is not None:
        e.emit("Add", [y, e.const(f"{base}_bias", bias.astype(np.float32) * np.float32(beta))], [out],
               f"{base}_bias_Add")


def _quantize_tables(g: gs.Graph, c: Consts, e: Emitter) -> dict[str, tuple[gs.Constant, np.ndarray]]:
    """Gather tables -> int8 rows + per-row scale; a Transpose reader gets DequantizeLinear."""
    out: dict[str, tuple] = {}
    for node in list(g.nodes):
        if node.op != "Gather" or attr(node, "axis", 0) != 0 or not c.is_const(node.inputs[0]):
            continue
        t = node.inputs[0]
        if t.name not in out:
            table = c.get(t)
            if table.ndim != 2 or table.dtype != np.float32 or table.shape[0] < 256:
                continue
            out[t.name] = _int8_table(e, t.name, table, list(t.outputs))
        eq, _, scol, _ = out[t.name]
        base = (node.name or node.outputs[0].name).strip("/").replace("/", "_")
        ids = node.inputs[1]
        (rows,) = e.node("Gather", [eq, ids], base, axis=0)
        (rf,) = e.node("Cast", [rows], base, to=TensorProto.FLOAT)
        (rs,) = e.node("Gather", [scol, ids], f"{base}_scale", axis=0)
        e.emit("Mul", [rf, rs], [_detach(node)], f"{base}_dequant")
    res = {}
    for v in out.values():   # keyed by what a tied head's Transpose now reads: the DQ output
        res.update({dq.name: (v[0], v[1]) for dq in v[3]})
    return res


def _int8_table(e: Emitter, name: str, table: np.ndarray, readers) -> tuple:
    q, s = quantize_weight(table.T)                  # a row of the table = an output channel
    eq = e.const(f"{name}_int8", np.ascontiguousarray(q.T))
    dqs = []
    for r in readers:
        if r.op == "Transpose":                      # tied LM head: read the int8 table through DQ
            zp = e.const(f"{name}_zp", np.zeros(s.size, np.int8))
            (dq,) = e.node("DequantizeLinear", [eq, e.const(f"{name}_scale", s), zp], f"{name}_table", axis=0)
            r.inputs[0] = dq
            dqs.append(dq)
    return eq, s, e.const(f"{name}_row_scale", s.reshape(-1, 1)), dqs
