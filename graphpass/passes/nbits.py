"""Weight-only N-bit linear layers: Y = X·W  ->  com.microsoft MatMulNBits(X, B, scales[, zp]).

W [K, N] is cut along K into blocks of `block_size` (the last one zero-padded); block b of output
channel n keeps one scale s[n, b] (and a zero point z[n, b] when asymmetric):
  q[k, n] = clip(round(W[k, n] / s[n, b]) + z[n, b], 0, 2^bits - 1),   W ~ (q - z)·s
symmetric: z = 2^(bits-1) implied (no zero-point input). Packing is onnxruntime's own C++
(`quantize_matmul_8bits` / `quantize_matmul_4bits`, as MatMulNBitsQuantizer calls them), giving
B [N, k_blocks, block_size·bits/8] uint8 (4 bits: two per byte, low nibble first).

A tied token table T = W_head^T [V, D] (Gather(T) for the lookup, T^T for the head) is stored
once: row v of T is output channel v of the head, so B [V, k_blocks, blob] reshaped to
[V, k_blocks·blob] *is* T quantized along D in the same blocks, and
  Gather(T, ids) -> GatherBlockQuantized(Reshape(B), ids, scales[, zp]) [-> Slice off the padding]
reads the head's bytes and scales. `accuracy_level` 4 lets the CPU kernel quantize X to int8 per
block and use the integer (VNNI) path; 0 computes in float.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.errors import GraphpassError
from graphpass.graph.consts import Consts, attr
from graphpass.graph.gs_io import add_opset, export_into, opset_version, proto_graphs
from graphpass.graph.nbits_layout import Packed, unpack_reference  # noqa: F401 (re-exported)
from graphpass.match.linears import Linear
from graphpass.match.sites import analyze
from graphpass.passes.qforms import MS, Emitter
from graphpass.passes.quantize import QuantReport, _detach, is_lm_head

NBITS_SCHEMES = {"w8": 8, "w4": 4}
DEFAULT_BLOCK = {8: 32, 4: 128}
BLOCK_SIZES = (16, 32, 64, 128, 256)   # the block sizes MatMulNBits takes along K


@dataclass(frozen=True)
class NBitsConfig:
    bits: int = 8
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    lm_head: bool = True              # the LM head in N bits too (a tied table is then shared)
    skip: tuple[str, ...] = ()        # fnmatch patterns on linear layer names
    head_bits: int | None = None      # the LM head (and a tied table) in other bits (None: `bits`)
    keep8: tuple[str, ...] = ()       # linear layers (names) kept in 8 bits under a 4-bit body (search/mixed.py)
    head_block_size: int | None = None   # ... and in other blocks (None: `block_size`)
    layer_blocks: tuple[tuple[str, int], ...] = ()   # (fnmatch pattern on layer names, block); first match wins

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise GraphpassError(f"--bits must be 4 or 8, got {self.bits}")
        if self.head_bits not in (None, 4, 8):
            raise GraphpassError(f"--head-bits must be 4 or 8, got {self.head_bits}")
        if self.block_size not in BLOCK_SIZES:
            raise GraphpassError(f"--block-size must be a power of two in 16..256, got {self.block_size}")
        if self.head_block_size not in (None, *BLOCK_SIZES):
            raise GraphpassError(f"--head-block-size must be a power of two in 16..256, got {self.head_block_size}")
        for pattern, block in self.layer_blocks:
            if block not in BLOCK_SIZES:
                raise GraphpassError(f"--layer-block-size {pattern}={block}: the block must be a power of two "
                                     "in 16..256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise GraphpassError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")


def pack(w: np.ndarray, bits: int = 8, block_size: int = 32, symmetric: bool = True) -> Packed:
    """W [K, N] float32 -> MatMulNBits inputs, packed by onnxruntime's C++ quantizer."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if w.ndim != 2:
        raise GraphpassError(f"MatMulNBits packs a 2-D weight, got shape {list(w.shape)}")
    rows, cols = w.shape
    k_blocks = -(-rows // block_size)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if k_blocks * block_size != rows:
        w = np.pad(w, ((0, k_blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, k_blocks, block_size * bits // 8), np.uint8)
    zp = np.zeros((cols, -(-k_blocks * bits // 8)), np.uint8)
    scales = np.zeros((cols, k_blocks), np.float32)
    fn = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    fn(packed, w, scales, zp, block_size, cols, rows, symmetric)
    return Packed(packed, scales, None if symmetric else zp, rows, cols)


def nbits(model: onnx.ModelProto | gs.Graph, config: NBitsConfig = NBitsConfig(), base_dir: str | None = None,
          consts: Consts | None = None, packed: dict[str, Packed] | None = None
          ) -> tuple[onnx.ModelProto | gs.Graph, QuantReport]:
    """Rewrite `model` in place: each linear layer with a constant weight -> MatMulNBits.
    `packed`: layers (by name) whose codes were chosen already (GPTQ, passes/nbits_codes.py)."""
    an = analyze(model, base_dir, consts)
    names = {lin.name for lin in an.linears}
    g, c = an.graph, an.consts
    rep = QuantReport(skipped=[u for u in an.uncovered if u[0] not in names])
    e = Emitter(g, opset_version(g), c._names)
    for lin in an.linears:
        why = _skip_reason(lin, c, config)
        if why:
            rep.skipped.append((lin.name, why))
            continue
        gathers = _tied_gathers(lin) if is_lm_head(lin, c) else []
        name = lin.name          # before the rewrite detaches the node
        cfg = layer_config(lin, c, config)
        p = _rewrite(lin, c, e, cfg, (packed or {}).get(name))
        for gather in gathers:
            rep.tables.append(gather.inputs[0].name)
            _shared_lookup(gather, p, e, cfg)
        rep.quantized.append(name)
    if rep.quantized:
        add_opset(g, MS, 1)
    g.cleanup().toposort()
    if isinstance(model, onnx.ModelProto):
        export_into(model, g)
    return model, rep


def layer_config(lin: Linear, c: Consts, cfg: NBitsConfig) -> NBitsConfig | None:
    """What one layer is packed with: None for an LM head kept float (--float-head); the block of
    the first `layer_blocks` pattern its name matches, else `block_size`; a layer named in `keep8`
    in 8 bits; the LM head in `head_bits` / `head_block_size` when set."""
    block = next((b for p, b in cfg.layer_blocks if fnmatch.fnmatchcase(lin.name, p)), cfg.block_size)
    if not is_lm_head(lin, c):
        out = cfg if block == cfg.block_size else replace(cfg, block_size=block)
        return replace(out, bits=8) if lin.name in cfg.keep8 and cfg.bits != 8 else out
    if not cfg.lm_head:
        return None
    return replace(cfg, bits=cfg.head_bits or cfg.bits, block_size=cfg.head_block_size or block)


def _skip_reason(lin: Linear, c: Consts, cfg: NBitsConfig) -> str:
    if any(fnmatch.fnmatchcase(lin.name, p) for p in cfg.skip):
        return "matches a --skip pattern"
    if is_lm_head(lin, c) and not cfg.lm_head:
        return "LM head (kept in float: --float-head)"
    if lin.node.op == "Gemm" and lin.bias_at is not None:
        return "Gemm with a bias (not rewritten to MatMulNBits yet)"
    if lin.shared_weight(c) and not is_lm_head(lin, c):
        return "weight shared with another reader"
    return ""


@dataclass(frozen=True)
class _Emitted:
    packed: Packed
    b: gs.Constant
    scales: gs.Constant
    zp: gs.Constant | None


def _rewrite(lin: Linear, c: Consts, e: Emitter, cfg: NBitsConfig, p: Packed | None = None) -> _Emitted:
    n, base = lin.node, (lin.node.name or lin.node.outputs[0].name).strip("/").replace("/", "_")
    if p is None:
        w = lin.weight(c)
        if n.op == "Gemm":
            w = w * np.float32(attr(n, "alpha", 1.0))
        p = pack(w, cfg.bits, cfg.block_size, cfg.symmetric)
        del w
    x, out = lin.x, _detach(n)        # the float weight leaves the graph with the node
    b, s = e.const(f"{base}_q{cfg.bits}", p.b), e.const(f"{base}_scales", p.scales)
    zp = e.const(f"{base}_zp", p.zero_points) if p.zero_points is not None else None
    attrs = dict(K=p.k, N=p.n, bits=cfg.bits, block_size=cfg.block_size)
    if cfg.accuracy_level:
        attrs["accuracy_level"] = cfg.accuracy_level
    e.emit("MatMulNBits", [x, b, s] + ([zp] if zp is not None else []), [out], f"{base}_Q{cfg.bits}",
           domain=MS, **attrs)
    return _Emitted(p, b, s, zp)


def _tied_gathers(lin: Linear) -> list[gs.Node]:
    """Gather(axis 0) nodes whose table rows are the head's output channels (T = W^T).

    Head MatMul(x, W) with Gather(Transpose(W)) (onnxruntime-genai builder), or
    MatMul(x, Transpose(E)) with Gather(E) (torch exports)."""
    stored = lin.weight_tensor()
    if lin.via is None and lin.in_axis == 0:          # table = Transpose(W)
        tables = [t.outputs[0] for t in stored.outputs
                  if t.op == "Transpose" and list(attr(t, "perm", [1, 0])) == [1, 0]]
    elif lin.via is not None and lin.in_axis == 0:    # W = Transpose(E): table = E
        tables = [stored]
    else:
        return []
    return [r for t in tables for r in t.outputs
            if r.op == "Gather" and r.inputs[0] is t and attr(r, "axis", 0) == 0]


def _shared_lookup(gather: gs.Node, em: _Emitted, e: Emitter, cfg: NBitsConfig) -> None:
    """Gather(T, ids) -> GatherBlockQuantized(Reshape(B, [V, k_blocks·blob]), ids, scales[, zp])."""
    p, base = em.packed, (gather.name or gather.outputs[0].name).strip("/").replace("/", "_")
    n, kb, blob = p.b.shape
    shape = e.const(f"{base}_table_shape", np.array([n, kb * blob], np.int64))
    (table,) = e.node("Reshape", [em.b, shape], f"{base}_table")
    ids = gather.inputs[1]
    out = _detach(gather)
    padded = kb * cfg.block_size != p.k
    target = gs.Variable(e.name(f"{base}_padded")) if padded else out
    e.emit("GatherBlockQuantized", [table, ids, em.scales] + ([em.zp] if em.zp is not None else []), [target],
           f"{base}_GBQ", domain=MS, bits=cfg.bits, block_size=cfg.block_size, gather_axis=0, quantize_axis=1)
    if padded:
        i64 = lambda name, v: e.const(f"{base}_{name}", np.array([v], np.int64))  # noqa: E731
        e.emit("Slice", [target, i64("start", 0), i64("end", p.k), i64("axis", -1)], [out], f"{base}_unpad")


def with_accuracy_level(model: onnx.ModelProto, level: int, only=None) -> int:
    """Set accuracy_level = `level` on every MatMulNBits node (or those whose name `only(name)`
    accepts), in place, subgraphs included (a decode route's If bodies); the packed weights are
    untouched, so level 0 and 4 of one graph differ only by the kernel's int8 activation (X -> int8
    per row and block of block_size). Returns the count of nodes set."""
    if level not in (0, 1, 2, 3, 4):
        raise GraphpassError(f"accuracy_level must be 0..4, got {level}")
    n = 0
    for node in (node for g in proto_graphs(model) for node in g.node):
        if node.op_type == "MatMulNBits" and node.domain == MS and (only is None or only(node.name)):
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", level)])
            n += 1
    return n


def default_config(scheme: str) -> NBitsConfig:
    bits = NBITS_SCHEMES[scheme]
    return NBitsConfig(bits=bits, block_size=DEFAULT_BLOCK[bits])


def nbits_or(quantize_pass):
    """The pipeline's quantize step: MatMulNBits for w8 / w4, else `quantize_pass` (W8A8)."""
    def run(model, qconfig, ranges, base_dir, consts, nbits: NBitsConfig | None = None, packed=None):
        if qconfig.scheme not in NBITS_SCHEMES:
            return quantize_pass(model, qconfig, ranges, base_dir, consts)
        cfg = nbits if nbits is not None else default_config(qconfig.scheme)
        return _run_nbits(model, qconfig, cfg, base_dir, consts, packed)
    return run


def _run_nbits(model, qconfig, cfg: NBitsConfig, base_dir, consts, packed=None):
    if cfg.bits != NBITS_SCHEMES[qconfig.scheme]:
        raise GraphpassError(f"scheme '{qconfig.scheme}' is {NBITS_SCHEMES[qconfig.scheme]}-bit, "
                             f"but --bits {cfg.bits} was given")
    if qconfig.skip and not cfg.skip:
        cfg = replace(cfg, skip=qconfig.skip)
    return nbits(model, cfg, base_dir, consts, packed)
