"""MatMulNBits' weight layout, as data: B [N, k_blocks, blob] uint8 (two 4-bit codes per byte, low
nibble first, or one 8-bit code), scales [N, k_blocks], zero points [N, ceil(k_blocks·bits / 8)]
uint8 or None (then 2^(bits-1)); per block b of channel n, W[k, n] = (q[n, k] − z[n, b]) · s[n, b]."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Packed:
    """One weight in MatMulNBits layout: B [N, k_blocks, blob], scales [N, k_blocks], zp or None."""
    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int


def unpack_reference(p: Packed, bits: int, block_size: int) -> np.ndarray:
    """Numpy dequantization of a Packed weight back to W [K, N] (the reference the tests use)."""
    n, kb, _ = p.b.shape
    if bits == 8:
        q = p.b.reshape(n, kb, block_size).astype(np.float32)
    else:
        lo, hi = p.b & 0x0F, p.b >> 4
        q = np.stack([lo, hi], -1).reshape(n, kb, block_size).astype(np.float32)
    if p.zero_points is None:
        z = np.full((n, kb), 2 ** (bits - 1), np.float32)
    elif bits == 8:
        z = p.zero_points[:, :kb].astype(np.float32)
    else:
        z = np.stack([p.zero_points & 0x0F, p.zero_points >> 4], -1).reshape(n, -1)[:, :kb].astype(np.float32)
    w = (q - z[:, :, None]) * p.scales[:, :, None]
    return w.reshape(n, kb * block_size)[:, :p.k].T
