"""An 8-bit KV cache for with-past graphs, in whichever attention form the graph has.

    quantize_kv_cache(g, scales) -> KVReport

`scales`: past input name -> s [kv, d] (calibrate/kv.py: |max| / 127 per kv head and channel).
GroupQueryAttention nodes get the kernel's own int8 cache (kv_gqa.py); decomposed attention gets
Concat in int8 with the scales folded into the query and the output (kv_concat.py). Either way
past.* and present.* become int8 graph I/O: the cache takes 1/4 of the float cache's bytes at any
length (scales are constants in the graph, not per slot).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.errors import GraphpassError
from graphpass.passes.kv_concat import quantize_concat_cache
from graphpass.passes.kv_gqa import quantize_gqa_cache

KV_CACHE_TYPES = ("int8",)


@dataclass
class KVReport:
    gqa: int = 0                    # GroupQueryAttention nodes with the kernel's int8 cache
    concat: int = 0                 # decomposed caches (key or value) in int8
    folded: int = 0                 # of those, with the scale folded into query / output
    skipped: list[str] = field(default_factory=list)

    def format(self) -> str:
        parts = []
        if self.gqa:
            parts.append(f"{self.gqa} GroupQueryAttention caches in int8 (per-channel scales)")
        if self.concat:
            parts.append(f"{self.concat} decomposed caches in int8, {self.folded} with scales folded "
                         f"into query / output")
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
    rep.concat, rep.folded, why2 = quantize_concat_cache(g, left, fold)
    rep.skipped = why + why2 if not (rep.gqa or rep.concat) else why2
    if not (rep.gqa or rep.concat):
        raise GraphpassError("--kv-cache: no KV cache could be quantized (" +
                             (rep.skipped[0] if rep.skipped else "no past input calibrated") + ")")
    g.cleanup().toposort()
    return rep
