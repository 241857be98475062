"""Key-channel smoothing for an int8 KV cache: a per-(kv head, channel) factor σ moved from the
keys into the queries through the q and k projection weights (SmoothQuant's fold, on q·kᵀ).

    W_k[:, h·d + c] /= σ[h, c]        W_q[:, j·d + c] *= σ[j // rep, c]   (every query head j of group h)

so q_j · k_h = Σ_c (q_jc σ_hc)(k_hc / σ_hc) is unchanged in exact arithmetic. RoPE sits between the
projection and the cache: it rotates channel pairs (c, c + d/2) by a position's angle, and
rope(k ⊘ σ) = rope(k) ⊘ σ only when σ[h, c] = σ[h, c + d/2]; the factors are therefore built from
the pair-norm statistic (calibrate/kv.py), which is equal on both channels of a pair, and that
equality is checked before any weight is touched.

    σ[h, c] = (A[h, c] / max_c' A[h, c'])^α

with A the key cache statistic: the smoothed keys have A' = A / σ, flat within each head at α = 1.
The query is not quantized here (the attention MatMuls run in float), so moving the range into
it costs nothing; what it buys is that one scale per head (or per tensor) rounds the keys about as
finely as one per channel. With per-channel cache scales it changes nothing: round(K/σ / (s/σ)) =
round(K/s).
"""
from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.errors import GraphpassError
from graphpass.graph.decode import is_key
from graphpass.graph.gs_io import read, set_values

LAYER = re.compile(r"layers\.(\d+)/(?:self_attn|attn)/(q_proj|k_proj|qkv_proj)/MatMul$")


def key_factors(absmax: dict[str, np.ndarray], alpha: float = 1.0) -> dict[str, np.ndarray]:
    """Key past name -> σ [kv, d] (module docstring); rotate-half pairs share their factor."""
    if not 0.0 <= alpha <= 1.0:
        raise GraphpassError(f"key smoothing strength must lie in [0, 1], got {alpha}")
    out = {}
    for name, a in absmax.items():
        if not is_key(name):
            continue
        half = a.shape[1] // 2
        if a.shape[1] % 2 or not np.allclose(a[:, :half], a[:, half:], rtol=1e-6, atol=0.0):
            raise GraphpassError(f"'{name}': key statistic differs on RoPE channel pairs (c, c + d/2); "
                                 "a smoothing factor would not commute with the rotation")
        top = np.maximum(a.max(axis=1, keepdims=True), 1e-30)
        out[name] = np.where(a > 0, (a / top) ** alpha, 1.0).astype(np.float32)
    return out


def _projections(g: gs.Graph) -> dict[int, dict[str, gs.Node]]:
    layers: dict[int, dict[str, gs.Node]] = {}
    for n in g.nodes:
        m = LAYER.search(n.name or "")
        if n.op == "MatMul" and m and isinstance(n.inputs[1], gs.Constant):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = n
    return layers


def _bias(node: gs.Node) -> bool:
    return any(r.op == "Add" and any(isinstance(t, gs.Constant) for t in r.inputs) for r in node.outputs[0].outputs)


def smooth_keys(g: gs.Graph, factors: dict[str, np.ndarray]) -> tuple[int, list[str]]:
    """Fold σ of `factors` (past_key_values.{i}.key -> [kv, d]) into layer i's q / k projection
    weights (separate q_proj and k_proj, or a packed qkv_proj [q | k | v]). Returns (layers
    smoothed, reasons of the rest). Weights are rebound, never edited in place."""
    layers, done, why = _projections(g), 0, []
    for name, sig in factors.items():
        m = re.search(r"(\d+)", name.rsplit(".", 1)[0] if "." in name else name)
        i = int(m.group(1)) if m else -1
        proj = layers.get(i, {})
        kv, d = sig.shape
        if any(_bias(n) for n in proj.values()):
            why.append(f"layer {i}: a q/k projection has a bias (not folded)")
            continue
        if "qkv_proj" in proj:
            w = proj["qkv_proj"].inputs[1]
            heads = (read(w).shape[-1] - 2 * kv * d) // d
            q_cols = np.repeat(sig, max(heads // kv, 1), axis=0).reshape(-1)   # query head j -> group j // rep
            cols = np.concatenate([q_cols, 1.0 / sig.reshape(-1), np.ones(kv * d, np.float32)])
            if heads % kv or read(w).shape[-1] != cols.size:
                why.append(f"layer {i}: packed qkv_proj has {read(w).shape[-1]} columns, not (h + 2·{kv})·{d}")
                continue
            set_values(w, (read(w) * cols).astype(np.float32))
        elif "q_proj" in proj and "k_proj" in proj:
            wq, wk = proj["q_proj"].inputs[1], proj["k_proj"].inputs[1]
            heads = read(wq).shape[-1] // d
            q_cols, k_cols = np.repeat(sig, max(heads // kv, 1), axis=0).reshape(-1), sig.reshape(-1)
            if heads % kv or read(wq).shape[-1] != q_cols.size or read(wk).shape[-1] != k_cols.size:
                why.append(f"layer {i}: q/k projection widths are not h·{d} and {kv}·{d}")
                continue
            if len(wq.outputs) > 1 or len(wk.outputs) > 1:
                why.append(f"layer {i}: a q/k weight is shared with another node")
                continue
            set_values(wq, (read(wq) * q_cols).astype(np.float32))
            set_values(wk, (read(wk) / k_cols).astype(np.float32))
        else:
            why.append(f"layer {i}: no q_proj/k_proj (or qkv_proj) MatMul with a constant weight")
            continue
        done += 1
    return done, why
