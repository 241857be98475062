"""GPTQ (Frantar et al. 2022): rounding that compensates each column's error in the columns after it.

A reader Y = X·W, W [K, N], rounded to MatMulNBits' grid (blocks of `block_size` along K, one
scale per block and output channel n, symmetric or with a zero point). With the Hessian of the
output error, H = 2/R · X^T·X [K, K] (calibration rows, after any AWQ scale: X' = X / s gives
H' = diag(1/s)·H·diag(1/s)), dampened H += λ·mean(diag H)·I, and U the upper Cholesky factor of
H^-1 (H^-1 = U^T·U), input channels k = 0, 1, .. K-1 are rounded in turn, all N channels at once:
  q_k = Q(w_k),   e_k = (w_k − q_k) / U[k, k],   w_j −= e_k · U[k, j]   for j > k
(the exact OBQ update of the not-yet-rounded weights, lazily applied in batches of 128 columns,
or of one block when blocks are longer, and within a batch in sub-batches of 16: a row gathers the
corrections of its sub-batch's earlier rows in one product, and each finished sub-batch corrects the
rest of its batch in one matrix product, instead of a rank-one update of the batch per row).
At the first column of each block the block's scale is fixed from the weights as they are then
(already updated), as the reference implementation's groupsize path does, and by the packer's rule:
  symmetric : scale = ρ·v / −2^(bits-1), v the block's value of largest |v|
  asymmetric: scale = ρ·(max(hi, 0) − min(lo, 0)) / (2^bits − 1), zero = rint(−ρ·min(lo, 0) / scale)
with ρ [k_blocks, N] the clip ratios (search/clip.py; 1 = no clip). The codes and scales chosen
here are what MatMulNBits stores (passes/nbits_codes.pack_codes), bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphpass.errors import GraphpassError

DAMP = 0.1           # λ: the fraction of mean(diag H) added to the diagonal (the reference's percdamp is 0.01)
LAZY = 128           # columns per lazy batch update
SUB = 16             # rows per inner batch of a lazy batch (search/gptq._round_rows)


@dataclass(frozen=True)
class GptqConfig:
    """act_order: round input channels by decreasing diag(H), on static block grids (gptq_round);
    damp: λ, the fraction of mean(diag H) added to its diagonal."""
    act_order: bool = True
    damp: float = DAMP

    def __post_init__(self):
        if not 0.0 < self.damp <= 10.0:
            raise GraphpassError(f"GPTQ damping must lie in (0, 10] (a fraction of mean diag H), got {self.damp}")


@dataclass(frozen=True)
class Rounded:
    """GPTQ's choice for W [K, N]: codes u [K, N] (0 .. 2^bits − 1), scales [N, k_blocks] float32,
    zero points [N, k_blocks] (None: symmetric, 2^(bits-1) implied), W_q = (u − z)·scale [K, N];
    h_error = tr(D^T·H·D), D = W − W_q (dead input channels, whose H rows are 0, left out)."""
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    dequantized: np.ndarray
    h_error: float = float("nan")


def hessian(gram: np.ndarray, rows: int, s: np.ndarray | None = None) -> np.ndarray:
    """H = 2/R · diag(1/s)·G·diag(1/s) (float64) from G = Σ X^T·X over R rows of the unscaled X."""
    h = np.asarray(gram, np.float64) * (2.0 / max(int(rows), 1))
    if s is not None:
        inv = 1.0 / np.asarray(s, np.float64)
        h = h * inv[:, None] * inv[None, :]
    return h


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray, float]:
    """(U, dead, λ̄): U upper with (H + λ̄·I)^-1 = U^T·U, λ̄ = λ·mean(diag H) (x10 per failed
    factorization); dead input channels (diag 0, never seen) get diag 1 and their weights are
    zeroed by the caller, as in the reference."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    flip = h[::-1, ::-1]          # J·H·J, J the reversal
    for _ in range(6):            # not positive definite in float64 (collinear rows): damp harder
        try:
            m_inv = cholesky_inverse(flip + lam * np.eye(len(h)))
            break
        except np.linalg.LinAlgError:
            lam *= 10.0
    else:
        raise np.linalg.LinAlgError("GPTQ: the Hessian stays singular after damping")
    # J·H·J = M·M^T  =>  H^-1 = J·M^-T·M^-1·J = U^T·U with U = J·M^-1·J, upper with a positive diagonal:
    # the upper Cholesky factor of H^-1, from one factorization that also gives M^-1.
    return np.ascontiguousarray(m_inv[::-1, ::-1]), dead, lam


