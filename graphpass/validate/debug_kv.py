"""Debug of a candidate with an int8 KV cache against a float-cache reference.

The merged graph (debug_graph.py) feeds both graphs from one set of inputs, but the reference's
past is float and the candidate's int8. The candidate therefore gets its own past, derived inside
the merged graph from the reference's float past C with the candidate's own multipliers m = 1/s
(passes/kv_cache.cache_multipliers):
    q/past = QuantizeLinear(C · m, 1, 0)        int8, what the candidate would have stored
so both graphs see the same cache, each in its own dtype. With an empty past (prefill windows, as
`graphpass data` builds them) this is an empty int8 tensor; either way the keys and values of the
window's own tokens are rounded to int8 inside the candidate before its attention reads them, so
the cache's rounding is part of what is compared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphpass.errors import GraphpassError
from graphpass.graph.gs_io import import_graph
from graphpass.graph.io import input_specs


def recast_past(ref: onnx.ModelProto, cand: onnx.ModelProto, cand_dir: Path) -> dict[str, np.ndarray]:
    """Input name -> m [1, kv, 1, d] for every candidate input that is int8 where the reference's
    is float (an int8 KV cache); a one-line error for any other dtype mismatch."""
    ref_types = {s.name: s.dtype for s in input_specs(ref)}
    odd = {s.name: s.dtype for s in input_specs(cand) if s.name in ref_types and s.dtype != ref_types[s.name]}
    if not odd:
        return {}
    from graphpass.passes.kv_cache import cache_multipliers

    mult = cache_multipliers(import_graph(cand, str(cand_dir)))
    for name, dt in odd.items():
        if dt != np.int8 or ref_types[name] != np.float32 or name not in mult:
            raise GraphpassError(f"input '{name}' is {dt} in the candidate and {ref_types[name]} in the "
                                 "reference, and is not an int8 KV cache graphpass wrote")
    return {name: mult[name] for name in odd}


def add_recast(g: onnx.GraphProto, mult: dict[str, np.ndarray], prefix: str) -> None:
    """<prefix><name> = QuantizeLinear(<name> · m, 1, 0) for each past input of `mult` (module
    docstring): the candidate's own past input, under its merged-graph name."""
    if not mult:
        return
    one, zero = prefix + "kv8/one", prefix + "kv8/zero"
    g.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), one),
                          numpy_helper.from_array(np.array(0, np.int8), zero)])
    for name, m in mult.items():
        p = prefix + name
        g.initializer.append(numpy_helper.from_array(np.asarray(m, np.float32), p + "/kv8/mult"))
        g.node.extend([helper.make_node("Mul", [name, p + "/kv8/mult"], [p + "/kv8/scaled"], name=p + "/kv8/Mul"),
                       helper.make_node("QuantizeLinear", [p + "/kv8/scaled", one, zero], [p], name=p + "/kv8/Quantize")])
        g.value_info.append(helper.make_tensor_value_info(p, TensorProto.INT8, None))


def describe(mult: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> str:
    """What debug compares on an int8-cache candidate, in one line ('' when there is none)."""
    if not mult:
        return ""
    lengths = sorted({int(data[n].shape[2]) for n in mult if n in data and data[n].ndim == 4})
    past = ("an empty past (prefill windows): each window's keys and values are rounded to int8 "
            "inside the candidate before its attention reads them" if lengths == [0] else
            f"the data's float past (length {', '.join(map(str, lengths))}) rounded to int8 with the "
            "candidate's own scales, plus the window's own keys and values rounded the same way")
    return f"int8 KV cache in the candidate ({len(mult)} past inputs): compared over {past}"
