"""AWQ scale search per site, scored on the MatMulNBits arithmetic the graph will run.

For a site with sampled input rows X [R, C] (calibration) and readers W_k [C, N_k], a candidate
per-channel scale s gives the error
  err(s) = Σ_k ||X·W_k − A(X / s)·Q(diag(s)·W_k)||² / ||X·W_k||²
(Q: the MatMulNBits weight from onnxruntime's packer, dequantized; A: the int8 per-block activation
of accuracy_level 4, else the identity; search/blockq.grid_scorers), each reader Q on the
grid it is packed on (passes/nbits.layer_config: an LM head in --head-bits; a float head not
scored, its output is exact for any s). Candidates, with m_j = mean|X_j| over every calibration
row (Stats.mean_abs, no second pass) and w_j = max_k max_o |W_k[j, o]|:
  awq  : s = m^r                  r in 0, 0.05, ..., 0.95   (r = 0 is plain round-to-nearest)
  duo  : s = m^r / w^(1-r)        r in 0.05, ..., 0.95
  smooth (only with smoothing on): s = (max|X|)^α / w^(1-α), α over search/alpha.GRID, or the one α given.
With grouped-query attention the statistics are reduced over the query heads sharing a kv channel
(passes/smooth.site_scales), so the chosen s folds exactly into the value projection.
The smallest error wins; r = 0 is a candidate, so the choice is never worse than RTN on the rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphpass.calibrate.stats import Stats
from graphpass.match.sites import Analysis, Site
from graphpass.passes.nbits import NBitsConfig, layer_config
from graphpass.passes.smooth import site_scales, weight_absmax
from graphpass.search.alpha import GRID as ALPHA_GRID
from graphpass.search.blas import heap_scratch, one_blas_thread
from graphpass.search.blockq import grid_scorers

MAX_COLUMNS = 128                                           # output channels scored per reader
MAX_ROWS = 128                                              # sampled rows scored per site
RATIOS = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2))    # 20 points, as llm-awq's n_grid


@dataclass(frozen=True)
class Candidate:
    form: str          # "awq", "duo" or "smooth"
    r: float           # the exponent (r or α)

    @property
    def label(self) -> str:
        return f"{self.form} {self.r:.2f}"


def candidates(smoothing: float | str | None) -> list[Candidate]:
    """The grid: AWQ forms always; SmoothQuant's α too when smoothing is on (a number or 'auto')."""
    out = [Candidate("awq", float(r)) for r in RATIOS]
    out += [Candidate("duo", float(r)) for r in RATIOS if r > 0]
    if smoothing == "auto":
        out += [Candidate("smooth", float(a)) for a in ALPHA_GRID if a > 0]
    elif smoothing is not None and float(smoothing) > 0:
        out.append(Candidate("smooth", float(smoothing)))
    return out


def candidate_scales(site: Site, an: Analysis, stats: Stats, cand: Candidate,
                     w_max: np.ndarray | None = None) -> np.ndarray:
    """The per-channel s of one candidate (float32, clamped as smoothing scales are, centred on 1)."""
    c = an.consts
    if w_max is None:
        w_max = weight_absmax(site.consumers, c)
    if cand.form == "smooth":
        s = site_scales(site, c, stats.absmax(site.act).astype(np.float64), cand.r, w_max=w_max)
    else:
        m = stats.mean_abs(site.act).astype(np.float64)
        s = site_scales(site, c, m, cand.r, w_max=np.ones_like(m) if cand.form == "awq" else w_max)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def column_subset(w: np.ndarray, max_columns: int, rng: np.random.Generator) -> np.ndarray:
    """W [C, N] on at most max_columns of its output channels (a sorted random subset)."""
    if w.shape[1] <= max_columns:
        return w
    return w[:, np.sort(rng.choice(w.shape[1], max_columns, False))]


@dataclass
class SiteChoice:
    site: str
    choice: Candidate
    scales: np.ndarray
    errors: dict[str, float]

    @property
    def gain(self) -> float:
        """Error of RTN (r = 0) over the chosen error."""
        return self.errors["awq 0.00"] / max(self.errors[self.choice.label], 1e-30)


def search_awq(an: Analysis, stats: Stats, cfg: NBitsConfig, smoothing: float | str | None = None,
               progress: bool = True, max_columns: int = MAX_COLUMNS) -> dict[str, SiteChoice]:
    """The best candidate per site that has sampled rows, keyed by site name.

    At most MAX_ROWS rows are scored; each reader on at most `max_columns` of its output channels (a fixed random subset,
    the same for every candidate): columns quantize independently, so the error summed over a
    subset estimates the full one at a fraction of the cost; s keeps every input channel.
    """
    with one_blas_thread(), heap_scratch():
        return _search(an, stats, cfg, smoothing, progress, max_columns)


def _search(an, stats, cfg, smoothing, progress, max_columns) -> dict[str, SiteChoice]:
    from graphpass.progress import bar
    from graphpass.search.pool import ordered_map

    grid, out, rng = candidates(smoothing), {}, np.random.default_rng(0)

    def prepare(site):          # graph reads and the random column subsets: here, in site order
        x = stats.rows.get(site.act)
        if x is None or not len(x):
            return None
        x = x[::-(-len(x) // MAX_ROWS)].astype(np.float32)             # evenly thinned to <= MAX_ROWS
        weights = [lin.weight(an.consts).astype(np.float32) for lin in site.consumers]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        cfgs = [layer_config(lin, an.consts, cfg) for lin in site.consumers]   # a head in its own bits / float
        return site, x, [column_subset(w, max_columns, rng) for w in weights], w_max, cfgs

    def work(site, x, weights, w_max, cfgs) -> SiteChoice:
        scorers = grid_scorers(x, weights, cfgs)
        errs, scales = {}, {}
        for cand in grid:
            s = candidate_scales(site, an, stats, cand, w_max)
            errs[cand.label] = sum(sc.error(s) for sc in scorers)
            scales[cand.label] = s
        best = min(grid, key=lambda cd: errs[cd.label])
        return SiteChoice(site.name, best, scales[best.label], errs)

    for site, choice in ordered_map(prepare, work, bar(an.sites, "AWQ search", "site", enabled=progress)):
        out[site.name] = choice
    return out