TRI_BASE = 128       # cholesky_inverse: blocks up to this size are factored and inverted directly


def cholesky_inverse(a: np.ndarray) -> np.ndarray:
    """M^-1 for A = M·M^T (M the lower Cholesky factor), by halves: with M11 = chol(A11),
    M21 = A21·M11^-T and M22 = chol(A22 − M21·M21^T),
      M^-1 = [[M11^-1, 0], [−M22^-1·M21·M11^-1, M22^-1]].
    Matrix products only (~7K³/6 flops): inverse_factor at K = 1,536 in float64 on one core takes
    0.11-0.15 s, where LAPACK's factorization and a general inverse (LU, then K solves) took 0.47 s;
    the same values to float64 rounding. Raises LinAlgError when A is not positive definite."""
    k = len(a)
    if k <= TRI_BASE:
        return np.tril(np.linalg.inv(np.linalg.cholesky(a)))
    half = k // 2
    i11 = cholesky_inverse(a[:half, :half])
    m21 = a[half:, :half] @ i11.T
    i22 = cholesky_inverse(a[half:, half:] - m21 @ m21.T)
    out = np.zeros_like(a)
    out[:half, :half], out[half:, half:] = i11, i22
    out[half:, :half] = -(i22 @ m21) @ i11
    return out


def _block_grid(wb: np.ndarray, ratio: np.ndarray, levels: np.ndarray, symmetric: bool):
    """(scale [N] float32, 1/scale [N], zero point [N] or None) of one block wb [b, N], by the packer's
    rule; levels [N]: 2^bits per output channel (float64, so the arithmetic is that of a scalar)."""
    if symmetric:
        v = np.take_along_axis(wb, np.abs(wb).argmax(axis=0)[None], 0)[0] * ratio
        scale, zero = (v / -(levels / 2)).astype(np.float32), None
    else:
        lo = np.minimum(wb.min(axis=0), 0) * ratio
        scale = ((np.maximum(wb.max(axis=0), 0) * ratio - lo) / (levels - 1)).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros(scale.shape, np.float32), where=scale != 0)
    if not symmetric:
        zero = np.clip(np.rint(-lo * inv), 0, levels - 1).astype(np.float32)
    return scale, inv, zero


