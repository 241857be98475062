"""Weight clipping per output channel and block, before MatMulNBits packing.

W [K, N] is cut along K into blocks of `block_size` as MatMulNBits cuts it. With a ratio
ρ[n, b] in (0, 1] per output channel n and block b:
  symmetric : W[k, n] -> clip(W[k, n], -ρ·max_b|W[:, n]|, ρ·max_b|W[:, n]|)
  asymmetric: W[k, n] -> clip(W[k, n], ρ·min_b W[:, n], ρ·max_b W[:, n])   (min_b <= 0 <= max_b kept)
The packer then derives a smaller block scale from the clipped block, trading the error of the
few clipped weights for a finer grid on the rest (search/clip.py picks ρ by output error).
"""
from __future__ import annotations

import numpy as np


def block_view(w: np.ndarray, block: int) -> np.ndarray:
    """W [K, N] -> [k_blocks, block, N] (K zero-padded to a multiple of block)."""
    k, n = w.shape
    kb = -(-k // block)
    return np.pad(w, ((0, kb * block - k), (0, 0))).reshape(kb, block, n)


def clip_blocks(w: np.ndarray, ratio: np.ndarray | float, block: int, symmetric: bool = True) -> np.ndarray:
    """W clipped per block and output channel; `ratio`: a scalar or [k_blocks, N]."""
    k, n = w.shape
    wb = block_view(w.astype(np.float32), block)
    r = np.broadcast_to(np.asarray(ratio, np.float32), (wb.shape[0], n))[:, None, :]
    if symmetric:
        hi = np.abs(wb).max(axis=1, keepdims=True) * r
        lo = -hi
    else:
        hi = np.maximum(wb.max(axis=1, keepdims=True), 0) * r
        lo = np.minimum(wb.min(axis=1, keepdims=True), 0) * r
    return np.clip(wb, lo, hi).reshape(-1, n)[:k]
