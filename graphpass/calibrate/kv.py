"""Calibration of a KV cache: per (kv head, channel) |max| of every present.* over prefill and
decode steps, from which an int8 cache takes its static scales.

Each window runs as generation does (calibrate/collect.py's recipe): a prefill of the window,
then K one-token decode steps against the returned cache, fed the text that follows the window.
For a value cache V [b, kv, T, d] the statistic is
    A[h, c] = max over batches, slots t of |V[b, h, t, c]|
Keys are cached after RoPE, which rotates channel pairs (c, c + d/2) by a position-dependent
angle, so |K[c]| at a position never seen in calibration can exceed every calibrated |K[c]|. The
pair's norm is what rotation keeps, so keys take
    A[h, c] = A[h, c + d/2] = max over b, t of sqrt(K[b,h,t,c]² + K[b,h,t,c+d/2]²)
a bound that holds at every position (rotate-half pairing, as Llama and the genai builder use).
The int8 scale is s[h, c] = A[h, c] / 127 (symmetric, zero point 0): the key or value at slot t
is stored as round(C / s): within [-127, 127] where |C| stays within the calibrated bound, else
saturated to [-128, 127] (QuantizeLinear, and GroupQueryAttention's kernel).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graphpass.calibrate.collect import _inputs_only, feeds, with_next_tokens
from graphpass.calibrate.kv_stat import update_cache_absmax
from graphpass.errors import GraphpassError
from graphpass.graph.decode import Cache, advance, is_key, past_layout, step_feeds   # noqa: F401 (is_key: re-exported)
from graphpass.graph.io import externalized, load_model
from graphpass.graph.runtime import make_session
from graphpass.progress import bar

QMAX = 127.0


def cache_absmax(model_path: str | os.PathLike, data, decode_steps: int = 4, batch_size: int = 1,
                 threads: int = 2, progress: bool = True) -> dict[str, np.ndarray]:
    """Past input name -> A [kv, d] float32 (see the module docstring) for the float-cache graph
    at `model_path`; `data`: dict of arrays or a CalibrationDataReader, as for `calibrate`."""
    folder = Path(model_path).parent
    with externalized(model_path) as p:
        graph_only = load_model(p, load_weights=False)
        layout = past_layout(graph_only, folder)
        if layout is None:
            raise GraphpassError(f"{Path(model_path).name}: takes no past_key_values.* input "
                                 "(an int8 KV cache needs a with-past graph)")
        bad = [q.name for q in layout.past if q.dtype != np.float32]
        if bad:
            raise GraphpassError(f"past input '{bad[0]}' is already {layout.past[0].dtype}: "
                                 "the KV cache is calibrated on a float-cache graph")
        check = _inputs_only(graph_only)
        del graph_only
        sess = make_session(p, threads)
        absmax: dict[str, np.ndarray] = {}
        want = layout.present_names
        pairs = with_next_tokens(feeds(data, batch_size, check), decode_steps)
        for b, nxt in bar(pairs, "calibrate kv cache", "batch", enabled=progress):
            f = b
            vals = dict(zip(want, sess.run(want, f)))
            update_cache_absmax(absmax, layout, vals)
            for t in range(0 if nxt is None else nxt.shape[1]):   # decode steps on the cache
                cache = advance(layout, f, vals)
                cache = Cache(cache.mask[:nxt.shape[0]], {k: v[:nxt.shape[0]] for k, v in cache.past.items()})
                f = step_feeds(layout, cache, nxt[:, t:t + 1])
                vals = dict(zip(want, sess.run(want, f)))
                update_cache_absmax(absmax, layout, vals)
    return absmax


def cache_scales(absmax: dict[str, np.ndarray], per: str = "channel") -> dict[str, np.ndarray]:
    """Past name -> int8 scale [kv, d]: A / 127 per (head, channel), or per head (`per="head"`:
    the head's max over its channels, repeated); a channel never seen non-zero gets scale 1."""
    if per not in ("channel", "head"):
        raise GraphpassError(f"kv-cache scales are per 'channel' or per 'head', got '{per}'")
    out = {}
    for name, a in absmax.items():
        a = np.broadcast_to(a.max(axis=1, keepdims=True), a.shape) if per == "head" else a
        out[name] = np.where(a > 0, a / QMAX, 1.0).astype(np.float32)
    return out
