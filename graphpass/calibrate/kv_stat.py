"""The KV-cache statistic, updated from one run's present.* outputs (calibrate/kv.py explains it):
    values  A[h, c] = max over b, t of |V[b, h, t, c]|
    keys    A[h, c] = A[h, c + d/2] = max over b, t of sqrt(K[b,h,t,c]² + K[b,h,t,c+d/2]²)
Shared by the cache calibration (kv.py) and the activation calibration (collect.py), which can
gather it in the same runs."""
from __future__ import annotations

import numpy as np

from graphpass.graph.decode import PastLayout, is_key


def update_cache_absmax(absmax: dict[str, np.ndarray], layout: PastLayout, vals: dict[str, np.ndarray]) -> None:
    """Merge one run's present.* (`vals`, by output name) into `absmax` (past name -> A [kv, d])."""
    for p in layout.past:
        c = vals[p.present]
        if c.shape[2] == 0:
            continue
        a = (_pair_norm(c) if is_key(p.name) else np.abs(c)).max(axis=(0, 2)).astype(np.float32)
        absmax[p.name] = a if p.name not in absmax else np.maximum(absmax[p.name], a)


def _pair_norm(c: np.ndarray) -> np.ndarray:
    """sqrt(C[..., i]² + C[..., i + d/2]²) written on both channels of each rotate-half pair."""
    half = c.shape[-1] // 2
    r = np.sqrt(np.square(c[..., :half], dtype=np.float32) + np.square(c[..., half:2 * half], dtype=np.float32))
    return np.concatenate([r, r], -1) if c.shape[-1] % 2 == 0 else np.abs(c)
