"""Per-site alpha search: pick α from a grid by the error of the site's quantized outputs.

For a site with sampled input rows X [R, C] (from calibration) and readers W_k [C, N_k]:
  err(α) = Σ_k ||X·W_k − Q_a(X / s_α)·Q_w(diag(s_α)·W_k)||² / ||X·W_k||²
where Q_w is symmetric int8 per output channel and Q_a the activation quantizer of the chosen
scheme: per row (token), per tensor over the sampled rows (dynamic), or per tensor over the
calibrated range [min_j / s_j, max_j / s_j] (static). The grid includes α = 0 (no smoothing).
"""
from __future__ import annotations

import numpy as np

from graphpass.passes.qforms import static_qparams
from graphpass.passes.smooth import site_scales
from graphpass.match.sites import Analysis, Site
from graphpass.calibrate.stats import Stats

GRID = tuple(np.round(np.arange(0.0, 1.0001, 0.1), 2))


def fake_quant_act(x: np.ndarray, scheme: str, lo: float = 0.0, hi: float = 0.0) -> np.ndarray:
    if scheme == "token":
        r = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30) / 127.0
        return np.clip(np.rint(x / r), -127, 127) * r
    if scheme == "dynamic":
        lo, hi = float(x.min()), float(x.max())
    scale, zp = static_qparams(lo, hi)
    q = np.clip(np.rint(x / scale) + float(zp), 0, 255)
    return (q - float(zp)) * scale


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel, dequantized (float32, as the search needs no int8).
    The same ufuncs as clip(rint(w / scale), -127, 127) * scale, in one scratch array."""
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-30) / np.float32(127)
    q = np.divide(w, scale)
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return np.multiply(q, scale, out=q)


def weights_absmax(weights: list[np.ndarray]) -> np.ndarray:
    """max_k max_o |W_k[j, o]| from the readers' weights in hand (smooth.weight_absmax reads
    them from the graph again)."""
    return np.max([np.abs(w).max(axis=1) for w in weights], axis=0)


def site_error(site: Site, an: Analysis, x: np.ndarray, weights: list[np.ndarray], ys: list[np.ndarray],
               stats: Stats, alpha: float, scheme: str, w_max: np.ndarray | None = None) -> float:
    """err(α) of the module docstring; `w_max`: max|W| per input channel over every output
    channel (default: over the `weights` given)."""
    act = stats.absmax(site.act).astype(np.float64)
    w_max = weights_absmax(weights) if w_max is None else w_max
    s = site_scales(site, an.consts, act, alpha, w_max).astype(np.float32)
    lo = float((stats.min[site.act] / s).min())
    hi = float((stats.max[site.act] / s).max())
    xq = fake_quant_act(x / s, scheme, lo, hi).astype(np.float32)
    err = 0.0
    for w, y in zip(weights, ys):
        yq = xq @ fake_quant_weight(w * s[:, None])
        err += float(((y - yq) ** 2).sum() / max(float((y ** 2).sum()), 1e-30))
    return err


def search_alpha(an: Analysis, stats: Stats, scheme: str, grid=GRID, progress: bool = True
                 ) -> tuple[dict[str, float], list[dict]]:
    """α per site (keyed by site name) and a row per site with the error at each grid point."""
    return search_sites(an, stats, lambda site, x, weights, ys, a, w_max: site_error(
        site, an, x, weights, ys, stats, a, scheme, w_max), "alpha search", grid, progress)


def search_sites(an: Analysis, stats: Stats, error, desc: str, grid=GRID, progress: bool = True
                 ) -> tuple[dict[str, float], list[dict]]:
    """The grid search over every site with sampled rows: `error(site, x, weights, ys, α, w_max)`
    scores one α (the quantizer it models is the caller's; w_max = weights_absmax(weights), found
    once per site); the smallest error wins."""
    from graphpass.progress import bar
    from graphpass.search.blas import heap_scratch, one_blas_thread
    from graphpass.search.pool import ordered_map

    def prepare(site):
        x = stats.rows.get(site.act)
        if x is None or not len(x):
            return None
        weights = [lin.weight(an.consts).astype(np.float32) for lin in site.consumers]   # read here: one thread
        return site, x.astype(np.float32), weights

    def work(site, x, weights) -> list[float]:
        w_max = weights_absmax(weights)
        ys = [x @ w for w in weights]
        return [error(site, x, weights, ys, float(a), w_max) for a in grid]

    chosen, rows = {}, []
    with one_blas_thread(), heap_scratch():     # many small products: BLAS threads only synchronize (search/blas.py)
        for site, errs in ordered_map(prepare, work, bar(an.sites, desc, "site", enabled=progress)):
            best = int(np.argmin(errs))
            chosen[site.name] = float(grid[best])
            rows.append({"site": site.name, "alpha": float(grid[best]), "errors": dict(zip(map(float, grid), errs))})
    return chosen, rows
