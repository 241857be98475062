"""MatMulNBits inputs from codes chosen elsewhere (GPTQ), not re-derived from a float weight.

onnxruntime's packer (passes/nbits.pack) computes each block's scale from the float block and
rounds to nearest; a weight GPTQ rounded would come back with other scales whenever its largest
code is not −2^(bits-1). Here the codes u [K, N] (0 .. 2^bits − 1), scales [N, k_blocks] and
zero points [N, k_blocks] (None: symmetric, 2^(bits-1) implied) are laid out as MatMulNBits reads
them, vectorized: B [N, k_blocks, block·bits/8] (4 bits: two codes per byte, low nibble first; K
padded with codes equal to the zero point, which dequantize to 0), zero points [N, ⌈k_blocks·bits/8⌉].
"""
from __future__ import annotations

import numpy as np

from graphpass.passes.nbits import Packed


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[.., 2m] codes in 0..15 -> [.., m] bytes, element 2j in the low nibble."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def pack_codes(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
               block_size: int) -> Packed:
    k, n = codes.shape
    kb = -(-k // block_size)
    zp = np.full((n, kb), 2 ** (bits - 1), np.uint8) if zero_points is None else zero_points.astype(np.uint8)
    u = np.empty((n, kb * block_size), np.uint8)
    u[:, :k] = codes.T
    u[:, k:] = np.repeat(zp[:, -1:], kb * block_size - k, axis=1)   # padding dequantizes to 0
    u = u.reshape(n, kb, block_size)
    b = u if bits == 8 else _nibbles(u)
    zpk = None
    if zero_points is not None:
        zpk = zp if bits == 8 else _nibbles(np.pad(zp, ((0, 0), (0, kb % 2))))
    return Packed(np.ascontiguousarray(b), np.ascontiguousarray(scales, np.float32), zpk, k, n)
