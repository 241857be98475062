"""Per-site α for SmoothQuant before MatMulNBits, scored on the kernel's own arithmetic.

For a site with sampled input rows X [R, C] and readers W_k [C, N_k], smoothing scales s_α:
  err(α) = Σ_k ||X·W_k − A(X / s_α)·Q(diag(s_α)·W_k)||² / ||X·W_k||²
Q is the MatMulNBits weight (onnxruntime's packer, dequantized: blocks of `block_size` along C).
A is what accuracy_level 4 does to the activation (int8 per row and per block of `block_size`
along C, scale = max|x| / 127); with accuracy_level 0, A is the identity. α = 0 is in the grid.
"""
from __future__ import annotations

import numpy as np

from graphpass.calibrate.stats import Stats
from graphpass.match.sites import Analysis
from graphpass.search.alpha import GRID, search_sites
from graphpass.passes.nbits import NBitsConfig
from graphpass.passes.smooth import site_scales
from graphpass.search.blockq import NBitsScorer, fake_quant_act_blocks, grid_scorers, quantize_blocks  # noqa: F401 (re-exported)


def fake_quant_weight_blocks(w: np.ndarray, cfg: NBitsConfig) -> np.ndarray:
    """W [K, N] through the packer's arithmetic, dequantized, in numpy (no packing: ~2x faster than
    pack + unpack_reference, equal to them but for rounding ties, tested). Per block b, channel n:
      symmetric : s = v / -2^(bits-1), v the block's value of largest |v|;  q = clip(rint(w/s), -2^(bits-1), 2^(bits-1)-1)
      asymmetric: s = (max(hi, 0) - min(lo, 0)) / (2^bits - 1), z = clip(rint(-min(lo, 0)/s));  q = clip(rint(w/s) + z) - z
    """
    from graphpass.passes.clip import block_view

    k, n = w.shape
    wb = block_view(w.astype(np.float32, copy=False), cfg.block_size)     # [k_blocks, block, N], a copy
    return quantize_blocks(wb, cfg.bits, cfg.symmetric, out=wb).reshape(-1, n)[:k]


def site_error_nbits(x: np.ndarray, weights: list[np.ndarray], ys: list[np.ndarray], s: np.ndarray,
                     cfg: NBitsConfig | list[NBitsConfig]) -> float:
    """Σ_k relative error of reader k; `cfg` one config for all readers or one per reader (their
    blocks may differ: --layer-block-size), each group of readers on one grid scored together (the
    activation rounded once per grid)."""
    cfgs = cfg if isinstance(cfg, list) else [cfg] * len(weights)
    return sum(sc.error(s) for sc in grid_scorers(x, weights, cfgs, ys))


def reader_configs(site, an: Analysis, cfg: NBitsConfig) -> list[NBitsConfig]:
    """Each reader's own packing (passes/nbits.layer_config; `cfg` for a reader it leaves float)."""
    from graphpass.passes.nbits import layer_config

    return [layer_config(lin, an.consts, cfg) or cfg for lin in site.consumers]


def search_alpha_nbits(an: Analysis, stats: Stats, cfg: NBitsConfig, grid=GRID, progress: bool = True
                       ) -> tuple[dict[str, float], list[dict]]:
    """α per site (keyed by site name) and a row per site with the error at each grid point."""
    def error(site, x, weights, ys, alpha, w_max):
        act = stats.absmax(site.act).astype(np.float64)
        s = site_scales(site, an.consts, act, alpha, w_max)
        return site_error_nbits(x, weights, ys, s.astype(np.float32), reader_configs(site, an, cfg))

    return search_sites(an, stats, error, "alpha search (MatMulNBits)", grid, progress)


def alpha_search_for(config, search_alpha):
    """The pipeline's α search: on MatMulNBits arithmetic for w8 / w4, else `search_alpha` (W8A8)."""
    from graphpass.passes.nbits import NBITS_SCHEMES, default_config

    if config.scheme == "outlier":   # (α, threshold) per site, on the split's arithmetic
        from graphpass.search.outlier_alpha import search_alpha_outlier
        return lambda an, stats, scheme, progress=True: search_alpha_outlier(an, stats, config.outlier,
                                                                             progress=progress)
    if config.scheme not in NBITS_SCHEMES:
        return search_alpha
    cfg = config.nbits if config.nbits is not None else default_config(config.scheme)
    return lambda an, stats, scheme, progress=True: search_alpha_nbits(an, stats, cfg, progress=progress)
