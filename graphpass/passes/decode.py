"""The decode rewrites in sequence, on an onnx-graphsurgeon graph: fewer nodes at one token.

    fuse_decode(model) -> (model, DecodeReport)

Each rule is exact up to float rounding (see its module): decode_gqa (attention with a KV cache
-> GroupQueryAttention + RotaryEmbedding), decode_rmsnorm (the residual Add and the
decomposed RMSNorm after it -> SkipSimplifiedLayerNormalization), decode_rowscale (the `token`
scheme's per-row rescale Mul -> MatMulIntegerToFloat's activation scale), nbits_pack (MatMulNBits
layers reading one activation -> one MatMulNBits + Split: w8 / w4 graphs). Only the packing reads
weights (those it concatenates); other external initializers stay external and keep their locations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from graphpass.passes.decode_gqa import fuse_gqa
from graphpass.passes.decode_rmsnorm import fuse_rmsnorm
from graphpass.passes.decode_rowscale import fold_rescales
from graphpass.passes.nbits_pack import pack_nbits

MS_OPSET = 1


@dataclass
class DecodeReport:
    nodes_before: int = 0
    nodes_after: int = 0
    attention: int = 0
    norms: int = 0
    rescales: int = 0
    packed: int = 0
    skipped: list[str] = field(default_factory=list)

    def format(self) -> str:
        s = (f"{self.attention} attention blocks -> GroupQueryAttention, {self.norms} residual Adds + "
             f"RMSNorms -> SkipSimplifiedLayerNormalization, "
             f"{self.rescales} row rescales folded, {self.packed} MatMulNBits layers packed with the others "
             f"reading their input; {self.nodes_before} -> {self.nodes_after} nodes")
        if self.skipped and not self.attention:
            s += f" (not matched: {self.skipped[0]})"
        return s


def fuse_decode_graph(g: gs.Graph, attention: bool = True, norms: bool = True,
                      rescales: bool = True, pack: bool = True) -> DecodeReport:
    """The four rewrites on a gs.Graph, in place (the pipeline's form)."""
    from graphpass.graph.gs_io import add_opset, names, opset_version

    rep = DecodeReport(nodes_before=len(g.nodes))
    if attention:
        rep.attention, rep.skipped = fuse_gqa(g)
    if norms:
        rep.norms = fuse_rmsnorm(g)
    if rescales:
        rep.rescales = fold_rescales(g)
    if pack:
        rep.packed = pack_nbits(g, names(g), opset_version(g))
    if rep.attention or rep.norms or rep.rescales or rep.packed:
        add_opset(g, "com.microsoft", MS_OPSET)
        g.cleanup().toposort()
    rep.nodes_after = len(g.nodes)
    return rep


def fuse_decode(model: onnx.ModelProto, attention: bool = True, norms: bool = True,
                rescales: bool = True, pack: bool = True) -> tuple[onnx.ModelProto, DecodeReport]:
    """The same on a ModelProto (weights loaded): a new model when anything matched, else `model`."""
    g = gs.import_onnx(model)
    rep = fuse_decode_graph(g, attention, norms, rescales, pack)
    if not (rep.attention or rep.norms or rep.rescales or rep.packed):
        return model, rep
    out = gs.export_onnx(g)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, rep
