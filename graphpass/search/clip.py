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

from graphpass.passes.clip import block_view
from graphpass.passes.nbits import NBitsConfig
from graphpass.search.blockq import quantize_blocks

CLIP_GRID = tuple(np.round(1.0 - np.arange(10) * 0.05, 2))    # 1.0, 0.95, ..., 0.55 (llm-awq: max shrink 0.5)


CHUNK = 256      # output channels searched at a time (in cache; each buffer < 1 MB at block 128)


def search_clip(x: np.ndarray, w: np.ndarray, cfg: NBitsConfig, grid=CLIP_GRID
                ) -> tuple[np.ndarray, float, float]:
    """(ρ [k_blocks, N], summed block error at ρ = 1, at the chosen ρ)."""
    xb = block_view(np.ascontiguousarray(x.T, np.float32), cfg.block_size).transpose(0, 2, 1)   # [kb, R, bs]
    parts = [_search_columns(xb, w[:, j:j + CHUNK], cfg, grid) for j in range(0, w.shape[1], CHUNK)]
    best = np.concatenate([p[0] for p in parts], axis=1)
    return best, float(sum(p[1] for p in parts)), float(sum(p[2] for p in parts))


def _search_columns(xb: np.ndarray, w: np.ndarray, cfg: NBitsConfig, grid) -> tuple[np.ndarray, float, float]:
    """search_clip on some output channels: each ρ clips, rounds and scores one scratch buffer
    (clip_blocks' bounds, quantize_blocks' rounding: the weight the packer will see)."""
    wb = block_view(w.astype(np.float32), cfg.block_size)                                       # [kb, bs, n]
    mx, mn = wb.max(axis=1, keepdims=True), wb.min(axis=1, keepdims=True)
    top, bottom = (np.maximum(mx, -mn), None) if cfg.symmetric else (np.maximum(mx, 0), np.minimum(mn, 0))
    buf, out = np.empty_like(wb), np.empty((wb.shape[0], xb.shape[1], wb.shape[2]), np.float32)
    best_err, best, first = None, None, 0.0
    for rho in grid:
        r = np.float32(rho)
        hi = top * r
        lo = -hi if cfg.symmetric else bottom * r
        np.clip(wb, lo, hi, out=buf)             # max and min of the clipped blocks follow:
        quantize_blocks(buf, cfg.bits, cfg.symmetric, buf, np.minimum(mx, hi), np.maximum(mn, lo))
        np.subtract(wb, buf, out=buf)                                                           # the rounding error
        np.matmul(xb, buf, out=out)                                                             # [kb, R, n]
        err = np.einsum("brn,brn->bn", out, out)
        if best is None:
            best_err, best, first = err, np.full(err.shape, float(rho), np.float32), float(err.sum())
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best[better] = rho
    return best, first, float(best_err.sum())
