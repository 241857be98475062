"""Per-site (α, threshold) for smoothing followed by the outlier split, scored like the α search.

For a site with sampled rows X [R, C], readers W_k, smoothing scales s_α and the columns
O(α, t) = {j : max|X_j| / s_α,j > t} (calibrated maxima), with X' = X / s_α, W'_k = diag(s_α)·W_k
and m = 1 off O:
  err(α, t) = Σ_k ||X·W_k − X'[:, O]·W'_k[O] − Q_a(X' ⊙ m)·Q_w(W'_k ⊙ m)||² / ||X·W_k||²
(Q_a int8 per row, or two int8 digits on passes.outlier.two_digit_sites; Q_w int8 per output
channel, as in search/alpha.py). Grid: α in GRID times
t in threshold · (1, 2, 4, 8, ∞) (t = ∞: no float column, the token scheme). A lower threshold
never costs accuracy but always costs time, so among the grid points within (1 + slack) of the
smallest error the one with the fewest float columns wins (then the smaller error). With the
top-k / fraction forms O does not depend on t and only α is searched.
"""
from __future__ import annotations

import numpy as np

from graphpass.calibrate.stats import Stats
from graphpass.match.sites import Analysis
from graphpass.passes.digits import fake_quant_digits
from graphpass.passes.outlier import OutlierConfig, outlier_columns, two_digit_sites
from graphpass.passes.smooth import site_scales
from graphpass.search.alpha import GRID, fake_quant_act, fake_quant_weight, search_sites

MULTIPLES = (1.0, 2.0, 4.0, 8.0, float("inf"))


def split_error(x: np.ndarray, weights: list[np.ndarray], ys: list[np.ndarray], s: np.ndarray,
                o: np.ndarray, digits: bool = False) -> float:
    """Relative output error of the split on smoothed X, summed over the readers (`digits`: the
    int8 activations in two digits, passes/digits.py)."""
    xs = (x / s).astype(np.float32)
    m = np.ones(xs.shape[1], np.float32)
    m[o] = 0.0
    xq = (fake_quant_digits(xs * m) if digits else fake_quant_act(xs * m, "token")).astype(np.float32)
    err = 0.0
    for w, y in zip(weights, ys):
        ws = (w * s[:, None]).astype(np.float32)
        yq = xq @ fake_quant_weight(ws * m[:, None]) + xs[:, o] @ ws[o]
        err += float(((y - yq) ** 2).sum() / max(float((y ** 2).sum()), 1e-30))
    return err


def joint_grid(cfg: OutlierConfig, alphas=GRID) -> list[tuple[float, float]]:
    ts = [cfg.threshold * k for k in MULTIPLES] if cfg.by_threshold else [cfg.threshold]
    return [(float(a), t) for a in alphas for t in ts]


def search_alpha_outlier(an: Analysis, stats: Stats, cfg: OutlierConfig, alphas=GRID, progress: bool = True
                         ) -> tuple[dict[str, tuple[float, float]], list[dict]]:
    """(α, threshold) per site name, and a row per site with every grid point's error and |O|."""
    grid = joint_grid(cfg, alphas)
    digits = two_digit_sites(an, cfg)
    counts: dict[tuple[str, int], int] = {}
    seen: dict[tuple, float] = {}   # thresholds that give the same O at one α share one score

    def error(site, x, weights, ys, i, w_max):
        alpha, t = grid[int(i)]
        s = site_scales(site, an.consts, stats.absmax(site.act).astype(np.float64), alpha, w_max).astype(np.float32)
        o = outlier_columns(stats.absmax(site.act) / s, cfg, t)
        counts[(site.name, int(i))] = int(o.size)
        key = (site.name, alpha, o.tobytes())
        if key not in seen:
            seen[key] = split_error(x, weights, ys, s, o, site.name in digits)
        return seen[key]

    _, rows = search_sites(an, stats, error, "alpha + outlier threshold search",
                           np.arange(len(grid), dtype=np.float64), progress)
    chosen, out = {}, []
    for row in rows:
        errs = {int(i): e for i, e in row["errors"].items()}
        best = min(errs.values())
        ok = [i for i, e in errs.items() if e <= best * (1 + cfg.slack)]
        pick = min(ok, key=lambda i: (counts[(row["site"], i)], errs[i]))
        chosen[row["site"]] = grid[pick]
        out.append({"site": row["site"], "alpha": grid[pick][0], "threshold": grid[pick][1],
                    "float_columns": counts[(row["site"], pick)], "error": errs[pick], "best_error": best})
    return chosen, out