def gptq_round(w: np.ndarray, h: np.ndarray, bits: int | np.ndarray = 4, block_size: int = 128,
               symmetric: bool = True, ratio: np.ndarray | None = None, damp: float = DAMP,
               act_order: bool = False) -> Rounded:
    """W [K, N] rounded by GPTQ against the Hessian h [K, K] on MatMulNBits' block grid; `bits`: one
    count, or one per output channel (layers of one input in 4 and 8 bits share H: one call).
    Rows of W (input channels) are rounded in turn; the working copy is float32, as the reference's.
    act_order: static groups (every block's grid fixed from W before any rounding), then the rows
    rounded in order of decreasing diag(H), so the channels that matter most are rounded while the
    most channels remain to absorb their error; blocks stay contiguous in K (no g_idx)."""
    k, n = w.shape
    kb = -(-k // block_size)
    ratio = np.ones((kb, n)) if ratio is None else np.broadcast_to(np.asarray(ratio, np.float64), (kb, n))
    levels = np.broadcast_to(2.0 ** np.asarray(bits, np.float64), (n,))
    lo, hi = ((-levels / 2, levels / 2 - 1) if symmetric else (np.zeros(n), levels - 1))
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    w0 = np.array(w, np.float32)
    w0[np.diag(h) <= 0] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    u_mat, _, lam = inverse_factor(h[np.ix_(order, order)] if act_order else h, damp)
    u32 = u_mat.astype(np.float32)
    grids = [_block_grid(w0[b * block_size:(b + 1) * block_size], ratio[b], levels, symmetric)
             for b in range(kb)] if act_order else [None] * kb
    u_rows, q_rows, e2 = _round_rows(w0[order], u32, order, grids, ratio, levels, lo, hi, block_size, symmetric)
    scales = np.stack([g[0] for g in grids], 1)                               # [N, k_blocks]
    zeros = None if symmetric else np.stack([g[2] for g in grids], 1)
    codes, deq = np.empty((k, n), np.uint8), np.empty((k, n), np.float32)
    codes[order] = u_rows - lo if symmetric else u_rows                       # symmetric: stored with -lo added
    deq[order] = q_rows
    # D = U^T·E (E the rows of e_k) and U·(H + λ̄·I)·U^T = I, so tr(D^T·(H + λ̄·I)·D) = ||E||²:
    # GPTQ's own error needs no product with H
    d2 = float(np.einsum("kn,kn->", w0 - deq, w0 - deq, dtype=np.float64))
    return Rounded(codes, scales, None if symmetric else zeros.astype(np.uint8), deq, e2 - lam * d2)


def _round_rows(wk: np.ndarray, u32: np.ndarray, order: np.ndarray, grids: list, ratio, levels, lo, hi,
                block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """GPTQ's loop over the rows of wk [K, N] (in rounding order, updated in place), U = u32:
    (levels u [K, N], dequantized (u − z)·scale [K, N]) in that order, and Σ e_k² (float64). `grids`: each block's
    (scale, 1/scale, zero), None where it is fixed at the block's first row from the updated rows.
    Updates are lazy on two levels: a row gathers the corrections of the earlier rows of its
    sub-batch (one product of <= SUB terms), a finished sub-batch corrects the rest of its lazy
    batch, a finished lazy batch every row after it (matrix products): the OBQ update
    w_j −= e_k·U[k, j] for every j > k, without a rank-one update of the batch per row."""
    k, n = wk.shape
    lazy = block_size * max(1, LAZY // block_size)      # a block never straddles two lazy batches
    sub = math.gcd(SUB, block_size)                     # a block starts a sub-batch: its rows are up to date
    u_rows, q_rows, err = np.empty((k, n), np.float32), np.empty((k, n), np.float32), np.empty((lazy, n), np.float32)
    u_cols = np.ascontiguousarray(u32.T)                # U[a:i, i] as a contiguous row
    diag, blocks, e2 = list(np.diag(u32)), (order // block_size).tolist(), 0.0
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        for a in range(i1, i2, sub):
            a2 = min(a + sub, i2)
            for i in range(a, a2):
                b = blocks[i]
                if grids[b] is None:                    # dynamic grid: fixed at the block's first row
                    grids[b] = _block_grid(wk[i:i + block_size], ratio[b], levels, symmetric)
                scale, inv, zero = grids[b]
                wi = wk[i] if i == a else wk[i] - u_cols[i, a:i] @ err[a - i1:i - i1]
                u, q, e = u_rows[i], q_rows[i], err[i - i1]   # ufuncs into the rows: no clip() wrapper per row
                np.rint(np.multiply(wi, inv, out=u), out=u)
                if not symmetric:
                    u += zero
                np.minimum(np.maximum(u, lo, out=u), hi, out=u)
                if symmetric:
                    np.multiply(u, scale, out=q)
                else:
                    np.multiply(np.subtract(u, zero, out=q), scale, out=q)
                np.subtract(wi, q, out=e)
                e /= diag[i]
            if a2 < i2:
                wk[a2:i2] -= u32[a:a2, a2:i2].T @ err[a - i1:a2 - i1]
        wk[i2:] -= u32[i1:i2, i2:].T @ err[:i2 - i1]
        e2 += float(np.einsum("kn,kn->", err[:i2 - i1], err[:i2 - i1], dtype=np.float64))
    return u_rows, q_rows, e2
