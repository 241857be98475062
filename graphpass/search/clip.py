"""Clipping ratio per output channel and block, picked by the error of the block's output.

For a reader W [K, N] with input rows X [R, K] (as the reader sees them, after any fold), block b
(rows k of W in b) and output channel n, each ratio ρ of the grid gives
  err_ρ[b, n] = Σ_r ( X[r, b] · (W[b, n] − Q(clip_ρ(W)) [b, n]) )²
(Q: the MatMulNBits weight of passes/nbits.pack, dequantized; clip_ρ: passes/clip.clip_blocks).
Blocks quantize independently, so the per-(b, n) choice is exactly the weight the packer then sees;
cross terms between blocks are left out (as llm-awq does). ρ = 1 (no clipping) is in the grid.
"""
from __future__ import annotations

import numpy as np

from graphpass.passes.clip import block_view, clip_blocks
from graphpass.passes.nbits import NBitsConfig
from graphpass.search.nbits_alpha import fake_quant_weight_blocks

CLIP_GRID = tuple(np.round(1.0 - np.arange(10) * 0.05, 2))    # 1.0, 0.95, ..., 0.55 (llm-awq: max shrink 0.5)


def search_clip(x: np.ndarray, w: np.ndarray, cfg: NBitsConfig, grid=CLIP_GRID
                ) -> tuple[np.ndarray, float, float]:
    """(ρ [k_blocks, N], summed block error at ρ = 1, at the chosen ρ)."""
    xb = block_view(np.ascontiguousarray(x.T, np.float32), cfg.block_size).transpose(0, 2, 1)   # [kb, R, bs]
    best_err, best = None, None
    first = 0.0
    for rho in grid:
        q = fake_quant_weight_blocks(clip_blocks(w, rho, cfg.block_size, cfg.symmetric), cfg)
        e = block_view(w - q, cfg.block_size)                                                    # [kb, bs, N]
        out = np.matmul(xb, e)                                                                   # [kb, R, N]
        err = np.einsum("brn,brn->bn", out, out)
        if best is None:
            best_err, best, first = err, np.full(err.shape, float(rho), np.float32), float(err.sum())
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best[better] = rho
    return best, first, float(best_err.sum())
