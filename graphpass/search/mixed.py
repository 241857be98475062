"""Mixed precision under a 4-bit body: which linear layers to keep in 8 bits.

Each layer W [K, N] (not the LM head, which --head-bits sets) is scored on its sampled
calibration rows X [R, K] by the relative output error of its 4-bit weight,
  e = ||X·W − X·Q4(W)||² / ||X·W||²     (Q4: MatMulNBits' grid, round to nearest)
and the `count` layers of largest e are kept in 8 bits (MatMulNBits bits = 8, the same block).
An 8-bit layer costs K'·N/2 bytes more than its 4-bit form, K' = K padded to whole blocks (576
in blocks of 128: 640); its scales are the same. The score is
measured before AWQ and GPTQ (which then run on each layer's own grid); it is the layer's own
error, not its share of the model's output KL, which it only approximates.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from graphpass.calibrate.stats import Stats
from graphpass.match.sites import Analysis
from graphpass.passes.nbits import NBitsConfig, _skip_reason, layer_config
from graphpass.search.blas import one_blas_thread
from graphpass.search.nbits_alpha import fake_quant_weight_blocks

ROWS = 256     # sampled rows scored per layer (evenly thinned)


def rank_layers(an: Analysis, stats: Stats, cfg: NBitsConfig) -> list[tuple[str, float, int]]:
    """(layer, relative 4-bit output error, extra bytes in 8 bits), largest error first."""
    c, out = an.consts, []
    with one_blas_thread():
        for lin in an.linears:
            lcfg = layer_config(lin, c, cfg)
            x = stats.rows.get(lin.act)
            if lcfg is None or lcfg.bits != 4 or _skip_reason(lin, c, cfg) or x is None or not len(x):
                continue
            x = x[::-(-len(x) // ROWS)].astype(np.float32)
            w = lin.weight(c).astype(np.float32)
            y = x @ w
            e = float(((y - x @ fake_quant_weight_blocks(w, lcfg)) ** 2).sum() / max(float((y ** 2).sum()), 1e-30))
            out.append((lin.name, e, -(-w.shape[0] // lcfg.block_size) * lcfg.block_size * w.shape[1] // 2))
    return sorted(out, key=lambda r: -r[1])


def keep_8bit(an: Analysis, stats: Stats, cfg: NBitsConfig, count: int) -> tuple[NBitsConfig, list]:
    """`cfg` with the `count` layers of largest 4-bit error in keep8, and the ranking used."""
    ranked = rank_layers(an, stats, cfg)
    return replace(cfg, keep8=tuple(name for name, _, _ in ranked[:count])), ranked
