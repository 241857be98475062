"""An int8 KV cache inside com.microsoft GroupQueryAttention (its own quantized-cache mode).

onnxruntime >= 1.23's GroupQueryAttention takes past_key / past_value as int8 (type T_CACHE) with
attributes k_quant_type = v_quant_type = "PER_CHANNEL", kv_cache_bit_width = 8 and float scale
inputs k_scale, v_scale (inputs 12, 13) of shape [1, kv, 1, d]. Its CPU kernel then stores the
new token's key K_t (after rotary) as
    present[:, h, t, c] = clip(round(K_t[h, c] / s[h, c]), -128, 127)       (int8)
concatenated after the int8 past, and reads the cache back as present · s inside attention
(checked against numpy in tests/test_kv_cache.py). So the rewrite is a change of attributes,
inputs and the declared I/O dtypes; the cache layout [b, kv, T, d] stays.

Scales are per (kv head, channel): the kernel's finest granularity, and what keys need (a few
channels of each head carry outliers 10-100x the rest; one scale per head would round the others
to a handful of levels).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

K_SCALE, V_SCALE = 12, 13      # GroupQueryAttention input slots (onnxruntime 1.32 schema)


def _reason(node: gs.Node, inputs: dict, outputs: set, scales: dict) -> str | None:
    """Why `node` cannot take the int8 cache, or None."""
    if len(node.inputs) < 5 or len(node.outputs) < 3:
        return "no past/present cache inputs and outputs"
    pk, pv = node.inputs[3], node.inputs[4]
    if pk.name not in inputs or pv.name not in inputs:
        return "past_key / past_value are not graph inputs"
    if node.outputs[1].name not in outputs or node.outputs[2].name not in outputs:
        return "present_key / present_value are not graph outputs"
    if pk.name not in scales or pv.name not in scales:
        return f"no calibrated scale for '{pk.name}' / '{pv.name}'"
    if str(node.attrs.get("k_quant_type", "NONE")) != "NONE":
        return "the cache is already quantized"
    if any(len(node.inputs) > i and node.inputs[i].name for i in (K_SCALE, V_SCALE)):
        return "k_scale / v_scale inputs already set"
    if pk.dtype not in (None, np.float32) or pv.dtype not in (None, np.float32):
        return f"past cache is {pk.dtype}, not float32"
    return None


def quantize_gqa_cache(g: gs.Graph, scales: dict[str, np.ndarray]) -> tuple[int, list[str]]:
    """Every GroupQueryAttention whose cache is graph I/O -> int8 cache (module docstring).
    `scales`: past input name -> s [kv, d]. Returns (nodes rewritten, reasons of the others)."""
    inputs = {t.name: t for t in g.inputs}
    outputs = {t.name for t in g.outputs}
    done, why = 0, []
    for node in [n for n in g.nodes if n.op == "GroupQueryAttention"]:
        reason = _reason(node, inputs, outputs, scales)
        if reason:
            why.append(f"{node.name}: {reason}")
            continue
        pk, pv = node.inputs[3], node.inputs[4]
        while len(node.inputs) <= V_SCALE:
            node.inputs.append(gs.Variable.empty())
        for slot, t in ((K_SCALE, pk), (V_SCALE, pv)):
            s = np.asarray(scales[t.name], np.float32)
            node.inputs[slot] = gs.Constant(f"{t.name}.kv_scale", s.reshape(1, *s.shape[:1], 1, s.shape[-1]))
        node.attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        for t in (pk, pv, node.outputs[1], node.outputs[2]):
            t.dtype = np.int8
        done += 1
    return done, why
