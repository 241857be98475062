"""GPTQ (Frantar et al. 2022): rounding that compensates each column's error in the columns after it.

A reader Y = X·W, W [K, N], rounded to MatMulNBits' grid (blocks of `block_size` along K, one
scale per block and output channel n, symmetric or with a zero point). With the Hessian of the
output error, H = 2/R · X^T·X [K, K] (calibration rows, after any AWQ scale: X' = X / s gives
H' = diag(1/s)·H·diag(1/s)), dampened H += λ·mean(diag H)·I, and U the upper Cholesky factor of
H^-1 (H^-1 = U^T·U), input channels k = 0, 1, .. K-1 are rounded in turn, all N channels at once:
  q_k = Q(w_k),   e_k = (w_k − q_k) / U[k, k],   w_j −= e_k · U[k, j]   for j > k
(the exact OBQ update of the not-yet-rounded weights, lazily applied in batches of 128 columns,
or of one block when blocks are longer).
At the first column of each block the block's scale is fixed from the weights as they are then
(already updated), as the reference implementation's groupsize path does, and by the packer's rule:
  symmetric : scale = ρ·v / −2^(bits-1), v the block's value of largest |v|
  asymmetric: scale = ρ·(max(hi, 0) − min(lo, 0)) / (2^bits − 1), zero = rint(−ρ·min(lo, 0) / scale)
with ρ [k_blocks, N] the clip ratios (search/clip.py; 1 = no clip). The codes and scales chosen
here are what MatMulNBits stores (passes/nbits_codes.pack_codes), bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMP = 0.1           # λ: the fraction of mean(diag H) added to the diagonal (the reference's percdamp is 0.01)
LAZY = 128           # columns per lazy batch update


@dataclass(frozen=True)
class GptqConfig:
    """act_order: round input channels by decreasing diag(H), on static block grids (gptq_round);
    damp: λ, the fraction of mean(diag H) added to its diagonal."""
    act_order: bool = True
    damp: float = DAMP


@dataclass(frozen=True)
class Rounded:
    """GPTQ's choice for W [K, N]: codes u [K, N] (0 .. 2^bits − 1), scales [N, k_blocks] float32,
    zero points [N, k_blocks] (None: symmetric, 2^(bits-1) implied), W_q = (u − z)·scale [K, N]."""
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    dequantized: np.ndarray


def hessian(gram: np.ndarray, rows: int, s: np.ndarray | None = None) -> np.ndarray:
    """H = 2/R · diag(1/s)·G·diag(1/s) (float64) from G = Σ X^T·X over R rows of the unscaled X."""
    h = np.asarray(gram, np.float64) * (2.0 / max(int(rows), 1))
    if s is not None:
        inv = 1.0 / np.asarray(s, np.float64)
        h = h * inv[:, None] * inv[None, :]
    return h


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper with (H + λ·mean(diag H)·I)^-1 = U^T·U; dead input channels (diag 0,
    never seen) get diag 1 and their weights are zeroed by the caller, as in the reference."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    flip = h[::-1, ::-1]          # J·H·J, J the reversal
    for _ in range(6):            # not positive definite in float64 (collinear rows): damp harder
        try:
            low = np.linalg.cholesky(flip + lam * np.eye(len(h)))
            break
        except np.linalg.LinAlgError:
            lam *= 10.0
    else:
        raise np.linalg.LinAlgError("GPTQ: the Hessian stays singular after damping")
    # J·H·J = M·M^T  =>  H^-1 = J·M^-T·M^-1·J = U^T·U with U = J·M^-1·J, upper with a positive diagonal:
    # the upper Cholesky factor of H^-1, from one factorization and one inverse (was: two and a product).
    m_inv = np.linalg.inv(low)
    return np.ascontiguousarray(m_inv[::-1, ::-1]), dead


def _block_grid(wb: np.ndarray, ratio: np.ndarray, bits: int, symmetric: bool):
    """(scale [N] float32, 1/scale [N], zero point [N] or None) of one block wb [b, N], by the packer's rule."""
    if symmetric:
        v = np.take_along_axis(wb, np.abs(wb).argmax(axis=0)[None], 0)[0] * ratio
        scale, zero = (v / -(2 ** (bits - 1))).astype(np.float32), None
    else:
        qmax = 2 ** bits - 1
        lo = np.minimum(wb.min(axis=0), 0) * ratio
        scale = ((np.maximum(wb.max(axis=0), 0) * ratio - lo) / qmax).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros(scale.shape, np.float32), where=scale != 0)
    if not symmetric:
        zero = np.clip(np.rint(-lo * inv), 0, qmax).astype(np.float32)
    return scale, inv, zero


def gptq_round(w: np.ndarray, h: np.ndarray, bits: int = 4, block_size: int = 128, symmetric: bool = True,
               ratio: np.ndarray | None = None, damp: float = DAMP, act_order: bool = False) -> Rounded:
    """W [K, N] rounded by GPTQ against the Hessian h [K, K] on MatMulNBits' block grid.
    Rows of W (input channels) are rounded in turn; the working copy is float32, as the reference's.
    act_order: static groups (every block's grid fixed from W before any rounding), then the rows
    rounded in order of decreasing diag(H), so the channels that matter most are rounded while the
    most channels remain to absorb their error; blocks stay contiguous in K (no g_idx)."""
    k, n = w.shape
    kb = -(-k // block_size)
    ratio = np.ones((kb, n)) if ratio is None else np.broadcast_to(np.asarray(ratio, np.float64), (kb, n))
    wk = np.array(w, np.float32)
    wk[np.diag(h) <= 0] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    u_mat, _ = inverse_factor(h[np.ix_(order, order)] if act_order else h, damp)
    u32 = u_mat.astype(np.float32)
    grids = [_block_grid(wk[b * block_size:(b + 1) * block_size], ratio[b], bits, symmetric)
             for b in range(kb)] if act_order else [None] * kb
    wk = wk[order]
    codes = np.zeros((k, n), np.uint8)
    deq = np.zeros((k, n), np.float32)
    scales = np.zeros((n, kb), np.float32)
    zeros = None if symmetric else np.zeros((n, kb), np.float32)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    lazy = block_size * max(1, LAZY // block_size)      # a block never straddles two lazy batches
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err = wk[i1:i2].copy(), np.zeros((i2 - i1, n), np.float32)
        hinv1 = u32[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = order[i1 + i]
            b = row // block_size
            if act_order or row % block_size == 0:     # dynamic grid: fixed at the block's first row
                scale, inv, zero = grids[b] or _block_grid(w1[i:i + block_size], ratio[b], bits, symmetric)
                scales[:, b] = scale
                zp = np.float32(0) if symmetric else zero        # codes stored with -lo added when symmetric
                if zeros is not None:
                    zeros[:, b] = zero
            u = np.clip(np.rint(w1[i] * inv) + zp, lo, hi)
            codes[row] = u - lo if symmetric else u
            q = (u - zp) * scale
            deq[row] = q
            e = (w1[i] - q) / hinv1[i, i]
            w1[i + 1:] -= np.outer(hinv1[i, i + 1:], e)
            err[i] = e
        wk[i2:] -= u32[i1:i2, i2:].T @ err
    return Rounded(codes, scales, None if symmetric else zeros.astype(np.uint8), deq)
