"""An 8-bit KV cache for with-past graphs, in whichever attention form the graph has.

    quantize_kv_cache(g, scales) -> KVReport

`scales`: past input name -> s [kv, d] (calibrate/kv.py: |max| / 127 per kv head and channel).
GroupQueryAttention nodes get the kernel's own int8 cache (kv_gqa.py); decomposed attention gets
Concat in int8 with the scales folded into the query and the output (kv_concat.py). Either way
past.* and present.* become int8 graph I/O: the cache takes 1/4 of the float cache's bytes at any
length (scales are constants in the graph, not per slot). cache_multipliers(g) reads back, from
a graph this pass wrote, the m = 1/s by which a float cache entry is multiplied before rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.errors import GraphpassError
from graphpass.passes.kv_concat import quantize_concat_cache
from graphpass.graph.gs_io import read
from graphpass.passes.kv_gqa import K_SCALE, V_SCALE, quantize_gqa_cache

KV_CACHE_TYPES = ("int8",)


@dataclass
class KVReport:
    gqa: int = 0                    # GroupQueryAttention nodes with the kernel's int8 cache
    concat: int = 0                 # decomposed caches (key or value) in int8
    folded: int = 0                 # of those, with the scale folded into query / output
    grouped: int = 0                # of those, read without the repeat-kv copy (kv_grouped.py)
    skipped: list[str] = field(default_factory=list)

    def format(self) -> str:
        parts = []
        if self.gqa:
            parts.append(f"{self.gqa} GroupQueryAttention caches in int8 (per-channel scales)")
        if self.concat:
            parts.append(f"{self.concat} decomposed caches in int8, {self.folded} with scales folded "
                         f"into query / output, {self.grouped} read without the repeat-kv copy")
        s = "; ".join(parts) or "no cache quantized"
        if self.skipped:
            s += f" (not matched: {self.skipped[0]}" + (f"; {len(self.skipped) - 1} more)" if len(self.skipped) > 1 else ")")
        return s


def quantize_kv_cache(g: gs.Graph, scales: dict[str, np.ndarray], fold: bool = True) -> KVReport:
    """Every past/present pair named in `scales` to int8, in place; one line if none could be."""
    rep = KVReport()
    rep.gqa, why = quantize_gqa_cache(g, scales)
    inputs = {t.name: t for t in g.inputs}
    left = {k: v for k, v in scales.items() if k in inputs and inputs[k].dtype != np.int8}
    rep.concat, rep.folded, rep.grouped, why2 = quantize_concat_cache(g, left, fold)
    rep.skipped = why + why2 if not (rep.gqa or rep.concat) else why2
    if not (rep.gqa or rep.concat):
        raise GraphpassError("--kv-cache: no KV cache could be quantized (" +
                             (rep.skipped[0] if rep.skipped else "no past input calibrated") + ")")
    g.cleanup().toposort()
    return rep


def cache_multipliers(g: gs.Graph) -> dict[str, np.ndarray]:
    """Int8 past input name -> m [1, kv, 1, d] with stored cache = clip(round(C · m)): the 1/s of
    the QuantizeLinear(new · (1/s), 1, 0) feeding Concat(past8, ·) (kv_concat.py), or 1 /
    k_scale, v_scale of a GroupQueryAttention int8 cache (kv_gqa.py). Past inputs read neither
    way are left out."""
    out: dict[str, np.ndarray] = {}
    past = {t.name for t in g.inputs if t.dtype == np.int8}
    for n in g.nodes:
        if n.op == "GroupQueryAttention" and len(n.inputs) > V_SCALE:
            for src, slot in ((n.inputs[3], K_SCALE), (n.inputs[4], V_SCALE)):
                if src.name in past and isinstance(n.inputs[slot], gs.Constant):
                    out[src.name] = (1.0 / read(n.inputs[slot])).astype(np.float32)
        elif n.op == "Concat" and n.inputs and n.inputs[0].name in past and len(n.inputs) == 2:
            q = n.inputs[1].inputs[0] if n.inputs[1].inputs else None
            mul = q.inputs[0].inputs[0] if q is not None and q.op == "QuantizeLinear" and q.inputs[0].inputs else None
            unit = q is not None and isinstance(q.inputs[1], gs.Constant) and float(np.max(read(q.inputs[1]))) == 1.0
            if unit and mul is not None and mul.op == "Mul" and isinstance(mul.inputs[1], gs.Constant):
                out[n.inputs[0].name] = np.asarray(read(mul.inputs[1]), np.float32)
    return out
